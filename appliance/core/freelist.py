"""The freed addresses of one universe, in reuse order, held in space that follows the live state.

Three parts, each less recently freed than the next:
- `folded`: freed addresses whose quarantine is over and that fell out of `cool`, as intervals
  ("used once, free"). Which of them was freed first is forgotten: allocate takes the lowest.
- `cool`: the most recently freed addresses whose quarantine is over, at most `keep` once folded
  (`fold`), least recently freed first.
- the quarantine: freed less than reuse_delay ago, in order of freeing (a FIFO of two columns;
  an address taken out of it, by a claim or a reservation, leaves a hole, noted by its free
  count in `_holes`), and sorted by address for counting by bisect. Its size follows the rate
  of frees times reuse_delay, not the live state, so its columns are packed arrays of offsets
  from the universe's start (24 bytes an address instead of about 80 as lists of ints and
  floats), where the universe is small enough (up to 2**64 addresses, an IPv6 /64).
`expire(now)` moves addresses whose quarantine is over from the quarantine to `cool`; it changes
no meaning, so queries call it too. `fold` changes what is stored, so only a free calls it: its
caller writes the rows it returns.
"""
from __future__ import annotations

from array import array
from bisect import bisect_left, insort
from collections import OrderedDict

from .intervals import IntervalSet

KEEP_FREED = 4096  # freed addresses remembered one by one once their quarantine is over
PACKED = 1 << 64  # offsets below this fit an array('Q')


