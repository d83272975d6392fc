"""The rings of every universe, held in one place, and the one way they change.

`Rings` is their only holder: the replica (gossip) and the allocator read them through it, so
a bootstrap split that replaces a universe's ring is seen by both at once.

Every change of a ring, made here or merged from a peer, goes through `RingWriter.change()`.
It checks the rules of ring.py on every ring before the change (and that the allocator's view
of what this host owns is the ring's: a change that bypassed this path shows there), and on
every changed ring after it; then it gives the rows that belong together: the entries written,
what the allocator forgets with space that left, and the clock row (the write counter and
vector, durable with the writes: DESIGN.md rule 3). A broken rule is a bug of this host,
raised as RingInvariant before any row is given, so nothing of it reaches the disk or a peer.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

from . import messages as m
from .addr import Cidr
from .ring import Entry, Ring, RingInvariant
from .spare import is_marker, is_spare

if TYPE_CHECKING:
    from .allocator import Allocator
    from .gossip import Replica


class Rings(Mapping):
    """universe -> its ring. Read-only to everyone but RingWriter (replace)."""

    def __init__(self, rings: Iterable[Ring]):
        self._by_universe: dict[Cidr, Ring] = {r.universe: r for r in rings}

    def __getitem__(self, u: Cidr) -> Ring:
        return self._by_universe[u]

    def __iter__(self) -> Iterator[Cidr]:
        return iter(self._by_universe)

    def __len__(self) -> int:
        return len(self._by_universe)

    def items(self):
        return self._by_universe.items()  # the dict's own view: gossip walks it often

    def values(self):
        return self._by_universe.values()

    def _add(self, ring: Ring) -> None:
        if ring.universe in self._by_universe:
            raise RingInvariant(f"universe {ring.universe} exists already")
        self._by_universe[ring.universe] = ring

    def _remove(self, u: Cidr) -> None:
        del self._by_universe[u]

    def _replace(self, ring: Ring) -> None:
        if ring.universe not in self._by_universe:
            raise RingInvariant(f"no universe {ring.universe} to replace the ring of")
        self._by_universe[ring.universe] = ring


class Change:
    """What one change wrote, in order, per universe. The clock row goes with it when
    anything was written or the write counter moved; `clock = True` asks for it anyway (a
    vector raised by gossip that brought no entry)."""

    def __init__(self, rings: Rings):
        self._rings = rings
        self.written: dict[Cidr, list[Entry]] = {}
        self.created: dict[Cidr, str] = {}  # universes made by this change, and their kind
        self.clock = False

    def wrote(self, u: Cidr, entries: list[Entry]) -> list[Entry]:
        self.written.setdefault(u, []).extend(entries)
        return entries

    def create(self, ring: Ring, kind: str) -> None:
        """A universe new to this host (a range added online, spare.py): its ring, and the
        row that makes it, before any ring row of it."""
        self._rings._add(ring)
        self.created[ring.universe] = kind
        self.wrote(ring.universe, ring.entries)

    def replace(self, ring: Ring) -> None:
        """A whole new ring for its universe (the bootstrap split): every entry is written."""
        self._rings._replace(ring)
        self.wrote(ring.universe, ring.entries)


class RingWriter:
    def __init__(self, me: str, rings: Rings, replica: Replica, allocator: Allocator):
        self.me, self.rings, self.replica, self.allocator = me, rings, replica, allocator
        # Each ring as this writer last checked it, and its count of writes then: a ring
        # with no write since is known good, and is not walked again before the next change.
        self._checked: dict[Cidr, tuple[Ring, int]] = {}

    @contextmanager
    def change(self, rows: list) -> Iterator[Change]:
        """with writer.change(out.rows) as ch: ch.wrote(u, ring.transfer(...)). The rows are
        added when the block ends without an exception (a refused merge adds none)."""
        self.check_invariants()
        clock = (self.replica.seq, dict(self.replica.vector))
        ch = Change(self.rings)
        try:
            yield ch
        except BaseException:
            for u in ch.created:  # refused: memory must not be ahead of the rows
                self.rings._remove(u)
                self.allocator.drop_universe(u)
            raise
        for u, kind in ch.created.items():
            rows.append(m.AddUniverse(str(u), u.family, kind))
            self.allocator.add_universe(u)
        for u, entries in ch.written.items():
            self._check(u, self.rings[u])
            rows += m.ring_rows(u, entries)
            rows += self.allocator.ring_changed(u)
            self._checked[u] = (self.rings[u], self.rings[u].writes)
        if ch.created or any(is_spare(u) or self.allocator.kind(u) == "blocks" or
                             any(is_marker(e.owner) for e in es)
                             for u, es in ch.written.items()):
            self.allocator.carves_changed()  # a marker may have changed: what they say
        if ch.written or ch.clock or clock != (self.replica.seq, self.replica.vector):
            rows.append(self.clock_row())

    def clock_row(self) -> m.ClockWrite:
        return m.ClockWrite(self.replica.seq, tuple(sorted(self.replica.vector.items())))

    def check_invariants(self) -> None:
        """Every ring keeps ring.py's rules and the allocator sees what the ring says this
        host owns; else RingInvariant naming what broke."""
        for u, ring in self.rings.items():
            if self._checked.get(u) == (ring, ring.writes):
                continue
            self._check(u, ring)
            if self.allocator.owned(u) != ring.owned_by(self.me):
                raise RingInvariant(f"ring of {u}: the allocator's view of what {self.me} owns "
                                    "is not the ring's (a ring change that bypassed "
                                    "RingWriter.change)")
            self._checked[u] = (ring, ring.writes)

    def _check(self, u: Cidr, ring: Ring) -> None:
        if ring.universe != u:
            raise RingInvariant(f"the ring of {ring.universe} is filed under {u}")
        ring.check_changed()
