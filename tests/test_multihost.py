"""Five daemons, each in its own network namespace on a shared bridge (198.18.0.0/24), joined
one by one with one --peer each; then real partitions (a link taken down, nft drop rules),
allocations on every side, claims across the cut, healing, and a check of every database."""
import itertools

import pytest

from .multihost import Cluster, allocations, owner_at, owner_spans, wait_until

N = 5


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path, N, "10.50.0.0/22", "--reuse-delay", "1")
    try:
        yield c
    finally:
        c.close()


def probe(d) -> str:
    """An address in d's own space: one it hands out and takes back at once."""
    r = d.call({"op": "allocate", "handle": "probe"})
    assert r["ok"], r
    assert d.call({"op": "release", "handle": "probe"})["ok"]
    return r["address"].split("/")[0]


def test_five_hosts_share_the_range_through_partitions(cluster):
    c, ds = cluster, cluster.daemons
    wait_until("all five to reach each other and agree on the ring", c.converged)
    ids = [c.status(i)["peer"] for i in range(N)]
    given = {}  # address -> handle, as clients were told
    counter = itertools.count()

    def allocate(i, n=5):
        for _ in range(n):
            h = f"h{i}-{next(counter)}"
            r = ds[i].call({"op": "allocate", "handle": h})
            assert r["ok"], (i, r)
            a = r["address"].split("/")[0]
            assert a not in given, f"{a} given twice"
            given[a] = h

    for i in range(N):
        allocate(i)
    assert all(c.status(i)["universes"][0]["owned"] > 0 for i in range(N))  # by donation
    wait_until("status to agree on every host", c.converged)

    # Cut h4 off: its link on the bridge goes down.
    c.link(4, False)
    wait_until("h4 to be unreachable from the rest and alone",
               lambda: all(ids[4] not in c.status(i)["reachable"] for i in range(4))
               and c.status(4)["reachable"] == [])
    for i in range(N):
        allocate(i, 3)  # every side owns free space
    r = ds[0].call({"op": "claim", "handle": "static-1", "address": probe(ds[4])})
    assert not r["ok"] and r["error"]["code"] == "unreachable" and ids[4] in \
        r["error"]["message"], r
    c.heal()
    wait_until("the rings to converge after the heal", c.converged)

    # Split 2/3 with nft drop rules.
    c.cut([0, 1], [2, 3, 4])
    sides = ([0, 1], [2, 3, 4])
    wait_until("the split to be seen by every host",  # h1 asks h3 below: both must see it
               lambda: all(set(c.status(i)["reachable"]) == {ids[j] for j in side if j != i}
                           for side in sides for i in side))
    for i in range(N):
        allocate(i, 3)
    r = ds[1].call({"op": "claim", "handle": "static-2", "address": probe(ds[3])})
    assert not r["ok"] and r["error"]["code"] == "unreachable" and ids[3] in \
        r["error"]["message"], r
    c.heal()
    wait_until("the rings to converge after the split heals", c.converged)

    # Every database: no address twice, every acknowledged allocation present, each in space
    # its host owns.
    held = {}
    spans = owner_spans(ds[0])
    for i, d in enumerate(ds):
        for a, h in allocations(d).items():
            assert a not in held, f"{a} held on two hosts"
            assert owner_at(spans, a) == ids[i], f"{a} on h{i} lies outside its space"
            held[a] = h
    assert held == given
