"""The ring of one universe: who owns which part of the address space.

Sorted entries (start, end, owner, version, free_hint, stamp); an entry owns [start, end). The
end is written by the owner that made the boundary, so an entry says exactly what it covers:
a peer that has not heard of some entry can only think it owns less than it does, never more
(deriving the end from the next entry one happens to know would let a missing entry widen a
peer's space into another's). Single writer: only the owner of the
space an entry covers changes it, always bumping its version, so merging two copies is "per
start, the higher version wins": commutative, associative, idempotent, and never backwards.
Equal version with different owners can only come from a bug or a forged peer; it is reported as
a conflict and nothing is merged, never resolved silently (DESIGN.md section 3).

Entries are never deleted: a boundary that no longer separates two owners stays, owned like its
neighbour, so a late copy of the old entry can never bring it back. Such entries cost memory,
not correctness; `segments()` counts the boundaries that matter.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, replace

from .addr import Cidr
from .spare import is_marker, marker, parse_marker

# Free hints are advisory and travel in gossip and SQLite INTEGERs: an IPv6 range's count
# saturates here rather than overflowing.
HINT_MAX = 2**63 - 1
GAP_VERSION = 2**32  # see claim_gaps
KEPT = 64  # puts the sorted view is brought up to date for before it is rebuilt instead (_put)


@dataclass(frozen=True)
class Entry:
    start: int
    end: int
    owner: str
    version: int
    free_hint: int = 0
    # Who wrote this version and their sequence number at the time: what version vectors count.
    stamp: tuple[str, int] = ("", 0)

    def same_write(self, other: Entry) -> bool:
        return self.owner == other.owner and self.stamp == other.stamp


class RingConflict(Exception):
    def __init__(self, start: int, mine: Entry, theirs: Entry):
        super().__init__(f"ring conflict at {start} version {mine.version}: "
                         f"{mine.owner} ({mine.stamp}) vs {theirs.owner} ({theirs.stamp})")
        self.start, self.mine, self.theirs = start, mine, theirs


class RingError(ValueError):
    """An operation the rules forbid (a bug in the caller), or an entry a peer must not send."""


class RingInvariant(Exception):
    """A ring that breaks the rules above: a bug in this host's code, never a peer's data
    (that is refused by check_entry before it is merged). The message names what broke."""


class Ring:
    def __init__(self, universe: Cidr, entries: list[Entry] | None = None):
        self.universe = universe
        self._by_start: dict[int, Entry] = {}
        # start -> entry, per writer (stamp[0]): gossip sends what a peer lacks of a few
        # writers' news, and finds it here instead of scanning every entry of every ring.
        self._by_writer: dict[str, dict[int, Entry]] = {}
        for e in entries or []:
            self.check_entry(e)
            self._index(e)
        self._sorted: list[Entry] | None = None
        self._spans: list[tuple[Entry, int, int]] | None = None
        self._starts: list[int] = []
        self._dirty: set[int] | None = None  # starts put since the last check; None: never checked
        self._kept = 0  # puts the views were brought up to date for since they were built
        self.writes = 0  # entries put since made: RingWriter skips checking a ring it knows

    @classmethod
    def single_owner(cls, universe: Cidr, owner: str, stamp: tuple[str, int] = ("", 0)) -> Ring:
        return cls(universe, [Entry(universe.start, universe.end, owner, 1,
                                    min(universe.size, HINT_MAX), stamp)])

    @classmethod
    def split(cls, universe: Cidr, owners: list[str]) -> Ring:
        """The bootstrap ring every first peer computes alike: the universe cut into the
        smallest power-of-two number of equal aligned blocks that gives each owner one, dealt
        out in sorted order (the spare blocks go round again from the first). Each owner's
        entries are its write number 1, so every copy is the same write."""
        owners = sorted(set(owners))
        k = 1
        while k < len(owners) and k < universe.size:
            k *= 2
        size = universe.size // k
        return cls(universe, [Entry(universe.start + i * size, universe.start + (i + 1) * size,
                                    owners[i % len(owners)], 1, min(size, HINT_MAX),
                                    (owners[i % len(owners)], 1)) for i in range(k)])

    def check_entry(self, e: Entry) -> None:
        """What any entry, ours or a peer's, must satisfy before it is merged."""
        if not self.universe.start <= e.start < e.end <= self.universe.end:
            raise RingError(f"ring entry [{e.start}, {e.end}) lies outside {self.universe}")
        if e.version < 1 or not e.owner or not 0 <= e.free_hint <= HINT_MAX:
            raise RingError(f"ring entry at {e.start} is malformed: {e}")

    def check_invariants(self) -> None:
        """Raise RingInvariant unless this copy keeps the rules: the sorted view holds exactly
        the entries, ascending, each filed under its own start; each carries an end past its
        start inside the universe (check_entry); and what each covers here is disjoint from
        the next: one owner per address. One pass, no sort."""
        self._check_counts()
        for i in range(len(self.spans())):
            self._check_at(i)
        self._dirty = set()  # only once it passed: a failed check fails again

    def check_changed(self) -> None:
        """check_invariants, after it once ran, for what was put since: each entry put and
        its neighbours (whose spans it can change; the rest are the same objects at the same
        places). It runs on every change: a walk of every entry there was most of a busy
        peer's time at a few hundred peers (each peer merges every change)."""
        dirty = self._dirty
        if dirty is None:
            return self.check_invariants()
        self._check_counts()
        n = len(self.spans())  # first: it brings _starts up to date if the views were dropped
        starts, at = self._starts, set()
        for s in dirty:
            i = bisect_left(starts, s)
            if i >= n or starts[i] != s:
                raise RingInvariant(f"ring of {self.universe}: the sorted entries are out of "
                                    f"date at {s}")
            at.update(j for j in (i - 1, i, i + 1) if 0 <= j < n)
        for i in sorted(at):
            self._check_at(i)
        self._dirty = set()

    def _check_counts(self) -> None:
        where, held, es = f"ring of {self.universe}", self._by_start, self.entries
        if len(es) != len(held):
            raise RingInvariant(f"{where}: the sorted entries are not the entries "
                                f"({len(es)} listed, {len(held)} held)")
        if sum(map(len, self._by_writer.values())) != len(held):
            raise RingInvariant(f"{where}: the entries by writer are not the entries")

    def _check_at(self, i: int) -> None:
        where, held, es, spans = f"ring of {self.universe}", self._by_start, self.entries, \
            self.spans()
        e, lo, hi = spans[i]
        last, prev = (spans[i - 1][2], es[i - 1].start) if i else (self.universe.start, None)
        if e.end <= e.start:
            raise RingInvariant(f"{where}: the entry at {e.start} ends at {e.end}, not "
                                "past its start")
        if lo != e.start or not lo < hi <= e.end:
            raise RingInvariant(f"{where}: the entry [{e.start}, {e.end}) is said to cover "
                                f"[{lo}, {hi})")
        if lo < last:
            raise RingInvariant(f"{where}: [{lo}, {last}) has two owners")
        if held.get(e.start) is not e:
            key = next((k for k, v in held.items() if v is e), None)
            if key is not None:
                raise RingInvariant(f"{where}: the entry at {e.start} is filed under {key}")
            raise RingInvariant(f"{where}: the entry at {e.start} is not held")
        if es[i] is not e or self._starts[i] != e.start or \
                prev is not None and prev >= e.start:
            raise RingInvariant(f"{where}: the sorted entries are out of date at {e.start}")
        if self._by_writer.get(e.stamp[0], {}).get(e.start) is not e:
            raise RingInvariant(f"{where}: the entry at {e.start} is not filed under its "
                                f"writer {e.stamp[0]!r} (gossip would not send it)")
        try:
            self.check_entry(e)
        except RingError as err:
            raise RingInvariant(f"{where}: {err}") from None

    @property
    def entries(self) -> list[Entry]:
        if self._sorted is None:
            self._sorted = sorted(self._by_start.values(), key=lambda e: e.start)
            self._starts = [e.start for e in self._sorted]
            self._kept = 0
        return self._sorted

    def get(self, start: int) -> Entry | None:
        return self._by_start.get(start)

    def spans(self) -> list[tuple[Entry, int, int]]:
        """What each entry covers here, as (entry, lo, hi) in ascending order: from its start
        to its own end or the next entry's start, whichever comes first."""
        if self._spans is None:
            es = self.entries
            self._spans = [(e, e.start, min(e.end, es[i + 1].start) if i + 1 < len(es)
                            else e.end) for i, e in enumerate(es)]
        return self._spans

    def owned_by(self, owner: str) -> list[tuple[int, int]]:
        """[lo, hi) ranges of the universe that owner holds, ascending, adjacent ones joined."""
        out: list[tuple[int, int]] = []
        for e, lo, hi in self.spans():
            if e.owner != owner:
                continue
            if out and out[-1][1] == lo:
                out[-1] = (out[-1][0], hi)
            else:
                out.append((lo, hi))
        return out

    def owner_of(self, value: int) -> str | None:
        """The owner of value as far as this copy knows, or None."""
        e = self._containing(value)
        return e.owner if e is not None else None

    def _containing(self, value: int) -> Entry | None:
        # Called for each freed address that allocate considers: a bisect, not a scan.
        es = self.entries
        i = bisect_right(self._starts, value) - 1
        if i < 0 or value >= es[i].end or (i + 1 < len(es) and value >= es[i + 1].start):
            return None
        return es[i]

    def segments(self) -> int:
        """Runs of one owner: the ring's size as far as fragmentation goes."""
        n, last = 0, None
        for e in self.entries:
            if e.owner != last:
                n, last = n + 1, e.owner
        return n

    def cuts(self, lo: int, hi: int) -> int:
        """How many new entries a transfer of [lo, hi) would write: one for each end that
        falls inside an entry rather than on a boundary."""
        n = 0
        for edge in (lo, hi):
            e = self._containing(edge)
            n += e is not None and e.start < edge
        return n

    # -- changes by the owner ------------------------------------------------------------------

    def transfer(self, me: str, lo: int, hi: int, to: str, stamp: tuple[str, int],
                 free_hint: int = 0) -> list[Entry]:
        """Hand [lo, hi), which `me` owns, to `to`; return the entries written.

        Boundaries at lo and hi are made first (splitting my entry there: the first part keeps
        its start with a shorter end, the rest is a new entry), then every entry inside is
        rewritten with owner `to` at version + 1. The caller persists the result before any
        message says so.
        """
        if not (self.universe.start <= lo < hi <= self.universe.end):
            raise RingError(f"cannot transfer [{lo}, {hi}) of {self.universe}")
        if not any(olo <= lo and hi <= ohi for olo, ohi in self.owned_by(me)):
            raise RingError(f"{me} does not own all of [{lo}, {hi})")
        written: dict[int, Entry] = {}
        for edge in (lo, hi):
            e = self._containing(edge)
            if e is not None and e.start < edge:
                # A new boundary inside one of my entries: never a boundary before, since
                # boundaries are never removed, so version 1 cannot collide with anyone's.
                bump = 0 if e.start in written else 1  # not yet published: amend it
                written[e.start] = self._put(replace(e, end=edge, version=e.version + bump,
                                                     stamp=stamp))
                written[edge] = self._put(Entry(edge, e.end, me, 1, 0, stamp))
        for e in list(self.entries):
            if lo <= e.start < hi:
                hint = max(0, min(free_hint, HINT_MAX)) if e.start == lo else 0  # a /48 counts past 2^64
                written[e.start] = self._put(replace(e, owner=to, version=e.version + 1,
                                                     free_hint=hint, stamp=stamp))
        return sorted(written.values(), key=lambda e: e.start)

    def remark(self, start: int, owner: str, stamp: tuple[str, int]) -> Entry:
        """Rewrite a carve marker (spare.py: retire or resume a range): only a marker, and
        only into a marker of the same universe."""
        e = self._by_start[start]
        if not is_marker(e.owner) or \
                parse_marker(e.owner).universe != parse_marker(owner).universe:
            raise RingError(f"cannot rewrite the entry at {start} ({e.owner}) as {owner}")
        return self._put(replace(e, owner=owner, version=e.version + 1, stamp=stamp))

    def unmark(self, c: Cidr, me: str, stamp: tuple[str, int]) -> list[Entry]:
        """Give the space carved as c back to `me` as its own (c dissolved: spare.py). Only
        the host that owns all of c's own ring may: the caller has checked."""
        out = []
        for e in list(self.entries):
            if is_marker(e.owner) and parse_marker(e.owner).universe == c:
                out.append(self._put(replace(e, owner=me, version=e.version + 1, free_hint=0,
                                             stamp=stamp)))
        if not out:
            raise RingError(f"no marker of {c} in the ring of {self.universe}")
        return out

    def revive(self, me: str, stamp: tuple[str, int], free_hint: int,
               version: int) -> list[Entry]:
        """A dissolved universe carved again: every entry (each says "dissolved") becomes
        `me`'s, at `version` (spare.py: above any this universe's entries had) or higher."""
        if not all(is_marker(e.owner) for e in self.entries):
            raise RingError(f"{self.universe} is in use: it cannot be carved again")
        hint = min(free_hint, HINT_MAX)
        return [self._put(replace(e, owner=me, version=max(version, e.version + 1),
                                  free_hint=hint if i == 0 else 0, stamp=stamp))
                for i, e in enumerate(list(self.entries))]

    def carve_first(self, universes: dict[Cidr, str]) -> Ring:
        """A spare ring as the first peers make it (spare.py), every universe given
        ({cidr: "range" or "static"}) carved out under its marker. Each piece keeps the
        version and stamp of the entry it was cut from, so every first peer computes the very
        same entries."""
        cuts = sorted((u, state) for u, state in universes.items()
                      if u.family == self.universe.family and u.prefix > 0)
        out = []
        for e, lo, hi in self.spans():
            pieces = [(lo, hi, e.owner)]
            for u, state in cuts:
                new = []
                for a, b, o in pieces:
                    if u.end <= a or b <= u.start or is_marker(o):
                        new.append((a, b, o))
                        continue
                    if a < u.start:
                        new.append((a, u.start, o))
                    new.append((max(a, u.start), min(b, u.end), marker(state, u)))
                    if u.end < b:
                        new.append((u.end, b, o))
                pieces = new
            out += [Entry(a, b, o, e.version, 0, e.stamp) for a, b, o in pieces]
        return Ring(self.universe, out)

    def set_hint(self, me: str, start: int, free: int, stamp: tuple[str, int]) -> Entry:
        e = self._by_start[start]
        if e.owner != me:
            raise RingError(f"{me} cannot change the entry at {start}, owned by {e.owner}")
        return self._put(replace(e, free_hint=max(0, min(free, HINT_MAX)), version=e.version + 1,
                                 stamp=stamp))

    def reclaim(self, dead: str, to: str, stamp: tuple[str, int]) -> list[Entry]:
        """Rewrite every entry of a removed peer with owner `to`. The one write not made by
        the owner: the removal protocol has made `to` its only writer (every live peer
        promised to take nothing more from `dead` and to let no one else remove it)."""
        size = self._coverage()
        return [self._put(replace(e, owner=to, version=e.version + 1,
                                  free_hint=min(size.get(e.start, 0), HINT_MAX), stamp=stamp))
                for e in list(self.entries) if e.owner == dead]

    def claim_gaps(self, to: str, stamp: tuple[str, int]) -> list[Entry]:
        """Give `to` every part of the universe no entry covers here. Only after a removal
        round has gathered every live peer's ring: a gap then lies where only dead peers
        knew the owner. The version is beyond any a dead copy could reach by counting, so
        such a copy, should one come back, loses."""
        written, at = [], self.universe.start
        for e, lo, hi in list(self.spans()) + [(None, self.universe.end, self.universe.end)]:
            if lo > at:
                written.append(self._put(Entry(at, lo, to, GAP_VERSION,
                                               min(lo - at, HINT_MAX), stamp)))
            at = max(at, hi)
        return written

    def _coverage(self) -> dict[int, int]:
        """start -> how many addresses that entry covers here."""
        size: dict[int, int] = {}
        for e, lo, hi in self.spans():
            size[e.start] = size.get(e.start, 0) + hi - lo
        return size

    def _index(self, e: Entry) -> None:
        old = self._by_start.get(e.start)
        if old is not None:
            mine = self._by_writer.get(old.stamp[0])
            if mine is not None:
                mine.pop(e.start, None)
                if not mine:
                    del self._by_writer[old.stamp[0]]
        self._by_start[e.start] = e
        self._by_writer.setdefault(e.stamp[0], {})[e.start] = e

    def written_by(self, writer: str) -> list[Entry]:
        """The entries whose current version `writer` wrote."""
        return list(self._by_writer.get(writer, {}).values())

    def _put(self, e: Entry) -> Entry:
        self._index(e)
        self.writes += 1
        if self._dirty is not None:
            self._dirty.add(e.start)
        es = self._sorted
        if es is None:
            return e
        self._kept += 1
        if self._kept > KEPT:
            # Many puts with the views unread since they were built (a full state merged, a
            # removed peer's space reclaimed): one rebuild when next read costs less than
            # bringing copies of them up to date for each.
            self._sorted = self._spans = None
            return e
        # The sorted view and the spans are brought up to date, not rebuilt (a sort and a
        # walk of every entry, for each change a peer merges). Copied, not changed in place:
        # lists callers got before stay what they were.
        i, es, spans = bisect_left(self._starts, e.start), es[:], self._spans
        spans = spans[:] if spans is not None else None
        if i < len(es) and es[i].start == e.start:
            es[i] = e
        else:
            es.insert(i, e)
            self._starts = self._starts[:]
            self._starts.insert(i, e.start)
            if spans is not None:
                spans.insert(i, None)
        self._sorted = es
        if spans is not None:
            for j in (i - 1, i):
                if j >= 0:
                    spans[j] = (es[j], es[j].start, min(es[j].end, es[j + 1].start)
                                if j + 1 < len(es) else es[j].end)
            self._spans = spans
        return e

    # -- merging -------------------------------------------------------------------------------

    def merge(self, other: list[Entry], apply: bool = True) -> list[Entry]:
        """Fold another copy's entries in; return the entries that change (or would, with
        apply=False: a dry run that only checks).

        All or nothing: a RingConflict or RingError leaves the ring as it was.
        """
        changed = {}
        for e in other:
            self.check_entry(e)
            cur = changed.get(e.start) or self._by_start.get(e.start)
            if cur is None or e.version > cur.version:
                changed[e.start] = e
            elif e.version == cur.version and not cur.same_write(e):
                if is_marker(cur.owner) and is_marker(e.owner):
                    # A range retired and resumed at once on two hosts (spare.py): either is
                    # safe, so the larger write wins everywhere rather than an alarm.
                    if (e.owner, e.stamp) > (cur.owner, cur.stamp):
                        changed[e.start] = e
                    continue
                raise RingConflict(e.start, cur, e)
        if apply:
            for e in changed.values():
                self._put(e)
        return list(changed.values())
