"""`make bench`: how far the WAL grows under the 8-client hook load, on an idle machine and beside
busy processes (which starve the checkpoint's copy thread). Prints a table; asserts nothing.

A checkpoint is due at CHECKPOINT_PAGES; past the hard bound (daemon._Checkpoints) a batch waits
for the copy under way. The idle run is this run's baseline: what the load alone does to the WAL.
The WAL's size is read every 10 ms; `waits` is the daemon's own count (status `wal`).

    python -m tests.bench.wal_bench [--seconds S (40)] [--busy N (2)]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from appliance.store import CHECKPOINT_PAGES
from tests.bench.hook_bench import CLIENTS, PAIRS_PER_CLIENT, _clients
from tests.daemon_proc import Daemon

PAGE = 4096


def run(tmp: Path, seconds: float, busy: int) -> dict:
    d = Daemon(tmp, "--iprange", "10.64.0.0/12", "--reuse-delay", "30")
    d.start()
    try:
        return _loaded(d, seconds, busy)
    finally:
        d.stop()


def _loaded(d: Daemon, seconds: float, busy: int) -> dict:
    hogs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(busy)]
    wal = Path(f"{d.db}-wal")
    sizes: list[int] = []
    done = threading.Event()

    def watch():
        while not done.wait(0.01):
            sizes.append(wal.stat().st_size if wal.exists() else 0)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        t0, rounds = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            _clients(str(d.socket), f"r{rounds}-", ("allocate", "release"))
            rounds += 1
        elapsed = time.perf_counter() - t0
    finally:
        done.set()
        watcher.join()
        for h in hogs:
            h.kill()
            h.wait()
    status = d.call({"op": "status"})
    return {"req_s": rounds * CLIENTS * PAIRS_PER_CLIENT * 2 / elapsed,
            "max_mb": max(sizes) / 1e6,
            "over": sum(s > CHECKPOINT_PAGES * PAGE for s in sizes) / len(sizes),
            "waits": status["wal"]["waits"], "load": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=40.0)  # 20 s may end before the bound
    ap.add_argument("--busy", type=int, default=2, help="busy processes beside the daemon")
    args = ap.parse_args()
    print(f"\nWAL under the 8-client hook load (allocate+release pairs), {args.seconds:.0f} s each; "
          f"checkpoint due at {CHECKPOINT_PAGES * PAGE / 1e6:.1f} MB; load average before "
          f"{os.getloadavg()[0]:.2f}")
    print(f"{'':<32}{'req/s':>8}{'WAL max MB':>12}{'time over due':>15}{'waits':>7}{'load':>6}")
    with tempfile.TemporaryDirectory() as t:
        for name, busy in (("idle machine (baseline)", 0),
                           (f"beside {args.busy} busy processes", args.busy)):
            sub = Path(t) / str(busy)
            sub.mkdir()
            r = run(sub, args.seconds, busy)
            print(f"{name:<32}{r['req_s']:>8.0f}{r['max_mb']:>12.1f}{r['over']:>14.0%}"
                  f"{r['waits']:>7}{r['load']:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
