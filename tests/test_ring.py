"""The ring CRDT: operations by the owner, and the merge laws under hypothesis.

Histories are made by owners doing transfers, so every (start, version) has one content, as the
single-writer rule promises; replicas see arbitrary subsets of it, duplicates included (ties on
purpose). A forged write (same start and version, another owner) must be refused in every order.
"""
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.core.addr import cidr
from appliance.core.ring import Entry, Ring, RingConflict, RingError

U = cidr("10.0.0.0/24")
PEERS = ["a", "b", "c", "d"]


def test_transfer_makes_boundaries_and_bumps_versions():
    r = Ring.single_owner(U, "a")
    written = r.transfer("a", U.start + 64, U.start + 128, "b", ("a", 1), free_hint=64)
    assert [(e.start - U.start, e.end - U.start, e.owner, e.version) for e in written] == [
        (0, 64, "a", 2), (64, 128, "b", 2), (128, 256, "a", 1)]
    assert r.owned_by("a") == [(U.start, U.start + 64), (U.start + 128, U.end)]
    assert r.owned_by("b") == [(U.start + 64, U.start + 128)]
    assert r.owner_of(U.start + 100) == "b" and r.segments() == 3
    with pytest.raises(RingError, match="does not own"):
        r.transfer("a", U.start + 60, U.start + 70, "c", ("a", 2))
    r.transfer("b", U.start + 64, U.start + 128, "a", ("b", 1))  # given back: one run again
    assert r.owned_by("a") == [(U.start, U.end)] and r.segments() == 1
    assert len(r.entries) == 3  # the old boundaries stay, owned like their neighbours
    assert r.owner_of(U.start + 5) == "a"


def test_an_entry_covers_only_its_own_extent():
    # A peer that heard of b's block but not of what follows it must not think it owns more.
    r = Ring(U, [Entry(U.start + 64, U.start + 128, "b", 2)])
    assert r.owned_by("b") == [(U.start + 64, U.start + 128)]
    assert r.owner_of(U.start + 200) is None and r.owner_of(U.start + 10) is None


def test_entries_from_peers_are_checked():
    r = Ring.single_owner(U, "a")
    for bad in (Entry(U.end, U.end + 1, "b", 1), Entry(U.start, U.end, "b", 0),
                Entry(U.start, U.end, "", 3), Entry(U.start, U.end, "b", 3, -1),
                Entry(U.start + 9, U.start + 9, "b", 3), Entry(U.start, U.end + 1, "b", 3)):
        with pytest.raises(RingError):
            r.merge([bad])
    assert r.entries == Ring.single_owner(U, "a").entries


def history(seed: int, steps: int) -> list[Entry]:
    """Every write owners make in a random run of transfers."""
    rng = random.Random(seed)
    ring = Ring.single_owner(U, "a", ("a", 1))
    seq = {p: 1 for p in PEERS}
    writes = list(ring.entries)
    for _ in range(steps):
        owner = rng.choice(PEERS)
        spans = ring.owned_by(owner)
        if not spans:
            continue
        lo, hi = rng.choice(spans)
        if hi - lo < 2:
            continue
        a = rng.randrange(lo, hi - 1)
        b = rng.randrange(a + 1, hi + 1)
        seq[owner] += 1
        writes += ring.transfer(owner, a, b, rng.choice(PEERS), (owner, seq[owner]))
    return writes


def replica(writes, picks) -> Ring:
    r = Ring(U, [writes[0]])
    r.merge([writes[i % len(writes)] for i in picks])
    return r


def merged(x: Ring, y: Ring) -> Ring:
    r = Ring(U, x.entries)
    r.merge(y.entries)
    return r


REPLICA = st.lists(st.integers(min_value=0, max_value=10**6), max_size=40)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32), steps=st.integers(1, 25), a=REPLICA, b=REPLICA, c=REPLICA)
def test_merge_laws(seed, steps, a, b, c):
    writes = history(seed, steps)
    x, y, z = replica(writes, a), replica(writes, b), replica(writes, c)
    assert merged(x, y).entries == merged(y, x).entries                                 # commutes
    assert merged(merged(x, y), z).entries == merged(x, merged(y, z)).entries           # associates
    assert merged(x, x).entries == x.entries                                            # idempotent
    before = {e.start: e.version for e in x.entries}
    after = {e.start: e.version for e in merged(x, y).entries}
    assert all(after[s] >= v for s, v in before.items())                               # monotone
    full = replica(writes, range(len(writes)))
    assert merged(merged(x, y), full).entries == full.entries  # everything converges to all


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32), steps=st.integers(1, 15), pick=st.integers(0, 10**6),
       order=st.booleans())
def test_forged_tie_is_a_conflict_in_every_order(seed, steps, pick, order):
    writes = history(seed, steps)
    ring = replica(writes, range(len(writes)))
    # A tie with a superseded version is stale and dropped; the alarm is for current ones.
    real = ring.entries[pick % len(ring.entries)]
    forged = Entry(real.start, real.end, real.owner + "-forged", real.version, real.free_hint,
                   ("x", 1))
    snapshot = ring.entries
    batch = [forged, real] if order else [real, forged]
    with pytest.raises(RingConflict):
        Ring(U, [writes[0]]).merge(writes + batch)
    with pytest.raises(RingConflict):
        ring.merge([forged])
    assert ring.entries == snapshot  # a refused merge changes nothing
