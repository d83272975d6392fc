"""Which free block a donor gives: the one that fragments the ring least.

Every transfer may write a new entry at each end of the block (where the end falls inside an
entry) and may add runs of one owner (where the block does not touch the requester's space).
Entries are never deleted, so a donor that always cut the largest aligned block out of the
middle of its space would leave the ring a little longer with every grant. Instead the donor
weighs each candidate block: a block twice as large is worth one more entry or run.
Among equals an aligned block wins, then the larger, then the lower. Candidates
are the largest aligned block of each free run and, at every existing boundary inside a free
run, the largest block that starts or ends there (such a block costs no new entry there).
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right

from .ring import Ring


def choose_block(ring: Ring, me: str, to: str, free_runs: list[tuple[int, int]],
                 limit: int, holding: int | None = None) -> tuple[int, int] | None:
    """The block to give `to` out of free_runs (ascending, owned by me), at most limit long
    and, for a claim, holding that address; None if there is nothing to give."""
    if limit < 1:
        return None
    starts = [e.start for e in ring.entries] + [ring.universe.end]
    best, best_key = None, None
    for s, x in free_runs:
        candidates = [_largest_aligned(s, x, limit)]
        if holding is not None:
            candidates += _aligned_holding(s, x, limit, holding)
        for b in starts[bisect_left(starts, s):bisect_right(starts, x)]:
            if b < x:
                size = _pow2_at(b, min(x - b, limit))
                candidates += [(b, min(x, b + limit)), (b, b + size)]
            if b > s:
                size = _pow2_at(b, min(b - s, limit))
                candidates += [(max(s, b - limit), b), (b - size, b)]
        for lo, hi in candidates:
            if holding is not None and not lo <= holding < hi:
                continue
            cost = ring.cuts(lo, hi) + _runs_added(ring, me, to, lo, hi)
            # Aligned blocks read better as CIDRs in status; among equals, prefer them.
            aligned = (hi - lo) & (hi - lo - 1) == 0 and lo % (hi - lo) == 0
            key = ((hi - lo).bit_length() - cost, aligned, hi - lo, -lo)
            if best_key is None or key > best_key:
                best, best_key = (lo, hi), key
    return best


def _pow2_at(b: int, most: int) -> int:
    """The largest power of two, at most `most`, that b is a multiple of: the size of the
    largest aligned block starting or ending at b."""
    size = 1
    while size * 2 <= most and b % (size * 2) == 0:
        size *= 2
    return size


def _aligned_holding(lo: int, hi: int, limit: int, address: int) -> list[tuple[int, int]]:
    """The aligned blocks inside [lo, hi) that hold address, up to limit long."""
    out, size = [], 1
    while size <= limit:
        start = address - address % size
        if start < lo or start + size > hi:
            break
        out.append((start, start + size))
        size *= 2
    return out


def _runs_added(ring: Ring, me: str, to: str, lo: int, hi: int) -> int:
    """How many more runs of one owner the ring has once [lo, hi) goes from me to `to`."""
    left = ring.owner_of(lo - 1) if lo > ring.universe.start else None
    right = ring.owner_of(hi) if hi < ring.universe.end else None
    return ((left != to) + (right != to)) - ((left != me) + (right != me))


def _largest_aligned(lo: int, hi: int, limit: int) -> tuple[int, int]:
    """The largest power-of-two block aligned to its size inside [lo, hi), at most limit."""
    size = 1
    while size * 2 <= min(hi - lo, limit):
        size *= 2
    while size > 1:
        start = -(-lo // size) * size  # first multiple of size at or after lo
        if start + size <= hi:
            return (start, start + size)
        size //= 2
    return (lo, lo + 1)


def returnable(ring: Ring, me: str) -> list[tuple[int, int, str]]:
    """My runs with the neighbour each would best go back to: the peer on both sides if it
    is the same one (giving the run back takes two runs out of the ring), else one beside it
    (one run fewer). No new entry is written, since the ends of a run are boundaries already.
    A run goes only into a larger run beside it (ties: to the lower name): two peers that
    each gave the other its run at once would swap them, again and again. Runs next to space
    no entry covers are kept."""
    runs = _runs(ring)
    out = []
    for i, (owner, lo, hi) in enumerate(runs):
        if owner != me:
            continue
        around = [runs[j] for j in (i - 1, i + 1) if 0 <= j < len(runs)]
        if any(o is None for o, _, _ in around) or not around:
            continue
        both = len(around) == 2 and around[0][0] == around[1][0]
        for o, nlo, nhi in sorted(around, key=lambda r: r[1] - r[2]):  # largest first
            if (nhi - nlo, me) > (hi - lo, o):
                out.append((lo, hi, o))
                break
            if both:
                break
    return out


def _runs(ring: Ring) -> list[tuple[str | None, int, int]]:
    """The ring as runs of one owner, ascending; None where no entry covers the space."""
    out: list[tuple[str | None, int, int]] = []
    at = ring.universe.start
    for e, lo, hi in ring.spans():
        if lo > at:
            out.append((None, at, lo))
        if out and out[-1][0] == e.owner and out[-1][2] == lo:
            out[-1] = (e.owner, out[-1][1], hi)
        else:
            out.append((e.owner, lo, hi))
        at = hi
    if at < ring.universe.end:
        out.append((None, at, ring.universe.end))
    return out
