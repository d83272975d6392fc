"""Bounds on what anyone who can reach a socket can take (DESIGN.md rule 10).

File descriptors: at start the soft RLIMIT_NOFILE is raised to the hard limit, a reserve is kept
for the database, peers we dial and our own work, and what is left is shared among the listeners
(hook socket, Docker socket, metrics, peer port), each capped. A connection over its listener's
cap is closed at once. Floods are logged as one summary line per interval, not a line each.
"""
from __future__ import annotations

import logging
import resource
import time

log = logging.getLogger("ipamd")

RESERVE = 64        # descriptors never given to listeners: database, WAL, dialled peers, threads
SUMMARY_EVERY = 10.0  # seconds between summary lines of a flood
# Each listener's share of what is left after the reserve, and its cap on any machine.
SHARES = {"hook": (0.40, 512), "peer": (0.30, 1024), "docker": (0.15, 64), "metrics": (0.10, 16)}


def raise_nofile() -> int:
    """Raise the soft limit on open files to the hard one; return the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as e:
            log.warning("event=nofile_not_raised soft=%d hard=%d error=%r", soft, hard, str(e))
    return soft


def caps(limit: int) -> dict[str, int]:
    """Connections each listener may hold at once, given the limit on open files."""
    left = max(0, limit - RESERVE)
    return {name: max(2, min(most, int(left * share))) for name, (share, most) in SHARES.items()}


class Summary:
    """Counts events and logs each distinct reason once per interval (at most DISTINCT of
    them), then one line saying how many more there were: a flood of the same garbage costs a
    line or two, not a line each."""
    DISTINCT = 8

    def __init__(self, event: str, clock=time.monotonic):
        self.event, self.clock = event, clock
        self.count = 0          # since start (status, metrics)
        self._held = 0
        self._seen: set[str] = set()
        self._since = -SUMMARY_EVERY

    def note(self, reason: str) -> None:
        self.count += 1
        now = self.clock()
        if now - self._since >= SUMMARY_EVERY:
            if self._held:
                log.warning("event=%s count=%d reason=%r", self.event, self._held,
                            "more of the reasons above")
            self._held, self._seen, self._since = 0, set(), now
        if reason not in self._seen and len(self._seen) < self.DISTINCT:
            self._seen.add(reason)
            log.warning("event=%s reason=%r", self.event, reason)
        else:
            self._held += 1


class ConnectionCap:
    """At most `cap` connections of one listener at once; the rest are closed at once."""

    def __init__(self, name: str, cap: int):
        self.name, self.cap = name, cap
        self.open = 0
        self.refused = Summary(f"{name}_connection_refused")

    def wrap(self, handler):
        async def capped(stream):
            if self.open >= self.cap:
                self.refused.note(f"{self.cap} {self.name} connections already open")
                await stream.aclose()
                return
            self.open += 1
            try:
                await handler(stream)
            finally:
                self.open -= 1
        return capped


class RateLimitFilter(logging.Filter):
    """Lets one record through per interval, saying how many were held back (trio's accept
    loop logs a traceback every 100 ms while descriptors are exhausted)."""

    def __init__(self, clock=time.monotonic):
        super().__init__()
        self.clock = clock
        self._last = -SUMMARY_EVERY
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = self.clock()
        if now - self._last < SUMMARY_EVERY:
            self._held += 1
            return False
        if self._held:
            record.msg = f"{record.msg} ({self._held} more like it held back)"
        record.exc_info = None  # the same traceback each time: the message says enough
        self._last, self._held = now, 0
        return True
