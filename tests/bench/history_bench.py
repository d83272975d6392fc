"""`make bench` / `make bench-history CYCLES=n`: does a host's cost follow its live state or its
history? Prints a table; asserts nothing.

One real daemon on a /12 (the default range's size), 500 live allocations, then allocate+release
cycles over the hook socket as fast as two pipelining clients can drive them (quarantine 30 s,
the default). At each checkpoint: cycles done, the daemon's RSS, `status` latency (median [min-max]
of STATUS_CALLS calls), the database and its WAL, and the addresses in quarantine. Then the daemon
is SIGKILLed and started again RESTARTS times: seconds to 'ready' and RSS after a `status`.

Machine noise, measured in the same run: the load average and a one-row apsw WAL commit (the
floor of every request's cost), each at every checkpoint, so a slow row can be told from a busy
machine.

    python -m tests.bench.history_bench [--cycles N] [--checkpoints K]   (default 100000, 4)
    make bench-history CYCLES=1000000
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.hook_bench import commit_baseline, rss_kb, spread
from tests.daemon_proc import Daemon

RANGE = "10.32.0.0/12"
LIVE = 500
CLIENTS = 2
WINDOW = 64  # allocate+release pairs sent before reading their replies
STATUS_CALLS = 21
RESTARTS = 3


def _drive(args) -> None:
    """n allocate+release cycles, WINDOW at a time on one connection (answered in order)."""
    path, tag, first, n = args
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    f = s.makefile("rb")
    i = first
    while i < first + n:
        k = min(WINDOW, first + n - i)
        batch = b"".join(b'{"op":"allocate","handle":"%s-%d"}\n{"op":"release","handle":"%s-%d"}\n'
                         % (tag.encode(), j, tag.encode(), j) for j in range(i, i + k))
        s.sendall(batch)
        for _ in range(2 * k):
            reply = f.readline()
            if b'"ok":true' not in reply:
                raise RuntimeError(f"request failed: {reply!r}")
        i += k
    s.close()


def _status_ms(d: Daemon) -> list[float]:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(d.socket))
    f = s.makefile("rb")
    out = []
    for _ in range(STATUS_CALLS):
        t0 = time.perf_counter()
        s.sendall(b'{"op":"status"}\n')
        reply = f.readline()
        out.append((time.perf_counter() - t0) * 1000)
        assert b'"ok":true' in reply, reply
    s.close()
    return out


def _db_mb(d: Daemon) -> tuple[float, float]:
    """(database, WAL) in MB."""
    return tuple(p.stat().st_size / 1e6 if p.exists() else 0.0
                 for p in (d.db, Path(f"{d.db}-wal")))


def checkpoint(d: Daemon, tmp: Path, cycles: int, rate: float | None) -> dict:
    st = d.call({"op": "status"})
    return {"cycles": cycles, "rate": rate, "rss": rss_kb(d.proc.pid) / 1024,
            "status": _status_ms(d), "db": _db_mb(d),
            "quarantined": sum(u["quarantined"] for u in st["universes"]),
            "commit": [commit_baseline(tmp, "NORMAL") for _ in range(3)],
            "load": os.getloadavg()[0]}


def run(tmp: Path, cycles: int, checkpoints: int) -> None:
    d = Daemon(tmp, "--iprange", RANGE, "--reuse-delay", "30")
    d.start()
    for i in range(LIVE):
        assert d.call({"op": "allocate", "handle": f"live-{i}"})["ok"]
    marks = sorted({round(cycles * (k + 1) / checkpoints) for k in range(checkpoints)})
    print(f"\n{'cycles':>9} {'cycles/s':>9} {'RSS MB':>7} {'status ms median [min-max]':>28} "
          f"{'DB + WAL MB':>13} {'quarant.':>9} {'commit us (noise)':>22} {'load':>5}")

    def show(r: dict) -> None:
        rate = "" if r["rate"] is None else f"{r['rate']:.0f}"
        print(f"{r['cycles']:>9} {rate:>9} {r['rss']:>7.1f} {spread(r['status'], '.2f'):>28} "
              f"{r['db'][0]:>6.2f} + {r['db'][1]:<4.2f} {r['quarantined']:>9} {spread(r['commit'], '.1f'):>22} "
              f"{r['load']:>5.2f}", flush=True)

    show(checkpoint(d, tmp, 0, None))
    done = 0
    ctx = mp.get_context("fork")
    with ctx.Pool(CLIENTS) as pool:
        for mark in marks:
            n = mark - done
            share = [n // CLIENTS + (1 if c < n % CLIENTS else 0) for c in range(CLIENTS)]
            t0 = time.perf_counter()
            pool.map(_drive, [(str(d.socket), f"c{c}", done + sum(share[:c]), share[c])
                              for c in range(CLIENTS)])
            rate = n / (time.perf_counter() - t0)
            done = mark
            show(checkpoint(d, tmp, done, rate))
    restarts = []
    for _ in range(RESTARTS):
        d.kill()
        t0 = time.perf_counter()
        line = d.start(timeout=600)
        ready = time.perf_counter() - t0
        assert f"allocations={LIVE}" in line, line
        d.call({"op": "status"})
        restarts.append({"ready": ready, "rss": rss_kb(d.proc.pid) / 1024})
    print(f"\nrestart after SIGKILL ({RESTARTS} times, median [min-max]): "
          f"{spread([r['ready'] for r in restarts], '.3f')} s to ready, "
          f"RSS after {spread([r['rss'] for r in restarts], '.1f')} MB; "
          f"database {_db_mb(d)[0]:.2f} MB + WAL {_db_mb(d)[1]:.2f} MB")
    d.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=int(os.environ.get("CYCLES") or 100_000))
    ap.add_argument("--checkpoints", type=int, default=4)
    args = ap.parse_args()
    print(f"ipamd history benchmark: {os.cpu_count()} cores, python {sys.version.split()[0]}; "
          f"range {RANGE}, {LIVE} live allocations, {args.cycles} allocate+release cycles "
          f"({CLIENTS} clients, {WINDOW} pairs in flight each), quarantine 30 s; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as t:
        run(Path(t), args.cycles, args.checkpoints)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
