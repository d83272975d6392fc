"""A peer's durable state as the rows it committed, and the peer rebuilt from them.

The simulator keeps one of these per peer in place of SQLite: a restart is exactly "build the
peer again from what was committed", so a crash at any point is modelled faithfully.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import messages as m
from .addr import Cidr, cidr, parse_addr
from .allocator import Held
from .peer import Peer
from .ring import Entry, Ring


@dataclass
class Durable:
    me: str
    cluster: str
    universes: list[Cidr]  # static ones (claim-only space) included
    static: tuple[Cidr, ...] = ()
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
    # How this peer was bootstrapped: the shell passes these again on every start (flags).
    mode: str = "founder"
    quorum: int | None = None
    seeds: tuple[str, ...] = ()

    def apply(self, rows: list) -> None:
        """One transaction: the rows in order (the same meaning the SQL store gives them)."""
        for r in rows:
            if isinstance(r, m.PutAllocation):
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
        peer.restore_bootstrap(self.mode, self.quorum, self.vote, self.standing, self.seeds)
        peer.restore_removals(list(self.removals.values()))
        peer.seen = set(self.seen)
        a = peer.allocator
        for u in self.universes:
            a.ring_changed(u)
        for r in self.allocations.values():
            fam, v = parse_addr(r.address)
            a.load_allocation(Held(fam, v, by_text.get(r.universe), cidr(r.subnet), r.handle,
                                   r.anchor, r.allocated_at, r.address))
        for r in sorted(self.freed.values(), key=lambda f: (f.freed_at, f.address)):
            a.load_freed(by_text[r.universe], parse_addr(r.address)[1], r.freed_at)
        for r in self.freed_spans.values():
            a.load_freed_span(by_text[r.universe], parse_addr(r.start)[1],
                              parse_addr(r.last)[1] + 1)
        for r in self.reserved.values():
            a.load_reserved(parse_addr(r.address), r.holder)
        return peer
