"""The simulator's CI tier, and proof that its checker catches broken code.

CI tier: 300 seeds of 3-7 peers with 1,000 operations each and random fault rates, plus 10
seeds of 100 peers; zero violations. Each seed draws its bootstrap (founder, seeds or quorum)
too. Seeds are spread over both cores. A failure names its seed; `make sim SEED=n` replays it.
Ten more seeds run in the test's own process: `make mutate` maps each mutated function to the
tests that call it in-process, and the pool's workers are other processes.
"""
import math
import multiprocessing as mp
import os
import subprocess
import sys
from collections import Counter

import pytest

from appliance.core import allocator as allocator_mod
from appliance.core import removal as removal_mod
from appliance.core import ring as ring_mod

from appliance.core import messages as m

from .sim.simulator import Faults, Sim, Violation

SMALL_SEEDS = range(300)
BIG_SEEDS = range(10)
IN_PROCESS_SEEDS = range(300, 310)


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


def test_ci_tier_in_this_process():
    bad = [(seed, v) for seed, v, _ in map(run_seed, [(s, None, 1000) for s in IN_PROCESS_SEEDS])
           if v]
    assert not bad, f"violations (replay with make sim SEED=...): {bad[:5]}"


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


@pytest.mark.parametrize("where", ["_reusable", "_blocked"])
def test_checker_catches_quarantine_ignored(monkeypatch, where):
    """I9: an allocator that takes every quarantine as over: _reusable hands a just-freed
    address out again, _blocked lets donations and give-backs carry one away."""
    real = getattr(allocator_mod.Allocator, where)

    def at_the_end_of_time(self, *args):  # both take `now` last
        return real(self, *args[:-1], math.inf)

    monkeypatch.setattr(allocator_mod.Allocator, where, at_the_end_of_time)
    found = find_violation()
    assert found is not None, f"ignoring quarantine in {where} went unnoticed"
    assert found[1].startswith(f"I9 seed={found[0]}: "), found
    print(f"quarantine ignored in {where}: caught at seed {found[0]}: {found[1]}")


def drive(sim, p, req):
    """One client request to peer p, through the simulator's checks."""
    sim.stats.ops += 1
    ref = ("test", sim.stats.ops)
    sim.pending[ref] = (p, req)
    sim._handle(p, sim.live[p].request(ref, req, sim.now))
    return ref


def test_checker_sees_a_quarantined_address_in_a_handover():
    """I9's transfer check covers handovers too (the simulated clients never leave), shown
    with a leave that hands a just-freed address over on purpose (the quarantine taken as
    over)."""
    sim = Sim(1, 2, Faults())
    sim.live["p0"].allocator.reuse_delay = 0.0  # as if its quarantine were not kept
    drive(sim, "p0", m.Allocate("x"))
    drive(sim, "p0", m.Release("x"))
    with pytest.raises(Violation, match=r"^I9 seed=1: p0 gave p1 10\.0\.0\.0-10\.0\.3\.255, "
                       r"holding 10\.0\.0\.1, 0\.00s after freeing it"):
        drive(sim, "p0", m.Leave())


def test_leave_hands_over_no_quarantined_address():
    sim = Sim(1, 2, Faults())
    drive(sim, "p0", m.Allocate("x"))
    drive(sim, "p0", m.Release("x"))
    sim.now += 1.0
    drive(sim, "p0", m.Leave())  # refused, or waits out the quarantine: anything but I9
    assert sim.stats.refused["busy"] == 1  # refused, naming the quarantine
    assert sim.live["p0"].standing == "member"
    sim.now += 10.0  # the quarantine is over: it may leave now
    drive(sim, "p0", m.Leave())
    assert sim.stats.refused["busy"] == 1 and sim.live["p0"].standing == "left"
