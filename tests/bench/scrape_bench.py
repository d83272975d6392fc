"""`make bench` (metrics part): a Prometheus scrape of a daemon holding addresses in 2,000
subnets, and what it costs the hook requests made meanwhile. Prints tables; asserts nothing on
timing.

A real daemon per run (range 198.18.0.0/15, --metrics on 127.0.0.1, port 0), given one
allocation in each of SUBNETS /28 subnets (hook `allocate` with `subnet`). One client process
makes PAIRS allocate+release pairs in the default subnet on one connection and times each
request (as hook_bench's latency client), first with no scrape running, then while another
process scrapes /metrics back to back; each scrape's duration is kept. Baselines in the same
run: the same with no scrape, and the same on a daemon with one subnet in use.

1. --reuse-delay 0, so the freed addresses leave nothing in quarantine and the subnets are the
   only difference. The daemon formats a scrape at most once per metrics.FRESH (1 s): the
   others back to back get that body again.
2. The default --reuse-delay (30 s): a scrape after N allocate+release pairs, N addresses then
   being in quarantine, and the longest hook round trip (`lookup`, back to back) during
   those scrapes; each a second after the last, so that each formats anew.

Each figure is measured RUNS times: median [min-max], the spread being this run's noise.
"""
from __future__ import annotations

import http.client
import multiprocessing as mp
import os
import re
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from appliance.metrics import FRESH
from tests.daemon_proc import Daemon

RUNS = 3
SUBNETS = 2000
PAIRS = 2000
RANGE = "198.18.0.0/15"  # 131,072 addresses: room for 2,000 /28s and the default subnet's use
QUARANTINED = (0, 1000, 3000)
SCRAPES = 5


def subnet(i: int) -> str:
    v = (198 << 24 | 18 << 16) + 65536 + i * 16  # the /28s in 198.19.0.0/16
    return f"{v >> 24}.{v >> 16 & 255}.{v >> 8 & 255}.{v & 255}/28"


def launch(tmp: Path, subnets: int, *flags: str) -> tuple[Daemon, int]:
    d = Daemon(tmp, "--iprange", RANGE, "--metrics", "127.0.0.1:0", *flags)
    d.start()
    port = int(re.search(r"metrics=\S+:(\d+)", d.ready_line).group(1))
    s, f = connect(d)
    for first in range(0, subnets, 200):  # 200 at a time, so neither side's buffer fills
        batch = range(first, min(first + 200, subnets))
        s.sendall(b"".join(b'{"op":"allocate","handle":"sub-%d","subnet":"%s"}\n'
                           % (i, subnet(i).encode()) for i in batch))
        for _ in batch:
            reply = f.readline()
            if b'"ok":true' not in reply:
                raise RuntimeError(f"allocate failed: {reply!r}")
    s.close()
    return d, port


def connect(d: Daemon):
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(d.socket))
    return s, s.makefile("rb")


def request(s, f, line: bytes) -> float:
    """Seconds for one hook round trip."""
    t0 = time.perf_counter()
    s.sendall(line)
    reply = f.readline()
    took = time.perf_counter() - t0
    if b'"ok":true' not in reply:
        raise RuntimeError(f"request failed: {reply!r}")
    return took


def pairs(d: Daemon, tag: str, n: int) -> list[float]:
    """n allocate+release pairs in the default subnet: each request's seconds."""
    s, f = connect(d)
    out = []
    for i in range(n):
        out.append(request(s, f, b'{"op":"allocate","handle":"%s-%d"}\n' % (tag.encode(), i)))
        out.append(request(s, f, b'{"op":"release","handle":"%s-%d"}\n' % (tag.encode(), i)))
    s.close()
    return out


def scrape(port: int) -> tuple[float, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    t0 = time.perf_counter()
    c.request("GET", "/metrics")
    r = c.getresponse()
    body = r.read()
    took = time.perf_counter() - t0
    c.close()
    if r.status != 200:
        raise RuntimeError(f"scrape: HTTP {r.status}")
    return took, body


def _scraper(port: int, count: int | None, started, stop, out) -> None:
    """In its own process: scrape back to back until told to stop (or count times, then set
    stop itself); send back the durations."""
    took = []
    started.set()
    while not stop.is_set():
        took.append(scrape(port)[0])
        if len(took) == count:
            stop.set()
    out.send(took)


class Scraping:
    """A process scraping /metrics back to back while the with-block runs, or `count` times
    (then `stop` is set)."""

    def __init__(self, port: int, count: int | None = None):
        ctx = mp.get_context("fork")
        self.started, self.stop = ctx.Event(), ctx.Event()
        self.recv, send = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_scraper,
                                args=(port, count, self.started, self.stop, send))
        self.took: list[float] = []

    def __enter__(self):
        self.proc.start()
        self.started.wait(30)
        time.sleep(0.05)  # the first scrape under way
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.recv.poll(120):
            self.took = self.recv.recv()
        self.proc.join(30)
        if self.proc.exitcode != 0:
            raise RuntimeError(f"scraper failed (exit code {self.proc.exitcode})")


