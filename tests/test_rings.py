"""The one way rings change (core/rings.py): a broken ring is a bug of this host, raised as
RingInvariant naming what broke, before any row of the change is given."""
import dataclasses
import random
import re

import pytest

from appliance.core import messages as m
from appliance.core.addr import cidr
from appliance.core.durable import Durable
from appliance.core.gossip import Replica
from appliance.core.peer import Peer, Ready
from appliance.core.peer_messages import Gossip, SpaceRequest
from appliance.core.ring import Entry, Ring, RingInvariant

U = cidr("10.0.0.0/24")
S = U.start


def split_ring() -> Ring:
    r = Ring.single_owner(U, "a")
    r.transfer("a", S + 64, S + 128, "b", ("a", 1))
    return r


def test_a_ring_made_by_its_operations_keeps_the_rules():
    r = split_ring()
    r.check_invariants()
    r.spans()  # with its caches filled, too
    r.check_invariants()


def test_an_entry_filed_under_another_start():
    r = split_ring()
    r._by_start[S + 10] = r._by_start.pop(S + 64)
    r._sorted = r._spans = None
    with pytest.raises(RingInvariant, match=r"^ring of 10\.0\.0\.0/24: the entry at "
                       f"{S + 64} is filed under {S + 10}$"):
        r.check_invariants()


@pytest.mark.parametrize("end, why", [
    (S + 300, rf"ring entry \[{S + 128}, {S + 300}\) lies outside 10\.0\.0\.0/24"),
    (S + 128, f"the entry at {S + 128} ends at {S + 128}, not past its start")])
def test_an_entry_outside_the_universe_or_without_its_end(end, why):
    r = split_ring()
    r._put(Entry(S + 128, end, "a", 2))
    with pytest.raises(RingInvariant, match=rf"^ring of 10\.0\.0\.0/24: {why}$"):
        r.check_invariants()


def test_an_entry_missing_from_its_writers_index():
    # Gossip finds what a peer lacks through the index by writer (Ring.written_by): an entry
    # left out of it would never be sent, and the rings would stay apart with equal vectors.
    r = split_ring()
    e = r.entries[1]
    del r._by_writer[e.stamp[0]][e.start]
    with pytest.raises(RingInvariant, match=r"^ring of 10\.0\.0\.0/24: the entries by writer "
                       r"are not the entries$"):
        r.check_invariants()
    r._by_writer.setdefault("someone else", {})[e.start] = e
    with pytest.raises(RingInvariant, match=rf"^ring of 10\.0\.0\.0/24: the entry at {e.start} "
                       rf"is not filed under its writer {e.stamp[0]!r}"):
        r.check_invariants()


def test_written_by_follows_rewrites():
    r = split_ring()
    e = r.entries[0]
    assert r.written_by(e.stamp[0]) and e in r.written_by(e.stamp[0])
    (new,) = r.merge([Entry(e.start, e.end, e.owner, e.version + 1, 0, ("w", 9))])
    assert r.written_by("w") == [new] and e not in r.written_by(e.stamp[0])
    r.check_invariants()


def test_a_sorted_view_that_is_not_the_entries():
    r = split_ring()
    r.entries  # cached
    r._by_start[S + 200] = Entry(S + 200, S + 256, "a", 1)  # behind the cache's back
    with pytest.raises(RingInvariant, match=r"^ring of 10\.0\.0\.0/24: the sorted entries are "
                       r"not the entries \(3 listed, 4 held\)$"):
        r.check_invariants()


def test_two_owners_of_one_address():
    r = split_ring()
    a, b, c = r.spans()
    r._spans = [a, (b[0], b[1] - 8, b[2]), c]  # b said to start inside a: it does not
    with pytest.raises(RingInvariant, match=r"^ring of 10\.0\.0\.0/24: the entry "
                       rf"\[{S + 64}, {S + 128}\) is said to cover \[{S + 56}, {S + 128}\)$"):
        r.check_invariants()
    r._spans = [a, (dataclasses.replace(b[0], start=S + 56), S + 56, S + 128), c]
    with pytest.raises(RingInvariant, match=rf"^ring of 10\.0\.0\.0/24: \[{S + 56}, {S + 64}\) "
                       "has two owners$"):
        r.check_invariants()



