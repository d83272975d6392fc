"""Chaos with real daemons: N hosts in network namespaces, allocation and release churn on
every host, a fault every FAULT_EVERY seconds (a host's link down, a 2/3 split, a bridge (two
sides cut apart but for one host that reaches both), a one-way drop, SIGKILL and restart,
SIGSTOP for 5 s), then heal and check I1-I8 from the databases and the client log, and L1:

L1 after each heal (and the last one): within HEAL_WITHIN seconds every host reaches every
other and an allocation on every host succeeds (retried until then). The fault-free window
that follows, up to the next fault, is "calm": of the allocations made wholly inside calm
windows, at most CALM_REFUSED_MAX (1%) may be refused or go unanswered. Free space exists
throughout: each host's clients hold at most HELD_MAX addresses (5 x 150 of a /20), and a
window counts only if the hosts' status shows room for every allocation it could make.

A client thread that dies of an exception fails the run (tests/threads.py).

    python -m tests.chaos --minutes N [--seed S]     (as root; `make soak MINUTES=N`)
"""
from __future__ import annotations

import argparse
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from appliance.client import Client, Unreachable

from .multihost import Cluster, allocations, owner_at, owner_spans, read_db, wait_until
from .threads import Worker, join_all, raise_first_error

FAULT_EVERY = 10.0
FAULT_LASTS = 5.0
RATE = 15.0  # client operations per second per host
HELD_MAX = 150  # addresses one host's clients hold at most: free space always exists
HEAL_WITHIN = 30.0  # L1: seconds after a heal by which every host reaches all and allocates
CALM_REFUSED_MAX = 0.01  # L1: share of calm-window allocations that may fail


class Violation(AssertionError):
    pass


class Windows:
    """The calm windows: each opens once a heal is done (every host reaches every other and
    has allocated) and closes when the next fault begins. `current` is the open one's number,
    or None; a client call counts as calm if the same window was open when it was sent and
    when it was answered."""

    def __init__(self):
        self.current: int | None = None
        self.opened = 0   # windows counted
        self.skipped = 0  # windows not counted: too little free space to be sure of any

    def open(self, roomy: bool) -> None:
        if roomy:
            self.opened += 1
            self.current = self.opened
        else:
            self.skipped += 1
            self.current = None

    def close(self) -> None:
        self.current = None


class Churn(Worker):
    """One host's clients: allocate new handles, release held ones, at RATE a second."""

    def __init__(self, i: int, socket: Path, seed: int, stop: threading.Event,
                 windows: Windows):
        super().__init__(self._churn, name=f"churn-h{i}")
        self.i, self.socket, self.stop, self.rng = i, socket, stop, random.Random(seed)
        self.windows = windows
        self.acked: dict[str, str] = {}   # handle -> address, acknowledged and not released
        self.released: set[str] = set()   # release sent: the address may or may not be free
        self.outcomes: Counter = Counter()
        self.calm_allocations = 0
        self.calm_refused: Counter = Counter()  # error code (or no_answer) -> count

    def _churn(self) -> None:
        n = 0
        while not self.stop.is_set():
            began = time.monotonic()
            if self.acked and (len(self.acked) >= HELD_MAX or self.rng.random() < 0.45):
                handle = self.rng.choice(sorted(self.acked))
                self.acked.pop(handle)
                self.released.add(handle)  # from the moment it is sent it may take effect
                self._call({"op": "release", "handle": handle})
            else:
                n += 1
                handle = f"h{self.i}-{n}"
                window = self.windows.current
                r = self._call({"op": "allocate", "handle": handle})
                if r is not None and r["ok"]:
                    self.acked[handle] = r["address"].split("/")[0]
                if window is not None and self.windows.current == window:
                    self.calm_allocations += 1
                    if r is None or not r["ok"]:
                        self.calm_refused["no_answer" if r is None else r["error"]["code"]] += 1
            self.stop.wait(max(0.0, 1 / RATE - (time.monotonic() - began)))

    def _call(self, request: dict) -> dict | None:
        try:
            with Client(self.socket, timeout=15) as c:
                r = c.call(request)
        except (Unreachable, OSError, ValueError):
            # Killed (a reply cut short too), restarting or stopped: no answer.
            self.outcomes[f"{request['op']}_no_answer"] += 1
            return None
        key = "ok" if r["ok"] else r["error"]["code"]
        self.outcomes[f"{request['op']}_{key}"] += 1
        return r


