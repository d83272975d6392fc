"""The requirements' scale dimensions, run in the simulator: what a user would feel.

    python -m tests.sim.matrix [--size quick|full|huge] [--only NAME] [--json PATH]

One baseline (20 peers, 50 live addresses per peer at 50% of the range, even load, moderate
churn, a static membership, no failures), and each dimension varied from it in turn over the
levels of the requirements (node count up to 100 peers, 200 and 1,000 with --size huge;
addresses per node, distribution,
churn, utilisation up to 90%, membership static / gradual / spiky, node churn, node failures),
each of those at 20 peers and again at 100 (not with --size quick).
Each case fills the range to its utilisation, then churns for a fixed simulated time, heals
and measures:

- allocations refused while the cluster still had free space (and refusals overall),
- allocations that needed a peer (not answered in the Ready of the request itself), and how
  many rounds (0.1 s ticks) they waited,
- peer bytes (the messages of a sample of the pairs through the real codec) per ring change (a ring write by its
  writer), and for one claim of an address another peer owns: rounds and bytes until every
  ring has it,
- ring entries and runs of one owner (fragmentation),
- rounds to converge after the heal.

The simulator's invariants (I1-I9) are checked every simulated 10 s and after the heal, so a
case also fails loudly if the core breaks a safety rule at that size. Core bugs the simulator
knows of (simulator.KNOWN_BUGS) are tolerated as it tolerates them, and a case names those it
met (known-bug NAME=count)."""
from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from appliance.protocols import peer_codec
from appliance.protocols.peer_frames import PROTOCOL
from appliance.core import messages as m
from appliance.core.addr import Cidr

from .simulator import REUSE_DELAY, TICK, Faults, Sim, Violation

ROUNDS_PER_S = round(1 / TICK)


@dataclass(frozen=True)
class Case:
    name: str = "baseline"
    dimension: str = "baseline"
    level: str = ""
    peers: int = 20
    per_node: int = 50           # live addresses per peer, on average
    utilisation: float = 0.5     # of the range, once filled
    distribution: str = "even"   # even | static (uneven, fixed) | dynamic (uneven, moving)
    churn: float = 0.02          # share of the live addresses replaced per second
    membership: str = "static"   # static | gradual | spiky
    node_churn: float = 0.0      # peers replaced (one leaves, one joins) per second
    failures: float = 0.0        # crashes per peer per second (each restarts 1-5 s later)
    seconds: float = 20.0        # simulated time of churn after the fill
    seed: int = 1

    def universe(self) -> Cidr:
        want = self.peers * self.per_node / self.utilisation
        prefix = 32 - max(8, math.ceil(math.log2(want)))
        return Cidr(4, 10 << 24, prefix)


def baseline(size: str) -> Case:
    return Case(seconds=10.0 if size == "quick" else 20.0)


def matrix(size: str) -> list[Case]:
    base = baseline(size)
    levels = {
        "node count": [("low", dict(peers=5)), ("medium", dict(peers=20)),
                       ("medium+", dict(peers=50)),
                       ("high", dict(peers=100, seconds=5.0))],  # the slowest: see the report
        "addresses per node": [("low", dict(per_node=5)), ("medium", dict(per_node=50)),
                               ("high", dict(per_node=300))],
        "distribution": [("even", {}), ("uneven static", dict(distribution="static")),
                         ("uneven dynamic", dict(distribution="dynamic"))],
        "churn": [("low", dict(churn=0.005)), ("high", dict(churn=0.2))],
        "utilisation": [("low", dict(utilisation=0.15)), ("medium", dict(utilisation=0.5)),
                        ("high", dict(utilisation=0.9))],
        "membership": [("static", {}), ("gradual", dict(membership="gradual")),
                       ("spiky", dict(membership="spiky"))],
        "node churn": [("low", dict(node_churn=0.1)), ("high", dict(node_churn=1.0))],
        "node failures": [("low", dict(failures=0.005)), ("high", dict(failures=0.05))],
    }
    if size == "quick":
        levels["node count"] = levels["node count"][:3]
    if size == "huge":  # about 35 minutes on 2 cores, nearly all of it the 1,000 peers
        levels["node count"] += [("very high", dict(peers=200, seconds=2.0)),
                                 ("highest", dict(peers=1000, seconds=2.0))]
    out = []
    for dim, lv in levels.items():
        for level, kw in lv:
            out.append(replace(base, name=f"{dim}: {level}", dimension=dim, level=level, **kw))
    if size != "quick":
        # Every other dimension again at the requirements' size, 100 peers, for as long as
        # node count's "high" (5 simulated seconds: about 20 s each here).
        for dim, lv in levels.items():
            if dim == "node count":
                continue
            for level, kw in lv:
                out.append(replace(base, name=f"{dim}: {level}, {WIDE} peers", dimension=dim,
                                   level=level, **{"seconds": 5.0, **kw, "peers": WIDE}))
    return out


