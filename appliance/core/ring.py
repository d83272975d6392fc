"""The ring of one universe: who owns which part of the address space.

Sorted entries (start, owner, version, free_hint); an entry owns from its start up to the next
entry's start (the last one up to the universe's end). Single writer: only an entry's owner changes
it, always bumping its version, so merging two copies is "per start, the higher version wins".
Equal version with different content can only come from a bug or a forged peer; it is reported as a
conflict, never resolved silently (DESIGN.md section 3).
"""
from __future__ import annotations

from dataclasses import dataclass

from .addr import Cidr

# Free hints are advisory and travel in gossip and SQLite INTEGERs: an IPv6 range's count
# saturates here rather than overflowing.
HINT_MAX = 2**63 - 1


@dataclass(frozen=True)
class Entry:
    start: int
    owner: str
    version: int
    free_hint: int = 0

    def same_content(self, other: Entry) -> bool:
        # free_hint is advisory and changes without a version bump being meaningful for safety;
        # ownership is what must agree.
        return self.owner == other.owner


class RingConflict(Exception):
    def __init__(self, start: int, mine: Entry, theirs: Entry):
        super().__init__(f"ring conflict at {start}: {mine} vs {theirs}")
        self.start, self.mine, self.theirs = start, mine, theirs


class Ring:
    def __init__(self, universe: Cidr, entries: list[Entry] | None = None):
        self.universe = universe
        self.entries: list[Entry] = sorted(entries or [], key=lambda e: e.start)
        for e in self.entries:
            if not universe.start <= e.start < universe.end:
                raise ValueError(f"ring entry {e} lies outside {universe}")

    @classmethod
    def single_owner(cls, universe: Cidr, owner: str) -> Ring:
        return cls(universe, [Entry(universe.start, owner, 1, min(universe.size, HINT_MAX))])

    def owned_by(self, owner: str) -> list[tuple[int, int]]:
        """[lo, hi) ranges of the universe that owner holds, ascending, adjacent ones joined."""
        out: list[tuple[int, int]] = []
        for i, e in enumerate(self.entries):
            if e.owner != owner:
                continue
            hi = self.entries[i + 1].start if i + 1 < len(self.entries) else self.universe.end
            if out and out[-1][1] == e.start:
                out[-1] = (out[-1][0], hi)
            else:
                out.append((e.start, hi))
        return out

    def owner_of(self, value: int) -> str | None:
        owner = None
        for e in self.entries:
            if e.start > value:
                break
            owner = e.owner
        return owner

    def merge(self, other: list[Entry]) -> list[Entry]:
        """Fold another copy's entries in; return the entries that changed here.

        Raises RingConflict (and changes nothing) on equal versions with different owners.
        """
        mine = {e.start: e for e in self.entries}
        changed = []
        for e in other:
            cur = mine.get(e.start)
            if cur is None or e.version > cur.version:
                changed.append(e)
            elif e.version == cur.version and not cur.same_content(e):
                raise RingConflict(e.start, cur, e)
        for e in changed:
            mine[e.start] = e
        self.entries = sorted(mine.values(), key=lambda e: e.start)
        return changed
