"""Ring size after churn: entries and runs of one owner, with this code and, as the baseline
in the same run, with free runs never given back. Counts from the deterministic simulator
(5 peers, no faults, seed 1), so they do not depend on machine noise.

    python -m tests.bench.ring_bench [--ops N]
"""
import argparse
from contextlib import contextmanager

import appliance.core.peer as peer_mod
from tests.test_fragmentation import churned, quiesce

CASES = [(0.5, 0.0), (0.5, 0.02), (0.5, 0.10), (0.9, 0.02), (0.9, 0.10)]


@contextmanager
def no_give_back():
    saved = peer_mod.Peer._give_back
    peer_mod.Peer._give_back = lambda self, now, out: None
    try:
        yield
    finally:
        peer_mod.Peer._give_back = saved


def measure(fill: float, claims: float, ops: int) -> tuple[int, int, int, int]:
    sim = churned(fill, claims, ops)
    ring = sim.live[sim.names[0]].replica.rings[sim.u]
    busy = (len(ring.entries), ring.segments())
    ring = quiesce(sim)
    return busy + (len(ring.entries), ring.segments())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", type=int, default=10_000)
    ops = ap.parse_args().ops
    print(f"ring size in a /22 shared by 5 peers after {ops} operations "
          "(entries/runs while busy, then once all released and quiet)")
    print(f"{'fill':>5} {'claims':>6} | {'this code':>23} | {'baseline: no give-back':>23}")
    for fill, claims in CASES:
        now = measure(fill, claims, ops)
        with no_give_back():
            base = measure(fill, claims, ops)
        fmt = "{:>5}/{:<4} -> {:>4}/{:<4}"
        print(f"{fill:>5} {claims:>6} | {fmt.format(*now):>23} | {fmt.format(*base):>23}")


if __name__ == "__main__":
    main()
