"""`make bench`: real daemons on loopback. Prints tables; asserts nothing.

1. Allocation that needs a donation from a peer: b owns nothing of a's range it has not been
   given, and claims addresses a owns, 64 apart, so that every claim is a round trip to a
   (SpaceRequest, a's commit, the grant, b's commit). Baseline in the same run: allocations
   on b from the space it was given (b's own commit only). Each request opens a connection,
   as a CNI plugin would.
2. 20 daemons: the time from a change on one (an allocation that moves space) until every
   daemon's ring digest matches, and the gossip bytes sent for it (all daemons' message bytes
   in the window, less the idle rate measured just before over the same length of time).

Each figure is measured RUNS times: median [min-max], the spread being this run's noise.
"""
from __future__ import annotations

import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.daemon_proc import Daemon, wait_until

RUNS = 3
CLAIMS = 200
DAEMONS = 20
SECRET = "bench-secret-0123456789abcdef"
RANGE = "10.70.0.0/16"


def launch(tmp: Path, name: str, *flags: str) -> Daemon:
    (tmp / name).mkdir()
    d = Daemon(tmp / name, "--iprange", RANGE, "--name", name, "--listen", "127.0.0.1:0",
               "--secret-file", str(tmp / "secret"), *flags)
    d.start()
    d.addr = "127.0.0.1:" + re.search(r"listen=\S+:(\d+)", d.ready_line).group(1)
    return d


def status(d: Daemon) -> dict:
    return d.call({"op": "status"})


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def donation_run(tmp: Path) -> dict:
    (tmp / "secret").write_text(SECRET)
    a = launch(tmp, "a")
    b = launch(tmp, "b", "--peer", a.addr)
    try:
        wait_until("b to hear a's ring", lambda: status(b)["ring_digest"]
                   == status(a)["ring_digest"])
        base = 10 << 24 | 70 << 16  # 10.70.0.0
        out = {"donation": [], "own space": []}
        for i in range(CLAIMS):
            v = base + 16384 + i * 64
            addr = f"{v >> 24}.{v >> 16 & 255}.{v >> 8 & 255}.{v & 255}"
            t0 = time.perf_counter()
            r = b.call({"op": "claim", "handle": f"claim-{i}", "address": addr})
            out["donation"].append((time.perf_counter() - t0) * 1e3)
            if not r["ok"]:
                raise RuntimeError(r)
        for i in range(CLAIMS):  # now b has space of its own: allocate from it
            t0 = time.perf_counter()
            r = b.call({"op": "allocate", "handle": f"own-{i}"})
            out["own space"].append((time.perf_counter() - t0) * 1e3)
            if not r["ok"]:
                raise RuntimeError(r)
        return out
    finally:
        a.stop()
        b.stop()


def spread_run(tmp: Path) -> dict:
    (tmp / "secret").write_text(SECRET)
    ds = [launch(tmp, "d0")]
    try:
        for i in range(1, DAEMONS):
            ds.append(launch(tmp, f"d{i}", "--peer", ds[i - 1].addr))
        ids = {status(d)["peer"] for d in ds}
        wait_until("all to reach all", lambda: all(
            len(status(d)["reachable"]) == DAEMONS - 1 for d in ds), 120)
        wait_until("one ring", lambda: len({status(d)["ring_digest"] for d in ds}) == 1, 60)
        # Give every daemon space first, so the measured change is one transfer only.
        for d in ds[1:]:
            assert d.call({"op": "allocate", "handle": "warm"})["ok"]
        wait_until("one ring again", lambda: len({status(d)["ring_digest"] for d in ds}) == 1)

        def traffic() -> int:
            return sum(status(d).get("peer_bytes_sent", {}).get("messages", 0) for d in ds)

        quiet = status(ds[0])["ring_digest"]
        t_idle, idle0 = time.monotonic(), traffic()
        time.sleep(2.0)  # an idle window, to measure the background probe traffic
        idle_rate = (traffic() - idle0) / (time.monotonic() - t_idle)
        before = traffic()
        t0 = time.monotonic()
        # The change: a claim on the last daemon of an address the first one owns.
        r = ds[-1].call({"op": "claim", "handle": "change", "address": "10.70.255.200"})
        assert r["ok"], r
        # Every ring equal again (ds[-1]'s holds the change, so all do): a digest captured
        # once could be overtaken by a later free-hint write and never be seen everywhere.
        wait_until("the change everywhere",
                   lambda: len({status(d)["ring_digest"] for d in ds} | {quiet}) == 2, 30)
        took = time.monotonic() - t0
        used = traffic() - before - idle_rate * (time.monotonic() - t0)
        return {"seconds": took, "bytes": used, "idle_bytes_per_s": idle_rate, "peers": len(ids)}
    finally:
        for d in ds:
            d.stop()


def spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def main() -> None:
    print(f"peer benchmark: {os.cpu_count()} cores, python {sys.version.split()[0]}, {RUNS} runs "
          f"each, median [min-max]; load average before: {os.getloadavg()[0]:.2f}")
    runs = []
    for _ in range(RUNS):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(donation_run(Path(tmp)))
    print(f"\nClaims over the hook socket on loopback ({CLAIMS} per run; budget: donation p95 "
          "< 10 ms)")
    print(f"{'':<34}{'p50 ms':>22}{'p95 ms':>22}{'p99 ms':>22}")
    for label in ("own space", "donation"):
        cols = [spread([pct(r[label], p) for r in runs], ".2f") for p in (50, 95, 99)]
        name = "baseline: allocate, own space" if label == "own space" else \
            "claim needing a donation from a"
        print(f"{name:<34}" + "".join(f"{c:>22}" for c in cols))
    res = []
    for _ in range(RUNS):
        with tempfile.TemporaryDirectory() as tmp:
            res.append(spread_run(Path(tmp)))
    print(f"\n{DAEMONS} daemons on loopback: one change (a claim that moves a block)")
    print(f"  time until every ring matches (budget < 2 s): "
          f"{spread([r['seconds'] for r in res], '.2f')} s")
    print(f"  message bytes for the change, idle traffic taken out: "
          f"{spread([r['bytes'] for r in res], '.0f')} B")
    print(f"  idle message traffic of the cluster (probes): "
          f"{spread([r['idle_bytes_per_s'] for r in res], '.0f')} B/s")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
