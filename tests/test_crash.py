"""Crash test with real processes: 8 clients allocate and release while the daemon is SIGKILLed.

Clients retry an interrupted request after the restart (allocate and release are idempotent), so
every request ends acknowledged. Afterwards the database must hold exactly what the clients were
told: every acknowledged allocation not released later, with the address they were given; no
address ever acknowledged to two live handles; PRAGMA integrity_check ok.
"""
import random
import threading

import apsw

from appliance.client import Client, Unreachable

from .daemon_proc import Daemon
from .threads import Worker, first_error, join_all, raise_first_error

CLIENTS = 8
KILLS = 24
ACKS_BETWEEN_KILLS = 40  # so every kill lands under load, not on an idle daemon


class Harness:
    def __init__(self, daemon: Daemon, seed: int):
        self.d = daemon
        self.rng = random.Random(seed)
        self.cond = threading.Condition()
        self.generation = 1  # bumped each time a fresh daemon is ready
        self.acks = 0
        self.stop = False
        self.live: dict[str, str] = {}  # address -> handle, for acknowledged and not released
        self.violations: list[str] = []
        self.held: list[dict[str, str]] = [{} for _ in range(CLIENTS)]
        self.interrupted = 0

    def wait_for_generation_after(self, gen: int) -> int:
        with self.cond:
            self.cond.wait_for(lambda: self.generation > gen or self.stop)
            return self.generation

    def call(self, state: dict, request: dict) -> dict | None:
        """Send until acknowledged; None if the test is stopping."""
        while True:
            if state.get("client") is None:
                with self.cond:
                    gen = self.generation
                try:
                    state["client"], state["gen"] = Client(self.d.socket, timeout=30), gen
                except Unreachable:
                    if self.wait_for_generation_after(gen) and self.stop:
                        return None
                    continue
            try:
                return state["client"].call(request)
            except (Unreachable, ValueError):
                self.interrupted += 1
                state["client"].close()
                state["client"] = None
                self.wait_for_generation_after(state["gen"])
                if self.stop:
                    return None

    def client(self, i: int) -> None:
        try:
            self._client(i)
        finally:  # wake the main thread, which also waits for a client that died
            with self.cond:
                self.cond.notify_all()

    def _client(self, i: int) -> None:
        rng = random.Random(self.rng.random())
        held = self.held[i]
        state: dict = {}
        n = 0
        while not self.stop:
            if len(held) < 16 or rng.random() < 0.55:
                n += 1
                handle = f"c{i}-{n}"
                reply = self.call(state, {"op": "allocate", "handle": handle})
                if reply is None:
                    return
                assert reply["ok"], reply
                address = reply["address"]
                with self.cond:
                    other = self.live.get(address)
                    if other is not None and other != handle:
                        self.violations.append(f"{address} acknowledged to {handle} while "
                                               f"{other} held it")
                    self.live[address] = handle
                    held[handle] = address
                    self.acks += 1
                    self.cond.notify_all()
            else:
                handle = rng.choice(sorted(held))
                with self.cond:
                    # Once the release is sent it may commit at any moment, so from now on the
                    # address may rightly be handed to someone else.
                    self.live.pop(held.pop(handle), None)
                if self.call(state, {"op": "release", "handle": handle}) is None:
                    return
                with self.cond:
                    self.acks += 1
                    self.cond.notify_all()
        if state.get("client"):
            state["client"].close()


def test_sigkill_under_load_loses_and_duplicates_nothing(tmp_path):
    seed = random.randrange(2**32)
    print(f"crash test seed={seed}")
    d = Daemon(tmp_path, "--iprange", "10.40.0.0/22", "--reuse-delay", "0")
    d.start()
    h = Harness(d, seed)
    # A client's failed assert (a refused allocate) fails the test: join_all raises it here.
    threads = [Worker(h.client, (i,), name=f"client-{i}") for i in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        for _ in range(KILLS):
            with h.cond:
                target = h.acks + ACKS_BETWEEN_KILLS + h.rng.randrange(ACKS_BETWEEN_KILLS)
                h.cond.wait_for(lambda: h.acks >= target or first_error(threads), timeout=60)
                raise_first_error(threads)
                assert h.acks >= target, "clients made no progress"
            d.kill()
            d.start()
            with h.cond:
                h.generation += 1
                h.cond.notify_all()
        with h.cond:
            target = h.acks + ACKS_BETWEEN_KILLS
            h.cond.wait_for(lambda: h.acks >= target or first_error(threads), timeout=60)
            raise_first_error(threads)
            assert h.acks >= target, "clients made no progress after the last kill"
    finally:
        with h.cond:
            h.stop = True
            h.cond.notify_all()
        join_all(threads, timeout=60)
    d.kill()  # the last one too: the database is checked as a crash leaves it

    db = apsw.Connection(str(d.db))
    assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    rows = db.execute("SELECT handle, address FROM allocations").fetchall()
    db.close()
    expected = {hd: a.split("/")[0] for held in h.held for hd, a in held.items()}
    print(f"kills={KILLS} acknowledged={h.acks} interrupted={h.interrupted} "
          f"held_at_end={len(expected)}")
    assert not h.violations, h.violations[:5]
    assert dict(rows) == expected
    assert len({a for _, a in rows}) == len(rows)
    assert h.interrupted > 0, "no request was ever cut off by a kill: the test did not bite"
    d.start()  # and the daemon comes back with exactly that state
    assert f"allocations={len(expected)}" in d.ready_line
    d.stop()