def test_the_sorted_view_and_spans_kept_up_to_date_equal_a_rebuild():
    """Ring._put brings the sorted entries, their starts and the spans up to date instead of
    rebuilding them: after every operation they equal a ring built afresh from the entries
    held, and lists got before the change are as they were (callers keep them)."""
    rng, owners = random.Random(5), ["a", "b", "c"]
    r = Ring.single_owner(U, "a")
    r.check_invariants()
    r.spans()
    done = 0
    for seq in range(1, 400):
        me = rng.choice(owners)
        owned = [(lo, hi) for lo, hi in r.owned_by(me) if hi - lo >= 2]
        if not owned:
            continue
        lo, hi = rng.choice(owned)
        a = rng.randrange(lo, hi - 1)
        b = rng.randrange(a + 1, hi + 1)
        entries, spans = r.entries, r.spans()
        kept = (list(entries), list(spans))
        r.transfer(me, a, b, rng.choice([o for o in owners if o != me]), (me, seq))
        assert (entries, spans) == kept
        fresh = Ring(U, list(r._by_start.values()))
        assert (r.entries, r._starts, r.spans()) == (fresh.entries, fresh._starts, fresh.spans())
        r.check_changed()
        done += 1
    assert done > 300 and len(r.entries) > 100
    r.check_invariants()


def test_a_change_is_checked_where_it_was_put():
    r = split_ring()
    r.check_invariants()
    r._put(Entry(S + 128, S + 999, "a", 5))
    why = f"ring of 10.0.0.0/24: ring entry [{S + 128}, {S + 999}) lies outside 10.0.0.0/24"
    with pytest.raises(RingInvariant, match=f"^{re.escape(why)}$"):
        r.check_changed()


def test_a_put_is_checked_with_its_neighbours():
    """An entry put inside another changes that one's span too: it is checked as well."""
    r = split_ring()
    r.check_invariants()
    r._put(Entry(S + 100, S + 128, "c", 1, 0, ("b", 2)))
    b = r.spans()[1][0]
    r._spans[1] = (b, S + 64, S + 133)  # kept wrong by the put
    why = f"the entry [{S + 64}, {S + 128}) is said to cover [{S + 64}, {S + 133})"
    with pytest.raises(RingInvariant, match=f"^ring of 10\\.0\\.0\\.0/24: {re.escape(why)}$"):
        r.check_changed()


def test_a_put_is_checked_with_the_entry_after_it():
    """An entry put may reach past the next one's start: what it is said to cover there is
    the next entry's, and checking the next entry finds it."""
    r = split_ring()
    r.check_invariants()
    c = r._put(Entry(S + 100, S + 200, "c", 1, 0, ("c", 1)))  # its span ends at S + 128
    i = r._starts.index(S + 100)
    r._spans[i] = (c, S + 100, S + 140)  # kept wrong by the put
    with pytest.raises(RingInvariant, match=rf"^ring of 10\.0\.0\.0/24: \[{S + 128}, "
                       rf"{S + 140}\) has two owners$"):
        r.check_changed()


def test_a_failed_check_fails_again():
    """What a check found stays to be found: a caller that carried on would not pass the
    next check."""
    r = split_ring()
    r.check_invariants()
    r._put(Entry(S + 128, S + 999, "a", 5))
    for _ in range(2):
        with pytest.raises(RingInvariant, match="lies outside"):
            r.check_changed()
    fresh = split_ring()
    fresh._put(Entry(S + 128, S + 999, "a", 5))  # never checked: checked whole, twice
    for _ in range(2):
        with pytest.raises(RingInvariant, match="lies outside"):
            fresh.check_changed()


