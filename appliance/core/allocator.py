"""The allocator of one peer: hands out addresses from the space its ring entries give it.

Pure: fed a request and the time, returns (reply, rows). The shell commits the rows before it
sends the reply. Order of reuse: never-used addresses first, lowest first (they are the least
recently freed of all), then freed addresses once their quarantine is over, least recently freed
first: those folded into spans (freelist.py) before the ones still remembered one by one, and
among the folded, lowest first.
"""
from __future__ import annotations

from bisect import bisect_left, insort
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from .addr import Cidr, format_addr
from .donation import choose_block
from .freelist import FreeList
from .intervals import IntervalSet
from .messages import (Allocate, Claim, DropFreedSpan, ForgetFreed, FreeAddress, FreedSpan,
                       Holder, List, Lookup, PutAllocation,
                       Release, ReleaseIf, ReleaseUnlisted, Reserve, ReserveGateway, Row, Status,
                       TakeSets, Unreserve, error, ok)
from .ring import Ring
from .rings import Rings
from .names import Pattern
from .spare import DISSOLVED, Carve, is_marker, is_spare, parse_marker

CLAIM_BLOCK = 16  # the most a claim takes from another peer's space

# Who keeps a gateway reserved (the `holder` of a reserved row): a handle of this host that
# named it, a peer the owner reserved it for, "kept" (a database from before holders: for
# good), or "releasing" (no holder left here; the owner is still to be told).
KEPT, RELEASING = "kept", "releasing"


def handle_holder(handle: str) -> str:
    return f"handle {handle}"


def peer_holder(peer: str) -> str:
    return f"peer {peer}"


def _named(holder: str, kind: str) -> str | None:
    """The handle (kind "handle") or peer id (kind "peer") a holder names, else None."""
    return holder[len(kind) + 1:] if holder.startswith(kind + " ") else None


@dataclass(slots=True)  # no __dict__: one object fewer per allocation for the GC to walk
class Held:
    family: int
    address: int
    universe: Cidr | None
    subnet: Cidr
    handle: str
    anchor: str | None
    allocated_at: float
    text: str = ""  # the address as text, formatted once: ipaddress formatting is slow

    def __post_init__(self):
        if not self.text:
            self.text = format_addr(self.family, self.address)

    def view(self) -> dict:
        return {"handle": self.handle, "address": f"{self.text}/{self.subnet.prefix}",
                "subnet": str(self.subnet), "anchor": self.anchor,
                "allocated_at": self.allocated_at}