def series(body: bytes) -> int:
    return body.count(b"\nipamd_addresses_in_use{")


def hook_run(tmp: Path, subnets: int, scraping: bool) -> dict:
    d, port = launch(tmp, subnets, "--reuse-delay", "0")
    try:
        pairs(d, "warm", 200)
        _, body = scrape(port)
        if scraping:
            with Scraping(port) as sc:
                lat = pairs(d, "p", PAIRS)
            took = sc.took
        else:
            lat, took = pairs(d, "p", PAIRS), []
        q = statistics.quantiles(lat, n=100)
        out = {"p50": q[49] * 1e6, "p99": q[98] * 1e6, "max": max(lat) * 1e3,
               "series": series(body), "bytes": len(body) / 1024, "scrapes": len(took)}
        if took:
            out.update(s50=statistics.median(took) * 1e3, smax=max(took) * 1e3)
        return out
    finally:
        d.stop()


def quarantine_run(tmp: Path) -> list[dict]:
    d, port = launch(tmp, SUBNETS)  # default --reuse-delay: 30 s
    try:
        out, done = [], 0
        for n in QUARANTINED:
            pairs(d, f"q{n}", n - done)
            done = n
            held = d.call({"op": "status"})["universes"][0]["quarantined"]
            s, f = connect(d)
            lookups, took = [], []
            for _ in range(SCRAPES):
                # A scrape within metrics.FRESH of the last gets the last body: wait that
                # out, so that each of these formats anew (the cost being measured).
                time.sleep(FRESH + 0.1)
                one = threading.Thread(target=lambda: took.append(scrape(port)[0]))
                one.start()
                while one.is_alive() or not lookups:
                    lookups.append(request(s, f, b'{"op":"lookup","handle":"sub-0"}\n'))
                one.join()
            s.close()
            out.append({"quarantined": held, "s50": statistics.median(took) * 1e3,
                        "smax": max(took) * 1e3, "scrapes": len(took),
                        "lookup_max": max(lookups) * 1e3,
                        "lookup_p50": statistics.median(lookups) * 1e6})
        return out
    finally:
        d.stop()


def spread(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def table(title: str, rows: list[tuple[str, list[dict]]], cols: list[tuple[str, str, str]]):
    print(f"\n{title}")
    print(f"{'':<30}" + "".join(f"{h:>22}" for h, _, _ in cols))
    for name, runs in rows:
        print(f"{name:<30}" + "".join(
            f"{spread([r[k] for r in runs if k in r], fmt):>22}" for _, k, fmt in cols))


def main() -> None:
    print(f"metrics scrape benchmark: {os.cpu_count()} cores, python {sys.version.split()[0]}, "
          f"{RUNS} runs each, median [min-max]; load average before: {os.getloadavg()[0]:.2f}")
    configs = [(1, False), (1, True), (SUBNETS, False), (SUBNETS, True)]
    results = {c: [] for c in configs}
    quarantine = []
    with tempfile.TemporaryDirectory() as t:
        for run in range(RUNS):
            for subnets, scraping in configs:
                sub = Path(t) / f"hook-{run}-{subnets}-{scraping}"
                sub.mkdir()
                results[(subnets, scraping)].append(hook_run(sub, subnets, scraping))
            sub = Path(t) / f"quarantine-{run}"
            sub.mkdir()
            quarantine.append(quarantine_run(sub))
    label = {1: "1 subnet", SUBNETS: f"{SUBNETS:,} subnets"}
    table(f"Hook round trips while /metrics is scraped back to back: {PAIRS} allocate+release "
          "pairs, one client, per request; --reuse-delay 0 (nothing in quarantine)",
          [(f"{label[n]}, {'scraping' if sc else 'no scrape (baseline)'}", results[(n, sc)])
           for n, sc in configs],
          [("hook p50 us", "p50", ".0f"), ("hook p99 us", "p99", ".0f"),
           ("hook max ms", "max", ".1f"), ("scrapes", "scrapes", ".0f"),
           ("scrape p50 ms", "s50", ".1f"), ("scrape max ms", "smax", ".1f")])
    table("", [(f"{label[n]}: one scrape's body", results[(n, False)]) for n in (1, SUBNETS)],
          [("in_use series", "series", ".0f"), ("KiB", "bytes", ".0f")])
    table(f"{SUBNETS:,} subnets, default --reuse-delay (30 s): scrapes after N allocate+release "
          "pairs (N addresses in quarantine), and `lookup` round trips made meanwhile",
          [(f"N = {n}", [r[i] for r in quarantine]) for i, n in enumerate(QUARANTINED)],
          [("in quarantine", "quarantined", ".0f"), ("scrape p50 ms", "s50", ".1f"),
           ("scrape max ms", "smax", ".1f"), ("lookup p50 us", "lookup_p50", ".0f"),
           ("lookup max ms", "lookup_max", ".1f")])
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
