"""Bounded fragmentation: which block a donor gives, which runs go back, and the ring's size
after long churn in the simulator (the figures themselves: `python -m tests.bench.ring_bench`)."""
from appliance.core import messages as m
from appliance.core.addr import cidr
from appliance.core.donation import choose_block, returnable
from appliance.core.ring import Ring
from tests.sim.simulator import Faults, Sim

U = cidr("10.0.0.0/24")
S = U.start


def ring_of(*runs: tuple[int, int, str]) -> Ring:
    """A ring made by transfers from a single owner, as real histories are."""
    r = Ring.single_owner(U, runs[0][2])
    seq = 1
    for lo, hi, owner in runs[1:]:
        r.transfer(runs[0][2], S + lo, S + hi, owner, (runs[0][2], seq))
        seq += 1
    return r


def test_a_grant_touches_the_askers_space_and_adds_no_run():
    r = ring_of((0, 256, "a"), (0, 64, "b"))  # b owns [0, 64), a the rest
    block = choose_block(r, "a", "b", [(S + 64, S + 256)], 64)
    assert block == (S + 64, S + 128)
    before = r.segments()
    r.transfer("a", *block, "b", ("a", 9))
    assert r.segments() == before and r.owned_by("b") == [(S, S + 128)]


def test_a_free_span_between_boundaries_goes_whole_with_no_new_entry():
    # a owns [0, 100) and [132, 256) around c's [100, 132); then a gets it back: entries at
    # 100 and 132 stay. Free space of a: [90, 140) only.
    r = ring_of((0, 256, "a"), (100, 132, "c"))
    r.transfer("c", S + 100, S + 132, "a", ("c", 1))
    block = choose_block(r, "a", "d", [(S + 90, S + 140)], 32)
    assert block == (S + 100, S + 132) and r.cuts(*block) == 0


def test_a_claim_block_holds_the_address():
    r = ring_of((0, 256, "a"))
    for address in (S + 1, S + 77, S + 200, S + 255):
        lo, hi = choose_block(r, "a", "b", [(max(S, address - 15), min(U.end, address + 16))],
                              16, holding=address)
        assert lo <= address < hi and hi - lo <= 16


def test_small_runs_go_into_a_larger_run_beside_them_never_both_ways():
    r = ring_of((0, 256, "a"), (64, 80, "b"), (80, 128, "c"))
    # b's [64, 80) sits between a's [0, 64) and c's [80, 128): it goes to the larger, a.
    assert returnable(r, "b") == [(S + 64, S + 80, "a")]
    # c's run is larger than b's: c never offers it to b, so two peers never swap runs.
    assert all(to != "b" for _, _, to in returnable(r, "c"))


def churned(fill: float, claims: float, ops: int, seed: int = 1) -> Sim:
    sim = Sim(seed, 5, Faults(), bootstrap="founder")
    sim.fill, sim.claim_share = fill, claims
    while sim.stats.ops < ops:
        sim.step()
    sim.check()
    return sim


def quiesce(sim: Sim) -> Ring:
    """Release everything, let quarantine pass and the peers tick: the ring a quiet cluster
    settles to."""
    for p, h in sorted(sim.acked):
        sim.pending[("rel", h)] = (p, m.Release(h))
        sim._handle(p, sim.live[p].request(("rel", h), m.Release(h), sim.now))
    sim.acked.clear()
    sim.now += 60
    sim._rounds(300)
    sim.check()
    return sim.live[sim.names[0]].replica.rings[sim.u]


def test_after_churn_with_claims_the_ring_settles_to_a_few_runs_per_peer():
    # 10,000 operations at half full, 10% of them claims of random addresses (each carves a
    # block out of some other peer's space). With free runs given back: 9 runs once quiet;
    # with _give_back disabled, 288 (entries: about 310 either way, never deleted).
    sim = churned(0.5, 0.10, 10_000)
    ring = quiesce(sim)
    assert ring.segments() <= 3 * len(sim.names), ring.segments()
    rings = {p: peer.replica.rings[sim.u].entries for p, peer in sim.live.items()}
    assert all(r == rings["p0"] for r in rings.values())  # converged, nothing in flight
