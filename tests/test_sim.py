"""The simulator's CI tier, and proof that its checker catches broken code.

CI tier: 300 seeds of 3-7 peers with 1,000 operations each and random fault rates, plus 10
seeds of 100 peers; zero violations. Each seed draws its bootstrap (founder, seeds or quorum)
too. Seeds are spread over both cores. A failure names its seed; `make sim SEED=n` replays it.
"""
import multiprocessing as mp
import os
import subprocess
import sys
from collections import Counter

import pytest

from appliance.core import allocator as allocator_mod
from appliance.core import removal as removal_mod
from appliance.core import ring as ring_mod

from .sim.simulator import Sim, Violation

SMALL_SEEDS = range(300)
BIG_SEEDS = range(10)


def run_seed(args):
    seed, peers, ops = args
    sim = Sim.for_seed(seed, peers)
    try:
        stats = sim.run(ops)
    except Violation as v:
        return seed, str(v), None
    return seed, None, (stats.ops, dict(stats.faults), stats.rounds_to_converge,
                        stats.ring_entries, stats.segments, stats.messages, stats.removals,
                        sim.bootstrap, dict(stats.refused))


def run_many(jobs):
    with mp.get_context("fork").Pool(2) as pool:
        return pool.map(run_seed, jobs, chunksize=4)


def summarise(results, label):
    faults, refused, boots, ops, removals, rounds, entries, segments = \
        Counter(), Counter(), Counter(), 0, 0, [], [], []
    for _, _, s in results:
        ops += s[0]
        faults.update(s[1])
        rounds.append(s[2])
        entries.append(s[3])
        segments.append(s[4])
        removals += s[6]
        boots[s[7]] += 1
        refused.update(s[8])
    print(f"\n{label}: {len(results)} seeds ({dict(sorted(boots.items()))}), {ops} operations, "
          f"0 violations, {removals} rmpeers done; faults {dict(sorted(faults.items()))}; "
          f"refused {dict(sorted(refused.items()))}; rounds to converge after heal max "
          f"{max(rounds)}; ring entries after churn max {max(entries)} (runs of one owner "
          f"max {max(segments)})")


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


def test_a_seed_replays_exactly():
    """Same seed, different hash seeds (set order): the same run, message for message."""
    code = ("from tests.sim.simulator import Sim; s = Sim.for_seed(7); st = s.run(400); "
            "print(st.messages, st.acked, sorted(st.faults.items()), s.names)")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONHASHSEED": h}).stdout
            for h in ("1", "2")}
    assert len(outs) == 1, outs


def find_violation(broken=None, seeds=60):
    for seed in range(seeds):
        try:
            Sim.for_seed(seed, broken=broken).run(1000)
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


def test_checker_catches_rmpeer_without_promises(monkeypatch):
    """A runner that reclaims at once, asking nobody (what rmpeer is without rule 6)."""
    def no_round(self, req, r, peers, out, via=""):
        self._reclaim(req, out)

    monkeypatch.setattr(removal_mod.Removals, "_ask_promises", no_round)
    found = find_violation()
    assert found is not None
    print(f"rmpeer without promises: caught at seed {found[0]}: {found[1]}")
