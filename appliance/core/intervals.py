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

    def add(self, x: int) -> bool:
        """Add one integer, merging with neighbours; False if it was in already."""
        i = bisect_right(self._lo, x) - 1
        if i >= 0 and x < self._hi[i]:
            return False
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
        return True

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

    def first_in(self, lo: int, hi: int) -> int | None:
        """Lowest integer in [lo, hi) that is in the set, or None."""
        i = bisect_right(self._lo, lo) - 1
        if i >= 0 and lo < self._hi[i]:
            return lo
        i += 1
        return self._lo[i] if i < len(self._lo) and self._lo[i] < hi else None

    def overlapping(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The intervals that share an integer with [lo, hi)."""
        i = max(bisect_right(self._lo, lo) - 1, 0)
        out = []
        while i < len(self._lo) and self._lo[i] < hi:
            if self._hi[i] > lo:
                out.append((self._lo[i], self._hi[i]))
            i += 1
        return out

    def add_range(self, lo: int, hi: int) -> None:
        """Add [lo, hi), merging with what it overlaps or touches."""
        if lo >= hi:
            return
        i = bisect_right(self._lo, lo) - 1
        if i >= 0 and self._hi[i] >= lo:
            lo = self._lo[i]
        else:
            i += 1
        j = i
        while j < len(self._lo) and self._lo[j] <= hi:
            hi = max(hi, self._hi[j])
            j += 1
        self._lo[i:j] = [lo]
        self._hi[i:j] = [hi]

    def add_all(self, xs) -> None:
        """Add many integers: each run of neighbours as one range (a restart's quarantine is
        mostly runs), not one add each."""
        xs = sorted(xs)
        i = 0
        while i < len(xs):
            j = i
            while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
                j += 1
            self.add_range(xs[i], xs[j] + 1)
            i = j + 1

    def discard_range(self, lo: int, hi: int) -> None:
        """Remove [lo, hi)."""
        if lo >= hi:
            return
        i = max(bisect_right(self._lo, lo) - 1, 0)
        j = i
        keep_lo, keep_hi = [], []
        while j < len(self._lo) and self._lo[j] < hi:
            a, b = self._lo[j], self._hi[j]
            if b <= lo:
                keep_lo.append(a)
                keep_hi.append(b)
            else:
                if a < lo:
                    keep_lo.append(a)
                    keep_hi.append(lo)
                if b > hi:
                    keep_lo.append(hi)
                    keep_hi.append(b)
            j += 1
        self._lo[i:j] = keep_lo
        self._hi[i:j] = keep_hi

    def keep_within(self, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Keep only what lies in the sorted, disjoint spans; return the ranges removed."""
        if not self._lo:
            return []
        removed = []
        edge = self._lo[0]  # the start of the gap before the next span
        for lo, hi in [*spans, (self._hi[-1], self._hi[-1])]:
            if edge < lo:
                removed += [(max(a, edge), min(b, lo)) for a, b in self.overlapping(edge, lo)]
            edge = max(edge, hi)
        for a, b in removed:
            self.discard_range(a, b)
        return removed
