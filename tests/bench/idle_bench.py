"""`make bench-idle N=...`: what an idle daemon costs as the cluster grows. Prints; asserts nothing.

N real daemons on 127.0.0.1, each joined as users join them (`--peer` the first one). Once
every daemon reaches every other and all rings match, the cluster is left idle for IDLE
seconds, measured without touching it (the daemons are read before and after only):

- CPU per daemon: utime + stime from /proc/PID/stat over the window, as % of one core;
- peer bytes/s per daemon: status's peer_bytes_sent (whole frames, all kinds) over the window,
  also by frame kind (core messages, keepalives, address books); TCP/IP headers and ACKs are
  not in it;
- join: from launching the last daemon until every daemon reaches all and all rings match;
- change: one claim on the last daemon of an address the first owns (a block moves); the time
  until every daemon's ring shows the last daemon owning more than before.

The load average is printed before and after: on a shared machine it says how much of the CPU
figure is this cluster's own.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.daemon_proc import Daemon, cpu_times

SECRET = "bench-secret-0123456789abcdef"
RANGE = "10.80.0.0/16"


def launch(tmp: Path, name: str, *flags: str) -> Daemon:
    (tmp / name).mkdir()
    d = Daemon(tmp / name, "--iprange", RANGE, "--name", name, "--listen", "127.0.0.1:0",
               "--secret-file", str(tmp / "secret"), "--log-level", "error", *flags)
    d.start(timeout=120)
    d.addr = "127.0.0.1:" + re.search(r"listen=\S+:(\d+)", d.ready_line).group(1)
    d.id = re.search(r"peer=(\S+)", d.ready_line).group(1)
    return d


def status(d: Daemon) -> dict:
    r = d.call({"op": "status"})
    if not r.get("ok"):
        raise RuntimeError(f"{d.dir.name}: status refused: {r}")
    return r


def cpu_seconds(d: Daemon) -> float:
    return sum(cpu_times(d.proc.pid))


def peer_bytes(s: dict) -> int:
    return sum(s.get("peer_bytes_sent", {}).values())


def joined(ds: list[Daemon], pool: ThreadPoolExecutor) -> bool:
    """Every daemon reaches every other, and all rings match."""
    ids = {d.id for d in ds}
    ss = list(pool.map(status, ds))
    return all(set(s["reachable"]) == ids - {s["peer"]} for s in ss) and \
        len({s["ring_digest"] for s in ss}) == 1


def wait_for(what: str, check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g}s")
        time.sleep(0.05)


def run(n: int, idle: float, settle: float, pool: ThreadPoolExecutor) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "secret").write_text(SECRET)
        ds = [launch(tmp, "d000")]
        try:
            for i in range(1, n - 1):
                ds.append(launch(tmp, f"d{i:03d}", "--peer", ds[0].addr))
            t0 = time.monotonic()
            if n > 1:
                ds.append(launch(tmp, f"d{n - 1:03d}", "--peer", ds[0].addr))
            wait_for("every daemon to reach every other, one ring", lambda: joined(ds, pool), 600)
            join = time.monotonic() - t0
            time.sleep(settle)  # the join's own traffic (books, first vectors) dies down

            load0 = os.getloadavg()
            cpu0 = [cpu_seconds(d) for d in ds]
            ss0 = list(pool.map(status, ds))
            sent0 = [peer_bytes(s) for s in ss0]
            w0 = time.monotonic()
            time.sleep(idle)
            w = time.monotonic() - w0
            cpu1 = [cpu_seconds(d) for d in ds]
            ss = list(pool.map(status, ds))
            load1 = os.getloadavg()
            cpu = [100 * (b - a) / w for a, b in zip(cpu0, cpu1)]
            rate = [(peer_bytes(s) - a) / w for s, a in zip(ss, sent0)]
            kinds = {}  # bytes per second per daemon in the window, by frame kind
            for s0, s in zip(ss0, ss):
                b0 = s0.get("peer_bytes_sent", {})
                for k, v in s.get("peer_bytes_sent", {}).items():
                    kinds[k] = kinds.get(k, 0) + (v - b0.get(k, 0)) / w / len(ds)

            last = ds[-1]

            def owned_by_last(s: dict) -> int:
                return s["universes"][0]["peers"].get(last.id, {}).get("owned", 0)
            before = {d.id: owned_by_last(s) for d, s in zip(ds, pool.map(status, ds))}
            c0 = time.monotonic()
            r = last.call({"op": "claim", "handle": "change", "address": "10.80.255.200"})
            if not r.get("ok"):
                raise RuntimeError(f"the change was refused: {r}")
            waiting = list(ds)

            def everywhere() -> bool:
                waiting[:] = [d for d, s in zip(waiting, pool.map(status, waiting))
                              if owned_by_last(s) <= before[d.id]]
                return not waiting
            wait_for("the change in every ring", everywhere, 120)
            change = time.monotonic() - c0
            return {"n": n, "join": join, "change": change, "cpu": cpu, "rate": rate,
                    "window": w, "load": (load0[0], load1[0]), "kinds": kinds}
        finally:
            for d in ds:
                d.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--daemons", type=int, nargs="+", default=[10, 20, 40])
    ap.add_argument("--idle", type=float, default=15.0, help="seconds of the idle window")
    ap.add_argument("--settle", type=float, default=5.0,
                    help="seconds between the join and the window (the machine calms down)")
    a = ap.parse_args()
    print(f"idle benchmark: {os.cpu_count()} cores, idle window {a.idle:g}s after "
          f"{a.settle:g}s to settle; load average "
          f"before: {os.getloadavg()[0]:.2f}")
    print(f"{'daemons':>7} {'CPU %/daemon':>21} {'peer B/s per daemon':>24} {'join s':>7} "
          f"{'change s':>8} {'load before-after':>18}")
    print(f"{'':>7} {'median [max]':>21} {'median [max]':>24}")
    with ThreadPoolExecutor(8) as pool:
        for n in a.daemons:
            r = run(n, a.idle, a.settle, pool)
            cpu = f"{statistics.median(r['cpu']):.2f} [{max(r['cpu']):.2f}]"
            rate = f"{statistics.median(r['rate']):.0f} [{max(r['rate']):.0f}]"
            print(f"{n:>7} {cpu:>21} {rate:>24} {r['join']:>7.2f} {r['change']:>8.2f} "
                  f"{r['load'][0]:>8.2f}-{r['load'][1]:.2f}", flush=True)
            print(f"{'':>7} in the window, B/s per daemon by kind (mean): " + ", ".join(
                f"{k} {v:.0f}" for k, v in sorted(r["kinds"].items())), flush=True)


if __name__ == "__main__":
    main()
