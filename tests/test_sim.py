"""The simulator's CI tier, and proof that its checker catches broken code.

CI tier: 300 seeds of 3-7 peers with 1,000 operations each and random fault rates, plus 10
seeds of 100 peers; zero violations. Seeds are spread over both cores. A failure names its seed;
`make sim SEED=n` replays it.
"""
import multiprocessing as mp
import random
from collections import Counter

import pytest

from appliance.core import allocator as allocator_mod
from appliance.core import ring as ring_mod

from .sim.simulator import Faults, Sim, Violation

SMALL_SEEDS = range(300)
BIG_SEEDS = range(10)


def run_seed(args):
    seed, peers, ops = args
    rng = random.Random(seed)
    n = peers or rng.randint(3, 7)
    try:
        stats = Sim(seed, n, Faults.random(rng, n)).run(ops)
    except Violation as v:
        return seed, str(v), None
    return seed, None, (stats.ops, dict(stats.faults), stats.rounds_to_converge,
                        stats.ring_entries, stats.segments, stats.messages)


def run_many(jobs):
    with mp.get_context("fork").Pool(2) as pool:
        return pool.map(run_seed, jobs, chunksize=4)


def summarise(results, label):
    faults, ops, rounds, entries = Counter(), 0, [], []
    for _, _, s in results:
        ops += s[0]
        faults.update(s[1])
        rounds.append(s[2])
        entries.append(s[3])
    print(f"\n{label}: {len(results)} seeds, {ops} operations, 0 violations; faults "
          f"{dict(sorted(faults.items()))}; rounds to converge after heal max {max(rounds)}; "
          f"ring entries after churn max {max(entries)}")


def test_ci_tier_small_clusters():
    results = run_many([(s, None, 1000) for s in SMALL_SEEDS])
    bad = [(seed, v) for seed, v, _ in results if v]
    assert not bad, f"violations (replay with make sim SEED=...): {bad[:5]}"
    summarise(results, "3-7 peers")


def test_ci_tier_hundred_peers():
    results = run_many([(1000 + s, 100, 1000) for s in BIG_SEEDS])
    bad = [(seed, v) for seed, v, _ in results if v]
    assert not bad, f"violations: {bad[:5]}"
    summarise(results, "100 peers")


def find_violation(broken=None, seeds=60):
    for seed in range(seeds):
        rng = random.Random(seed)
        n = rng.randint(3, 7)
        try:
            Sim(seed, n, Faults.random(rng, n), broken=broken).run(1000)
        except Violation as v:
            return seed, str(v)
    return None


@pytest.mark.parametrize("broken", ["send_before_commit", "reuse_seq"])
def test_checker_catches_broken_shells(broken):
    found = find_violation(broken)
    assert found is not None, f"planting {broken} went unnoticed"
    print(f"{broken}: caught at seed {found[0]}: {found[1]}")


def test_checker_catches_a_skipped_version_bump(monkeypatch):
    real = ring_mod.Ring.transfer

    def no_bump(self, me, lo, hi, to, stamp, free_hint=0):
        written = real(self, me, lo, hi, to, stamp, free_hint)
        fixed = []
        for e in written:  # write the new owner at the old version
            old = ring_mod.replace(e, version=max(1, e.version - 1))
            self._put(old)
            fixed.append(old)
        return fixed

    monkeypatch.setattr(ring_mod.Ring, "transfer", no_bump)
    found = find_violation()
    assert found is not None
    print(f"skipped version bump: caught at seed {found[0]}: {found[1]}")


def test_checker_catches_donating_allocated_space(monkeypatch):
    monkeypatch.setattr(allocator_mod.Allocator, "_blocked", lambda self, *a: [])
    found = find_violation()
    assert found is not None
    print(f"donating allocated space: caught at seed {found[0]}: {found[1]}")
