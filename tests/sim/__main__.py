"""`make sim SEED=n [PEERS=k OPS=n]`: replay one seed verbosely; `make soak-sim MINUTES=n`."""
import argparse
import random
import sys
import time
from collections import Counter

from . import simulator
from .simulator import Sim, Violation


def one(seed: int, peers: int | None, ops: int):
    sim = Sim.for_seed(seed, peers)
    return sim.run(ops), (len(sim.names), sim.bootstrap)


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.sim")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--peers", type=int)
    ap.add_argument("--ops", type=int, default=1000)
    ap.add_argument("--minutes", type=float, help="soak: run random seeds until time is up")
    ap.add_argument("--strict", action="store_true",
                    help="tolerate none of the known core bugs (simulator.KNOWN_BUGS)")
    args = ap.parse_args()
    if args.strict:
        simulator.KNOWN_BUGS.clear()
    if args.minutes is None:
        seed = args.seed if args.seed is not None else random.randrange(2**32)
        stats, n = one(seed, args.peers, args.ops)
        print(f"seed={seed} peers={n[0]} bootstrap={n[1]} {stats}")
        return 0
    end = time.monotonic() + args.minutes * 60
    seeds, faults, gate, ranges, ops, removals, t0 = \
        0, Counter(), Counter(), Counter(), 0, 0, time.monotonic()
    while time.monotonic() < end:
        seed = random.randrange(2**32)
        try:
            stats, _ = one(seed, args.peers, args.ops)
        except Violation as v:
            print(f"VIOLATION {v}  (replay: make sim SEED={seed})")
            return 1
        seeds, ops, removals = seeds + 1, ops + stats.ops, removals + stats.removals
        faults.update(stats.faults)
        gate.update(stats.gate)
        families = {"." in u and 4 or 6 for u in stats.universes.split()}
        ranges["dual" if len(families) == 2 else f"IPv{families.pop()}"] += 1
    elapsed = time.monotonic() - t0
    print(f"{seeds} seeds in {elapsed:.0f}s ({seeds / elapsed:.2f} seeds/s), {ops} operations, "
          f"0 violations, {removals} rmpeers done; ranges {dict(sorted(ranges.items()))}; "
          f"faults injected: {dict(sorted(faults.items()))}; requests to peers not in good "
          f"standing: {dict(sorted(gate.items()))}")
    return 0


sys.exit(main())
