"""A peer's durable state as the rows it committed, and the peer rebuilt from them.

The simulator keeps one of these per peer in place of SQLite: a restart is exactly "build the
peer again from what was committed", so a crash at any point is modelled faithfully. The store
builds one from its tables to load the peer the same way.

`Durable.new` and `first_rows` are the one place a bootstrap mode becomes a starting state
(the store, the simulator and the scenario runner all start peers through them):
  single  this host owns every universe (a founder)
  join    nothing: space comes from the peers it joins
  seeds   the split over the seeds' ids, waiting to hear from them; with only their addresses
          known, nothing yet: the ids are learned as the transport reaches them
          (Peer.identified), and the split and the ids are committed together
  quorum  an empty vote, waiting for a quorum to decide the first peers
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import messages as m
from .addr import Cidr, cidr, parse_addr
from .allocator import Held
from .peer import Peer
from .ring import Entry, Ring


MODES = ("single", "join", "seeds", "quorum")


@dataclass
class Durable:
    me: str
    cluster: str
    universes: list[Cidr]  # static ones (claim-only space) included
    static: tuple[Cidr, ...] = ()
    spare: tuple[Cidr, ...] = ()  # spare.SPARE for a database made since schema 5 (in universes)
    ring: dict[tuple[str, str], m.RingWrite] = field(default_factory=dict)
    clock: m.ClockWrite = m.ClockWrite(0, ())
    allocations: dict[str, m.PutAllocation] = field(default_factory=dict)
    freed: dict[str, m.FreeAddress] = field(default_factory=dict)
    freed_spans: dict[str, m.FreedSpan] = field(default_factory=dict)
    reserved: dict[tuple[str, str], m.Reserve] = field(default_factory=dict)
    removals: dict[str, m.Removal] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    standing: m.Standing | None = None
    vote: m.Vote | None = None
    # How this peer was bootstrapped (MODES; the store keeps it in meta).
    mode: str = "join"
    quorum: int | None = None
    seeds: tuple[str, ...] = ()           # the seeds' ids, once known
    seed_addresses: tuple[str, ...] = ()  # where the seeds listen, to learn their ids

    @classmethod
    def new(cls, me: str, cluster: str, universes: list[Cidr], mode: str = "join",
            **bootstrap) -> Durable:
        """A new database for a bootstrap mode, its first rows applied."""
        d = cls(me, cluster, universes, mode=mode, **bootstrap)
        d.apply(d.first_rows())
        return d

    def first_rows(self) -> list:
        """The rows a new database of this bootstrap mode starts with."""
        if self.mode not in MODES:
            raise ValueError(f"unknown bootstrap mode {self.mode!r} (one of {', '.join(MODES)})")
        universes, subnet = list(self.universes), self.universes[0]
        kw = {"static": frozenset(self.static)}  # carved as static, not as ranges (spare.py)
        if self.mode == "single":
            return Peer.founder(self.me, self.cluster, universes, subnet, **kw)[1]
        if self.mode == "seeds" and self.seeds:
            return Peer.seeded(self.me, self.cluster, universes, subnet, list(self.seeds),
                               **kw)[1]
        if self.mode == "quorum":
            return Peer.voter(self.me, self.cluster, universes, subnet, self.quorum, **kw)[1]
        return []

    def apply(self, rows: list) -> None:
        """One transaction: the rows in order (the same meaning the SQL store gives them)."""
        for r in rows:
            if isinstance(r, m.AddUniverse):
                u = cidr(r.cidr)
                if u not in self.universes:
                    self.universes.append(u)
                    if r.kind == "static":
                        self.static = (*self.static, u)
            elif isinstance(r, m.PutAllocation):
                if not r.fresh:  # as the store does: a wrong `fresh` leaves a row behind
                    self.freed.pop(r.address, None)
                self.allocations[r.address] = r
            elif isinstance(r, m.FreeAddress):
                self.allocations.pop(r.address, None)
                if r.universe is not None:
                    self.freed[r.address] = r
            elif isinstance(r, m.Reserve):
                self.freed.pop(r.address, None)
                self.reserved.setdefault((r.address, r.holder), r)
            elif isinstance(r, m.Unreserve):
                self.reserved.pop((r.address, r.holder), None)
            elif isinstance(r, m.ForgetFreed):
                self.freed.pop(r.address, None)
            elif isinstance(r, m.FreedSpan):
                self.freed_spans[r.start] = r
            elif isinstance(r, m.DropFreedSpan):
                self.freed_spans.pop(r.start, None)
            elif isinstance(r, m.RingWrite):
                self.ring[(r.universe, r.start)] = r
            elif isinstance(r, m.ClockWrite):
                self.clock = r
            elif isinstance(r, m.Removal):
                if r.state == "released":
                    self.removals.pop(r.target, None)
                else:
                    self.removals[r.target] = r
            elif isinstance(r, m.PeerSeen):
                self.seen.add(r.peer)
            elif isinstance(r, m.Standing):
                self.standing = r
            elif isinstance(r, m.Vote):
                self.vote = r
            elif isinstance(r, m.SeedIds):
                self.seeds = tuple(r.ids)
            else:
                raise TypeError(f"not a row: {r!r}")

    def load(self, default_subnet: Cidr, reuse_delay: float, **kw) -> Peer:
        by_text = {str(u): u for u in self.universes}
        entries: dict[Cidr, list[Entry]] = {u: [] for u in self.universes}
        for r in self.ring.values():
            u = by_text[r.universe]
            entries[u].append(Entry(parse_addr(r.start)[1], parse_addr(r.last)[1] + 1, r.owner,
                                    r.version, r.free_hint, (r.stamp_peer, r.stamp_seq)))
        rings = [Ring(u, entries[u]) for u in self.universes]
        peer = Peer(self.me, self.cluster, rings, default_subnet, reuse_delay,
                    dict(self.clock.vector), self.clock.seq, static=frozenset(self.static), **kw)
        peer.restore(self.mode, self.quorum, self.vote, self.standing, self.seeds,
                     self.seed_addresses, list(self.removals.values()))
        peer.seen = set(self.seen)
        a = peer.allocator
        for r in self.allocations.values():
            fam, v = parse_addr(r.address)
            a.load_allocation(Held(fam, v, by_text.get(r.universe), cidr(r.subnet), r.handle,
                                   r.anchor, r.allocated_at, r.address))
        a.load_freed([(*parse_addr(r.address), r.freed_at) for r in sorted(
            self.freed.values(), key=lambda f: (f.freed_at, f.address))])
        for r in self.freed_spans.values():
            a.load_freed_span(by_text[r.universe], parse_addr(r.start)[1],
                              parse_addr(r.last)[1] + 1)
        for r in self.reserved.values():
            a.load_reserved(parse_addr(r.address), r.holder)
        return peer
