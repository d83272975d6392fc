"""Five daemons, each in its own network namespace on a shared bridge (198.18.0.0/24), joined
one by one with one --peer each; then real partitions (a link taken down, nft drop rules),
allocations on every side, claims across the cut, a range added and a tenant grown during the
cut (on the side that can reach the owners, and refused on the other), healing, and a check of
every database."""
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
    # Block space and a tenant, made before the cut (h0 founded the cluster: it owns the
    # spare space, so the tenant's key is carved by h0).
    for d, op in ((ds[0], {"op": "range_add", "range": "10.70.0.0/16", "blocks": True,
                           "allow_route_overlap": True}),
                  (ds[0], {"op": "tenant_create", "tenant": "acme", "prefix_len": 26,
                           "max_blocks": 3})):
        r = d.call(op)
        assert r["ok"], (op, r)
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
    # A range added on h1 (its spare space is h0's, on h1's side); on the other side an
    # overlapping add is refused, naming h0. Only one range ever exists.
    r = ds[1].call({"op": "range_add", "range": "10.60.0.0/24", "allow_route_overlap": True})
    assert r["ok"], r
    r = ds[3].call({"op": "range_add", "range": "10.60.0.0/25", "allow_route_overlap": True})
    assert not r["ok"] and r["error"]["code"] == "unreachable" and ids[0] in \
        r["error"]["message"], r
    # The tenant grows on h1 (its key is h0's, reachable); h2 cannot grow it (the key is h1's
    # now, across the cut) and says whom it cannot reach.
    r = ds[1].call({"op": "tenant_grow", "tenant": "acme"})
    assert r["ok"] and len(r["blocks"]) == 2, r
    r = ds[2].call({"op": "tenant_grow", "tenant": "acme"})
    assert not r["ok"] and r["error"]["code"] == "unreachable" and ids[1] in \
        r["error"]["message"], r
    c.heal()
    wait_until("the rings to converge after the split heals", c.converged)
    assert all("10.60.0.0/24" in [u["range"] for u in c.status(i)["universes"]]
               and len(c.status(i)["tenants"]["acme"]["blocks"]) == 2 for i in range(N))
    for i in (3, 4):  # the far side, once healed, allocates from both
        r = ds[i].call({"op": "allocate", "handle": f"late-{i}", "subnet": "10.60.0.0/24"})
        assert r["ok"] and r["address"].startswith("10.60.0."), r
        given[r["address"].split("/")[0]] = f"late-{i}"
        r = ds[i].call({"op": "allocate", "handle": f"acme-{i}", "tenant": "acme"})
        assert r["ok"] and r["address"].startswith("10.70."), r
        given[r["address"].split("/")[0]] = f"acme-{i}"

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
