"""`make bench` (CNI part): exec latency of ADD and DEL as the runtime sees it, at 0 and 2,000
live allocations, next to Debian's host-local measured in the same run on the same config.

Each plugin is exec'd fresh for every call, as a runtime does. Figures: median [min-max] over
3 runs, the spread being this run's noise.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.daemon_proc import ROOT, Daemon

RUNS = 3
CALLS = {"host-local": 200, "ipamd-cni (C forwarder)": 200, "ipamd (frozen, CNI mode)": 10,
         "python -m appliance (CNI mode)": 30}
HOST_LOCAL = "/usr/lib/cni/host-local"


def conf(kind: str, data: Path, sock: Path) -> bytes:
    ipam = {"type": kind, "ranges": [[{"subnet": "198.18.0.0/20"}]]}
    if kind == "host-local":
        ipam["dataDir"] = str(data)
    else:
        ipam["socket"] = str(sock)
    return json.dumps({"cniVersion": "1.0.0", "name": "bench", "ipam": ipam}).encode()


def call(argv: list[str], command: str, cid: str, stdin: bytes) -> float:
    env = {**os.environ, "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
           "CNI_NETNS": "/var/run/netns/bench", "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni"}
    t0 = time.perf_counter()
    r = subprocess.run(argv, input=stdin, env=env, capture_output=True, cwd=ROOT)
    elapsed = (time.perf_counter() - t0) * 1000
    if r.returncode != 0:
        raise RuntimeError(f"{argv[0]} {command} failed: {r.stdout!r} {r.stderr!r}")
    return elapsed


def fill(argv: list[str], stdin: bytes, n: int) -> None:
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: call(argv, "ADD", f"fill-{i}", stdin), range(n)))


def measure(argv: list[str], stdin: bytes, n: int, tag: str) -> dict:
    add, dele = [], []
    for i in range(n):
        add.append(call(argv, "ADD", f"{tag}-{i}", stdin))
        dele.append(call(argv, "DEL", f"{tag}-{i}", stdin))
    qa, qd = statistics.quantiles(add, n=100), statistics.quantiles(dele, n=100)
    return {"add50": qa[49], "add95": qa[94], "add99": qa[98], "del50": qd[49], "del95": qd[94]}


def main() -> None:
    if not os.path.exists(HOST_LOCAL):
        sys.exit("containernetworking-plugins is not installed (make test installs it as root)")
    print(f"CNI benchmark: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; "
          "milliseconds per exec, median [min-max] over runs")
    plugins = {"host-local": [HOST_LOCAL],
               "ipamd-cni (C forwarder)": [str(ROOT / "dist" / "ipamd-cni")],
               "ipamd (frozen, CNI mode)": [str(ROOT / "dist" / "ipamd")],
               "python -m appliance (CNI mode)": [sys.executable, "-m", "appliance"]}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        d = Daemon(tmp, "--iprange", "198.18.0.0/16")
        d.start()
        try:
            rows = []
            for live in (0, 2000):
                results: dict[str, list[dict]] = {k: [] for k in plugins}
                if live:  # the same 2,000 allocations in host-local's files and in ipamd
                    fill(plugins["host-local"], conf("host-local", tmp / "hl", d.socket), live)
                    fill(plugins["ipamd-cni (C forwarder)"], conf("ipamd", tmp, d.socket), live)
                for run in range(RUNS):
                    for name, argv in plugins.items():
                        kind = "host-local" if name == "host-local" else "ipamd"
                        stdin = conf(kind, tmp / "hl", d.socket)
                        results[name].append(measure(argv, stdin, CALLS[name],
                                                     f"r{live}-{run}"))
                rows += [(f"{name} @ {live}", results[name]) for name in plugins]
        finally:
            d.stop()
    cols = [("ADD p50", "add50"), ("ADD p95", "add95"), ("ADD p99", "add99"),
            ("DEL p50", "del50"), ("DEL p95", "del95")]
    print(f"\n{'':<42}" + "".join(f"{h:>20}" for h, _ in cols))
    for name, runs in rows:
        cells = []
        for _, k in cols:
            v = [r[k] for r in runs]
            cells.append(f"{statistics.median(v):.1f} [{min(v):.1f}-{max(v):.1f}]")
        print(f"{name:<42}" + "".join(f"{c:>20}" for c in cells))


if __name__ == "__main__":
    main()
