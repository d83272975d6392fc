"""Stateful property test: allocate/claim/release/restart against a naive reference model.

The model enumerates addresses one by one; the allocator uses interval sets and ordered maps. A
restart closes the SQLite store and rebuilds the allocator from it, so persistence is checked too.
The allocator remembers only KEEP freed addresses past quarantine one by one (2 here, so the fold
happens all the time): the model says exactly which address each allocate takes, fold included.
"""

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from appliance.core.addr import cidr, format_addr, parse_addr
from appliance.core.messages import Allocate, Claim, List, Release
from appliance.store import Store

UNIVERSES = [cidr("10.0.0.0/28"), cidr("fd00::/125")]
DEFAULT = cidr("10.0.0.0/27")  # wider than its range: 10.0.0.16-30 are for static claims
SUBNETS = [None, cidr("10.0.0.0/29"), cidr("fd00::/125")]
GATEWAY = parse_addr("10.0.0.9")
DELAY = 30.0
KEEP = 2  # freed addresses past quarantine remembered one by one, per universe
HANDLES = [f"h{i}" for i in range(5)]
CLAIMABLE = [format_addr(4, 0x0A000000 + i) for i in (0, 1, 2, 9, 14, 15, 16, 20, 31, 40)] + \
            [format_addr(6, (0xFD00 << 112) + i) for i in (0, 1, 5, 7)]


def reserved(subnet, v):
    """Written out here rather than borrowed from the code under test."""
    if subnet.family == 4 and subnet.prefix <= 30:
        return v in (subnet.start, subnet.start + subnet.size - 1)
    if subnet.family == 6 and subnet.prefix <= 126:
        return v == subnet.start
    return False


RANGES = [None, ("10.0.0.3", "10.0.0.12"), ("10.0.0.4", "10.0.0.5")]
REQUEST_GATEWAYS = [None, "10.0.0.1", "10.0.0.14", "10.0.0.20"]


class Model:
    """The obvious, slow allocator."""

    def __init__(self):
        self.held: dict[tuple[int, int], tuple[str, object]] = {}  # addr -> (handle, subnet)
        # Freed addresses remembered one by one, in order of freeing, and when; the folded
        # ones: freed before all of those, order forgotten.
        self.order: list[tuple[int, int]] = []
        self.freed: dict[tuple[int, int], float] = {}
        self.folded: set[tuple[int, int]] = set()
        self.holders: dict[tuple[int, int], set[str]] = {}  # gateway -> handles naming it

    @property
    def reserved(self):
        return {GATEWAY} | set(self.holders)

    def free(self, a, now):
        """a is freed: remembered last; then the least recently freed past quarantine fold
        until KEEP of them are left in its universe."""
        self.order.append(a)
        self.freed[a] = now
        cool = [x for x in self.order if x[0] == a[0] and self.freed[x] + DELAY <= now]
        for x in cool[:max(0, len(cool) - KEEP)]:
            self.order.remove(x)
            del self.freed[x]
            self.folded.add(x)

    def take(self, a):
        """a is used again; returns what puts it back where it was."""
        if a in self.folded:
            self.folded.discard(a)
            return lambda: self.folded.add(a)
        if a in self.freed:
            i, t = self.order.index(a), self.freed.pop(a)
            self.order.remove(a)

            def undo():
                self.order.insert(i, a)
                self.freed[a] = t
            return undo
        return lambda: None

    def restarted(self):
        """The store loads what it remembers one by one in order of (freed_at, address text)."""
        self.order.sort(key=lambda a: (self.freed[a], format_addr(*a)))

    def settle(self, handle, now):
        """A handle keeps the gateways it named while it holds an address of their family."""
        families = {a[0] for a, (h, _) in self.held.items() if h == handle}
        for gw, hs in sorted(self.holders.items()):
            if handle in hs and gw[0] not in families:
                hs.discard(handle)
                if not hs:
                    del self.holders[gw]
                    self.free(gw, now)  # back through quarantine

    def handle_subnet(self, handle, subnet):
        return next((a for a, (h, s) in self.held.items() if h == handle and s == subnet), None)

    def candidate(self, subnet, now, rng=None):
        """The address allocate must pick: never used (lowest), else folded (lowest), else
        the least recently freed of the rest past quarantine; None if there is none."""
        for u in UNIVERSES:
            if not u.overlaps(subnet):
                continue
            fresh, folded, ok = [], [], set()
            for v in range(max(subnet.start, u.start), min(subnet.start + subnet.size, u.end)):
                a = (u.family, v)
                if rng is not None and not rng[0] <= v <= rng[1]:
                    continue
                if a in self.held or a in self.reserved or reserved(subnet, v):
                    continue
                if a in self.folded:
                    folded.append(a)
                elif a not in self.freed:
                    fresh.append(a)
                elif self.freed[a] + DELAY <= now:
                    ok.add(a)
            if fresh or folded:
                return min(fresh or folded)
            for a in self.order:
                if a in ok:
                    return a
        return None

    def claim_outcome(self, handle, a):
        universe = next((u for u in UNIVERSES if a in u), None)
        subnet = DEFAULT if a in DEFAULT else universe
        if subnet is None:
            return "bad_address", None
        holder = self.held.get(a)
        if holder == (handle, subnet):
            return "same", subnet
        if holder is not None:
            return "in_use", subnet
        if self.handle_subnet(handle, subnet) is not None:
            return "conflict", subnet
        if reserved(subnet, a[1]) or a in self.reserved:
            return "reserved", subnet
        return "ok", subnet


class AllocatorMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        import tempfile
        self.dir = tempfile.TemporaryDirectory()
        self.path = f"{self.dir.name}/ipamd.db"
        self.now = 1000.0
        self.model = Model()
        self.store = Store(self.path)
        self.loaded = self.store.open(UNIVERSES, "test")
        self._load()

    def _load(self):
        self.alloc = self.store.load_peer(self.loaded, DEFAULT, DELAY, frozenset([GATEWAY])).allocator
        for freed in self.alloc.freed.values():
            freed.keep = KEEP

    def _apply(self, req):
        reply, rows = self.alloc.apply(req, self.now)
        # As the peer does after every request: gateways whose handles no longer need them.
        for handle in sorted(self.alloc.unsettled):
            rows += self.alloc.settle(handle, self.now)
        self.alloc.unsettled.clear()
        self.store.commit(rows)
        return reply

    def teardown(self):
        self.store.close()
        self.dir.cleanup()

    @rule(seconds=st.sampled_from([0, 0, 1, 10, 29.5, 30, 31, 100]))
    def tick(self, seconds):
        self.now += seconds

    @rule(handle=st.sampled_from(HANDLES), subnet=st.sampled_from(SUBNETS),
          rng=st.sampled_from(RANGES), gateway=st.sampled_from(REQUEST_GATEWAYS))
    def allocate(self, handle, subnet, rng, gateway):
        s = subnet or DEFAULT
        if s.family == 6:
            rng = gateway = None
        rng = rng and (parse_addr(rng[0])[1], min(parse_addr(rng[1])[1], s.start + s.size - 1))
        gw = gateway and parse_addr(gateway)
        if gw is not None and gw not in s:
            gw = None
        reply = self._apply(Allocate(handle, subnet, None, rng, gw and gw[1]))
        have = self.model.handle_subnet(handle, s)
        if have is not None:
            assert reply["ok"] and reply["address"] == s.with_prefix(have[1])
            return
        tentative = None
        if gw is not None and gw != GATEWAY and any(gw in u for u in UNIVERSES):
            holder = self.model.held.get(gw)
            if holder is not None:
                assert reply["error"]["code"] == "in_use", reply
                return
            # Held by this handle if the allocation succeeds; a failed one reserves nothing.
            tentative = (gw, self.model.take(gw), set(self.model.holders.get(gw, ())))
            self.model.holders.setdefault(gw, set()).add(handle)
        best = self.model.candidate(s, self.now, rng)
        if best is None:
            assert not reply["ok"] and reply["error"]["code"] == "exhausted", reply
            if tentative is not None:
                gw, undo, had = tentative
                if had:
                    self.model.holders[gw] = had
                else:
                    del self.model.holders[gw]
                undo()
            self.model.settle(handle, self.now)
            return
        assert reply["ok"], reply
        assert reply["address"] == s.with_prefix(best[1]), (reply, best)
        self.model.held[best] = (handle, s)
        self.model.take(best)

    @rule(handle=st.sampled_from(HANDLES), address=st.sampled_from(CLAIMABLE))
    def claim(self, handle, address):
        a = parse_addr(address)
        reply = self._apply(Claim(handle, *a))
        outcome, subnet = self.model.claim_outcome(handle, a)
        if outcome in ("ok", "same"):
            assert reply["ok"] and reply["address"] == subnet.with_prefix(a[1]), reply
            if outcome == "ok":
                self.model.held[a] = (handle, subnet)
                self.model.take(a)
        else:
            assert not reply["ok"] and reply["error"]["code"] == outcome, (outcome, reply)

    @rule(handle=st.sampled_from(HANDLES), only=st.sampled_from([None, *CLAIMABLE[:6]]))
    def release(self, handle, only):
        key = only and parse_addr(only)
        reply = self._apply(Release(handle, key))
        assert reply["ok"]
        mine = {a for a, (h, _) in self.model.held.items() if h == handle
                and (key is None or a == key)}
        # Freed in the order the reply names them (a handle's addresses have no other order).
        said = [parse_addr(x.split("/")[0]) for x in reply["released"]]
        assert len(said) == len(mine) and set(said) == mine
        for a in said:
            del self.model.held[a]
            if any(a in u for u in UNIVERSES):
                self.model.free(a, self.now)
        self.model.settle(handle, self.now)

    @rule()
    def restart(self):
        self.store.close()
        self.store = Store(self.path)
        self.loaded = self.store.open(None, "test")
        self._load()
        self.model.restarted()

    @invariant()
    def agrees_with_model(self):
        listed = self._apply(List())["allocations"]
        got = {parse_addr(x["address"].split("/")[0]): (x["handle"], cidr(x["subnet"]))
               for x in listed}
        assert len(got) == len(listed)  # at most one handle per address
        assert got == self.model.held

    @invariant()
    def counted_free_space_agrees_with_a_scan(self):
        """free_count counts (bisect, the tail of the freed list); _blocked scans everything.
        They must agree on every universe and on pieces of it."""
        a = self.alloc
        for u in a.rings:
            for lo, hi in ((u.start, u.end), (u.start + 3, u.start + 9), (u.start, u.start + 1),
                           (u.end - 5, u.end)):
                owned = sum(max(0, min(h, hi) - max(l, lo)) for l, h in a._owned[u])
                assert a.free_count(u, lo, hi, self.now) == \
                    owned - len(a._blocked(u, lo, hi, self.now)), (u, lo, hi)
            spans = [(u.start, u.end), (u.start + 3, u.start + 9), (u.end - 5, u.end)]
            assert a.free_counts(u, spans, self.now) == \
                [a.free_count(u, lo, hi, self.now) for lo, hi in spans]
        counts = {}
        for h in a.by_addr.values():
            counts[(h.universe, h.subnet)] = counts.get((h.universe, h.subnet), 0) + 1
        assert dict(a.in_use) == counts

    @invariant()
    def database_agrees(self):
        rows = self.store.conn.execute("SELECT address, handle FROM allocations").fetchall()
        assert {parse_addr(a): h for a, h in rows} == \
            {a: h for a, (h, _) in self.model.held.items()}
        freed = {parse_addr(a) for (a,) in self.store.conn.execute("SELECT address FROM freed")}
        assert freed == set(self.model.freed)
        # The folded addresses, stored as maximal spans: one row per run.
        spans = sorted((parse_addr(lo), parse_addr(hi)) for lo, hi in self.store.conn.execute(
            "SELECT start, last FROM freed_spans"))
        runs = []
        for a in sorted(self.model.folded):
            if runs and runs[-1][1] == (a[0], a[1] - 1):
                runs[-1] = (runs[-1][0], a)
            else:
                runs.append((a, a))
        assert spans == runs
        reserved = {}
        for a, holder in self.store.conn.execute("SELECT address, holder FROM reserved"):
            reserved.setdefault(parse_addr(a), set()).add(holder)
        assert reserved == {gw: {f"handle {h}" for h in hs}
                            for gw, hs in self.model.holders.items()}


AllocatorMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60,
                                              deadline=None)
TestAllocatorModel = AllocatorMachine.TestCase
