"""N peers in one process on a seeded scheduler, with faults, checking the invariants.

Faults: message drop, duplicate, reorder and delay; partitions (isolate one, majority split,
one-way, bridge); crashes at named points (before commit, after commit, after send) followed by
restarts from what was committed. Every run prints its seed; the same seed replays exactly.

Invariants (DESIGN.md section 7) checked as it runs and at the end:
I1 no address held by two handles at once; I2 no acknowledged allocation lost; I3 no two peers
own overlapping space, and no (start, version) has two contents (a ring conflict is a violation);
I4 every allocation lies in space its host owns; I5 after healing every range has a live owner;
I6 after healing all rings are equal; I7 a peer's seq and vector only grow, restarts included;
I9 no quarantined address is handed out or given away: the simulator keeps, per peer, every
address that peer freed and when (from the rows it committed), and checks every Ready before it
is committed: an allocate reply must not hand out an address the same peer freed less than
REUSE_DELAY ago, and no ring transfer the peer writes (a grant, a give-back, a handover) may
move space holding such an address. (A claim may take a quarantined address on purpose.)
A restart may lose the peer's whole database: it comes back under a new id, and its old id
stays dead until some peer runs rmpeer on it (during the run, from any peer at any time, so
concurrent and partitioned removals happen; after the heal, until it succeeds: I5 needs it).
Bootstrap is by a founder, by seeds, or by a quorum vote, under the same faults.
"""
from __future__ import annotations

import heapq
import random
from collections import Counter
from dataclasses import dataclass, field

from appliance import peer_codec
from appliance.core import messages as m
from appliance.core.addr import Cidr, cidr, format_addr, parse_addr
from appliance.core.bootstrap import decided_cluster
from appliance.core.durable import Durable
from appliance.core.peer import Peer, Ready

UNIVERSE = cidr("10.0.0.0/22")     # small enough that peers run short and ask each other
BIG_UNIVERSE = cidr("10.0.0.0/16")  # for 100 peers
TICK = 0.1
REUSE_DELAY = 5.0  # every peer's quarantine (--reuse-delay), seconds of simulated time
CRASH_POINTS = ("before_commit", "after_commit", "after_send")


class Violation(AssertionError):
    pass


@dataclass
class Faults:
    drop: float = 0.0
    dup: float = 0.0
    delay: float = 0.0        # chance a message is held back for a while
    crash: float = 0.0        # chance, per handled event, that the peer crashes there
    partition: float = 0.0    # chance per step that the network changes shape
    wipe: float = 0.0         # chance that a restart finds the database gone
    rmpeer: float = 0.0       # chance that a client operation is an rmpeer of a dead peer

    @classmethod
    def random(cls, rng: random.Random, peers: int = 5) -> Faults:
        # Crashes are drawn per event a peer handles; more peers handle more events.
        return cls(drop=rng.random() * 0.3, dup=rng.random() * 0.2, delay=rng.random() * 0.3,
                   crash=rng.random() * 0.05 / peers, partition=rng.random() * 0.01,
                   wipe=rng.random() * 0.3, rmpeer=rng.random() * 0.1)


@dataclass
class Stats:
    ops: int = 0
    acked: int = 0
    refused: Counter = field(default_factory=Counter)
    faults: Counter = field(default_factory=Counter)
    messages: int = 0
    rounds_to_converge: int = 0
    ring_entries: int = 0
    segments: int = 0
    removals: int = 0


