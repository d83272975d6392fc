"""Failure detection in simulation: N hosts' transports on one seeded, simulated clock.

The main simulator (simulator.py) decides who reaches whom itself; this one checks how the
transport comes to know it. Each host is a real PeerNet (its frame bookkeeping, reachability
rule and watch schedule: frame_heard, reachable, next_look), and sends keepalives on its own
wall-time grid with the interval peer_liveness gives for its number of peers, as peer_net's
_sender does. Frames take up to LATENCY on the wire and arrive in order per connection; hosts'
wall clocks differ by up to SKEW. Faults, drawn from the seed: one host crashes; one host is
slow (each of its frames late by up to SLOW of its intervals: a loaded machine, a GC pause);
the hosts split in two for a while, then heal; one link is cut one way for a while.

Checked at every look a host takes (when its watch would wake): no false alarm (a live host
whose frames reach us, slow or not, is reachable once first heard); a crashed host, and the
far side of a cut, is unreachable within 3 of its intervals (peer_liveness.dead_after) plus
the wire's delay (and a slow host's lateness); after a heal, reachable again within one
interval plus that delay.
"""
from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

from appliance.peer_net import PeerNet
from appliance.protocols import peer_liveness as liveness
from appliance.protocols.peer_frames import KEEPALIVE_FRAME

LATENCY = 0.05  # seconds a frame takes on the wire, at most
SLOW = 1.8      # a slow host's frames are late by up to this many of its intervals
SKEW = 0.3      # seconds hosts' wall clocks differ by, at most
MARGIN = 0.02   # the watch wakes a hair after the moment (next_look), and float rounding


class Violation(AssertionError):
    pass


class _Core:
    """What PeerNet reads of a core loop; nothing of it matters to failure detection."""

    ranges: list = []

    def __init__(self, me: str):
        self.me = me

    def cluster(self):
        return "c", "c"

    def heard_from(self):
        return frozenset()

    members = removed = heard_from

    def set_reachable(self, peers, dialling):
        pass


@dataclass
class Report:
    hosts: int
    interval: float
    detections: list[float] = field(default_factory=list)  # seconds, crash or cut to noticed
    heals: list[float] = field(default_factory=list)        # seconds, heal to reachable again
    looks: int = 0
    frames: int = 0