class FreeList:
    def __init__(self, reuse_delay: float, keep: int = KEEP_FREED, base: int = 0,
                 size: int = PACKED):
        """Addresses are in [base, base + size)."""
        self.reuse_delay = reuse_delay
        self.base = base
        self.keep = keep
        self.folded = IntervalSet()
        self.folded_count = 0
        # address -> (freed_at, n): n counts frees, so an undone take goes back in its place.
        self.cool: OrderedDict[int, tuple[float, int]] = OrderedDict()
        self._column = (lambda xs=(): array("Q", xs)) if size <= PACKED else list
        self._q_addr = self._column()  # offsets from base
        self._q_time = array("d")
        self._q_head = 0
        self._q_base = 0  # the free count of _q_addr[0]
        self._holes: set[int] = set()  # free counts of the entries taken out meanwhile
        self.q_sorted = self._column()  # the quarantined addresses' offsets, sorted

    # -- questions -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.folded_count + len(self.cool) + len(self.q_sorted)

    def __contains__(self, address: int) -> bool:
        return address in self.cool or address in self.folded or self._in_quarantine(address)

    def _in_quarantine(self, address: int) -> bool:
        off = address - self.base
        i = bisect_left(self.q_sorted, off)
        return i < len(self.q_sorted) and self.q_sorted[i] == off

    def _q_index(self, address: int) -> int:
        """Where the quarantined address is in the FIFO (it may also be in a hole before)."""
        off, i = address - self.base, self._q_head
        while True:
            i = self._q_addr.index(off, i)
            if self._q_base + i not in self._holes:
                return i
            i += 1

    def tracked(self) -> int:
        """Addresses remembered one by one (cool and quarantined): what costs memory and rows."""
        return len(self.cool) + len(self.q_sorted)

    def get(self, address: int) -> float | None:
        """When address was freed, if that is remembered (not folded)."""
        if address in self.cool:
            return self.cool[address][0]
        if self._in_quarantine(address):
            return self._q_time[self._q_index(address)]
        return None

    def items(self):
        """(address, freed_at) of the tracked addresses, least recently freed first."""
        for a, (t, _) in self.cool.items():
            yield a, t
        for i in range(self._q_head, len(self._q_addr)):
            if self._q_base + i not in self._holes:
                yield self.base + self._q_addr[i], self._q_time[i]

    def quarantined(self, now: float):
        """(address, freed_at) of those freed less than reuse_delay ago, most recent first."""
        for i in range(len(self._q_addr) - 1, self._q_head - 1, -1):
            t = self._q_time[i]
            if t + self.reuse_delay <= now:
                return
            if self._q_base + i not in self._holes:
                yield self.base + self._q_addr[i], t

    def quarantined_count(self, now: float) -> int:
        self.expire(now)
        return len(self.q_sorted)

    def quarantined_in(self, lo: int, hi: int) -> int:
        """Quarantined addresses in [lo, hi) as of the last expire."""
        qs, b = self.q_sorted, self.base
        return bisect_left(qs, hi - b) - bisect_left(qs, lo - b)

    def quarantined_between(self, lo: int, hi: int) -> list[int]:
        qs, b = self.q_sorted, self.base
        return [b + off for off in qs[bisect_left(qs, lo - b):bisect_left(qs, hi - b)]]

    def pick(self, lo: int, hi: int, now: float, usable) -> int | None:
        """The address in [lo, hi) to reuse: the lowest folded one, else the least recently
        freed of the rest whose quarantine is over; `usable(address)` must hold."""
        self.expire(now)
        x = lo
        while (x := self.folded.first_in(x, hi)) is not None:
            if usable(x):
                return x
            x += 1
        for address in self.cool:
            if lo <= address < hi and usable(address):
                return address
        return None

    # -- changes -------------------------------------------------------------------------------

    def expire(self, now: float) -> None:
        """Quarantine over: from the head of the quarantine to the tail of cool."""
        qa, qt, holes, b = self._q_addr, self._q_time, self._holes, self.base
        i = self._q_head
        while i < len(qa) and qt[i] + self.reuse_delay <= now:
            n = self._q_base + i
            if not holes or n not in holes:
                off = qa[i]
                self.cool[b + off] = (qt[i], n)
                del self.q_sorted[bisect_left(self.q_sorted, off)]
            else:
                holes.discard(n)
            i += 1
        self._q_head = i
        if i > 64 and i * 2 > len(qa):  # drop the consumed head now and then, not each time
            del qa[:i], qt[:i]
            self._q_head = 0
            self._q_base += i

    def free(self, address: int, t: float) -> None:
        """address was freed at t (not before any address freed earlier). It is in no part."""
        off = address - self.base
        self._q_addr.append(off)
        self._q_time.append(t)
        insort(self.q_sorted, off)

    def take(self, address: int, changes: dict):
        """Take address out of whichever part has it; span changes go into `changes` (see
        _touch). Returns what undoes it in memory, or None if it was in none."""
        t = self.cool.pop(address, None)
        if t is not None:
            return lambda: self._back_to_cool(address, t)
        if self._in_quarantine(address):
            i = self._q_index(address)
            n, t = self._q_base + i, self._q_time[i]
            self._holes.add(n)
            off = address - self.base
            del self.q_sorted[bisect_left(self.q_sorted, off)]

            def undo_quarantine():
                if n - self._q_base >= self._q_head:
                    self._holes.discard(n)
                    insort(self.q_sorted, off)
                else:  # its quarantine ended meanwhile
                    self._back_to_cool(address, (t, n))
            return undo_quarantine
        if address not in self.folded:
            return None
        self._touch(address, address + 1, changes, False)
        self.folded.discard(address)
        self.folded_count -= 1
        self._touch(address, address + 1, changes, True)

        def undo_folded():
            self.folded.add(address)
            self.folded_count += 1
        return undo_folded

    def _back_to_cool(self, address: int, when: tuple[float, int]) -> None:
        """An undone take: back in its place (rare: a request that failed half-way)."""
        self.cool = OrderedDict(sorted([*self.cool.items(), (address, when)],
                                       key=lambda kv: kv[1][1]))

    def fold(self, changes: dict) -> list[int]:
        """Fold cool's least recently freed into `folded` until `keep` are left; returns the
        addresses folded (their rows go), span changes into `changes`."""
        out = []
        while len(self.cool) > self.keep:
            a, _ = self.cool.popitem(last=False)
            self.add_folded(a, a + 1, changes)
            out.append(a)
        return out

    def add_folded(self, lo: int, hi: int, changes: dict | None = None) -> None:
        """[lo, hi) join the folded set (none of it is in another part)."""
        if changes is not None:
            self._touch(lo, hi, changes, False)
        self.folded.add_range(lo, hi)
        self.folded_count += hi - lo
        if changes is not None:
            self._touch(lo, hi, changes, True)

    def _touch(self, lo: int, hi: int, changes: dict, after: bool) -> None:
        """The stored form of `folded` is its spans, one row each keyed by start: `changes`
        maps a start to its span's end, or None for a span gone. Called before a change to
        [lo, hi) (every span there or beside it goes) and after it (those there now come)."""
        for s, e in self.folded.overlapping(lo - 1, hi + 1):
            changes[s] = e if after else None

    def forget_outside(self, keep_address, owned: list[tuple[int, int]],
                       changes: dict) -> tuple[list[int], list[tuple[int, int]]]:
        """Forget what no longer lies in owned space: (tracked addresses forgotten, folded
        ranges forgotten); span changes into `changes`."""
        gone = [a for a, _ in self.items() if not keep_address(a)]
        for a in gone:
            self.take(a, changes)
        before = self.folded.intervals()
        ranges = self.folded.keep_within(owned)
        if ranges:
            self.folded_count -= sum(hi - lo for lo, hi in ranges)
            for s, _ in before:
                changes[s] = None
            for s, e in self.folded.intervals():
                changes[s] = e
        return gone, ranges

    def load(self, rows: list[tuple[int, float]]) -> None:
        """From the database: (address, freed_at) in order of freed_at, none in any part, all
        freed after what is already here. Sorted once, not inserted one by one: a restart
        reads a quarantine's worth (hundreds of thousands at a high rate)."""
        offsets = [a - self.base for a, _ in rows]
        self._q_addr.extend(offsets)
        self._q_time.extend(t for _, t in rows)
        self.q_sorted = self._column(sorted([*self.q_sorted, *offsets]))
