"""The run: start N hosts, fill them, churn, kill and rmpeer some, join new ones, check.

Every figure comes from outside the daemons: latencies as the client saw them, CPU from
/proc/PID/stat, RSS from /proc/PID/status, peer bytes from `status`' peer_bytes_sent, how
many allocations needed a peer from the metrics (ipamd_donation_seconds_count), and the
final check from each database read with apsw after the daemons stopped."""
from __future__ import annotations

import dataclasses
import os
import random
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import load

from .cluster import SECRET, Host, choose_peers, each, stop_all, wait_agreed

IPRANGE = "10.64.0.0/12"  # room for 100 hosts of hundreds of containers, and quarantine


@dataclass
class Plan:
    hosts: int = 100
    seconds: float = 30.0
    live: int = 0        # containers per host before the churn; 0: chosen from hosts
    rate: float = 0.0    # starts (and stops) per second per host; 0: chosen from hosts
    replace: int = 0     # hosts killed and removed, then hosts joined; 0: chosen from hosts
    # Seconds of the idle window: many keepalive intervals (2.4 s at 100 hosts), or its bytes
    # depend on how many of their grid points it happens to span (2 or 3 in 5 s).
    idle: float = 20.0
    # Seconds between agreement and the idle window, as in make bench-idle: the join's own
    # traffic (the last candidates dialled, first vectors) dies down, or one daemon's tail of
    # it is taken for idle cost.
    settle: float = 5.0
    fanout: int = 2      # a new host is given 1..fanout running hosts with --peer
    wave: int = 10       # hosts booted at once at the start
    seed: int = 1

    def scaled(self) -> Plan:
        """Sizes the machine copes with: the requirements' figures (hundreds of containers,
        10 starts/s, 10 hosts replaced) scaled down as hosts grow on one 2-core machine."""
        n = self.hosts
        return dataclasses.replace(
            self, live=self.live or max(20, min(300, 6000 // n)),
            rate=self.rate or min(10.0, 200.0 / n),
            replace=self.replace or max(1, min(10, n // 10)))


class Failed(Exception):
    """A duplicate or a lost acknowledged allocation."""


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def poll(plan: Plan) -> float:
    """Seconds between looks at whether the rings agree: each look reads every host's status,
    which at a hundred hosts is itself a load on them."""
    return min(1.0, max(0.2, plan.hosts / 100))


def latency_summary(values: list[float]) -> dict:
    ms = [v * 1000 for v in values]
    return {"count": len(ms), "p50_ms": pct(ms, 0.50), "p95_ms": pct(ms, 0.95),
            "p99_ms": pct(ms, 0.99), "max_ms": max(ms, default=float("nan")),
            "under_10ms": sum(v < 10 for v in ms) / len(ms) if ms else float("nan")}


def sample(hosts: list[Host]) -> dict[str, tuple[float, float, int]]:
    """name -> (monotonic time, CPU seconds, peer bytes sent so far)."""
    def one(h: Host) -> tuple[float, float, int]:
        sent = sum(h.status()["peer_bytes_sent"].values())
        return time.monotonic(), h.cpu_seconds(), sent
    return dict(zip([h.name for h in hosts], each(hosts, one, "status")))


def usage(before: dict, after: dict) -> dict:
    """Per daemon: CPU as % of one core, peer bytes sent per second."""
    cpu, rate = [], []
    for name, (t1, c1, b1) in after.items():
        t0, c0, b0 = before[name]
        cpu.append(100 * (c1 - c0) / (t1 - t0))
        rate.append((b1 - b0) / (t1 - t0))
    return {"cpu_pct_mean": statistics.fmean(cpu), "cpu_pct_max": max(cpu),
            "peer_bytes_per_s_mean": statistics.fmean(rate), "peer_bytes_per_s_max": max(rate)}


def donations(hosts: list[Host]) -> int:
    return sum(each(hosts, Host.donations, "metrics scrape"))


def alive(hosts: list[Host]) -> list[Host]:
    return [h for h in hosts if not h.killed]


def start_hosts(root: Path, hosts: list[Host], count: int, plan: Plan, rng: random.Random,
                log) -> list[float]:
    """The first host alone, then the others in waves of `plan.wave` booted at once, as an
    operator brings up a rack: each given one or a few hosts that are already ready (never one
    of its own wave, whose address it could not know yet)."""
    ready = []
    while len(ready) < count:
        wave = 1 if not hosts else min(plan.wave, count - len(ready))
        new = [Host(root, len(hosts) + k, IPRANGE,
                    choose_peers(rng, hosts, plan.fanout) if hosts else []) for k in range(wave)]
        hosts.extend(new)
        with ThreadPoolExecutor(max_workers=wave) as pool:
            ready += list(pool.map(Host.start, new))
        log(f"  {len(hosts)} hosts started")
    return ready


def join_one(root: Path, hosts: list[Host], plan: Plan, rng: random.Random,
             ledger: load.Ledger) -> dict:
    """A new host joins; its first allocation needs space from a peer (a ring change): how long
    until ready, until that allocation is answered, until every other ring has the change."""
    peers = choose_peers(rng, hosts, plan.fanout)
    h = Host(root, len(hosts), IPRANGE, peers)
    others = alive(hosts)
    hosts.append(h)
    ready = h.start()
    # Retried as a container runtime would (a refusal is counted among the errors): on a
    # saturated machine the peer asked may not answer within the daemon's request timeout.
    tries = 0
    while True:
        tries += 1
        r = h.call({"v": 1, "op": "allocate", "handle": f"{h.name}-first"}, timeout=60)
        if r.get("ok"):
            break
        ledger.refused(f"join allocate {r['error']['code']}", r["error"]["message"])
        if time.monotonic() - h.started_at > 120:
            raise RuntimeError(f"{h.name}: first allocation refused for 120 s, lastly: {r}")
    first = time.monotonic() - h.started_at
    ledger.acked[(h.name, f"{h.name}-first")] = r["address"].split("/")[0]
    granted = time.monotonic()
    waiting = {o.name: o for o in others}
    reached: dict[str, float] = {}

    def heard(o: Host) -> float | None:
        """Seconds from the grant to this reading of o, if its ring has the change."""
        shares = o.status()["universes"][0]["peers"]
        return time.monotonic() - granted if shares.get(h.id, {}).get("owned", 0) > 0 else None

    # Read a few at a time (cluster.each): one by one, a sweep of a hundred loaded daemons
    # took seconds, and each host's time was as late as its place in the sweep.
    while waiting:
        polled = list(waiting.values())
        for o, t in zip(polled, each(polled, heard, "status")):
            if t is not None:
                reached[o.name] = t
                del waiting[o.name]
        if time.monotonic() - granted > 120:
            raise TimeoutError(f"{h.name}'s space never reached {sorted(waiting)}")
    return {"ready_s": ready, "first_allocation_s": first, "first_allocation_tries": tries,
            "change_reached_all_s": max(reached.values(), default=0.0),
            "change_reached_median_s": statistics.median(reached.values()) if reached else 0.0}


def first_allocations(join: dict) -> str:
    """The joiners' first allocation times, with their tries where one was refused first."""
    tries = join.get("first_allocation_tries", [1] * len(join["first_allocation_s"]))
    return ", ".join(f"{x:.2f}" + (f" ({n} tries)" if n > 1 else "")
                     for x, n in zip(join["first_allocation_s"], tries))


def remove_killed(hosts: list[Host], victims: list[Host], log) -> dict:
    """kill -9 the victims, then `ipamd rmpeer` them from a survivor until it is done (peers
    refuse while they still reach a victim, which lasts a few seconds after the kill)."""
    for v in victims:
        v.kill()
    killed = time.monotonic()
    runner = alive(hosts)[0]
    tries, last = 0, None
    while True:
        tries += 1
        t0 = time.monotonic()
        out = subprocess.run([*runner.daemon.command, "rmpeer", *[v.id for v in victims],
                              "--json", "--socket", str(runner.socket)],
                             capture_output=True, text=True, timeout=120,
                             cwd=runner.daemon.dir.parent)
        call = time.monotonic() - t0
        if out.returncode == 0:
            break
        last = out.stdout + out.stderr
        if time.monotonic() - killed > 120:
            raise RuntimeError(f"rmpeer never succeeded: {last}")
        time.sleep(0.5)
    done = time.monotonic() - killed
    log(f"  rmpeer done after {tries} tries, {done:.1f}s after the kill")
    return {"removed": len(victims), "tries": tries, "call_s": call,
            "kill_to_removed_s": done, "last_refusal": (last or "").strip()[:200]}


def check(hosts: list[Host], ledger: load.Ledger) -> dict:
    """From the databases of every host still in the cluster: no address twice, every
    acknowledged allocation present. Allocations of removed hosts are void (their space was
    reclaimed), so they are left out and counted."""
    holders: dict[str, str] = {}
    duplicates, rows = [], 0
    dbs = {}
    for h in alive(hosts):
        dbs[h.name] = h.allocations()
        for address, handle in dbs[h.name].items():
            rows += 1
            if address in holders:
                duplicates.append(f"{address}: {holders[address]} and {h.name}/{handle}")
            holders[address] = f"{h.name}/{handle}"
    removed = {h.name for h in hosts if h.killed}
    lost, void = [], 0
    for (name, handle), address in ledger.acked.items():
        if name in removed:
            void += 1
        elif dbs[name].get(address) != handle:
            lost.append(f"{name}/{handle} -> {address} (db has {dbs[name].get(address)!r})")
    return {"rows": rows, "duplicates": duplicates, "lost": lost, "acked_checked":
            len(ledger.acked) - void, "acked_void_on_removed_hosts": void}


def run(plan: Plan, log=print, keep: bool = False) -> dict:
    plan = plan.scaled()
    rng = random.Random(plan.seed)
    root = Path(tempfile.mkdtemp(prefix="ipamd-scale-"))
    (root / "secret").write_text(SECRET)
    os.chmod(root / "secret", 0o600)
    hosts: list[Host] = []
    ledger = load.Ledger()
    result: dict = {"plan": vars(plan), "load_before": os.getloadavg()}
    try:
        log(f"scale: {plan.hosts} hosts, {plan.live} containers each, {plan.rate:g} starts and "
            f"stops/s per host for {plan.seconds:g}s, {plan.replace} killed+removed then "
            f"{plan.replace} joined; range {IPRANGE}; load average {os.getloadavg()[0]:.2f}")
        t0 = time.monotonic()
        ready = start_hosts(root, hosts, plan.hosts, plan, rng, log)
        started = time.monotonic()
        wait_agreed(hosts, "every host to be a member, reach the others and share one ring",
                    timeout=120 + 3 * plan.hosts, interval=0.5)
        result["start"] = {"ready_s_mean": statistics.fmean(ready), "ready_s_max": max(ready),
                           "all_started_s": started - t0,
                           "converged_after_last_s": time.monotonic() - started}
        log(f"  all {plan.hosts} started in {started - t0:.1f}s, converged "
            f"{result['start']['converged_after_last_s']:.1f}s after the last")
        time.sleep(plan.settle)  # a measurement's margin, not a wait for anything
        before = sample(hosts)
        time.sleep(plan.idle)  # the idle window itself: nothing to wait for, we measure it
        result["idle"] = usage(before, sample(hosts))
        log(f"  idle window measured; filling each host to {plan.live}")
        loads = [load.HostLoad(h.name, str(h.socket), ledger) for h in hosts]
        d0 = donations(hosts)
        t = time.monotonic()
        load.run_fill(loads, plan.live)
        result["fill"] = {"seconds": time.monotonic() - t, "live": len(ledger.acked),
                          "needed_a_peer": donations(hosts) - d0,
                          **latency_summary(ledger.latency.get("fill", []))}
        log(f"  filled to {len(ledger.acked)} containers in {result['fill']['seconds']:.1f}s"
            + "".join(f"; {n} {k}" for k, n in sorted(ledger.errors.items())
                      if k.startswith("fill")))
        d0, before = donations(hosts), sample(hosts)
        # The client's own CPU: near 100% of a core would mean the latencies are its own.
        c0, t = time.process_time(), time.monotonic()
        load.run_churn(loads, plan.rate, plan.seconds, plan.seed)
        client = 100 * (time.process_time() - c0) / (time.monotonic() - t)
        after = sample(hosts)
        result["churn"] = {**usage(before, after), "needed_a_peer": donations(hosts) - d0,
                           "late_starts": ledger.late, "client_cpu_pct": client,
                           **latency_summary(ledger.latency.get("churn", []))}
        result["churn"]["settled_s"] = wait_agreed(alive(hosts), "rings to agree after the churn",
                                                   120 + plan.hosts, poll(plan))
        log(f"  churned {plan.seconds:g}s ({len(ledger.latency.get('churn', []))} allocations); "
            f"rings agreed {result['churn']['settled_s']:.1f}s later")
        rss = each(hosts, Host.rss_mb, "RSS")
        result["rss_mb"] = {"mean": statistics.fmean(rss), "max": max(rss)}
        victims = rng.sample(hosts[1:], plan.replace)
        result["rmpeer"] = remove_killed(hosts, victims, log)
        result["rmpeer"]["converged_s"] = wait_agreed(alive(hosts), "rings to agree after rmpeer",
                                                      120 + plan.hosts, poll(plan))
        log(f"  rings agreed {result['rmpeer']['converged_s']:.1f}s after the rmpeer")
        joins = [join_one(root, hosts, plan, rng, ledger) for _ in range(plan.replace)]
        result["join"] = {k: [j[k] for j in joins] for k in joins[0]}
        log(f"  {plan.replace} joined")
        result["errors"] = dict(ledger.errors)
        result["first_error"] = ledger.first_error
        t = time.monotonic()
        stop_all(alive(hosts))
        log(f"  all stopped in {time.monotonic() - t:.1f}s; checking the databases")
        result["check"] = check(hosts, ledger)
        result["load_after"] = os.getloadavg()
        result["ok"] = not result["check"]["duplicates"] and not result["check"]["lost"]
        return result
    finally:
        # Every daemon signalled before any is waited for, so an interrupt or a failure here
        # leaves none running.
        stop_all(hosts, signal.SIGKILL, timeout=30)
        if keep:
            log(f"  the hosts' data directories are kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
