"""A set of integers kept as sorted, disjoint, half-open intervals.

Used for "addresses ever used" per universe: sequential allocation keeps it at one interval, so the
lowest free address is found with one bisect rather than a scan.
"""
from __future__ import annotations

from bisect import bisect_right


class IntervalSet:
    __slots__ = ("_lo", "_hi")

    def __init__(self) -> None:
        self._lo: list[int] = []
        self._hi: list[int] = []

    def __len__(self) -> int:
        return sum(h - l for l, h in zip(self._lo, self._hi))

    def intervals(self) -> list[tuple[int, int]]:
        return list(zip(self._lo, self._hi))

    def __contains__(self, x: int) -> bool:
        i = bisect_right(self._lo, x) - 1
        return i >= 0 and x < self._hi[i]

    def add(self, x: int) -> None:
        """Add one integer, merging with neighbours."""
        i = bisect_right(self._lo, x) - 1
        if i >= 0 and x < self._hi[i]:
            return
        joins_left = i >= 0 and self._hi[i] == x
        joins_right = i + 1 < len(self._lo) and self._lo[i + 1] == x + 1
        if joins_left and joins_right:
            self._hi[i] = self._hi[i + 1]
            del self._lo[i + 1], self._hi[i + 1]
        elif joins_left:
            self._hi[i] = x + 1
        elif joins_right:
            self._lo[i + 1] = x
        else:
            self._lo.insert(i + 1, x)
            self._hi.insert(i + 1, x + 1)

    def discard(self, x: int) -> None:
        i = bisect_right(self._lo, x) - 1
        if i < 0 or x >= self._hi[i]:
            return
        lo, hi = self._lo[i], self._hi[i]
        if lo == x and hi == x + 1:
            del self._lo[i], self._hi[i]
        elif lo == x:
            self._lo[i] = x + 1
        elif hi == x + 1:
            self._hi[i] = x
        else:
            self._hi[i] = x
            self._lo.insert(i + 1, x + 1)
            self._hi.insert(i + 1, hi)

    def first_gap(self, lo: int, hi: int) -> int | None:
        """Lowest integer in [lo, hi) that is not in the set, or None."""
        i = bisect_right(self._lo, lo) - 1
        x = lo
        if i >= 0 and x < self._hi[i]:
            x = self._hi[i]
        # After jumping past the interval holding lo, x is either free or starts the next interval
        # only if intervals touched, which add() prevents by merging.
        return x if x < hi else None