class LivenessSim:
    def __init__(self, seed: int, n: int, seconds: float | None = None):
        self.rng = rng = random.Random(seed)
        self.seed, self.now = seed, 0.0
        self.names = [f"h{i:03d}" for i in range(n)]
        skew = {p: rng.uniform(-SKEW, SKEW) for p in self.names}
        self.nets = {p: PeerNet(_Core(p), b"secret", None, clock=lambda: self.now,
                                wall=lambda p=p: self.now + skew[p]) for p in self.names}
        for p, net in self.nets.items():
            net.out = {q: None for q in self.names if q != p}  # every connection up
        self.every = liveness.interval(n - 1)
        dead = liveness.dead_after(self.every)
        self.seconds = seconds or 10 * dead + 20
        self.report = Report(n, self.every)
        # Faults: times and victims from the seed; each long enough to be noticed.
        crash, slow, *rest = rng.sample(self.names, n)
        self.slow = slow
        self.crashed = {crash: rng.uniform(2 * dead, 3 * dead)}
        side = set(rest[:max(1, len(rest) // 3)])
        split_at = rng.uniform(3 * dead, 4 * dead)
        self.cuts: list[tuple[str, str, float, float]] = [  # (src, dst, from, until)
            (a, b, split_at, split_at + 2 * dead + 1) for a in self.names for b in self.names
            if a != b and (a in side) != (b in side)]
        one_way = rng.sample([p for p in self.names if p != crash], 2)
        at = rng.uniform(6 * dead, 7 * dead)
        self.cuts.append((one_way[0], one_way[1], at, at + 2 * dead + 1))
        self.cut_spans: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for a, b, lo, hi in self.cuts:
            self.cut_spans.setdefault((a, b), []).append((lo, hi))
        self.queue: list = []
        self.seq = 0
        self.arrives: dict[tuple[str, str], float] = {}  # per connection: frames in order
        self.gen = dict.fromkeys(self.names, 0)          # a host's current look
        # (dst, src) -> the times dst stopped, and started, calling src reachable
        self._drops: dict[tuple[str, str], list[float]] = {}
        self._rejoins: dict[tuple[str, str], list[float]] = {}
        self.first: dict[tuple[str, str], float] = {}    # (dst, src) -> first frame heard
        for p in self.names:
            self._at(0.0, "grid", p)
            self._look_at(p, 0.0)

    def _at(self, t: float, *event) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (t, self.seq, *event))

    def _look_at(self, p: str, t: float) -> None:
        self.gen[p] += 1
        self._at(t, "look", p, self.gen[p])

    def _cut(self, src: str, dst: str, t: float) -> bool:
        return any(lo <= t < hi for lo, hi in self.cut_spans.get((src, dst), ()))

    def run(self) -> Report:
        while self.queue and self.queue[0][0] <= self.seconds:
            t, _, kind, *args = heapq.heappop(self.queue)
            self.now = t
            getattr(self, "_" + kind)(*args)
        self._final()
        return self.report

    # -- events --------------------------------------------------------------------------------

    def _grid(self, p: str) -> None:
        """p's keepalives to every peer, then its next grid point (peer_net._sender)."""
        if p in self.crashed and self.now >= self.crashed[p]:
            return
        payload = liveness.encode(self.every)
        for q in self.names:
            if q == p or self._cut(p, q, self.now):
                continue  # lost (after a heal TCP starts afresh: a new connection)
            late = self.rng.uniform(0, SLOW * self.every) if p == self.slow else 0.0
            t = max(self.now + self.rng.uniform(0, LATENCY) + late,
                    self.arrives.get((p, q), 0.0))
            self.arrives[(p, q)] = t
            self._at(t, "frame", p, q, payload)
        self._at(self.now + liveness.until_next(self.nets[p].wall(), self.every), "grid", p)

    def _frame(self, src: str, dst: str, payload: bytes) -> None:
        if dst in self.crashed and self.now >= self.crashed[dst]:
            return
        self.report.frames += 1
        net = self.nets[dst]
        self.first.setdefault((dst, src), self.now)
        kicked = src not in net.told[0]
        net.frame_heard(src, KEEPALIVE_FRAME, payload)
        if kicked:
            self._look_at(dst, self.now)  # peer_net: rewatch set, the watch looks at once

    def _look(self, p: str, gen: int) -> None:
        """p's watch wakes (peer_net._watch): who it reaches now, checked."""
        if gen != self.gen[p] or p in self.crashed and self.now >= self.crashed[p]:
            return
        self.report.looks += 1
        net = self.nets[p]
        was, now = net.told[0], net.reachable()
        net.told = (now, False)
        for q in was - now:
            self._drops.setdefault((p, q), []).append(self.now)
        for q in now - was:
            self._rejoins.setdefault((p, q), []).append(self.now)
        for q in self.names:
            if q != p:
                self._check(p, q, q in now)
        self._look_at(p, self.now + net.next_look())

    # -- checks --------------------------------------------------------------------------------

    def _late(self, src: str) -> float:
        """How late a frame of src can arrive, at most."""
        return LATENCY + (SLOW * self.every if src == self.slow else 0.0)

    def _bound(self, src: str) -> float:
        """Seconds from src's last frame leaving it to dst calling it gone, at most."""
        return liveness.dead_after(self.every) + self._late(src) + MARGIN

    def _gone_since(self, src: str, dst: str) -> float | None:
        """Since when no frame of src can reach dst (crash or cut), if so now."""
        since = [self.crashed[src]] if src in self.crashed else []
        since += [lo for lo, hi in self.cut_spans.get((src, dst), ()) if lo <= self.now < hi]
        return min(since) if since else None

    def _check(self, p: str, q: str, reached: bool) -> None:
        gone = self._gone_since(q, p)
        if gone is not None:
            if reached and self.now > gone + self._bound(q):
                raise Violation(f"seed={self.seed} n={len(self.names)}: {p} still reaches {q} "
                                f"{self.now - gone:.2f}s after it went (bound "
                                f"{self._bound(q):.2f}s)")
            return
        healed = max((hi for lo, hi in self.cut_spans.get((q, p), ()) if hi <= self.now),
                     default=None)
        if healed is not None and self.now - healed < 1.1 * self.every + self._late(q) + MARGIN:
            return  # the first frame after the heal may still be on its way
        if (p, q) in self.first and not reached:
            raise Violation(f"seed={self.seed} n={len(self.names)}: {p} calls {q} unreachable "
                            f"at {self.now:.2f}s, but {q} is alive and its frames reach {p}"
                            + (" (it is the slow one)" if q == self.slow else ""))

    def _final(self) -> None:
        """Every loss noticed within the bound, every heal within one interval."""
        r = self.report
        for src, t in self.crashed.items():
            for dst in self.names:
                if dst != src and dst not in self.crashed:
                    self._noticed(src, dst, t)
        for src, dst, lo, hi in self.cuts:
            if src in self.crashed or dst in self.crashed or hi > self.seconds:
                continue
            self._noticed(src, dst, lo)
            back = [t for t in self._rejoins.get((dst, src), []) if t >= hi]
            if not back:
                raise Violation(f"seed={self.seed}: {dst} never reached {src} again after "
                                f"the heal at {hi:.2f}s")
            r.heals.append(back[0] - hi)

    def _noticed(self, src: str, dst: str, t: float) -> None:
        drops, rejoins = self._drops.get((dst, src), []), self._rejoins.get((dst, src), [])
        if max((x for x in drops if x < t), default=-1) > \
                max((x for x in rejoins if x < t), default=-1):
            return  # not reachable already when this fault began (an earlier one's doing)
        when = [x for x in drops if x >= t]
        if not when:
            raise Violation(f"seed={self.seed}: {dst} never noticed {src} was gone ({t:.2f}s)")
        self.report.detections.append(when[0] - t)