class Sim:
    def __init__(self, seed: int, n: int, faults: Faults, broken: str | None = None,
                 bootstrap: str = "founder"):
        self.seed, self.rng, self.faults = seed, random.Random(seed), faults
        self.broken = broken  # a known-wrong behaviour to plant, for the checker's own tests
        self.now = 1000.0
        self.names = [f"p{i}" for i in range(n)]
        self.u = BIG_UNIVERSE if n > 20 else UNIVERSE
        self.codec = n <= 20
        self.cluster = "sim"
        self.bootstrap = bootstrap
        self.claim_share = 0.10  # of client operations: claims of random addresses
        self.entrance_share = 0.15  # of client operations: what CNI, GC and the sweeper send
        half = self.u.prefix + 1
        self.subnets = (Cidr(4, self.u.start, half), Cidr(4, self.u.start + self.u.size // 2, half))
        # None: releases are 35% of operations, so the universe fills up and stays nearly full
        # (the hardest case). A fraction: release whenever that much of it is in use (churn at
        # a steady level, for measuring the ring's size over time).
        self.fill: float | None = None
        self.durable = {p: Durable(p, self.cluster, [self.u]) for p in self.names}
        self.live: dict[str, Peer] = {}
        for p in self.names:
            d = self.durable[p]
            if bootstrap == "seeds":
                d.mode, d.seeds = "seeds", tuple(self.names)
                peer, rows = Peer.seeded(p, self.cluster, [self.u], self.u, self.names,
                                         reuse_delay=REUSE_DELAY)
            elif bootstrap == "quorum":
                d.mode, d.quorum = "quorum", n
                peer, rows = Peer.voter(p, self.cluster, [self.u], self.u, n,
                                        reuse_delay=REUSE_DELAY)
            elif p == self.names[0]:
                peer, rows = Peer.founder(p, self.cluster, [self.u], self.u,
                                          reuse_delay=REUSE_DELAY)
            else:
                peer, rows = d.load(self.u, REUSE_DELAY), []
            d.apply(rows)
            self.live[p] = peer
        self.blocked: set[tuple[str, str]] = set()  # (from, to) pairs the network drops
        self.queue: list[tuple[float, int, str, str, object]] = []  # a heap by delivery time
        self.due: list[tuple[float, int, str, str, object]] = []    # delivered in any order
        self.views_of_down: dict[str, list[tuple[int, int]]] = {}
        self.msg_seq = 0
        self.acked: dict[tuple[str, str], str] = {}  # (peer, handle) -> address
        self.pending: dict[int, tuple[str, object]] = {}
        self.handles = 0
        self.stats = Stats()
        self.max_clock = {p: (0, {}) for p in self.names}
        self.gone: list[str] = []  # ids whose database was lost: dead for good
        # I9: per peer, address -> when that peer freed it (committed FreeAddress rows); an
        # address is quarantined there until freed_at + REUSE_DELAY.
        self.freed: dict[str, dict[str, float]] = {p: {} for p in self.names}
        self.wipes = 0
        self._update_reachability()

    # -- the network ---------------------------------------------------------------------------

    @classmethod
    def for_seed(cls, seed: int, peers: int | None = None, broken: str | None = None) -> Sim:
        """Everything about a run drawn from its seed: size, fault rates, bootstrap."""
        rng = random.Random(seed)
        n = peers or rng.randint(3, 7)
        faults = Faults.random(rng, n)
        return cls(seed, n, faults, broken, rng.choice(["founder", "seeds", "quorum"]))

    def _update_reachability(self) -> None:
        for p, peer in self.live.items():
            peer.reachable = {q for q in self.live if q != p and (p, q) not in self.blocked
                              and (q, p) not in self.blocked}

    def _send(self, src: str, dst: str, msg) -> None:
        self.stats.messages += 1
        if self.codec:
            # Through the real codec, as on the wire: a message it cannot carry is a bug here
            # too. (Not at 100 peers: there it would cost most of the run's time.)
            msg = peer_codec.decode(peer_codec.encode(msg))
        f = self.faults
        if (src, dst) in self.blocked or self.rng.random() < f.drop:
            self.stats.faults["drop"] += 1
            return
        copies = 2 if self.rng.random() < f.dup else 1
        if copies == 2:
            self.stats.faults["duplicate"] += 1
        for _ in range(copies):
            delay = TICK * self.rng.random()
            if self.rng.random() < f.delay:
                delay += self.rng.random() * 3.0
                self.stats.faults["delay"] += 1
            self.msg_seq += 1
            heapq.heappush(self.queue, (self.now + delay, self.msg_seq, src, dst, msg))

    def _reshape(self) -> None:
        """A new partition shape (or none)."""
        live = sorted(self.names)
        shape = self.rng.choice(["heal", "isolate", "split", "one_way", "bridge"])
        self.blocked = set()
        self.stats.faults[f"partition_{shape}"] += 1
        if shape == "isolate":
            lone = self.rng.choice(live)
            self.blocked = {(a, b) for a in live for b in live if (a == lone) != (b == lone)}
        elif shape == "split":
            side = set(self.rng.sample(live, len(live) // 2))
            self.blocked = {(a, b) for a in live for b in live if (a in side) != (b in side)}
        elif shape == "one_way":
            a, b = self.rng.sample(live, 2)
            self.blocked = {(a, b)}
        elif shape == "bridge" and len(live) >= 3:
            left = set(self.rng.sample(live, len(live) // 2))
            bridge = self.rng.choice(sorted(left))
            self.blocked = {(a, b) for a in live for b in live if (a in left) != (b in left)
                            and bridge not in (a, b)}
        self._update_reachability()

    # -- peers ---------------------------------------------------------------------------------

    def _handle(self, p: str, ready: Ready) -> None:
        """What a shell does with a Ready: commit, then send, then reply; maybe crash on the way."""
        for alarm in ready.alarms:
            if "conflict" in alarm:
                raise Violation(f"I3 seed={self.seed}: {p}: {alarm}")
        self._check_quarantine(p, ready)
        point = self.rng.choice(CRASH_POINTS) if self.rng.random() < self.faults.crash else None
        if self.broken == "send_before_commit":
            for dst, msg in ready.messages:
                self._send(p, dst, msg)
            if point is not None:
                return self._crash(p, point)
            self._commit(p, ready.rows)
        else:
            if point == "before_commit":
                return self._crash(p, point)
            self._commit(p, ready.rows)
            if point == "after_commit":
                return self._crash(p, point)
            for dst, msg in ready.messages:
                self._send(p, dst, msg)
        if point == "after_send":
            return self._crash(p, point)
        for ref, reply in ready.replies:
            self._client_reply(p, ref, reply)
        self._check_clock(p)

    def _commit(self, p: str, rows: list) -> None:
        self.durable[p].apply(rows)
        freed = self.freed[p]
        for r in rows:
            if isinstance(r, m.FreeAddress) and r.universe is not None:
                freed[r.address] = r.freed_at
            elif isinstance(r, (m.PutAllocation, m.ForgetFreed)):
                freed.pop(r.address, None)  # taken again (a claim), or gone with its space

    def _check_quarantine(self, p: str, ready: Ready) -> None:
        """I9, on what p is about to commit and say."""
        freed = self.freed[p]
        if not freed:
            return
        for a in [a for a, t in freed.items() if t + REUSE_DELAY <= self.now]:
            del freed[a]  # quarantine over
        if not freed:
            return
        for ref, reply in ready.replies:
            got = self.pending.get(ref)
            if got is None or not reply["ok"] or \
                    not isinstance(got[1], (m.Allocate, m.TakeSets)):
                continue
            for text in reply.get("addresses", [reply.get("address")]):
                address = text.split("/")[0]
                if address in freed:
                    raise Violation(f"I9 seed={self.seed}: {p} handed out {address} to "
                                    f"{got[1].handle} {self.now - freed[address]:.2f}s after "
                                    f"freeing it (quarantine {REUSE_DELAY:g}s)")
        given = [r for r in ready.rows if isinstance(r, m.RingWrite) and r.stamp_peer == p
                 and r.owner != p]
        if not given:
            return
        spans = {e.start: (lo, hi) for e, lo, hi in self.live[p].replica.rings[self.u].spans()}
        quarantined = sorted((parse_addr(a)[1], a) for a in freed)
        for r in given:
            lo, hi = spans[parse_addr(r.start)[1]]
            for value, address in quarantined:
                if lo <= value < hi:
                    fam = self.u.family
                    raise Violation(f"I9 seed={self.seed}: {p} gave {r.owner} "
                                    f"{format_addr(fam, lo)}-{format_addr(fam, hi - 1)}, holding "
                                    f"{address}, {self.now - freed[address]:.2f}s after freeing it "
                                    f"(quarantine {REUSE_DELAY:g}s)")

    def _crash(self, p: str, point: str) -> None:
        self.stats.faults[f"crash_{point}"] += 1
        del self.live[p]
        self.pending = {k: v for k, v in self.pending.items() if v[0] != p}  # in doubt
        self._update_reachability()

    def _restart(self, p: str) -> None:
        self.stats.faults["restart"] += 1
        self.views_of_down.pop(p, None)
        # A wipe that would leave no copy of the ring anywhere is the end of the cluster, not a
        # fault it can survive: only wipe while another peer's disk holds the ring.
        # And a voter that forgets its vote may let a second majority form: quorum mode is
        # safe only while at most the configured number of peers vote, so wipes wait until
        # the vote is over everywhere.
        if self.rng.random() < self.faults.wipe and any(
                self.durable[q].ring for q in self.names if q != p) and all(
                self.durable[q].vote is None or self.durable[q].vote.decided
                for q in self.names):
            return self._wiped(p)
        d = self.durable[p]
        if self.broken == "reuse_seq":  # as if the write counter were never made durable
            d.clock = m.ClockWrite(0, tuple((k, v) for k, v in d.clock.vector if k != p))
        self.live[p] = d.load(self.u, REUSE_DELAY)
        self._update_reachability()
        self._check_clock(p)

    def _wiped(self, p: str) -> None:
        """The database is gone: the host comes back as a newcomer with a new id (rule 3)."""
        self.stats.faults["wipe"] += 1
        self.gone.append(p)
        self.names.remove(p)
        self.wipes += 1
        new = f"{p.split('w')[0]}w{self.wipes}"
        self.names.append(new)
        # What its clients were told went with the disk: that loss is the fault itself.
        self.acked = {k: v for k, v in self.acked.items() if k[0] != p}
        # It joins as a newcomer (--peer), whatever its first flags were: with --quorum it
        # would be one voter more than the vote was sized for, and newcomers cut off from the
        # decided peers could then form a second majority (README: at most N hosts vote).
        # It learns the cluster's identity from the peer it joins through (a quorum's
        # decided cluster has its own).
        votes = [d.vote.decided for d in self.durable.values() if d.vote and d.vote.decided]
        cluster = decided_cluster(self.cluster, votes[0]) if votes else self.cluster
        self.durable[new] = Durable(new, cluster, [self.u])
        self.max_clock[new] = (0, {})
        self.freed[new] = {}
        self.live[new] = self.durable[new].load(self.u, REUSE_DELAY)
        self._update_reachability()

    def _check_clock(self, p: str) -> None:
        peer = self.live.get(p)
        if peer is None:
            return
        seq, vector = peer.replica.seq, peer.replica.vector
        old_seq, old_vector = self.max_clock[p]
        if seq < old_seq or any(vector.get(k, 0) < v for k, v in old_vector.items()):
            raise Violation(f"I7 seed={self.seed}: {p} went back from seq {old_seq} to {seq}")
        self.max_clock[p] = (seq, dict(vector))

    # -- clients -------------------------------------------------------------------------------

    def _client_op(self) -> None:
        p = self.rng.choice(sorted(self.live))
        mine = [h for (q, h) in self.acked if q == p]
        r = self.rng.random()
        self.stats.ops += 1
        dead = [g for g in self.gone if g in self.live[p].members()]
        if dead and self.rng.random() < self.faults.rmpeer:
            k = self.rng.randint(1, len(dead))
            req = m.RemovePeer(tuple(self.rng.sample(dead, k)))
            self.pending[self.stats.ops] = (p, req)
            return self._handle(p, self.live[p].request(self.stats.ops, req, self.now))
        release = 0.35 if self.fill is None else 0.0
        entrance = self.rng.random() < self.entrance_share
        if mine and (r < release if self.fill is None else
                     len(self.acked) >= self.fill * self.u.size):
            handle = self.rng.choice(sorted(mine)).split("/")[0]
            req = m.Release(handle)
            if entrance:
                req = self._entrance_release(p, handle)
        elif entrance:
            req = self._entrance_take()
        elif r < release + self.claim_share:
            self.handles += 1
            handle = f"h{self.handles}"
            address = self.u.start + 1 + self.rng.randrange(self.u.size - 2)
            req = m.Claim(handle, 4, address)
        else:
            self.handles += 1
            handle = f"h{self.handles}"
            req = m.Allocate(handle)
        ref = self.stats.ops
        self.pending[ref] = (p, req)
        # From the moment a release is sent it may take effect: stop counting its addresses.
        for key in self._releasing(p, req):
            self.acked.pop(key, None)
        ready = self.live[p].request(ref, req, self.now)
        if isinstance(req, m.CanServe) and ready.rows:
            raise Violation(f"gate seed={self.seed}: CanServe on {p} wrote {ready.rows[:3]}")
        self._handle(p, ready)

    # What the entrances send (DESIGN rule 9): CNI ADD as one TakeSets over two subnets with a
    # gateway, CNI STATUS, GC with a valid list, the sweeper's ReleaseIf.

    def _entrance_take(self):
        self.handles += 1
        handle = f"h{self.handles}"
        low, high = self.subnets
        if self.rng.random() < 0.2:
            return m.CanServe((((low, low.start + 1, low.end - 2),),
                               ((high, high.start + 1, high.end - 2),)))
        return m.TakeSets(handle, ((m.Allocate(handle, low, None, None, low.start + 1),),
                                   (m.Allocate(handle, high),)))

    def _entrance_release(self, p: str, handle: str):
        if self.rng.random() < 0.5:
            # The sweeper: what it judged dead, sometimes judged on an older allocation (a
            # wrong time), which must then be left alone.
            held = self.live[p].allocator.by_handle.get(handle, {}).values()
            stale = self.rng.random() < 0.3
            return m.ReleaseIf(handle, tuple((h.family, h.address,
                                              h.allocated_at - (1.0 if stale else 0.0))
                                             for h in held))
        # GC: keep some of p's handles that share a prefix, release the rest.
        prefix = handle[:2]
        mine = sorted({h.split("/")[0] for (q, h) in self.acked if q == p})
        keep = frozenset(h for h in mine if h.startswith(prefix) and self.rng.random() < 0.5
                         and h != handle)
        return m.ReleaseUnlisted(prefix, keep)

    def _releasing(self, p: str, req) -> list[tuple[str, str]]:
        """The acknowledged (peer, key) pairs a release request may free."""
        if isinstance(req, m.Release):
            handles = {req.handle}
        elif isinstance(req, m.ReleaseUnlisted):
            handles = {h.split("/")[0] for (q, h) in self.acked if q == p
                       and h.startswith(req.prefix) and h.split("/")[0] not in req.keep}
        elif isinstance(req, m.ReleaseIf):
            held = self.live[p].allocator.by_addr
            dead = {format_addr(f, a) for f, a, t in req.allocations
                    if (f, a) in held and held[(f, a)].allocated_at == t}
            return [k for k, v in self.acked.items() if k[0] == p and v in dead]
        else:
            return []
        return [k for k in self.acked if k[0] == p and k[1].split("/")[0] in handles]

    def _client_reply(self, p: str, ref, reply: dict) -> None:
        got = self.pending.pop(ref, None)
        if got is None:
            return
        _, req = got
        if not reply["ok"]:
            self.stats.refused[reply["error"]["code"]] += 1
            return
        if isinstance(req, m.RemovePeer):
            self.stats.removals += 1
            return
        self.stats.acked += 1
        if isinstance(req, (m.Allocate, m.Claim, m.TakeSets)):
            got = reply["addresses"] if isinstance(req, m.TakeSets) else [reply["address"]]
            for i, text in enumerate(got):
                address = text.split("/")[0]
                key = req.handle if i == 0 else f"{req.handle}/{i}"
                for (q, h), a in self.acked.items():
                    if a == address and (q, h) != (p, key):
                        raise Violation(f"I1 seed={self.seed}: {address} acknowledged to {p}/"
                                        f"{key} while {q}/{h} holds it")
                self.acked[(p, key)] = address
        if isinstance(req, m.ReleaseIf) and any(
                (f, a) in self.live[p].allocator.by_addr for f, a, _ in req.allocations
                if format_addr(f, a) in reply["released"]):
            raise Violation(f"gate seed={self.seed}: {p} still holds what ReleaseIf released")

    # -- invariants ----------------------------------------------------------------------------

    def owned_views(self) -> dict[str, list[tuple[int, int]]]:
        """What each peer believes it owns: live ones from memory, crashed ones from disk."""
        views = {}
        for p in self.names:
            peer = self.live.get(p)
            if peer is not None:
                views[p] = peer.replica.rings[self.u].owned_by(p)
            else:  # a crashed peer's disk does not change until it restarts
                if p not in self.views_of_down:
                    down = self.durable[p].load(self.u, REUSE_DELAY)
                    self.views_of_down[p] = down.replica.rings[self.u].owned_by(p)
                views[p] = self.views_of_down[p]
        return views

    def check(self) -> None:
        views = self.owned_views()
        spans = sorted((lo, hi, p) for p, v in views.items() for lo, hi in v)
        for (alo, ahi, a), (blo, bhi, b) in zip(spans, spans[1:]):
            if blo < ahi:
                raise Violation(f"I3 seed={self.seed}: {a} and {b} both own "
                                f"{format_addr(4, blo)}")
        holders: dict[str, str] = {}
        for p in self.names:
            d = self.durable[p]
            for address, row in d.allocations.items():
                if address in holders:
                    raise Violation(f"I1 seed={self.seed}: {address} held by {holders[address]} "
                                    f"and {p}/{row.handle}")
                holders[address] = f"{p}/{row.handle}"
            peer = self.live.get(p)
            if peer is not None:
                for h in peer.allocator.by_addr.values():
                    if not any(lo <= h.address < hi for lo, hi in views[p]):
                        raise Violation(f"I4 seed={self.seed}: {p} holds {h.text} outside "
                                        "its space")
        if self.stats.ops % 50 == 0:  # counted free space against a full scan, now and then
            for p, peer in self.live.items():
                a = peer.allocator
                ring = a.rings[self.u]
                owned = sum(h - l for l, h in ring.owned_by(p))
                blocked = {x.address for x in a.by_addr.values() if x.universe == self.u}
                blocked |= {x for x, t in a.freed[self.u].items() if t + a.reuse_delay > self.now}
                blocked |= {x for f, x in a.reserved if f == 4}
                blocked = {x for x in blocked if ring.owner_of(x) == p}
                if a.free_count(self.u, self.u.start, self.u.end, self.now) != \
                        owned - len(blocked):
                    raise Violation(f"count seed={self.seed}: {p}'s counted free space "
                                    "disagrees with a scan")
        for (p, handle), address in self.acked.items():
            row = self.durable[p].allocations.get(address)
            if row is None or row.handle != handle.split("/")[0]:
                raise Violation(f"I2 seed={self.seed}: acknowledged {p}/{handle} -> {address} "
                                "is not in its database")

    # -- running -------------------------------------------------------------------------------

    def step(self) -> None:
        r = self.rng.random()
        down = [p for p in self.names if p not in self.live]
        if r < self.faults.partition:
            self._reshape()
        elif down and r < 0.05:
            self._restart(self.rng.choice(down))
        elif r < 0.35 and self.live:
            self._client_op()
        elif r < 0.75 and (self.queue or self.due):
            while self.queue and self.queue[0][0] <= self.now:
                self.due.append(heapq.heappop(self.queue))
            if not self.due:
                self.now = self.queue[0][0]
                return
            # Everything due, in any order: one message a step would let a big cluster's
            # traffic pile up undelivered, and the run would test little but the final heal.
            batch, self.due = self.due, []
            self.rng.shuffle(batch)
            for _, _, src, dst, msg in batch:
                if dst in self.live and (src, dst) not in self.blocked:
                    self._handle(dst, self.live[dst].receive(src, msg, self.now))
        else:
            self.now += TICK * self.rng.random()
            for p in sorted(self.live):
                if p in self.live:
                    self._handle(p, self.live[p].tick(self.now))

    def _drain(self) -> None:
        """Deliver everything in flight (the network is whole again)."""
        self.queue += self.due
        self.due = []
        heapq.heapify(self.queue)
        while self.queue:
            _, _, src, dst, msg = heapq.heappop(self.queue)
            if dst in self.live:
                self._handle(dst, self.live[dst].receive(src, msg, self.now))

    def heal(self, max_rounds: int = 400) -> None:
        self.faults = Faults()
        self.blocked = set()
        for p in [p for p in self.names if p not in self.live]:
            self._restart(p)
        self._update_reachability()
        self._remove_gone()
        for rounds in range(1, max_rounds + 1):
            self.now += TICK
            for p in sorted(self.live):
                self._handle(p, self.live[p].tick(self.now))
            self._drain()
            rings = {p: peer.replica.rings[self.u].entries for p, peer in self.live.items()}
            if all(r == rings[self.names[0]] for r in rings.values()) and all(
                    not peer.waiting for peer in self.live.values()):
                self.stats.rounds_to_converge = rounds
                break
        else:
            raise Violation(f"I6 seed={self.seed}: rings still differ after {max_rounds} rounds")
        ring = self.live[self.names[0]].replica.rings[self.u]
        self.stats.ring_entries, self.stats.segments = len(ring.entries), ring.segments()
        covered = sorted(s for p in self.names for s in ring.owned_by(p))
        if not covered or covered[0][0] != self.u.start or covered[-1][1] != self.u.end or \
                any(a[1] != b[0] for a, b in zip(covered, covered[1:])):
            raise Violation(f"I5 seed={self.seed}: some space has no live owner")

    def _rounds(self, n: int, until=lambda: False) -> None:
        for _ in range(n):
            if until():
                return
            self.now += TICK
            for q in sorted(self.live):
                if q in self.live:
                    self._handle(q, self.live[q].tick(self.now))
            self._drain()

    def _remove_gone(self) -> None:
        """What an operator does after the heal: rmpeer the hosts whose disks were lost, until
        it succeeds. --force only where the dead are half or more of the membership."""
        for attempt in range(20):
            self._rounds(5)
            runner = sorted(self.live)[attempt % len(self.live)]
            peer = self.live[runner]
            # The operator names every dead host any live one knows (errors name them).
            known = set().union(*(q.members() | {e.owner for e, _, _ in
                                                 q.replica.rings[self.u].spans()}
                                  for q in self.live.values()))
            dead = tuple(g for g in self.gone if g in known)
            if not dead:
                return  # removed, or never known to anyone (then it owns nothing)
            everyone = peer.members() | set(dead)
            force = (len(everyone) - len(dead)) * 2 <= len(everyone)
            ref = ("rmpeer", attempt)
            self.pending[ref] = (runner, m.RemovePeer(dead, force))
            self._handle(runner, peer.request(ref, m.RemovePeer(dead, force), self.now))
            self._rounds(50, lambda: ref not in self.pending)
        raise Violation(f"I5 seed={self.seed}: rmpeer of {', '.join(self.gone)} never succeeded "
                        "after the heal")

    def liveness(self) -> None:
        """After healing, an allocation on any peer succeeds while the cluster has free space."""
        free = sum(peer.allocator.free_count(self.u, self.u.start + 1, self.u.end - 1,
                                             self.now + 60) for peer in self.live.values())
        self.now += 60  # past every quarantine
        for p in sorted(self.live):
            if free < 4 * len(self.live):
                return
            self.handles += 1
            ref = ("live", self.handles)
            req = m.Allocate(f"h{self.handles}")
            self.pending[ref] = (p, req)
            self._handle(p, self.live[p].request(ref, req, self.now))
            for _ in range(50):
                if ref not in self.pending:
                    break
                self.now += TICK
                for q in sorted(self.live):
                    self._handle(q, self.live[q].tick(self.now))
                self._drain()
            if ref in self.pending or (p, req.handle) not in self.acked:
                raise Violation(f"liveness seed={self.seed}: allocate on {p} failed with "
                                f"{free} addresses free in the cluster")
            free -= 1

    def run(self, ops: int) -> Stats:
        while self.stats.ops < ops:
            self.step()
            self.check()
        self.heal()
        self.check()
        self.liveness()
        self.check()
        return self.stats
