"""`make bench-host`: allocation latency on one host of an N-host cluster, with a core of its own.
Prints; asserts nothing.

`make scale` runs every daemon on this machine's two cores, so what its clients wait for is
mostly the other daemons: their keepalives, on one wall-time grid, take the whole machine for a
moment every interval (docs/design.md, "The grid has a price"). Here daemon d000 and its client
get core 0 to themselves and the other N-1 daemons share core 1 (sched_setaffinity), as if
d000 had a host of its own: what it feels is its own cost of being one of N peers.

The load, on d000's hook socket, one connection: RATE container starts a second (allocate,
timed) for SECONDS, each followed by the stop of the oldest container (release) once LIVE are
running; open loop on a schedule, so a slow reply shows as latency. The same load runs first
against a daemon with no peers, on the same core, in the same run: the machine's noise.
d000 must reach every peer before and after the window, or the run says so.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from appliance.client import Client
from tests.bench.idle_bench import SECRET, joined, launch, status, wait_for
from tests.scale.run import pct


def pin(pid: int, core: int) -> None:
    os.sched_setaffinity(pid, {core})


def churn(path: Path, rate: float, seconds: float, live: int, tag: str) -> dict:
    hook = Client(path)
    running, made, took, late = [], 0, [], 0
    for _ in range(live):  # the host's standing containers, not timed
        made += 1
        r = hook.call({"v": 1, "op": "allocate", "handle": f"{tag}-{made}"})
        if not r.get("ok"):
            raise RuntimeError(f"allocation refused: {r}")
        running.append(f"{tag}-{made}")
    t0 = time.monotonic()
    for i in range(int(rate * seconds)):
        at = t0 + i / rate
        now = time.monotonic()
        if now < at:
            time.sleep(at - now)  # the schedule (open loop), not synchronisation
        elif now - at > 1.0:
            late += 1
        made += 1
        s = time.perf_counter()
        r = hook.call({"v": 1, "op": "allocate", "handle": f"{tag}-{made}"})
        took.append(time.perf_counter() - s)
        if not r.get("ok"):
            raise RuntimeError(f"allocation refused: {r}")
        running.append(f"{tag}-{made}")
        r = hook.call({"v": 1, "op": "release", "handle": running.pop(0)})
        if not r.get("ok"):
            raise RuntimeError(f"release refused: {r}")
    return {"ms": [1000 * t for t in took], "late": late}


def line(name: str, r: dict) -> str:
    ms = r["ms"]
    return (f"{name:<34} {len(ms):>6} {pct(ms, 0.5):>7.2f} {pct(ms, 0.95):>7.2f} "
            f"{pct(ms, 0.99):>7.2f} {max(ms):>7.2f} {r['late']:>5}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--hosts", type=int, default=100)
    ap.add_argument("--rate", type=float, default=10.0, help="starts a second on d000")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--live", type=int, default=300, help="containers running on d000")
    a = ap.parse_args()
    if os.cpu_count() < 2:
        raise SystemExit("bench-host needs two cores: one for d000, one for the others")
    pin(0, 0)  # this client shares d000's core, as a container runtime would
    print(f"host latency: {os.cpu_count()} cores; d000 and its client on core 0, the other "
          f"{a.hosts - 1} daemons on core 1; {a.rate:g} starts/s for {a.seconds:g} s, "
          f"{a.live} running; load average before: {os.getloadavg()[0]:.2f}")
    print(f"{'':<34} {'allocs':>6} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'max ms':>7} "
          f"{'late':>5}")
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(8) as pool:
        tmp = Path(tmp)
        (tmp / "secret").write_text(SECRET)
        alone = launch(tmp, "alone")
        try:
            pin(alone.proc.pid, 0)
            print(line("a daemon with no peers", churn(alone.socket, a.rate, a.seconds,
                                                       a.live, "alone")), flush=True)
        finally:
            alone.stop()
        ds = [launch(tmp, "d000")]
        pin(ds[0].proc.pid, 0)
        try:
            for i in range(1, a.hosts):
                ds.append(launch(tmp, f"d{i:03d}", "--peer", ds[0].addr))
                pin(ds[-1].proc.pid, 1)
            wait_for("every daemon to reach every other, one ring", lambda: joined(ds, pool), 900)
            time.sleep(5)  # the join's own traffic (books, first vectors) dies down
            r = churn(ds[0].socket, a.rate, a.seconds, a.live, "d000")
            reach = len(status(ds[0])["reachable"])
            name = f"d000, one of {a.hosts} peers"
            print(line(name, r) + ("" if reach == a.hosts - 1 else
                                   f"  (reached only {reach} of {a.hosts - 1} peers after)"))
            print(f"load average after: {os.getloadavg()[0]:.2f}")
        finally:
            for d in ds:
                d.stop()


if __name__ == "__main__":
    main()