WIDE = 100  # the peers every dimension also runs at (the requirements' "up to 100 hosts")


@dataclass
class Result:
    case: dict
    wall_s: float = 0.0
    final_peers: int = 0
    universe: str = ""
    allocations: int = 0
    refused: Counter = field(default_factory=Counter)
    refused_with_space: int = 0
    most_free_at_refusal: int = 0  # the most free addresses the cluster had at a refusal
    needed_peer: int = 0
    wait_rounds: list = field(default_factory=list)  # of those that needed a peer
    ring_changes: int = 0
    peer_bytes: int = 0          # estimated from a sample past 10 peers (bytes_sampled)
    bytes_sampled: float = 1.0
    messages: int = 0
    bytes_per_change: float = 0.0
    change_rounds: int = 0
    change_bytes: int = 0
    ring_entries: int = 0
    ring_runs: int = 0
    heal_rounds: int = 0
    joined: int = 0
    left: int = 0
    crashes: int = 0
    known_bugs: dict = field(default_factory=dict)  # core bugs the checks tolerated, by name
    # Items of the version vectors the peers keep per partner at the end (Peer.known and
    # Peer.sent: the last vector each partner told, and the last sent it), each dict once
    # (vector_items): what bounds the node count the simulator can reach, as it grows with
    # peers^3.
    vector_items: int = 0
    protocol: int = PROTOCOL  # the peer protocol whose encoding the bytes are counted in

    def summary(self) -> dict:
        w = sorted(self.wait_rounds)
        d = asdict(self)
        del d["wait_rounds"]
        d["refused"] = dict(self.refused)
        d["needed_peer_share"] = self.needed_peer / max(1, self.allocations)
        d["wait_rounds_p50"] = w[len(w) // 2] if w else 0
        d["wait_rounds_p95"] = w[min(len(w) - 1, int(0.95 * len(w)))] if w else 0
        return d


def vector_items(peer) -> int:
    """The items of the vectors a peer keeps of its partners (known, sent), each dict once:
    partners that have what it has share one (Replica.frozen)."""
    kept = {id(v): v for held in (peer.known, peer.sent) for v in held.values()}
    return sum(len(v) for v in kept.values())


class MatrixSim(Sim):
    """The simulator, counting what users feel: bytes through the codec, replies, ring writes."""

    def __init__(self, case: Case, result: Result):
        super().__init__(case.seed, case.peers, Faults(), bootstrap="founder",
                         universes=[case.universe()])
        self.result = result
        self.asked: dict = {}  # ref -> (time, answered at once) of allocations under way
        # Encoding every message costs more than the rest of a big run (the codec is pure
        # Python), and so does keeping every connection's vectors (peer_codec.Vectors: two
        # vectors of every peer for each pair, a billion items at 1,000 peers). Past 10 peers
        # a sample of the pairs is measured: every message on a sampled pair is encoded, in
        # order, against its own connection's vectors, and the bytes of all are estimated
        # from the bytes per message there. A pair is sampled by a hash of its names and the
        # seed, never by the run's generator, so the run is the same whatever is sampled.
        self.sample = min(1.0, 10 / case.peers)
        self.salt = case.seed
        self.sampled = [0, 0]  # messages encoded, their bytes
        # Each pair's connection's vectors if it is sampled, else None.
        self.vectors: dict[tuple[str, str], peer_codec.Vectors | None] = {}

    def sampled_pair(self, src: str, dst: str) -> bool:
        if self.sample >= 1:
            return True
        h = hashlib.blake2b(f"{self.salt}/{src}/{dst}".encode(), digest_size=4).digest()
        return int.from_bytes(h, "big") < self.sample * (1 << 32)

    @property
    def peer_bytes(self) -> int:
        encoded, size = self.sampled
        return round(size * self.result.messages / encoded) if encoded else 0

    def _send(self, src, dst, msg) -> None:
        pair = (src, dst)
        if pair in self.vectors:
            vectors = self.vectors[pair]
        else:
            vectors = self.vectors[pair] = \
                peer_codec.Vectors() if self.sampled_pair(src, dst) else None
        if vectors is not None:
            self.sampled[0] += 1
            self.sampled[1] += len(peer_codec.encode(msg, vectors))
        self.result.messages += 1
        super()._send(src, dst, msg)

    def _crash(self, p, point) -> None:
        for pair in [pair for pair in self.vectors if p in pair]:
            del self.vectors[pair]  # its connections end: the next ones start afresh
        super()._crash(p, point)

    def _commit(self, p, rows) -> None:
        self.result.ring_changes += sum(1 for r in rows if isinstance(r, m.RingWrite)
                                        and r.stamp_peer == p)
        super()._commit(p, rows)

    def _client_reply(self, p, ref, reply) -> None:
        asked = self.asked.pop(ref, None)
        if asked is not None:
            t0, immediate = asked
            if not immediate:
                self.result.needed_peer += 1
                self.result.wait_rounds.append(round((self.now - t0) / TICK))
            if reply["ok"]:
                self.result.allocations += 1
            else:
                self.result.refused[reply["error"]["code"]] += 1
                free = self.cluster_free()
                if free > 0:
                    self.result.refused_with_space += 1
                    self.result.most_free_at_refusal = max(self.result.most_free_at_refusal,
                                                           free)
        super()._client_reply(p, ref, reply)

    def cluster_free(self) -> int:
        u = self.u
        return sum(q.allocator.free_count(u, *u.host_bounds(), self.now)
                   for q in self.live.values())


class Driver:
    def __init__(self, case: Case):
        self.case = case
        self.result = Result(asdict(case))
        self.sim = MatrixSim(case, self.result)
        self.rng = random.Random(case.seed * 7919)
        self.mine: dict[str, list[str]] = {p: [] for p in self.sim.names}
        self.weights: dict[str, float] = {}
        self.leaving: dict[str, float] = {}  # peer -> when to ask it to leave
        self.answered: dict[str, float] = {}  # peer that left -> when its leave answered
        self.down: dict[str, float] = {}     # crashed peer -> when it restarts
        self.joins = 0
        self.waiting_handles: list[tuple[str, str, object]] = []  # allocations under way
        self.reweigh()

    # -- load --------------------------------------------------------------------------------

    def reweigh(self) -> None:
        """Even, or Zipf-like (a few peers busy, most quiet) in a random order."""
        names = [p for p in self.sim.names if p not in self.leaving]
        if self.case.distribution == "even":
            self.weights = {p: 1.0 for p in names}
            return
        order = names[:]
        self.rng.shuffle(order)
        self.weights = {p: 1.0 / (i + 1) for i, p in enumerate(order)}

    def pick(self) -> str | None:
        live = [p for p in self.weights if p in self.sim.live
                and self.sim.live[p].standing == "member"]
        if not live:
            return None
        return self.rng.choices(live, [self.weights[p] for p in live])[0]

    def allocate(self) -> None:
        p = self.pick()
        if p is None:
            return
        sim = self.sim
        sim.handles += 1
        handle = f"h{sim.handles}"
        sim.requests += 1
        ref = ("req", sim.requests)
        peer = sim.live[p]
        sim.pending[ref] = (p, m.Allocate(handle))
        ready = peer.request(ref, m.Allocate(handle), sim.now)
        immediate = any(r == ref for r, _ in ready.replies)
        self.sim.asked[ref] = (sim.now, immediate)
        sim._handle(p, ready)
        if (p, handle) in sim.acked:
            self.mine[p].append(handle)
        elif ref in sim.pending:
            self.waiting_handles.append((p, handle, ref))

    def release(self) -> None:
        p = self.pick()
        if p is None or not self.mine.get(p):
            return
        handles = self.mine[p]
        handle = handles.pop(self.rng.randrange(len(handles)))
        self.sim._submit(p, m.Release(handle))

    def settle_handles(self) -> None:
        """Allocations that waited for a peer and are answered now."""
        still = []
        for p, h, ref in self.waiting_handles:
            if ref in self.sim.pending:
                still.append((p, h, ref))
            elif (p, h) in self.sim.acked and p not in self.leaving:
                self.mine.setdefault(p, []).append(h)
        self.waiting_handles = still

    # -- membership --------------------------------------------------------------------------

    def join(self) -> None:
        """A new host with an empty database and --peer (it owns nothing until it asks)."""
        sim = self.sim
        self.joins += 1
        new = f"j{self.joins}"
        sim.names.append(new)
        sim.durable[new] = sim.new_durable(new, sim.cluster)
        sim.max_clock[new] = (0, {})
        sim.freed[new] = {}
        sim._load(new)
        self.mine[new] = []
        self.weights[new] = max(self.weights.values(), default=1.0) if \
            self.case.distribution == "even" else self.rng.choice(list(self.weights.values()))
        self.result.joined += 1

    def start_leave(self) -> None:
        """The operator drains a peer (its containers go), waits out the quarantine, and asks
        it to leave."""
        sim = self.sim
        members = [p for p in sim.names if p in sim.live and p not in self.leaving
                   and p not in self.down and sim.live[p].standing == "member"
                   and p != sim.names[0]]
        if len(members) < 3:
            return
        p = self.rng.choice(members)
        self.leaving[p] = sim.now + REUSE_DELAY + 0.5
        self.weights.pop(p, None)
        self.mine[p] = []
        sim._submit(p, m.ReleaseUnlisted("", frozenset()))

    def leave_due(self) -> None:
        """Ask drained peers to leave; stop each once its leave has answered and `status`
        shows no peer in handing_over (as README tells operators), or 5 s after a timeout
        answer if one still does (the heal then runs rmpeer of it)."""
        sim = self.sim
        for p, when in sorted(self.leaving.items()):
            peer = sim.live.get(p)
            if peer is None:
                continue
            if peer.standing == "left":
                if any(q == p and isinstance(req, m.Leave) for q, req in sim.pending.values()):
                    continue  # the operator stops it once `ipamd leave` has answered
                answered = self.answered.setdefault(p, sim.now)
                if peer.removals.handing_over() and sim.now < answered + 5.0:
                    continue
                del self.leaving[p]
                sim._depart(p)
                self.result.left += 1
            elif sim.now >= when and not any(v[0] == p for v in sim.pending.values()):
                self.leaving[p] = sim.now + REUSE_DELAY + 0.5  # again, if refused
                sim._submit(p, m.Leave())

    def fail(self) -> None:
        sim = self.sim
        up = [p for p in sim.names if p in sim.live and p not in self.leaving
              and p != sim.names[0]]
        if not up:
            return
        p = self.rng.choice(up)
        sim._crash(p, self.rng.choice(("before_commit", "after_commit", "after_send")))
        self.mine[p] = [h for h in self.mine[p] if (p, h) in sim.acked]
        self.down[p] = sim.now + 1 + 4 * self.rng.random()
        self.result.crashes += 1

    def restarts_due(self) -> None:
        for p, when in sorted(self.down.items()):
            if self.sim.now >= when:
                del self.down[p]
                self.sim._restart(p)

    # -- time --------------------------------------------------------------------------------

    def round(self) -> None:
        sim = self.sim
        sim.now += TICK
        for p in sorted(sim.live):
            if p in sim.live:
                sim._handle(p, sim.live[p].tick(sim.now))
        while sim.queue and sim.queue[0][0] <= sim.now:
            _, _, src, dst, msg = heapq.heappop(sim.queue)
            if dst in sim.live and (src, dst) not in sim.blocked:
                sim._handle(dst, sim.live[dst].receive(src, msg, sim.now))
        self.settle_handles()

    def live_count(self) -> int:
        return sum(len(v) for v in self.mine.values())

    def run(self) -> Result:
        t0 = time.monotonic()
        case, sim = self.case, self.sim
        target = int(case.utilisation * sim.u.size)
        # Fill over 5 simulated seconds.
        fill_rounds = 5 * ROUNDS_PER_S
        for i in range(fill_rounds):
            for _ in range(target * (i + 1) // fill_rounds - target * i // fill_rounds):
                self.allocate()
            self.round()
            self.progress("fill", i, fill_rounds, t0)
        for _ in range(2 * ROUNDS_PER_S):
            self.round()
        sim.check()
        base = sim.names[:]
        rounds = int(case.seconds * ROUNDS_PER_S)
        credit = Counter()
        for i in range(rounds):
            frac = i / rounds
            if case.distribution == "dynamic" and i % (5 * ROUNDS_PER_S) == 0:
                self.reweigh()
            credit["churn"] += case.churn * target * TICK
            while credit["churn"] >= 1:
                credit["churn"] -= 1
                self.release()
                self.allocate()
            while self.live_count() < target * 0.98 and credit["refill"] < 50:
                credit["refill"] += 1  # top up what leaves and crashes took, a little a round
                self.allocate()
            credit["refill"] = 0
            credit["nodes"] += case.node_churn * TICK
            while credit["nodes"] >= 1:
                credit["nodes"] -= 1
                self.start_leave()
                self.join()
            credit["fail"] += case.failures * len(sim.live) * TICK
            while credit["fail"] >= 1:
                credit["fail"] -= 1
                self.fail()
            self.membership(i, rounds, frac, base)
            self.leave_due()
            self.restarts_due()
            self.round()
            if i % (10 * ROUNDS_PER_S) == 0:
                sim.check()
            self.progress("churn", i, rounds, t0)
        # Let leaves finish, then heal: every peer back, rings equal.
        for _ in range(200):
            if not self.leaving:
                break
            self.leave_due()
            self.round()
        for p in list(self.down):
            self.down[p] = sim.now
        self.restarts_due()
        sim.heal()
        sim.check()
        r = self.result
        r.heal_rounds = sim.stats.rounds_to_converge
        r.known_bugs = {k.removeprefix("known_bug_"): n
                        for k, n in sorted(sim.stats.faults.items()) if k.startswith("known_bug_")}
        ring = sim.live[sim.names[0]].replica.rings[sim.u]
        r.ring_entries, r.ring_runs = len(ring.entries), ring.segments()
        r.peer_bytes, r.bytes_sampled = sim.peer_bytes, sim.sample
        r.vector_items = sum(vector_items(q) for q in sim.live.values())
        r.bytes_per_change = r.peer_bytes / max(1, r.ring_changes)
        self.one_change()
        r.final_peers, r.universe = len(sim.live), str(sim.u)
        r.wall_s = time.monotonic() - t0
        return r

    def progress(self, phase: str, i: int, rounds: int, t0: float) -> None:
        if self.case.peers >= 500:  # a long run says how far it got
            print(f"  {self.case.name}: {phase} {i + 1}/{rounds} rounds, "
                  f"{time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)

    def membership(self, i: int, rounds: int, frac: float, base: list[str]) -> None:
        """gradual: grow by half the peers over the first half, shrink back over the second;
        spiky: double at a third of the run, back at two thirds."""
        case, n = self.case, self.case.peers
        if case.membership == "gradual":
            want = n + int(n / 2 * (1 - abs(2 * frac - 1)))
            have = len([p for p in self.sim.names if p not in self.leaving])
            if have < want:
                self.join()
            elif have > want:
                self.start_leave()
        elif case.membership == "spiky":
            if i == rounds // 3:
                for _ in range(n):
                    self.join()
            elif i == 2 * rounds // 3:
                for _ in range(n):
                    self.start_leave()

    def one_change(self) -> None:
        """A claim, on one peer, of a free address another owns: the owner grants a block
        holding it. Rounds and bytes until every ring has it."""
        sim = self.sim
        names = sorted(sim.live)
        a = names[0]
        ring = sim.live[a].replica.rings[sim.u]
        taken = set(sim.acked.values())
        for e, lo, hi in ring.spans():
            if e.owner == a or e.owner not in sim.live:
                continue
            free = [x for x in range(lo, min(hi, lo + 64)) if sim.u.addr(x) not in taken
                    and sim.u.host_bounds()[0] <= x < sim.u.host_bounds()[1]]
            if free:
                address = free[len(free) // 2]
                break
        else:
            return
        bytes0 = sim.peer_bytes
        sim.now += 60  # past every quarantine
        sim._submit(a, m.Claim("probe", 4, address))
        for rounds in range(1, 500):
            sim.now += TICK
            for p in sorted(sim.live):
                sim._handle(p, sim.live[p].tick(sim.now))
            sim._drain()
            rings = [q.replica.rings[sim.u].entries for q in sim.live.values()]
            if (a, "probe") in sim.acked and all(x == rings[0] for x in rings):
                self.result.change_rounds = rounds
                self.result.change_bytes = sim.peer_bytes - bytes0
                return


def run_case(case: Case) -> dict:
    return Driver(case).run().summary()


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.sim.matrix")
    ap.add_argument("--size", choices=("quick", "full", "huge"), default="full",
                    help="huge: full, and 200 and 1,000 peers (about 35 minutes)")
    ap.add_argument("--only", help="run the cases whose name contains this")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    cases = [c for c in matrix(args.size) if not args.only or args.only in c.name]
    load = os.getloadavg()
    print(f"scale matrix ({args.size}), {len(cases)} cases; load average {load[0]:.2f}")
    out, done = [], {}
    for c in cases:
        # A level that is the baseline's own (medium, even, static) is the same run: once.
        same = replace(c, name="", dimension="", level="")
        if same not in done:
            try:
                done[same] = run_case(c)
            except Violation as v:  # kept as the case's result: the report shows it
                print(f"{c.name:<30} VIOLATION {v}", flush=True)
                done[same] = {"violation": str(v)}
        r = {**done[same], "case": asdict(c)}
        out.append(r)
        if "violation" in r:
            continue
        print(f"{c.name:<30} peers={r['final_peers']:>4} {r['universe']:<14} allocs="
              f"{r['allocations']:>6} refused={sum(r['refused'].values()):>4} (with space "
              f"{r['refused_with_space']:>4}) needed-peer={100 * r['needed_peer_share']:5.1f}% "
              f"B/change={r['bytes_per_change']:>7.0f} change={r['change_rounds']}r/"
              f"{r['change_bytes']}B entries={r['ring_entries']:>5} heal={r['heal_rounds']}r "
              f"wall={r['wall_s']:.1f}s" + "".join(f" known-bug {k}={n}" for k, n in
                                            r["known_bugs"].items()), flush=True)
    if args.json:
        path = Path(args.json)
        if args.only and path.exists():  # replace just these cases in the last results
            kept = json.loads(path.read_text())["cases"]
            out = [next((r for r in out if r["case"]["name"] == k["case"]["name"]), k)
                   for k in kept] + [r for r in out if r["case"]["name"] not in
                                     {k["case"]["name"] for k in kept}]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(
            {"size": args.size, "baseline": asdict(baseline(args.size)),
             "load_before": load, "load_after": os.getloadavg(),
             "cases": out}, indent=1) + "\n")
    return 1 if any("violation" in r for r in out) else 0


if __name__ == "__main__":
    sys.exit(main())
