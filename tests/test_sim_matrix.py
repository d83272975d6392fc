"""The scale matrix's driver (tests/sim/matrix.py) at a few peers: each dimension does what it
says (peers join and leave, crash and restart, load moves), the simulator's invariants hold
through it (a breach raises Violation), and what it counts adds up."""
from dataclasses import replace

import pytest

from tests.sim.matrix import Case, Driver, matrix

SMALL = Case(peers=6, per_node=20, seconds=6.0)


def run(**kw):
    return Driver(replace(SMALL, **kw)).run()


def test_baseline_fills_to_its_utilisation_and_counts_what_it_sent():
    r = run()
    target = int(SMALL.utilisation * SMALL.universe().size)
    assert r.allocations >= target  # the fill, then as many again as churn replaced
    assert r.messages > 0 and r.peer_bytes > 0 and r.ring_changes > 0
    assert r.final_peers == 6 and r.joined == r.left == r.crashes == 0
    assert r.change_rounds > 0 and r.change_bytes > 0  # the probe claim reached every ring
    # Six peers that all talked, converged: each keeps what its five partners have and were
    # sent as one vector of six peers, its own (Replica.frozen), not ten copies.
    assert r.vector_items == 6 * 6, r.vector_items


@pytest.mark.parametrize("kw, joined, left", [
    (dict(membership="gradual"), True, True),
    (dict(membership="spiky"), True, True),
    (dict(node_churn=1.0), True, True),
])
def test_membership_dimensions_join_and_leave(kw, joined, left):
    r = run(**kw)
    assert (r.joined > 0) == joined and (r.left > 0) == left, r
    assert r.final_peers == 6 + r.joined - r.left


def test_failures_crash_and_restart_peers():
    r = run(failures=0.05)
    assert r.crashes > 0 and r.final_peers == 6


def test_uneven_distribution_loads_peers_unequally():
    d = Driver(replace(SMALL, distribution="static"))
    d.run()
    counts = sorted(len(v) for v in d.mine.values())
    assert counts[-1] > 2 * max(1, counts[0]), counts


def test_the_matrix_covers_every_dimension_of_the_requirements():
    dims = {c.dimension for c in matrix("full")}
    assert dims == {"node count", "addresses per node", "distribution", "churn",
                    "utilisation", "membership", "node churn", "node failures"}
    assert max(c.utilisation for c in matrix("full")) > 0.8
    # Each dimension at the requirements' size too, every level of it, and node count on to
    # 1,000 peers with --size huge.
    for size in ("full", "huge"):
        cases = matrix(size)
        for dim in dims - {"node count"}:
            mine = [c for c in cases if c.dimension == dim]
            at = {n: sorted(c.level for c in mine if c.peers == n) for n in {c.peers for c in mine}}
            assert set(at) == {20, 100} and at[20] == at[100], (size, dim, at)
    assert max(c.peers for c in matrix("huge")) == 1000
    assert max(c.peers for c in matrix("quick")) == 50


def test_a_sample_of_pairs_is_counted_message_by_message_against_its_vectors(monkeypatch):
    """Past 10 peers only a sample of the pairs is measured (peer_codec.Vectors for each pair
    is a billion items at 1,000 peers): every message on a sampled pair is encoded, in order,
    against that pair's own vectors, so its bytes are exactly what the daemons' codec sends;
    an unsampled pair keeps no vectors at all; the estimate scales the sampled bytes per
    message up to every message."""
    from appliance.protocols import peer_codec
    from tests.sim import matrix as mx
    shadow: dict = {}  # every pair's connection, encoded in full alongside
    exact = {}  # bytes per pair, encoding every message
    counted = {}  # messages per pair
    real = mx.MatrixSim._send

    def send(self, src, dst, msg):
        self.sample = 0.3
        pair = (src, dst)
        if pair not in self.vectors:
            shadow[pair] = peer_codec.Vectors()  # a new connection: both start afresh
        exact[pair] = exact.get(pair, 0) + len(peer_codec.encode(msg, shadow[pair]))
        counted[pair] = counted.get(pair, 0) + 1
        real(self, src, dst, msg)
        kept = self.vectors[pair]
        assert (kept is not None) == self.sampled_pair(src, dst)
        if kept is not None:
            mine = shadow[pair]
            assert (kept.vector, kept.base) == (mine.vector, mine.base), type(msg).__name__

    monkeypatch.setattr(mx.MatrixSim, "_send", send)
    d = Driver(replace(SMALL, seconds=2.0))
    r = d.run()  # (sampled_pair is a hash of the pair: asking it again gives the same answer)
    sampled = [pair for pair in exact if d.sim.sampled_pair(*pair)]
    assert 0 < len(sampled) < len(exact), (len(sampled), len(exact))
    assert d.sim.sampled == [sum(counted[p] for p in sampled), sum(exact[p] for p in sampled)]
    assert r.bytes_sampled == 0.3 and r.peer_bytes > 0