class Chaos:
    def __init__(self, tmp: Path, seconds: float, seed: int, n: int = 5, say=print):
        self.tmp, self.seconds, self.seed, self.n, self.say = tmp, seconds, seed, n, say
        self.rng = random.Random(seed)
        self.faults: Counter = Counter()
        self.seqs: dict[int, int] = {}               # I7: the highest seq seen per host
        self.versions: dict[tuple[int, str], int] = {}  # I7: (host, start) -> version
        self.writes: dict[tuple[str, int], tuple] = {}  # I3: (start, version) -> content
        self.windows = Windows()
        self.heals: list[float] = []  # L1: seconds from each heal until every host allocated
        self.probes = 0

    def run(self) -> dict:
        c = Cluster(self.tmp, self.n, "10.60.0.0/20", "--reuse-delay", "2")
        stop = threading.Event()
        churn = []
        try:
            wait_until("the cluster to form", c.converged, 60)
            self.ids = [c.status(i)["peer"] for i in range(self.n)]
            churn = [Churn(i, d.socket, self.seed * 100 + i, stop, self.windows)
                     for i, d in enumerate(c.daemons)]
            for t in churn:
                t.start()
            end = time.monotonic() + self.seconds
            while time.monotonic() < end:
                began = time.monotonic()
                self.windows.close()
                self._fault(c)
                self._healed(c)
                self._snapshot(c)
                raise_first_error(churn)
                time.sleep(max(0.0, FAULT_EVERY - (time.monotonic() - began)))
            self.windows.close()
            stop.set()
            join_all(churn, timeout=60)
            c.heal()
            self._healed(c, last=True)  # before waiting for one ring: a probe may move space
            wait_until("the rings to converge after the last heal", c.converged, 120)
            self._snapshot(c)
            return self._check(c, churn)
        finally:
            self.windows.close()
            stop.set()
            c.close()

    def _healed(self, c: Cluster, last: bool = False) -> None:
        """L1 after a heal: within HEAL_WITHIN every host reaches every other, then allocates
        (retried until the deadline; the probe address is released again). Then the calm
        window opens, if the hosts have room for every allocation it could make."""
        began = time.monotonic()
        deadline = began + HEAL_WITHIN
        ids = set(self.ids)
        for i in range(self.n):
            def reaches_all(i=i):
                return set(c.status(i)["reachable"]) == ids - {self.ids[i]}
            if not poll(reaches_all, deadline):
                raise Violation(f"L1: h{i} does not reach every other host {HEAL_WITHIN:g}s "
                                f"after the heal (reaches {c.status(i)['reachable']})")
        for i, d in enumerate(c.daemons):
            self.probes += 1
            handle = f"probe-{self.probes}"
            last_reply: list[dict | None] = [None]

            def allocates(d=d, handle=handle, last_reply=last_reply):
                try:
                    last_reply[0] = d.call({"op": "allocate", "handle": handle})
                except (Unreachable, OSError) as e:
                    last_reply[0] = {"ok": False, "error": {"code": "no_answer",
                                                            "message": str(e)}}
                return last_reply[0]["ok"]
            if not poll(allocates, deadline):
                raise Violation(f"L1: h{i} could not allocate within {HEAL_WITHIN:g}s of the "
                                f"heal: {last_reply[0]}")
            r = d.call({"op": "release", "handle": handle})
            if not r["ok"]:
                raise Violation(f"h{i} refused to release {handle}: {r}")
        self.heals.append(time.monotonic() - began)
        if not last:
            room = 0
            for i in range(self.n):
                u = c.status(i)["universes"][0]
                room += u["free"]  # allocatable now (quarantine left out)
            self.windows.open(roomy=room > RATE * self.n * FAULT_EVERY)

    def _fault(self, c: Cluster) -> None:
        kind = self.rng.choice(["isolate", "split", "bridge", "one_way", "kill", "stop"])
        self.faults[kind] += 1
        i = self.rng.randrange(self.n)
        order = self.rng.sample(range(self.n), self.n)
        if kind == "isolate":  # the host's link on the bridge goes down
            c.link(i, False)
            time.sleep(FAULT_LASTS)
            c.link(i, True)
        elif kind in ("split", "bridge", "one_way"):  # nft drop rules
            if kind == "split":
                c.cut(order[:2], order[2:])
            elif kind == "bridge":  # order[2] still reaches both sides
                c.cut(order[:2], order[3:])
            else:
                c.one_way(order[0], order[1])
            time.sleep(FAULT_LASTS)
            c.heal()
        elif kind == "kill":
            d = c.daemons[i]
            d.kill(signal.SIGKILL)
            # I8: the database a SIGKILL left behind is sound.
            ok = read_db(d.db, "PRAGMA integrity_check")
            if ok != [("ok",)]:
                raise Violation(f"I8: h{i}'s database after SIGKILL: {ok}")
            d.start()
        else:
            d = c.daemons[i]
            d.proc.send_signal(signal.SIGSTOP)
            time.sleep(FAULT_LASTS)
            d.proc.send_signal(signal.SIGCONT)

    def _snapshot(self, c: Cluster) -> None:
        """I7 and I3 from every database: seqs and versions never go back, and one content
        per (start, version) across all hosts and all times."""
        for i, d in enumerate(c.daemons):
            (seq,) = read_db(d.db, "SELECT seq FROM clock")[0]
            if seq < self.seqs.get(i, 0):
                raise Violation(f"I7: h{i}'s seq went back from {self.seqs[i]} to {seq}")
            self.seqs[i] = seq
            # Per universe: the spare ring has an entry (a marker) where each range starts.
            for u, start, version, owner, sp, sq, last in read_db(
                    d.db, "SELECT universe, start, version, owner, stamp_peer, stamp_seq, last "
                    "FROM ring"):
                if version < self.versions.get((i, u, start), 0):
                    raise Violation(f"I7: h{i}'s entry at {start} of {u} went back to version "
                                    f"{version}")
                self.versions[(i, u, start)] = version
                content = (owner, sp, sq, last)
                if self.writes.setdefault((u, start, version), content) != content:
                    raise Violation(f"I3: entry {start} of {u} version {version} has two "
                                    f"contents: {self.writes[(u, start, version)]} and "
                                    f"{content}")

    def _check(self, c: Cluster, churn: list[Churn]) -> dict:
        spans = owner_spans(c.daemons[0])
        for i in range(1, self.n):  # I6: one ring
            if owner_spans(c.daemons[i]) != spans:
                raise Violation(f"I6: h{i}'s ring differs from h0's after the heal")
        owners = {o for _, _, o in spans}
        if not owners <= set(self.ids):  # I5: no wipes here, so every owner is alive
            raise Violation(f"I5: owners {owners - set(self.ids)} are not live peers")
        held: dict[str, tuple[int, str]] = {}
        for i, d in enumerate(c.daemons):
            for address, handle in allocations(d).items():
                if address in held:  # I1
                    raise Violation(f"I1: {address} held by h{held[address][0]} "
                                    f"({held[address][1]}) and h{i} ({handle})")
                if owner_at(spans, address) != self.ids[i]:  # I4
                    raise Violation(f"I4: h{i} holds {address} outside its space")
                held[address] = (i, handle)
        for t in churn:  # I2: every acknowledged allocation not since released is there
            for handle, address in t.acked.items():
                if held.get(address) != (t.i, handle):
                    raise Violation(f"I2: h{t.i}'s acknowledged {handle} -> {address} is "
                                    f"missing (found {held.get(address)})")
        outcomes = sum((t.outcomes for t in churn), Counter())
        calm = sum(t.calm_allocations for t in churn)
        refused = sum((t.calm_refused for t in churn), Counter())
        share = sum(refused.values()) / calm if calm else 0.0
        liveness = {"heals": len(self.heals), "slowest_heal_s": round(max(self.heals), 2),
                    "calm_windows": self.windows.opened,
                    "windows_short_of_space": self.windows.skipped,
                    "calm_allocations": calm, "calm_refused": dict(sorted(refused.items())),
                    "calm_refused_share": round(share, 4), "bound": CALM_REFUSED_MAX}
        if self.windows.opened and not calm:
            raise Violation(f"L1: no allocation was made in {self.windows.opened} calm windows:"
                            " the check did not bite")
        if share > CALM_REFUSED_MAX:
            raise Violation(f"L1: {sum(refused.values())} of {calm} allocations in fault-free "
                            f"windows failed ({share:.1%} > {CALM_REFUSED_MAX:.0%}) while free "
                            f"space existed: {dict(refused)} ({liveness})")
        return {"seconds": self.seconds, "hosts": self.n, "faults": dict(self.faults),
                "operations": sum(outcomes.values()), "outcomes": dict(sorted(outcomes.items())),
                "held_at_end": len(held), "ring_entries": len(spans), "liveness": liveness}


def poll(fn, deadline: float, every: float = 0.1) -> bool:
    """fn() until it is true or the deadline passes; whether it became true."""
    while True:
        if fn():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(every)


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.chaos")
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"chaos seed={seed} minutes={args.minutes:g}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            report = Chaos(Path(tmp), args.minutes * 60, seed).run()
        except Violation as v:
            print(f"VIOLATION {v} (seed {seed})")
            return 1
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