def test_many_entries_merged_at_once_leave_views_equal_to_a_rebuild():
    """A full state merged into a ring whose views are built: past KEPT puts they are
    dropped and rebuilt once, not brought up to date for each."""
    from appliance.core.ring import KEPT
    source = Ring.single_owner(cidr("10.0.0.0/16"), "a")
    for k in range(1, 3 * KEPT):
        lo = source.universe.start + 64 * k
        source.transfer("a", lo, lo + 32, "b", ("a", k))
    r = Ring(source.universe)
    r.check_invariants()  # views built, empty
    changed = r.merge(source.entries)
    assert len(changed) > 2 * KEPT
    fresh = Ring(source.universe, list(source.entries))
    assert (r.entries, r._starts, r.spans()) == (fresh.entries, fresh._starts, fresh.spans())
    r.check_changed()

def test_a_ring_never_checked_is_checked_whole():
    r = split_ring()  # made, never checked: what changed since is not known
    r._by_start[S + 10] = r._by_start.pop(S + 64)
    r._sorted = r._spans = None
    with pytest.raises(RingInvariant, match=rf"^ring of 10\.0\.0\.0/24: the entry at {S + 64} "
                       rf"is filed under {S + 10}$"):
        r.check_changed()

def founder() -> Peer:
    peer, _ = Peer.founder("a", "c", [U], U)
    return peer


def test_a_ring_changed_behind_the_writers_back_stops_the_next_change():
    peer = founder()
    peer.rings[U].transfer("a", S + 64, S + 128, "b", ("a", 9))  # the allocator not told
    rows = []
    with pytest.raises(RingInvariant, match=r"^ring of 10\.0\.0\.0/24: the allocator's view of "
                       "what a owns is not the ring's"):
        with peer.writer.change(rows):
            pass
    assert rows == []


def test_a_change_that_breaks_a_ring_gives_no_rows():
    peer = founder()
    rows = []
    with pytest.raises(RingInvariant, match=r"lies outside 10\.0\.0\.0/24$"):
        with peer.writer.change(rows) as ch:
            ch.wrote(U, [peer.rings[U]._put(Entry(S + 128, S + 999, "a", 5))])
    assert rows == []


def test_a_change_gives_rows_the_allocators_view_and_the_clock_together():
    peer = founder()
    rows = []
    with peer.writer.change(rows) as ch:
        ch.wrote(U, peer.rings[U].transfer("a", S + 64, S + 128, "b",
                                           peer.replica.next_stamp()))
    assert [type(r) for r in rows] == [m.RingWrite] * 3 + [m.ClockWrite]
    assert rows[-1] == m.ClockWrite(2, (("a", 2),))
    assert peer.allocator.owned(U) == [(S, S + 64), (S + 128, U.end)]


def test_a_core_bug_surfaces_through_the_gate():
    """A request whose answer changes the ring (a donation) meets the broken ring first."""
    peer = founder()
    peer.rings[U]._put(Entry(S + 200, S + 300, "a", 1))  # a ring operation gone wrong
    with pytest.raises(RingInvariant, match="lies outside"):
        peer.receive("b", SpaceRequest("c", 1, U, U.start, U.end), 0)


def test_seeds_learn_each_others_ids_by_address_and_keep_them_with_the_split():
    d = Durable.new("p1", "c", [U], "seeds", seed_addresses=("h0:1", "h1:1"))
    peer = d.load(U, 30.0)
    assert (peer.standing, peer.note) == ("waiting", "waiting to learn the ids of seeds "
                                          "h0:1, h1:1")
    hello = Gossip("c", Replica("p0", []).hello())
    assert peer.receive("p0", hello, 0) == Ready()  # nothing before the split
    out = peer.identified("h1:1", "p1", 0)
    assert out.rows == [] and peer.note == "waiting to learn the ids of seeds h0:1"
    out = peer.identified("h0:1", "p0", 0)
    assert out.rows[-2:] == [m.Standing("waiting", "waiting to hear from seeds p0 before "
                                        "allocating"), m.SeedIds(("p0", "p1"))]
    d.apply(out.rows)
    again = d.load(U, 30.0)  # a restart: the split and the ids came in one commit
    assert again.boot.pending is None and again.confirming == {"p0"}
    assert again.rings[U].owned_by("p1") == [(S + 128, U.end)]
    assert again.rings[U].entries == peer.rings[U].entries