class Allocator:
    def __init__(self, me: str, rings: Rings | list[Ring], default_subnet: Cidr,
                 reuse_delay: float, gateways: frozenset[tuple[int, int]] = frozenset(),
                 static: frozenset[Cidr] = frozenset()):
        self.me = me
        # Read only: the peer's Rings, changed through its RingWriter, which calls
        # ring_changed after every change.
        self.rings = rings if isinstance(rings, Rings) else Rings(rings)
        # Claim-only universes: the default subnet outside the ranges, in the ring so that
        # every static address there has one owner, but never handed out by allocate.
        self.static = frozenset(static)
        # What the carve markers in the rings say (spare.py), worked out by carves_changed
        # whenever a marker may have changed: universe -> its carve, where its marker is, the
        # ranges retired, each tenant's blocks, each handle's leased blocks, the name pools.
        self.carves: dict[Cidr, Carve] = {}
        self.parents: dict[Cidr, Cidr] = {}
        self.retired: frozenset[Cidr] = frozenset()
        self.tenant_blocks: dict[str, list[Cidr]] = {}
        self.lease_blocks: dict[str, list[Cidr]] = {}
        self.pools: dict[Cidr, Pattern] = {}
        self._kinds: dict[Cidr, str] = {}
        self._open: list[Cidr] = []  # what a plain allocate searches: ranges not retired
        self.default_subnet = default_subnet
        self.reuse_delay = reuse_delay
        self.by_addr: dict[tuple[int, int], Held] = {}
        self.by_handle: dict[str, dict[Cidr, Held]] = {}
        # Counted as they change, so that free space and metrics cost a bisect, not a scan of
        # every allocation: held addresses per universe, sorted; how many per subnet.
        self.held_sorted: dict[Cidr, list[int]] = {u: [] for u in self.rings}
        self.in_use: Counter = Counter()  # (universe or None, subnet) -> addresses held
        # Per universe: every address ever used (allocated or freed), and the freed ones in
        # reuse order, in space bounded by the live state rather than by history (freelist.py).
        self.used: dict[Cidr, IntervalSet] = {u: IntervalSet() for u in self.rings}
        self.freed: dict[Cidr, FreeList] = {
            u: FreeList(reuse_delay, base=u.start, size=u.size) for u in self.rings}
        self._owned = {u: r.owned_by(me) for u, r in self.rings.items()}
        self.carves_changed()
        # Never handed out: --gateway addresses and gateways that requests named, each with
        # its holders (see KEPT); reserved while it has any. Those inside a universe also count
        # as used, so the search for fresh space skips them.
        self.reserved: dict[tuple[int, int], set[str]] = {}
        self.reserved_by: dict[str, set[tuple[int, int]]] = {}  # handle -> gateways it holds
        for g in gateways:
            self.load_reserved(g, KEPT)
        # Handles whose reservations may have outlived their reason (a release, a request
        # that reserved): the peer settles them once no request of theirs is in flight.
        self.unsettled: set[str] = set()
        # While a TakeSets runs: how to undo, in memory, each take it made (its rows are simply
        # not returned), so a half-served request leaves nothing behind, not even quarantine.
        self._journal: list | None = None
        # Set by the peer: are there other hosts? Static addresses outside every range have no
        # owner in the ring then, so nothing could stop two hosts claiming one: refuse them.
        self.clustered: Callable[[], bool] = lambda: False

    @property
    def reuse_delay(self) -> float:
        return self._reuse_delay

    @reuse_delay.setter
    def reuse_delay(self, seconds: float) -> None:
        # The free lists measure quarantine too (tests change it on a live allocator).
        self._reuse_delay = seconds
        for fl in getattr(self, "freed", {}).values():
            fl.reuse_delay = seconds

    # -- loading (restart) ---------------------------------------------------------------------

    def load_allocation(self, held: Held) -> None:
        self._hold(held)
        if held.universe is not None:
            self.used[held.universe].add(held.address)

    def load_reserved(self, key: tuple[int, int], holder: str) -> None:
        self.reserved.setdefault(key, set()).add(holder)
        if (handle := _named(holder, "handle")) is not None:
            self.reserved_by.setdefault(handle, set()).add(key)
        u = self.universe_of(key)
        if u is not None:
            self.used[u].add(key[1])
            if self.freed[u].get(key[1]) is not None:
                # Rows say both (a database from before reservations took addresses out of
                # the freed list). A folded one stays as stored: allocate skips reserved ones.
                self.freed[u].take(key[1], {})

    def _mark_used(self, u: Cidr, address: int, rows: list[Row]):
        """Mark address used and not freed (its span rows into rows); return what undoes that
        in memory, and whether it was never used before."""
        used = self.used[u]
        if used.add(address):
            # Never used, so in no part of the freed list (only what was used is freed):
            # nothing to take out there. Most allocations (fresh space goes first).
            return (lambda: used.discard(address)), True
        changes: dict = {}
        undo_freed = self.freed[u].take(address, changes)
        if changes:
            rows += self._span_rows(u, changes)
        return undo_freed or (lambda: None), False  # used it stays: it was before

    def _span_rows(self, u: Cidr, changes: dict) -> list[Row]:
        return [DropFreedSpan(format_addr(u.family, lo)) if hi is None else
                FreedSpan(str(u), format_addr(u.family, lo), format_addr(u.family, hi - 1))
                for lo, hi in sorted(changes.items())]

    def _free(self, u: Cidr, address: int, text: str, now: float, rows: list[Row]) -> None:
        """address is free again, through quarantine; the least recently freed beyond what is
        remembered one by one fold into spans."""
        fl = self.freed[u]
        fl.free(address, now)
        rows.append(FreeAddress(text, str(u), now))
        fl.expire(now)
        changes: dict = {}
        folded = fl.fold(changes)
        if folded:  # only once more than KEEP_FREED are remembered one by one
            rows += [ForgetFreed(format_addr(u.family, a)) for a in folded]
            rows += self._span_rows(u, changes)

    def universe_of(self, key: tuple[int, int]) -> Cidr | None:
        """The innermost universe holding key (a block rather than its block space); spare
        space holds no address."""
        best = None
        for u in self.rings:
            if key in u and not is_spare(u) and (best is None or u.prefix > best.prefix):
                best = u
        return best

    def universes(self) -> list[Cidr]:
        """The ranges and static universes: what addresses can be in."""
        return [u for u in self.rings if not is_spare(u)]

    def add_universe(self, u: Cidr) -> None:
        """A universe made after start (a range added online): RingWriter's Change.create."""
        self.held_sorted[u], self.used[u] = [], IntervalSet()
        self.freed[u] = FreeList(self.reuse_delay, base=u.start, size=u.size)
        self._owned[u] = self.rings[u].owned_by(self.me)

    def drop_universe(self, u: Cidr) -> None:
        """Undo add_universe: the change that made it was refused before any row."""
        for d in (self.held_sorted, self.used, self.freed, self._owned):
            d.pop(u, None)

    def carves_changed(self) -> None:
        """A marker may have changed (RingWriter): work out again what the markers say."""
        carves, parents, dissolved = {}, {}, set()
        for u, ring in self.rings.items():
            for e in ring.entries:
                if is_marker(e.owner):
                    c = parse_marker(e.owner)
                    if c.state == DISSOLVED:
                        dissolved.add(c.universe)
                    else:
                        carves[c.universe], parents[c.universe] = c, u
        self.carves, self.parents = carves, parents
        self.retired = frozenset(u for u, c in carves.items() if c.state == "retired")
        tenants: dict[str, list[Cidr]] = {}
        leases: dict[str, list[Cidr]] = {}
        for u, c in sorted(carves.items(), key=lambda x: (x[0].family, x[0].start)):
            if c.state == "block":
                tenants.setdefault(c.name, []).append(u)
            elif c.state == "lease":
                leases.setdefault(c.name, []).append(u)
        self.tenant_blocks, self.lease_blocks = tenants, leases
        self.pools = {u: Pattern.parse(c.args[1]) for u, c in carves.items()
                      if c.state == "names"}
        kinds = {}
        for u in self.rings:
            if is_spare(u):
                kinds[u] = "spare"
            elif u in carves:
                kinds[u] = carves[u].kind
            elif u in self.static:
                kinds[u] = "static"
            elif u in dissolved:
                kinds[u] = DISSOLVED
            else:
                kinds[u] = "range"  # made before markers, or not heard of whole yet
        self._kinds = kinds
        self._open = [u for u, k in kinds.items() if k == "range" and u not in self.retired]

    def view(self, h: Held) -> dict:
        """An allocation as replies show it: a tenant's names its tenant, a pool's its name."""
        v = h.view()
        # One lookup: a range's universe has a carve too, so every allocation looks.
        c = self.carves.get(h.universe)
        if c is None:
            return v
        if c.state == "names":  # exactly the carves that have a pool (carves_changed)
            v["name"] = self.pools[h.universe].name(h.address - h.universe.start - 1)
            v["pool"] = c.name
        elif c.state == "block":
            v["tenant"] = c.name
            v["gateway"] = format_addr(h.family, block_gateway(h.universe))
        return v

    def _never(self, u: Cidr) -> list[int]:
        """Addresses of a tenant's block never handed out (its network, gateway and broadcast
        addresses): not free, so neither counted in hints nor given as free space, which would
        leave a peer asking for room with a block it cannot use."""
        if self.kind(u) != "block":
            return []
        lo, hi = u.host_bounds()
        return sorted({*range(u.start, lo + 1), *range(hi, u.end)})

    def kind(self, u: Cidr) -> str:
        """spare, range, static, blocks, block, lease, tenant, names or dissolved."""
        return self._kinds.get(u, "range")

    def kind_text(self, u: Cidr) -> str:
        c = self.carves.get(u)
        return {"range": "retired range" if u in self.retired else "range",
                "static": "static space", "blocks": "block space",
                "block": f"tenant {c.name if c else '?'}'s block",
                "lease": f"block leased to {c.name if c else '?'}",
                "tenant": f"tenant {c.name if c else '?'}'s key",
                "names": f"name pool {c.name if c else '?'}"}.get(self.kind(u), self.kind(u))

    def parent_of(self, u: Cidr) -> Cidr | None:
        return self.parents.get(u)

    def allocatable(self, u: Cidr) -> bool:
        """Does anything ever hold an address of u (so free hints matter)?"""
        return self.kind(u) in ("range", "static", "block", "names")

    def candidates(self, subnet: Cidr, tenant: str | None = None) -> list[Cidr]:
        """The universes an allocate in subnet (or for tenant) searches."""
        if tenant is not None:
            return list(self.tenant_blocks.get(tenant, ()))
        if subnet in self.pools:
            return [subnet]
        return [u for u in self._open if u.overlaps(subnet)]

    def claimable(self, u: Cidr, subnet: Cidr, tenant: str | None,
                  address: int | None = None) -> str | None:
        """Why an address of u may not be claimed so, or None."""
        k = self.kind(u)
        if k == "block" and address == block_gateway(u):
            return f"it is the gateway of {self.kind_text(u)} {u}"
        if k == "names" and address is not None and \
                not u.start < address <= u.start + self.pools[u].size:
            return f"it is not a name of {self.kind_text(u)} ({self.carves[u].args[1]})"
        if k in ("range", "static") or k == "names" and subnet == u or \
                k == "block" and self.carves[u].name == tenant:
            return None
        if k == "block" and tenant is None:
            return f"it lies in {self.kind_text(u)} {u}: claim it for the tenant"
        return f"it lies in {self.kind_text(u)} {u}"

    def load_freed(self, rows: list[tuple[int, int, float]]) -> None:
        """The freed rows, (family, address, freed_at) in order of freed_at, each into the
        innermost universe holding it (the rows do not name it). One outside every universe
        is left out: no allocate can reach it."""
        into: dict[Cidr, list[tuple[int, float]]] = {}
        # CIDRs nest or are apart, so a universe with none inside it is the innermost one for
        # every address it holds: rows there (the rule; per family, as a dual-stack host
        # frees both) need no search. Worked out only for the universes rows fall in.
        leaves: dict[Cidr, bool] = {}
        last: dict[int, Cidr] = {}
        for family, address, freed_at in rows:
            u = last.get(family)
            if u is None or (family, address) not in u:
                u = self.universe_of((family, address))
                if u is None:
                    continue
                if u not in leaves:
                    leaves[u] = not any(w != u and w.family == u.family and u.start <= w.start
                                        and w.end <= u.end for w in self.rings)
                if leaves[u]:
                    last[family] = u
                else:
                    last.pop(family, None)
            into.setdefault(u, []).append((address, freed_at))
        for u, got in into.items():
            self._load_freed(u, got)

    def _load_freed(self, universe: Cidr, rows: list[tuple[int, float]]) -> None:
        self.used[universe].add_all(a for a, _ in rows)
        family = universe.family
        self.freed[universe].load(  # a --gateway freed before stays reserved
            [r for r in rows if (family, r[0]) not in self.reserved] if self.reserved else rows)

    def held_and_free(self):
        """(held, where) for each held address the freed list has too (a freed row or a
        freed span): a database edited by hand or copied from elsewhere. Allocate would hand
        them out again; the store refuses to start with them (each is caught later, at its
        reuse, only as a core bug)."""
        for u, fl in self.freed.items():
            # Whichever side is smaller is walked: the freed rows (a quarantine's worth at a
            # high rate) or every held address, whatever universe its row names.
            if fl.tracked() <= len(self.by_addr):
                for address, _ in fl.items():
                    held = self.by_addr.get((u.family, address))
                    if held is not None:
                        yield held, "table freed"
            else:
                for key, held in self.by_addr.items():
                    if key in u and fl.get(key[1]) is not None:
                        yield held, "table freed"
            hs = self.held_sorted[u]
            for lo, hi in fl.folded.intervals():
                for address in hs[bisect_left(hs, lo):bisect_left(hs, hi)]:
                    yield (self.by_addr[(u.family, address)],
                           f"a span of table freed_spans ({u.addr(lo)}-{u.addr(hi - 1)})")

    def misplaced(self):
        """Held addresses outside the universe their row names: a database edited by hand or
        copied from elsewhere. A release would free one into a list that cannot hold it; the
        store refuses to start with them."""
        for held in self.by_addr.values():
            if held.universe is not None and (held.family, held.address) not in held.universe:
                yield held

    def load_freed_span(self, universe: Cidr, lo: int, hi: int) -> None:
        """[lo, hi) freed once and free, less recently than every address load_freed gives."""
        self.used[universe].add_range(lo, hi)
        self.freed[universe].add_folded(lo, hi)

    # -- requests ------------------------------------------------------------------------------

    def apply(self, req, now: float) -> tuple[dict, list[Row]]:
        kind = type(req)  # `is`: cheaper than isinstance, and no request type has subclasses
        if kind is Allocate:
            return self._allocate(req, now)
        if kind is Release:
            return self._release(req, now)
        if kind is Claim:
            return self._claim(req, now)
        if kind is TakeSets:
            reply, rows, _ = self.take_sets(req, now)
            return reply, rows
        if kind is ReleaseIf:
            return self._release_if(req, now)
        if kind is ReleaseUnlisted:
            return self._release_unlisted(req, now)
        if isinstance(req, Lookup):
            held = self.by_handle.get(req.handle)
            if not held:
                return error("not_found", f"no address is held by handle {req.handle!r}"), []
            return ok(handle=req.handle, addresses=[self.view(h) for h in held.values()]), []
        if isinstance(req, List):
            return ok(allocations=[self.view(h) for h in self.by_addr.values()]), []
        if isinstance(req, Holder):
            h = self.by_addr.get((req.family, req.address))
            return ok(handle=None if h is None else h.handle), []
        if isinstance(req, Status):
            return ok(**self.status(now)), []
        raise TypeError(f"not a request: {req!r}")  # a bug in the caller, not bad input

    def _allocate(self, req: Allocate, now: float) -> tuple[dict, list[Row]]:
        if req.tenant is not None:
            subnets = self.tenant_blocks.get(req.tenant, [])
            if not subnets:
                return error("no_tenant", f"no tenant {req.tenant} with blocks is known "
                             "here"), []
            if req.subnet is not None:  # one of its blocks (a Docker network's pool)
                if req.subnet not in subnets:
                    return error("bad_subnet", f"{req.subnet} is not a block of tenant "
                                 f"{req.tenant} ({', '.join(map(str, subnets))})"), []
                subnets = [req.subnet]
        else:
            subnets = [req.subnet or self.default_subnet]
        held = self.by_handle.get(req.handle)
        if held:
            for subnet in subnets:
                if subnet in held:
                    return ok(**self.view(held[subnet])), []
        if req.tenant is None:
            bad = self._bad_subnet(subnets[0])
            if bad is not None:
                return bad, []
        subnet = subnets[0]
        rows: list[Row] = []
        undo_gateway = None
        if req.gateway is not None:
            err, undo_gateway = self._reserve_gateway((subnet.family, req.gateway), req.handle,
                                                      rows)
            if err is not None:
                return err, []
        for subnet in subnets:
            lo, hi = req.range if req.range is not None else (subnet.start, subnet.end - 1)
            if req.tenant is not None:
                lo = max(lo, block_gateway(subnet) + 1)  # its first host address: the gateway
            elif subnet in self.pools:  # only the pool's names: name i is start + 1 + i
                lo, hi = max(lo, subnet.start + 1), min(hi, subnet.start + self.pools[subnet].size)
            found = self._find(subnet, lo, hi, now, req.tenant)
            if found is not None:
                u, address = found
                reply, take = self._take(Held(u.family, address, u, subnet, req.handle,
                                              req.anchor, now))
                if undo_gateway is not None and self._journal is not None:
                    self._journal.append(undo_gateway)
                return reply, rows + take
        if undo_gateway is not None:
            undo_gateway()  # a request that fails reserves nothing
        if req.tenant is not None:
            return error("exhausted", f"no free address in tenant {req.tenant}'s blocks "
                         f"({', '.join(map(str, subnets))}) on this peer"), []
        where = f"subnet {subnet}" if req.range is None else \
            f"{subnet.addr(lo)}-{subnet.addr(hi)} of subnet {subnet}"
        retired = [u for u in self.universes() if u.overlaps(subnet) and u in self.retired]
        if retired and not self.candidates(subnet):
            return error("retired", f"no new allocations in {where}: range "
                         f"{', '.join(map(str, retired))} is retired "
                         "(ipamd range unretire to resume)"), []
        return error("exhausted", f"no free address in {where} on this peer"), []

    def _bad_subnet(self, subnet: Cidr) -> dict | None:
        """A request's subnet is the default one or lies inside a range: anything else (a
        /0, a subnet straddling a range) would hand out or record addresses no range gives."""
        # Identity first: nearly every request names the default subnet, and == is a Python
        # call (with the one-dict reply in _take, 9% of an allocation's core time, measured
        # in process).
        if subnet is self.default_subnet or subnet == self.default_subnet or \
                any(u.contains_cidr(subnet) for u in self.universes()):
            return None
        return error("bad_subnet", f"subnet {subnet} is neither the default subnet "
                     f"{self.default_subnet} nor inside an allocation range "
                     f"({', '.join(map(str, self.universes()))})")

    def can_allocate(self, subnet: Cidr, rng: tuple[int, int], now: float) -> bool:
        """Would an allocate from [first, last] of subnet succeed now? Changes nothing."""
        return self._find(subnet, rng[0], rng[1], now) is not None

    def _find(self, subnet: Cidr, first: int, last: int, now: float,
              tenant: str | None = None) -> tuple[Cidr, int] | None:
        """The address allocate would take from [first, last] of subnet, and its universe."""
        for u in self.candidates(subnet, tenant):
            if u.overlaps(subnet):
                bounds = self._bounds(u, subnet, first, last + 1)
                found = self._fresh(u, bounds)
                if found is None:
                    found = self._reusable(u, bounds, now)
                if found is not None:
                    return u, found
        return None

    def _reserve_gateway(self, key: tuple[int, int], handle: str, rows: list[Row]):
        """Reserve a gateway a request names, held by its handle; return (error, undo)."""
        u = self.universe_of(key)
        if u is None:
            return None, None  # outside every range: never handed out anyway
        owner = self.rings[u].owner_of(key[1])
        if owner == self.me:
            holder = self.by_addr.get(key)
            if holder is not None:
                return error("in_use", f"gateway {_fmt(key)} is held by handle "
                             f"{holder.handle!r}"), None
        elif not self._held_here(key):
            # Its owner must keep it out of use: the peer asks it to (ReserveGateway).
            return error("not_owned", f"gateway {_fmt(key)} is owned by peer {owner}, which "
                         "has not reserved it yet"), None
        return None, self._add_holder(key, u, handle_holder(handle), "gateway", rows)

    def _held_here(self, key: tuple[int, int]) -> bool:
        """Reserved for this host by the gateway's owner: a holder here keeps it so (a
        "releasing" one is on its way out, so a new holder asks the owner again)."""
        return any(h != RELEASING for h in self.reserved.get(key, ()))

    def _add_holder(self, key: tuple[int, int], u: Cidr, holder: str, note: str,
                    rows: list[Row]):
        """Add a holder of reserved key; return what undoes it (None if it was there)."""
        holders = self.reserved.setdefault(key, set())
        if holder in holders:
            return None
        holders.add(holder)
        handle = _named(holder, "handle")
        if handle is not None:
            self.reserved_by.setdefault(handle, set()).add(key)
            self.unsettled.add(handle)
        undo_used, _ = self._mark_used(u, key[1], rows)
        rows.append(Reserve(_fmt(key), holder, str(u), note))

        def undo():
            holders.discard(holder)
            if not holders:
                del self.reserved[key]
            if handle is not None:
                self.reserved_by[handle].discard(key)
                if not self.reserved_by[handle]:
                    del self.reserved_by[handle]
            undo_used()
        return undo

    def need_for(self, req, reply: dict):
        """What req lacks that a peer may give: space to allocate from, a claimed address's
        block, or a gateway's reservation by its owner. None when peers cannot help."""
        code = reply["error"]["code"]
        if code == "exhausted" and isinstance(req, Allocate) or \
                code == "not_owned" and isinstance(req, Claim):
            return req
        if code == "not_owned" and isinstance(req, Allocate) and req.gateway is not None:
            subnet = req.subnet or self.default_subnet
            return ReserveGateway(subnet.family, req.gateway, subnet, req.handle)
        return None

    def reserve_remote(self, key: tuple[int, int], handle: str, owner: str) -> list[Row]:
        """A gateway its owner has reserved for this host: held here by handle (and so never
        handed out here either, should its space come here)."""
        rows: list[Row] = []
        u = self.universe_of(key)
        self._add_holder(key, u, handle_holder(handle), f"gateway, reserved by {owner}", rows)
        if RELEASING in self.reserved[key]:
            rows += self._drop_holder(key, RELEASING, 0.0)  # still held: nothing is freed
        return rows

    def reserve_owned(self, key: tuple[int, int], peer: str) -> tuple[dict | None, list[Row]]:
        """Reserve a gateway this peer owns for another peer that asked: (error, rows)."""
        rows: list[Row] = []
        u = self.universe_of(key)  # the caller made sure this peer owns key
        holder = self.by_addr.get(key)
        if holder is not None:
            return error("in_use", f"gateway {_fmt(key)} is held by handle {holder.handle!r} "
                         f"on peer {self.me}"), []
        self._add_holder(key, u, peer_holder(peer), "gateway", rows)
        return None, rows

    def settle(self, handle: str, now: float) -> list[Row]:
        """Drop the handle's reservations of gateways it no longer needs: it holds no address
        of that family any more (released, or its request failed)."""
        families = {h.family for h in self.by_handle.get(handle, {}).values()}
        rows: list[Row] = []
        for key in sorted(self.reserved_by.get(handle, ())):
            if key[0] not in families:
                rows += self._drop_holder(key, handle_holder(handle), now)
        return rows

    def drop_peer(self, key: tuple[int, int], peer: str, now: float) -> list[Row]:
        """A peer no longer needs the gateway this one reserved for it (or it was removed)."""
        if peer_holder(peer) not in self.reserved.get(key, ()):
            return []
        return self._drop_holder(key, peer_holder(peer), now)

    def released_remotely(self, key: tuple[int, int], now: float) -> list[Row]:
        """The owner says it no longer reserves key for this host (or this host owns it
        now): forget the "releasing"."""
        if self.reserved.get(key) != {RELEASING}:
            return []  # a holder came back meanwhile: it was asked for again
        return self._drop_holder(key, RELEASING, now)

    def maybe_reserved(self, key: tuple[int, int]) -> list[Row]:
        """The owner was asked to reserve key for this host and its answer never came: it may
        have reserved it, so it is told to drop it (a no-op if it had not)."""
        u = self.universe_of(key)
        if u is None or key in self.reserved or key in self.by_addr or \
                self.rings[u].owner_of(key[1]) == self.me:
            # Ours meanwhile (a claim nearby brought its block, free, so never reserved
            # there), perhaps handed out already: nobody else can be keeping it for us.
            return []
        rows: list[Row] = []
        self._add_holder(key, u, RELEASING, "gateway, owner to be told", rows)
        return rows

    def releasing(self) -> list[tuple[int, int]]:
        return sorted(k for k, h in self.reserved.items() if h == {RELEASING})

    def held_remotely(self) -> list[tuple[int, int]]:
        """Gateways held here by handles and owned by another peer: reserved there for us."""
        out = []
        for key, holders in self.reserved.items():
            u = self.universe_of(key)
            if u is not None and self.rings[u].owner_of(key[1]) != self.me and \
                    any(_named(h, "handle") is not None for h in holders):
                out.append(key)
        return sorted(out)

    def peer_holders(self) -> dict[str, list[tuple[int, int]]]:
        out: dict[str, list[tuple[int, int]]] = {}
        for key, holders in self.reserved.items():
            for h in holders:
                if (peer := _named(h, "peer")) is not None:
                    out.setdefault(peer, []).append(key)
        return out

    def reservations_in(self, u: Cidr, lo: int, hi: int) -> list:
        """(universe, address, holders) of the gateways reserved in [lo, hi) for other peers
        or for good, as a Handover carries them: peer ids, or "kept"."""
        out = []
        for (f, a), holders in sorted(self.reserved.items()):
            names = tuple(sorted(_named(h, "peer") or h for h in holders
                                 if _named(h, "peer") is not None or h == KEPT))
            if f == u.family and lo <= a < hi and names:
                out.append((u, a, names))
        return out

    def adopt_reserved(self, u: Cidr, address: int, names) -> list[Row]:
        """Reservations that came with space handed over: kept for the same peers (never one
        of an address held here: it cannot be both)."""
        rows: list[Row] = []
        if (u.family, address) in self.by_addr:
            return rows
        for name in names:
            if name != self.me:
                holder = KEPT if name == KEPT else peer_holder(name)
                self._add_holder((u.family, address), u, holder, "gateway, handed over", rows)
        return rows

    def _drop_holder(self, key: tuple[int, int], holder: str, now: float) -> list[Row]:
        holders = self.reserved[key]
        holders.discard(holder)
        rows: list[Row] = [Unreserve(_fmt(key), holder)]
        if (handle := _named(holder, "handle")) is not None:
            mine = self.reserved_by[handle]
            mine.discard(key)
            if not mine:
                del self.reserved_by[handle]
        if holders:
            return rows
        del self.reserved[key]
        u = self.universe_of(key)
        if u is None:
            return rows
        if self.rings[u].owner_of(key[1]) == self.me:
            # Free again, through quarantine like any address given back: a bridge may still
            # carry it for a moment, and a holder asking again meanwhile finds it unused.
            self._free(u, key[1], _fmt(key), now, rows)
        elif holder != RELEASING:
            # Reserved for us by its owner: the owner is to be told, until it answers.
            self._add_holder(key, u, RELEASING, "gateway, owner to be told", rows)
        else:
            self.used[u].discard(key[1])
        return rows

    def take_sets(self, req: TakeSets, now: float):
        """All of req's sets or none: returns (reply, rows, need), need being the Allocate or
        Claim that failed for want of space here (peers may have it), else None."""
        self._journal = []
        rows: list[Row] = []
        addresses = []
        try:
            for i, alternatives in enumerate(req.sets):
                reply, need = None, None
                for alt in alternatives:
                    reply, r = self.apply(alt, now)
                    if reply["ok"]:
                        rows += r
                        break
                    code = reply["error"]["code"]
                    if need is None:
                        need = self.need_for(alt, reply)
                    if code != "exhausted":
                        break
                if not reply["ok"]:
                    for undo in reversed(self._journal):
                        undo()
                    code = reply["error"]["code"]
                    if code not in ("exhausted", "not_owned"):
                        need = None
                    return error(code, f"range set {i}: {reply['error']['message']}"), [], need
                addresses.append(reply["address"])
        finally:
            self._journal = None
        return ok(handle=req.handle, addresses=addresses), rows, None

    def _claim(self, req: Claim, now: float) -> tuple[dict, list[Row]]:
        key = (req.family, req.address)
        subnet = req.subnet
        universe = self.universe_of(key)
        if subnet is None:
            if req.tenant is not None and universe is not None:
                subnet = universe  # a tenant's address has its block's prefix
            elif key in self.default_subnet:
                subnet = self.default_subnet
            elif universe is not None:
                subnet = universe
            else:
                return error("bad_address", f"{_fmt(key)} lies in no allocation range and not in "
                             f"the default subnet {self.default_subnet}; name its subnet"), []
        elif key not in subnet:
            return error("bad_address", f"{_fmt(key)} is not inside subnet {subnet}"), []
        elif (bad := self._bad_subnet(subnet)) is not None:
            return bad, []
        if req.family == 6 and (req.address >> 32) == 0xFFFF:
            return error("bad_address", f"{_fmt(key)} is an IPv4-mapped IPv6 address; claim "
                         f"the IPv4 address {format_addr(4, req.address & 0xFFFFFFFF)}"), []
        holder = self.by_addr.get(key)
        if holder is not None:
            if holder.handle == req.handle and holder.subnet == subnet:
                return ok(**self.view(holder)), []
            return error("in_use", f"{_fmt(key)} is held by handle {holder.handle!r}"), []
        why = self.claimable(universe, subnet, req.tenant, req.address) \
            if universe is not None else None
        if req.tenant is not None and universe not in self.tenant_blocks.get(req.tenant, ()):
            why = f"it is not in a block of tenant {req.tenant}"
        if why is not None:
            return error("bad_address", f"{_fmt(key)} may not be claimed: {why}"), []
        if universe is None and self.clustered():
            return error("no_owner", f"{_fmt(key)} lies outside every allocation range "
                         f"({', '.join(map(str, self.universes()))}): in a cluster no host owns it, "
                         "so two hosts could each claim it; claim addresses inside a range"), []
        mine = self.by_handle.get(req.handle, {}).get(subnet)
        if mine is not None:
            return error("conflict", f"handle {req.handle!r} already holds {mine.text} in "
                         f"{subnet}; release it first"), []
        lo, hi = subnet.host_bounds()
        if not lo <= req.address < hi:
            return error("reserved", f"{_fmt(key)} is the network or broadcast address of "
                         f"{subnet}"), []
        if key in self.reserved:
            return error("reserved", f"{_fmt(key)} is a gateway"), []
        if universe is not None:
            owner = self.rings[universe].owner_of(req.address)
            if owner != self.me:
                return error("not_owned", f"{_fmt(key)} is owned by peer {owner}, not by this "
                             "peer"), []
        # A quarantined address may be claimed: quarantine keeps allocate from reusing an address
        # whose container may still be terminating; a claim names the address on purpose.
        return self._take(Held(req.family, req.address, universe, subnet, req.handle, req.anchor,
                               now))

    def _release_if(self, req: ReleaseIf, now: float) -> tuple[dict, list[Row]]:
        held = self.by_handle.get(req.handle, {})
        rows: list[Row] = []
        released: list[str] = []
        for family, address, at in req.allocations:
            h = self.by_addr.get((family, address))
            if h is not None and h.handle == req.handle and h.allocated_at == at and \
                    held.get(h.subnet) is h:
                reply, r = self._release(Release(req.handle, (family, address)), now)
                rows += r
                released += reply["released"]
        return ok(handle=req.handle, released=released), rows

    def _release_unlisted(self, req: ReleaseUnlisted, now: float) -> tuple[dict, list[Row]]:
        rows: list[Row] = []
        released: list[str] = []
        for handle in [h for h in self.by_handle if h.startswith(req.prefix)
                       and h not in req.keep]:
            reply, r = self._release(Release(handle), now)
            rows += r
            released += reply["released"]
        return ok(released=released), rows

    def _release(self, req: Release, now: float) -> tuple[dict, list[Row]]:
        mine = self.by_handle.get(req.handle, {})
        if req.address is None:
            held = self.by_handle.pop(req.handle, {})
        else:
            held = {s: h for s, h in mine.items() if (h.family, h.address) == req.address}
            for s in held:
                del mine[s]
            if not mine:
                self.by_handle.pop(req.handle, None)
        rows: list[Row] = []
        if req.handle in self.reserved_by:
            self.unsettled.add(req.handle)
        for h in held.values():
            self._unhold(h)
            if h.universe is not None:
                self._free(h.universe, h.address, h.text, now, rows)
            else:
                rows.append(FreeAddress(h.text, None, now))
        return ok(handle=req.handle,
                  released=[f"{h.text}/{h.subnet.prefix}" for h in held.values()]), rows

    # -- space moving between peers ------------------------------------------------------------

    def ring_changed(self, universe: Cidr) -> list[Row]:
        """After the ring moved space: forget freed addresses that are no longer ours."""
        self._owned[universe] = self.rings[universe].owned_by(self.me)
        rows: list[Row] = []
        ring = self.rings[universe]
        changes: dict = {}
        gone, ranges = self.freed[universe].forget_outside(
            lambda a: ring.owner_of(a) == self.me, self._owned[universe], changes)
        for address in gone:
            self.used[universe].discard(address)
            rows.append(ForgetFreed(format_addr(universe.family, address)))
        for lo, hi in ranges:
            self.used[universe].discard_range(lo, hi)
        return rows + self._span_rows(universe, changes)

    def owned(self, universe: Cidr) -> list[tuple[int, int]]:
        """What this host owns in universe, as the last ring_changed saw it."""
        return self._owned[universe]

    def free_count(self, universe: Cidr, lo: int, hi: int, now: float) -> int:
        """Addresses in [lo, hi) that this peer could hand out or give away now: what it owns
        there less what is held (counted by bisect), quarantined (only the recently freed
        are looked at) or reserved. Equal to owned - len(_blocked(...)), without the scan."""
        return self.free_counts(universe, [(lo, hi)], now)[0]

    def free_counts(self, universe: Cidr, spans: list[tuple[int, int]], now: float) -> list[int]:
        """free_count of each [lo, hi) in spans: held and quarantined addresses are counted
        by bisect in sorted lists, the reservations (few) read once for all of them (a
        metrics scrape asks for every subnet in use)."""
        hs = self.held_sorted[universe]
        fl = self.freed[universe]
        fl.expire(now)
        ring = self.rings[universe]
        first, end = min(lo for lo, _ in spans), max(hi for _, hi in spans)
        # Never quarantined too: taking a reservation takes it out of the freed list.
        other = sorted({a for f, a in self.reserved if f == universe.family and first <= a < end
                        and ring.owner_of(a) == self.me} |
                       {a for a in self._never(universe) if first <= a < end
                        and ring.owner_of(a) == self.me})
        out = []
        for lo, hi in spans:
            n = held = 0
            for olo, ohi in self._owned[universe]:
                a, b = max(olo, lo), min(ohi, hi)
                if a < b:
                    n += b - a
                    held += bisect_left(hs, b) - bisect_left(hs, a) + fl.quarantined_in(a, b)
            out.append(n - held - (bisect_left(other, hi) - bisect_left(other, lo)))
        return out

    def quarantined(self, universe: Cidr, now: float):
        """(address, freed_at) of those freed less than reuse_delay ago, most recent first."""
        return self.freed[universe].quarantined(now)

    def _blocked(self, universe: Cidr, lo: int, hi: int, now: float) -> list[int]:
        """Owned addresses in [lo, hi) that are not free: held, quarantined or reserved."""
        fam = universe.family
        out = [h.address for h in self.by_addr.values() if h.universe == universe
               and lo <= h.address < hi]
        self.freed[universe].expire(now)
        out += self.freed[universe].quarantined_between(lo, hi)
        out += [a for f, a in self.reserved if f == fam and lo <= a < hi]
        out += [a for a in self._never(universe) if lo <= a < hi]
        ring = self.rings[universe]
        return sorted(a for a in set(out) if ring.owner_of(a) == self.me)

    def donatable(self, universe: Cidr, lo: int, hi: int, now: float, limit: int,
                  to: str) -> tuple[int, int] | None:
        """A block of free owned space in [lo, hi) for `to`, at most `limit` long, chosen to
        fragment the ring least (donation.py)."""
        blocked = self._blocked(universe, lo, hi, now)
        runs = []
        for olo, ohi in self._owned[universe]:
            a, b = max(lo, olo), min(hi, ohi)
            start = a
            for x in [x for x in blocked if a <= x < b] + [b]:
                if x > start:
                    runs.append((start, x))
                start = max(start, x + 1)
        return choose_block(self.rings[universe], self.me, to, runs, limit)

    def why_not_free(self, universe: Cidr, address: int, now: float) -> tuple[str, str]:
        """(code, message) for an owned address a claim from another peer cannot have."""
        key = (universe.family, address)
        h = self.by_addr.get(key)
        if h is not None:
            return "in_use", f"{_fmt(key)} is held by handle {h.handle!r} on peer {self.me}"
        if key in self.reserved:
            return "reserved", f"{_fmt(key)} is a gateway, reserved on peer {self.me}"
        t = self.freed[universe].get(address)
        if t is not None and t + self.reuse_delay > now:
            return "quarantined", (f"{_fmt(key)} was freed on peer {self.me} and is in "
                                   f"quarantine for {t + self.reuse_delay - now:.0f}s more")
        return "exhausted", f"{_fmt(key)} is not free on peer {self.me}"

    def block_holding(self, universe: Cidr, address: int, now: float,
                      to: str) -> tuple[int, int] | None:
        """A free owned block that holds address, up to CLAIM_BLOCK long, chosen like a
        donation: a claim asks for one address, and a little more spares the next claim
        nearby a round trip."""
        if self.rings[universe].owner_of(address) != self.me:
            return None
        lo, hi = address - CLAIM_BLOCK + 1, address + CLAIM_BLOCK
        blocked = set(self._blocked(universe, lo, hi, now))
        if address in blocked:
            return None
        olo, ohi = next((a, b) for a, b in self._owned[universe] if a <= address < b)
        s, x = address, address + 1
        while s > max(lo, olo) and s - 1 not in blocked:
            s -= 1
        while x < min(hi, ohi) and x not in blocked:
            x += 1
        return choose_block(self.rings[universe], self.me, to, [(s, x)], CLAIM_BLOCK, address)

    # -- search --------------------------------------------------------------------------------

    def _bounds(self, u: Cidr, subnet: Cidr, lo: int, hi: int) -> tuple[int, int]:
        """[lo, hi) of what may be handed out: hosts of the subnet, in the universe and range."""
        slo, shi = subnet.host_bounds()
        return max(slo, u.start, lo), min(shi, u.end, hi)

    def _fresh(self, u: Cidr, bounds: tuple[int, int]) -> int | None:
        lo, hi = bounds
        used = self.used[u]  # reserved addresses are in it too
        for olo, ohi in self._owned[u]:
            g = used.first_gap(max(lo, olo), min(hi, ohi))
            if g is not None:
                return g
        return None

    def _reusable(self, u: Cidr, bounds: tuple[int, int], now: float) -> int | None:
        ring = self.rings[u]
        return self.freed[u].pick(*bounds, now, lambda a: ring.owner_of(a) == self.me and
                                  (u.family, a) not in self.reserved)

    def _take(self, held: Held) -> tuple[dict, list[Row]]:
        rows: list[Row] = []
        undo_used, fresh = self._mark_used(held.universe, held.address, rows) \
            if held.universe else (None, False)
        self._hold(held)
        if self._journal is not None:
            def undo():
                self._unhold(held)
                mine = self.by_handle[held.handle]
                del mine[held.subnet]
                if not mine:
                    del self.by_handle[held.handle]
                if undo_used is not None:
                    undo_used()
            self._journal.append(undo)
        rows.append(PutAllocation(held.text,
                                  str(held.universe) if held.universe else None,
                                  str(held.subnet), held.handle, held.anchor, held.allocated_at,
                                  fresh))
        return {"ok": True, **self.view(held)}, rows  # ok(**...): one dict more, per allocation

    def _hold(self, held: Held) -> None:
        key = (held.family, held.address)
        if key in self.by_addr:
            raise AssertionError(f"{_fmt(key)} held twice")  # the store's primary key forbids it
        mine = self.by_handle.setdefault(held.handle, {})
        if held.subnet in mine:
            # Allocate and claim answer first; the schema has no index on handle to refuse it.
            raise AssertionError(f"handle {held.handle!r} would hold a second address in "
                                 f"{held.subnet}")
        self.by_addr[key] = held
        mine[held.subnet] = held
        if held.universe is not None:
            insort(self.held_sorted[held.universe], held.address)
        # get and set, not Counter's +=: each lookup hashes both blocks of the key
        key = (held.universe, held.subnet)
        self.in_use[key] = self.in_use.get(key, 0) + 1

    def _unhold(self, held: Held) -> None:
        """Forget held in by_addr and the counts (by_handle is the caller's)."""
        del self.by_addr[(held.family, held.address)]
        if held.universe is not None:
            hs = self.held_sorted[held.universe]
            del hs[bisect_left(hs, held.address)]
        key = (held.universe, held.subnet)
        n = self.in_use[key] - 1
        if n:
            self.in_use[key] = n
        else:
            del self.in_use[key]

    # -- status --------------------------------------------------------------------------------

    def status(self, now: float) -> dict:
        universes = []
        for u, ring in self.rings.items():
            kind = self.kind(u)
            if kind in ("spare", DISSOLVED):
                continue
            lo, hi = u.host_bounds()
            owned = sum(max(0, min(h, hi) - max(l, lo)) for l, h in self._owned[u])
            allocated = len(self.held_sorted[u])
            quarantined = self.freed[u].quarantined_count(now)
            c = self.carves.get(u)
            universes.append({"range": str(u), "static": kind == "static", "kind": kind,
                              "retired": u in self.retired, "for": c.name if c else None,
                              "owned": owned, "allocated": allocated,
                              # allocatable now: not held, quarantined or reserved
                              "quarantined": quarantined, "free": self.free_count(u, lo, hi, now),
                              "ring_entries": len(ring.entries)})
        return {"peer": self.me, "default_subnet": str(self.default_subnet),
                "reuse_delay": self.reuse_delay, "allocations": len(self.by_addr),
                "reserved": {_fmt(k): sorted(h) for k, h in sorted(self.reserved.items())},
                "handles": len(self.by_handle), "universes": universes}


def block_gateway(block: Cidr) -> int:
    """A tenant's block keeps its first host address for the gateway (a bridge's address):
    never handed out, named in every allocation's reply."""
    return block.host_bounds()[0]


def _fmt(key: tuple[int, int]) -> str:
    return format_addr(*key)
