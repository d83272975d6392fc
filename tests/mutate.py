"""`make mutate`: mutation testing with mutmut 3 ([tool.mutmut] in pyproject.toml).

mutmut mutates the core and the entrance modules, runs the selected tests once to learn which
tests call which function (in their own process), then runs each mutant against only the tests
that call the function it is in. This module is both halves of our side of that:

As a pytest plugin (`-p tests.mutate`, which [tool.mutmut] passes to every run) it leaves out
the tests whose work happens in other processes, which mutmut cannot map to a mutant and which
would only slow its whole-selection runs: every test module that starts daemons (it uses
tests/daemon_proc, multihost, chaos or docker_engine), nested pytest runs (pytester), and the
simulator's pool tiers (their seeds run in worker processes; test_sim's in-process seeds stand
in for them). New in-process test modules are picked up without a change here. It also loads a
Hypothesis profile without deadlines (mutated code runs through mutmut's trampolines, slower)
and with derandomised examples (a mutant's verdict must not depend on luck).

As a program it prints what the last run found:

    python -m tests.mutate [GLOB] [--min-score PERCENT]

per file: killed, survived, no tests (no fast test runs that code), timeouts; the surviving
mutants by name (`.venv/bin/mutmut show NAME` prints one's diff); and the score, caught / tried:
caught = killed + timeout, tried = caught + survived + no tests + suspicious + segfault (mutants
not checked yet, or skipped, are left out). Below --min-score it exits 1.
"""
from __future__ import annotations

import argparse
import fnmatch
import subprocess
import sys
import types
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Helpers that run the code under test in other processes (daemons, namespaces, engines).
ELSEWHERE = ("tests.daemon_proc", "tests.multihost", "tests.chaos", "tests.docker_engine",
             "tests.test_forwarder")  # the last runs both CNI forwarders as processes
# Single tests whose work runs in other processes.
IN_WORKERS = ("test_sim.py::test_ci_tier_small_clusters", "test_sim.py::test_ci_tier_hundred_peers",
              "test_sim.py::test_a_seed_replays_exactly")
# Test modules that run only other programs (make, reading the Makefile: mutants/ has none).
OTHER_PROGRAMS = ("tests/test_make_targets.py",)


# -- the pytest plugin -------------------------------------------------------------------------

def pytest_configure(config) -> None:
    from hypothesis import settings
    settings.register_profile("mutate", deadline=None, derandomize=True, database=None)
    settings.load_profile("mutate")


def pytest_collection_modifyitems(config, items) -> None:
    keep, drop = [], []
    for item in items:
        (drop if runs_elsewhere(item) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def runs_elsewhere(item) -> bool:
    if item.nodeid.endswith(IN_WORKERS) or item.nodeid.startswith(OTHER_PROGRAMS) or \
            "pytester" in getattr(item, "fixturenames", ()):
        return True
    module = getattr(item, "module", None)
    if module is None:
        return False
    for value in vars(module).values():
        name = value.__name__ if isinstance(value, types.ModuleType) else \
            getattr(value, "__module__", None)
        if name in ELSEWHERE:
            return True
    return False


# -- the report --------------------------------------------------------------------------------

CAUGHT = ("killed", "timeout")
MISSED = ("survived", "no tests", "suspicious", "segfault")


def results() -> dict[str, str]:
    """mutant name -> status, from the last `mutmut run` (in mutants/)."""
    out = subprocess.run([str(Path(sys.executable).parent / "mutmut"), "results", "--all", "true"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and name:
            found[name] = status
    return found


def module_of(name: str) -> str:
    """appliance.core.intervals.xǁIntervalSetǁadd__mutmut_3 -> appliance.core.intervals"""
    return name.rpartition(".")[0]


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.mutate")
    ap.add_argument("glob", nargs="*", help="only mutants whose names match (as mutmut run)")
    ap.add_argument("--min-score", type=float, default=None, help="percent; below it exit 1")
    ap.add_argument("--survivors", type=int, default=20, help="how many to name per module")
    args = ap.parse_args()
    found = {n: s for n, s in results().items()
             if not args.glob or any(fnmatch.fnmatch(n, g) for g in args.glob)}
    by_module: dict[str, Counter] = defaultdict(Counter)
    survivors: dict[str, list[str]] = defaultdict(list)
    for name, status in sorted(found.items()):
        by_module[module_of(name)][status] += 1
        if status in MISSED:
            survivors[module_of(name)].append(f"{name} ({status})")
    total: Counter = Counter()
    for module, counts in sorted(by_module.items()):
        total += counts
        print(f"{module}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        for s in survivors[module][:args.survivors]:
            print(f"    {s}")
        if len(survivors[module]) > args.survivors:
            print(f"    ... and {len(survivors[module]) - args.survivors} more")
    caught = sum(total[s] for s in CAUGHT)
    tried = caught + sum(total[s] for s in MISSED)
    if not tried:
        print("no mutant has been tried yet: run `make mutate` first")
        return 1
    score = 100.0 * caught / tried
    print(f"score: {caught} of {tried} mutants caught = {score:.1f}% "
          f"({total['not checked']} not checked yet, {total['skipped']} skipped)")
    if args.min_score is not None and score < args.min_score:
        print(f"below the minimum of {args.min_score:g}%")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
