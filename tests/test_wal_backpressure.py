"""The WAL's backpressure (daemon._Checkpoints): past its hard bound a batch waits for the
checkpoint copy under way, for a limited time, and not at all while a reader holds the WAL.
Real commits on a real database, with thresholds of a few pages; a copy thread starved of CPU
is played by a copy held until the test releases it."""
from __future__ import annotations

import logging
import threading

import apsw
import trio
import trio.testing

from appliance.core import messages as m
from appliance import daemon as daemon_mod
from appliance.daemon import _Checkpoints
from tests.test_gate import core_loop, held_in_db

PAGES, HARD = 8, 16  # a checkpoint is due at PAGES; commits wait past HARD


class HeldCopy:
    """Store.checkpoint_copy, held until release(): the copy thread of a busy host."""

    def __init__(self, store):
        self.real = store.checkpoint_copy
        self.gate = threading.Event()
        store.checkpoint_copy = self

    def __call__(self):
        assert self.gate.wait(timeout=20), "the test never released the copy"
        return self.real()

    def release(self):
        self.gate.set()


async def checkpointed(tmp_path, limit: float):
    """A core loop with small thresholds, its WAL started over (creating the database
    wrote more than HARD pages): copied whole, then one commit writes it from its start."""
    core = core_loop(tmp_path)
    core.checkpoints = _Checkpoints(core.store, pages=PAGES, hard=HARD, limit=limit)
    wal, copied = core.store.checkpoint_finish()
    assert wal == copied
    assert (await core.submit(m.Allocate("first")))["ok"]
    assert 0 < core.store.wal_pages < PAGES
    return core, core.checkpoints


def next_address(core) -> str:
    """What the next allocation takes: allocations go up from .1, none is released here."""
    return f"198.18.0.{len(core.allocator.by_addr) + 1}"


async def fill(core, until, tag: str = "h") -> int:
    """Allocate until until() holds; the number of allocations."""
    n = 0
    while not until():
        assert n < 200, "the condition never came"
        reply = await core.submit(m.Allocate(f"{tag}{n}"))
        assert reply["ok"], reply
        n += 1
    return n


async def test_past_the_hard_bound_a_commit_waits_for_the_copy_under_way(tmp_path):
    core, cp = await checkpointed(tmp_path, limit=60)
    held = HeldCopy(core.store)
    order = []
    commit, finish = core.store.commit, core.store.checkpoint_finish
    core.store.commit = lambda rows: (order.append("commit"), commit(rows))[1]
    core.store.checkpoint_finish = lambda: (order.append("finish"), finish())[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cp.run)
        await fill(core, lambda: core.store.wal_pages >= HARD and cp.copying is not None)
        assert cp.waits == 0  # due at PAGES, held since: a copy under way, nobody waited
        order.clear()
        address = next_address(core)
        replies, answered = [], trio.Event()

        async def late():
            replies.append(await core.submit(m.Allocate("late")))
            answered.set()

        nursery.start_soon(late)
        await trio.testing.wait_all_tasks_blocked()
        # Applied in memory, neither committed nor answered while the copy is held.
        assert cp.waits == 1 and order == [] and replies == []
        assert "late" not in held_in_db(core).values()
        held.release()
        await answered.wait()
        assert order == ["finish", "commit"]
        assert replies[0]["address"] == f"{address}/24"
        assert held_in_db(core)[address] == "late"
        assert core.store.wal_pages < PAGES  # copied whole, so the WAL started over
        assert cp.copying is None and not cp.pinned
        nursery.cancel_scope.cancel()


async def test_the_wait_ends_at_its_limit_and_the_batch_commits(tmp_path, autojump_clock):
    core, cp = await checkpointed(tmp_path, limit=5)
    held = HeldCopy(core.store)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cp.run)
        await fill(core, lambda: core.store.wal_pages >= HARD and cp.copying is not None)
        address, t0 = next_address(core), trio.current_time()
        reply = await core.submit(m.Allocate("late"))
        assert trio.current_time() - t0 == 5  # the limit, not for ever
        assert reply["address"] == f"{address}/24"
        assert held_in_db(core)[address] == "late"
        assert cp.waits == 1 and cp.copying is not None  # the copy is still held
        copying = cp.copying
        held.release()
        await copying.wait()
        nursery.cancel_scope.cancel()


async def test_a_reader_holding_the_wal_is_logged_once_and_stalls_nothing(
        tmp_path, autojump_clock, caplog):
    core, cp = await checkpointed(tmp_path, limit=30)
    # An operator's sqlite shell, left in a read transaction: no checkpoint can copy past it.
    reader = apsw.Connection(str(core.store.path), flags=apsw.SQLITE_OPEN_READONLY)
    reader.execute("BEGIN")
    assert reader.execute("SELECT handle FROM allocations").fetchall() == [("first",)]
    caplog.set_level(logging.WARNING, logger="ipamd")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cp.run)
        # Two checkpoints end with the WAL pinned (each waited for as an event, never counted
        # in allocations: a copy's fsyncs take what they take).
        for tag in ("h", "more"):
            await fill(core, lambda: cp.copying is not None, tag)
            await cp.copying.wait()
            assert cp.pinned
        pinned = [r.getMessage() for r in caplog.records if "event=wal_pinned" in r.getMessage()]
        assert len(pinned) == 1 and "a reader's open transaction" in pinned[0], pinned
        held, waits = HeldCopy(core.store), cp.waits
        # Past the hard bound with a copy under way: a commit would wait, but for nothing.
        await fill(core, lambda: core.store.wal_pages >= HARD and cp.copying is not None, "past")
        address, t0 = next_address(core), trio.current_time()
        reply = await core.submit(m.Allocate("late"))
        assert reply["address"] == f"{address}/24"
        assert trio.current_time() == t0 and cp.waits == waits
        # The reader ends: the held checkpoint copies it all and the WAL starts over.
        reader.execute("COMMIT")
        reader.close()
        copying = cp.copying
        held.release()
        await copying.wait()
        assert not cp.pinned
        assert (await core.submit(m.Allocate("after")))["ok"]
        assert core.store.wal_pages < PAGES
        nursery.cancel_scope.cancel()


async def test_with_no_thread_to_be_had_the_copy_runs_on_the_loop(tmp_path, monkeypatch, caplog):
    """Threads exhausted (a process limit): the checkpoint is done on the event loop rather
    than ending the daemon, and the WAL still starts over."""
    core, cp = await checkpointed(tmp_path, limit=60)

    async def no_thread(*args, **kwargs):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(daemon_mod.trio.to_thread, "run_sync", no_thread)
    caplog.set_level(logging.WARNING, logger="ipamd")
    finished, finish = trio.Event(), core.store.checkpoint_finish
    results = []

    def finish_then_tell():
        results.append(finish())
        finished.set()
        return results[-1]

    core.store.checkpoint_finish = finish_then_tell
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cp.run)
        await fill(core, lambda: core.store.wal_pages >= PAGES)  # due
        await finished.wait()
        (wal, copied), = results
        assert wal == copied > 0 and not cp.pinned and cp.copying is None
        inline = [r.getMessage() for r in caplog.records if "event=checkpoint_inline" in
                  r.getMessage()]
        assert inline == ["event=checkpoint_inline reason=\"can't start new thread\""], inline
        address = next_address(core)
        assert (await core.submit(m.Allocate("after")))["address"] == f"{address}/24"
        assert core.store.wal_pages < PAGES  # started over
        nursery.cancel_scope.cancel()
