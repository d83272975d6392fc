"""The containers' side: one trio process drives every host's hook socket, bringing each host to
its live containers, then starting and stopping containers at a fixed rate per host.

Open loop: starts are scheduled at the rate whatever earlier requests are doing, so a slow
reply shows as latency instead of lowering the rate. An allocation counts as acknowledged once
its reply says ok; it stops counting when its release is sent (from then on it may be gone)."""
from __future__ import annotations

import json
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import trio

CALL_TIMEOUT = 30.0  # seconds: no hook request of the load waits longer

class Conn:
    def __init__(self, stream: trio.SocketStream):
        self.stream, self.buf = stream, b""

    async def call(self, request: dict) -> dict:
        await self.stream.send_all(json.dumps(request, separators=(",", ":")).encode() + b"\n")
        while b"\n" not in self.buf:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise ConnectionError("the daemon closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


@dataclass
class Ledger:
    acked: dict[tuple[str, str], str] = field(default_factory=dict)  # (host, handle) -> addr
    latency: dict[str, list[float]] = field(default_factory=dict)    # phase -> seconds
    errors: Counter = field(default_factory=Counter)                 # "phase op code"
    releases: int = 0
    first_error: dict[str, str] = field(default_factory=dict)  # "phase op code" -> message
    late: int = 0  # starts that began over a second behind their schedule (client overloaded)


    def refused(self, key: str, message: str) -> None:
        self.errors[key] += 1
        # Monotonic time (trio's clock has an offset of its own, and joins call this outside
        # trio): the "at" of first errors of different phases compare.
        self.first_error.setdefault(key, f"{message} (at {time.monotonic():.1f})")


class HostLoad:
    """One host's containers and a pool of hook connections to it."""

    def __init__(self, name: str, socket: str, ledger: Ledger):
        self.name, self.socket, self.ledger = name, socket, ledger
        self.live: deque[str] = deque()
        self.idle: list[Conn] = []
        self.made = 0

    async def call(self, request: dict) -> dict:
        """The reply, or trio.TooSlowError past CALL_TIMEOUT: the daemon answers every request
        within its own request timeout (seconds); this bounds one that does not."""
        with trio.fail_after(CALL_TIMEOUT):
            conn = self.idle.pop() if self.idle else \
                Conn(await trio.open_unix_socket(self.socket))
            try:
                reply = await conn.call(request)
            except BaseException:
                await conn.stream.aclose()  # closes at once, even cancelled
                raise
        self.idle.append(conn)
        return reply

    async def start(self, phase: str) -> None:
        self.made += 1
        handle = f"{self.name}-c{self.made}"
        t0 = trio.current_time()
        try:
            r = await self.call({"v": 1, "op": "allocate", "handle": handle})
        except (OSError, trio.TooSlowError) as e:
            self.ledger.errors[f"{phase} allocate {type(e).__name__}"] += 1
            return
        self.ledger.latency.setdefault(phase, []).append(trio.current_time() - t0)
        if r.get("ok"):
            self.ledger.acked[(self.name, handle)] = r["address"].split("/")[0]
            self.live.append(handle)
        else:
            self.ledger.refused(f"{phase} allocate {r['error']['code']}", r["error"]["message"])

    async def stop(self, phase: str) -> None:
        if not self.live:
            return
        handle = self.live.popleft()
        self.ledger.acked.pop((self.name, handle), None)
        self.ledger.releases += 1
        try:
            r = await self.call({"v": 1, "op": "release", "handle": handle})
        except (OSError, trio.TooSlowError) as e:
            self.ledger.errors[f"{phase} release {type(e).__name__}"] += 1
            return
        if not r.get("ok"):
            self.ledger.refused(f"{phase} release {r['error']['code']}", r["error"]["message"])

    async def close(self) -> None:
        for c in self.idle:
            await c.stream.aclose()
        self.idle.clear()


async def fill(loads: list[HostLoad], target: int, per_host: int = 4) -> None:
    """Every host up to `target` live containers, `per_host` requests in flight on each."""
    async def worker(h: HostLoad):
        while h.made < target:  # made counts requests in flight too
            await h.start("fill")

    async with trio.open_nursery() as n:
        for h in loads:
            for _ in range(per_host):
                n.start_soon(worker, h)


async def churn(loads: list[HostLoad], rate: float, seconds: float, seed: int) -> None:
    """`rate` starts and `rate` stops a second on every host, for `seconds`."""
    rng = random.Random(seed)
    period = 1.0 / rate

    async def host(h: HostLoad, offset: float, n: trio.Nursery):
        due = trio.current_time() + offset
        end = due + seconds
        while due < end:
            await trio.sleep_until(due)
            if trio.current_time() - due > 1.0:
                h.ledger.late += 1
            n.start_soon(h.start, "churn")
            n.start_soon(h.stop, "churn")
            due += period

    async with trio.open_nursery() as n:
        for h in loads:
            n.start_soon(host, h, rng.random() * period, n)


def run_fill(loads: list[HostLoad], target: int) -> None:
    async def main():
        try:
            await fill(loads, target)
        finally:
            for h in loads:
                await h.close()
    trio.run(main)


def run_churn(loads: list[HostLoad], rate: float, seconds: float, seed: int) -> None:
    async def main():
        try:
            await churn(loads, rate, seconds, seed)
        finally:
            for h in loads:
                await h.close()
    trio.run(main)
