"""Version vectors and delta gossip over the rings of all universes.

Each peer stamps its ring writes (peer, seq), seq counting up by one per write, and keeps a
vector {peer: seq} that means "my rings hold every write of that peer up to seq, or a later
write that replaced it". A delta for a peer whose vector is V holds every entry whose stamp V
does not cover; having merged all of it, the receiver may raise its vector to the sender's
(which also covers writes the sender saw replaced, so they are never sent again). A delta is
merged whole or not at all: raising a vector on part of one (a truncated frame, a single
relayed write) would hide the writes not yet seen, for good.

A peer that knows nothing (empty vector) is sent every entry: full state is the same rule.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .addr import Cidr
from .ring import Entry, Ring, RingError
from .rings import Rings

Vector = dict[str, int]
DIGEST_SIZE = 8  # bytes; a collision only delays a repair until the vectors change again


@dataclass(frozen=True)
class Delta:
    """What a sender knew (its vector), the vector it assumed the receiver has (base), and
    every entry that base does not cover."""
    vector: tuple[tuple[str, int], ...]
    entries: tuple[tuple[Cidr, Entry], ...]
    base: tuple[tuple[str, int], ...] | None = ()  # None: a hello, "tell me your vector"

    def size(self) -> int:
        return len(self.entries)


def covers(vector: Vector, stamp: tuple[str, int]) -> bool:
    return stamp[1] <= vector.get(stamp[0], 0)


class Replica:
    def __init__(self, me: str, rings: Rings | list[Ring], vector: Vector | None = None,
                 seq: int = 0):
        self.me = me
        self.rings = rings if isinstance(rings, Rings) else Rings(rings)  # read and merged
        self.vector: Vector = dict(vector or {})
        self.seq = max(seq, self.vector.get(me, 0))
        self._frozen: Vector = {}
        self._items: tuple[tuple[str, int], ...] = ()  # the frozen vector's, as deltas carry it
        self._digest: tuple | None = None  # (frozen vector, removed ids, their digest)

    def frozen(self) -> Vector:
        """The vector now, as a dict nobody changes: the same object while the vector stays
        the same. What partners have, or are assumed to have, is mostly this vector: kept as a
        copy per partner it is peers^2 items on every peer."""
        if self._frozen != self.vector:
            self._frozen = dict(self.vector)
            self._items = tuple(self._frozen.items())
        return self._frozen

    def next_stamp(self) -> tuple[str, int]:
        """The stamp of this peer's next write. The caller persists seq with the write before
        anything leaves the host, so a restart never reuses a stamp."""
        self.seq += 1
        self.vector[self.me] = self.seq
        return (self.me, self.seq)

    def delta_for(self, their: Vector) -> Delta:
        # Only writes this peer knows whole (its own vector covers them) are passed on. Others
        # (from grants, or relayed ahead of the rest of their writer's news) wait until it
        # does: passed on, nobody's vector would ever cover them and they would be resent for
        # ever. Withholding them is safe because entries carry their own ends: a peer missing
        # one can only think it owns less.
        # Writers of whom we know more than they do: most answers find none, and skip the scan.
        # Vectors go as tuples made once per vector, not per delta (at 1,000 peers making them
        # was a seventh of the simulator's time).
        frozen = self.frozen()
        lacking = {} if their is frozen else {p: (their.get(p, 0), s) for p, s in frozen.items()
                                              if s > their.get(p, 0)}
        entries = []
        for u, ring in self.rings.items() if lacking else ():
            mine = [e for p, (lo, hi) in lacking.items() for e in ring.written_by(p)
                    if lo < e.stamp[1] <= hi]
            entries += [(u, e) for e in sorted(mine, key=lambda e: e.start)]
        # Vectors in the dicts' order, not sorted: nothing reads them in order, and sorting
        # both for every delta was most of its cost at a hundred peers.
        return Delta(self._items, tuple(entries),
                     self._items if their is frozen else tuple(their.items()))

    def hello(self) -> Delta:
        return Delta(self.vector_items(), (), None)

    def vector_items(self) -> tuple[tuple[str, int], ...]:
        """The vector as deltas carry it: made once per vector (with frozen), not per delta."""
        self.frozen()
        return self._items

    def digest(self, removed) -> bytes:
        """A short hash of the vector and the removed peers' ids (not who removed them: two
        peers may have heard that differently): equal on two peers that have seen the same
        writes and removals, so a probe need not carry the vector itself."""
        frozen, gone = self.frozen(), sorted(removed)
        kept = self._digest
        if kept is not None and kept[0] is frozen and kept[1] == gone:
            return kept[2]  # asked for each probe sent and received: made once per vector
        h = hashlib.blake2b(digest_size=DIGEST_SIZE)
        h.update(repr((sorted(frozen.items()), gone)).encode())
        self._digest = (frozen, gone, h.digest())
        return self._digest[2]

    def complete_for_me(self, delta: Delta) -> bool:
        """Was the delta made against a vector this peer's own covers? Only then does it hold
        everything this peer lacks of what the sender knew."""
        return delta.base is not None and all(self.vector.get(p, 0) >= s for p, s in delta.base)

    def receive(self, delta: Delta) -> list[tuple[Cidr, Entry]]:
        """Merge a delta; return what changed. RingConflict or RingError: nothing changed.

        The caller merges a gossip delta only when complete_for_me(delta), else raising the
        vector would claim writes never seen. (Grants are partial on purpose and carry no
        vector: entries say what they cover, so a partial set is safe to merge.)"""
        by_universe: dict[Cidr, list[Entry]] = {}
        for u, e in delta.entries:
            if u not in self.rings:
                raise RingError(f"entry for unknown universe {u}")
            by_universe.setdefault(u, []).append(e)
        # Check every universe before changing any, so a refusal changes nothing.
        for u, es in by_universe.items():
            self.rings[u].merge(es, apply=False)
        changed = []
        for u, es in by_universe.items():
            changed += [(u, e) for e in self.rings[u].merge(es)]
        for peer, seq in delta.vector:
            if seq > self.vector.get(peer, 0):
                self.vector[peer] = seq
        return changed
