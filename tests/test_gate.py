"""The one gate, in process: every entrance's change goes through the core's checks, a bug in
the core costs a batch but never leaves memory ahead of the database, and the sweeper frees
exactly what it has proof is gone."""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import apsw
import pytest
import trio

from appliance import sweeper as sweeper_mod
from appliance.core import messages as m
from appliance.core.addr import cidr, parse_addr
from appliance.core.allocator import Allocator
from appliance.core.peer import Peer
from appliance.core.ring import Ring
from appliance.core.peer_messages import SpaceDenied
from appliance.daemon import CommitFailed, Config, CoreBug, CoreLoop
from appliance.store import Store
from appliance.sweeper import ALIVE, GONE, UNKNOWN, Sweeper, anchor_state

RANGE = cidr("198.18.0.0/24")


def core_loop(tmp_path: Path, clock=lambda: 1000.0) -> CoreLoop:
    store = Store(tmp_path / "ipamd.db")
    loaded = store.open([RANGE], "t")
    config = Config(data_dir=tmp_path, socket=tmp_path / "s", universes=[RANGE], subnet=None,
                    name="t")
    return CoreLoop(store, loaded, config, clock=clock)


def held_in_db(core: CoreLoop) -> dict:
    # apsw, as the daemon: a second copy of SQLite in one process must not touch its file.
    db = apsw.Connection(str(core.store.path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return dict(db.execute("SELECT address, handle FROM allocations").fetchall())
    finally:
        db.close()


def held_in_memory(core: CoreLoop) -> dict:
    return {h.text: h.handle for h in core.allocator.by_addr.values()}


async def test_a_core_bug_fails_its_batch_and_memory_is_rebuilt_from_the_database(
        tmp_path, monkeypatch):
    core = core_loop(tmp_path)
    assert (await core.submit(m.Allocate("keep")))["address"] == "198.18.0.1/24"
    real = Allocator._take
    planted = []

    def take_then_fail(self, held):
        out = real(self, held)  # memory now holds it ...
        if held.handle == "boom" and not planted:
            planted.append(held.text)
            raise RuntimeError("planted")  # ... and the core blows up before returning rows
        return out
    monkeypatch.setattr(Allocator, "_take", take_then_fail)
    # A batch is open (its leader has not committed yet) when "boom" fails: the whole batch
    # is refused, and memory is rebuilt once the leader runs. (Driven by hand: which of two
    # tasks trio runs first is not ours to choose.)
    first = core._core(lambda: core.peer.request("r1", m.Allocate("before"), 1000.0))
    core._open.rows.extend(first.rows)
    core._open.after.append(first)
    with pytest.raises(CoreBug, match="planted"):
        core._core(lambda: core.peer.request("r2", m.Allocate("boom"), 1000.0))
    assert planted and isinstance(core._open.failed, CoreBug)
    assert {"before", "boom"} <= set(held_in_memory(core).values())
    await core._lead(core._open)
    assert held_in_memory(core) == held_in_db(core) == {"198.18.0.1": "keep"}
    # With no batch open, the bug's half-change is dropped at once; the daemon keeps serving.
    planted.clear()
    with pytest.raises(CoreBug):
        await core.submit(m.Allocate("boom"))
    assert held_in_memory(core) == held_in_db(core) == {"198.18.0.1": "keep"}
    ok = await core.submit(m.Allocate("after"))
    assert ok["ok"] and ok["address"] == "198.18.0.2/24", ok
    assert held_in_memory(core) == held_in_db(core)
    core.store.close()


async def test_a_second_address_for_a_handle_in_a_subnet_is_a_core_bug(tmp_path, monkeypatch):
    # The schema has no index on handle (a page per request in every commit), so the core's
    # own check is what stops a buggy path from giving a handle two addresses in a subnet:
    # the request fails as a core bug, nothing is written, and the daemon serves on.
    from appliance.core.allocator import Held
    core = core_loop(tmp_path)
    assert (await core.submit(m.Allocate("keep")))["address"] == "198.18.0.1/24"

    def allocate_without_looking(self, req, now):  # skips "already holds one here"
        return self._take(Held(4, RANGE.start + 7, RANGE, RANGE, req.handle, None, now))
    monkeypatch.setattr(Allocator, "_allocate", allocate_without_looking)
    with pytest.raises(CoreBug, match="handle 'keep' would hold a second address in "
                                      "198.18.0.0/24"):
        await core.submit(m.Allocate("keep"))
    assert held_in_memory(core) == held_in_db(core) == {"198.18.0.1": "keep"}
    monkeypatch.undo()
    ok = await core.submit(m.Allocate("next"))
    assert ok["ok"] and ok["address"] == "198.18.0.2/24", ok
    core.store.close()


async def test_releases_pass_the_gate_in_every_standing_takes_do_not(tmp_path):
    core = core_loop(tmp_path)
    await core.submit(m.Allocate("a"))
    core.peer.standing, core.peer.note = "removed", "removed by x"
    for req in (m.Allocate("b"), m.Claim("c", 4, RANGE.start + 9),
                m.TakeSets("d", ((m.Allocate("d"),),)),
                m.CanServe(((RANGE, RANGE.start + 1, RANGE.end - 2),))):
        r = await core.submit(req)
        assert r == m.error("removed", "removed by x"), (req, r)
    r = await core.submit(m.Release("a"))
    assert r["ok"] and r["released"] == ["198.18.0.1/24"]
    assert held_in_db(core) == {}
    core.store.close()


def test_anchor_needs_evidence_to_be_gone(tmp_path, monkeypatch):
    ns = tmp_path / "ns"
    ns.write_text("")
    assert anchor_state(json.dumps({"netns": str(ns)}))[0] == ALIVE
    assert anchor_state(json.dumps({"netns": str(tmp_path / "no")}))[0] == GONE
    me = os.getpid()
    start = int(Path(f"/proc/{me}/stat").read_bytes().rsplit(b")", 1)[1].split()[19])
    assert anchor_state(json.dumps({"pid": me, "start_time": start}))[0] == ALIVE
    assert anchor_state(json.dumps({"pid": me, "start_time": start + 1}))[0] == GONE
    assert anchor_state(json.dumps({"pid": me}))[0] == ALIVE  # a pid alone: alive while it runs
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert anchor_state(json.dumps({"pid": dead.pid}))[0] == GONE
    for bad in ("[]", "not json", json.dumps({"pid": "7"}), json.dumps({"x": 1})):
        assert anchor_state(bad)[0] == UNKNOWN, bad

    # Any error but "no such file" is no proof: EMFILE, EACCES, EIO keep the allocation.
    def failing(err):
        def f(*a, **k):
            raise OSError(err, os.strerror(err))
        return f
    for err in (errno.EMFILE, errno.EACCES, errno.EIO, errno.ENFILE):
        monkeypatch.setattr(os, "lstat", failing(err))
        monkeypatch.setattr("builtins.open", failing(err))
        state, why = anchor_state(json.dumps({"netns": str(tmp_path / "no")}))
        assert state == UNKNOWN and os.strerror(err) in why, (err, state, why)
        state, why = anchor_state(json.dumps({"pid": 1, "start_time": 1}))
        assert state == UNKNOWN and os.strerror(err) in why, (err, state, why)
        monkeypatch.undo()


async def test_sweeper_frees_exactly_the_addresses_whose_anchor_is_gone(tmp_path):
    now = [1000.0]
    core = core_loop(tmp_path, clock=lambda: now[0])
    live, gone = tmp_path / "live-ns", tmp_path / "gone-ns"
    live.write_text("")
    upper = cidr("198.18.0.128/25")
    # One handle: an unanchored address, one anchored to a live netns, one to a vanished one.
    await core.submit(m.Claim("h", 4, RANGE.start + 10, cidr("198.18.0.0/25")))
    await core.submit(m.Claim("h", 4, RANGE.start + 200, upper,
                              json.dumps({"netns": str(gone)})))
    await core.submit(m.Allocate("live", None, json.dumps({"netns": str(live)})))
    await core.submit(m.Allocate("young", None, json.dumps({"netns": str(gone)})))
    s = Sweeper(core, 30.0)
    now[0] = 1020.0
    await core.submit(m.Allocate("young2", None, json.dumps({"netns": str(gone)})))
    now[0] = 1031.0  # the first three are older than one interval, young2 is not
    await s.sweep()
    assert held_in_db(core) == held_in_memory(core) == {
        "198.18.0.10": "h", "198.18.0.1": "live", "198.18.0.3": "young2"}
    assert s.swept == 2  # 198.18.0.200 of h, and young's 198.18.0.2
    core.store.close()


async def test_sweeper_release_is_checked_again_at_the_gate(tmp_path):
    """An address judged dead but given anew before the release lands stays with its new
    holder: ReleaseIf names the allocation (address and time), not just the handle."""
    core = core_loop(tmp_path)
    await core.submit(m.Allocate("x", None, json.dumps({"netns": "/nonexistent"})))
    key = parse_addr("198.18.0.1")
    (h,) = core.allocator.by_handle["x"].values()
    judged = (key[0], key[1], h.allocated_at)
    await core.submit(m.Release("x"))
    core.clock = lambda: 1500.0  # given anew, to the same handle even, later
    await core.submit(m.Claim("x", key[0], key[1], None, json.dumps({"netns": "/live"})))
    r = await core.submit(m.ReleaseIf("x", (judged,)))
    assert r == m.ok(handle="x", released=[])
    assert held_in_db(core) == {"198.18.0.1": "x"}
    core.store.close()


def test_cni_status_on_a_newcomer_asks_the_cluster_not_just_this_host():
    newcomer = Peer("b", "c", [Ring(RANGE)], RANGE)
    sets = ((((RANGE, RANGE.start + 1, RANGE.end - 2),)),)
    req = m.CanServe(sets)
    ((_, r),) = newcomer.request(1, req, 0.0).replies
    assert r == m.error("exhausted", "set 0: no free address in 198.18.0.0/24 on b or any "
                        "peer it can reach")
    newcomer.reachable = {"a"}  # knows no ring yet, but a reachable peer may serve
    ((_, r),) = newcomer.request(2, req, 0.0).replies
    assert r == m.ok()


def test_a_parked_request_meets_the_gate_again_when_it_is_retried():
    b = Peer("b", "c", [Ring(RANGE)], RANGE)
    b.dialling = True  # a joiner that has not reached its --peer yet
    ready = b.request("r1", m.Allocate("x"), 0.0)
    assert ready.replies == [] and ready.messages == [] and len(b.waiting) == 1
    (req,) = b.waiting
    # An answer nobody was sent to (a forged or late req id) is ignored, not a crash.
    ready = b.receive("z", SpaceDenied("c", req, "no", "exhausted"), 0.1)
    assert ready.replies == [] and len(b.waiting) == 1
    b.standing, b.note = "removed", "removed by a"
    b.reachable = {"a"}
    ready = b.tick(0.2)
    assert ready.replies == [("r1", m.error("removed", "removed by a"))]
    assert not [r for r in ready.rows if isinstance(r, m.PutAllocation)] and not b.waiting


async def test_sweeper_keeps_what_it_cannot_judge_and_counts_it(tmp_path, monkeypatch):
    now = [1000.0]
    core = core_loop(tmp_path, clock=lambda: now[0])
    await core.submit(m.Allocate("a", None, json.dumps({"netns": "/gone/a"})))
    await core.submit(m.Allocate("b", None, json.dumps({"netns": "/gone/b"})))
    real = sweeper_mod.anchor_state
    monkeypatch.setattr(sweeper_mod, "anchor_state", lambda anchor: (
        (UNKNOWN, "Too many open files") if "/a" in anchor else real(anchor)))
    s = Sweeper(core, 30.0)
    now[0] = 1030.0  # exactly one interval old: judged
    await s.sweep()
    assert held_in_db(core) == {"198.18.0.1": "a"}
    assert (s.swept, s.undecided) == (1, 1)
    core.store.close()


async def test_a_range_added_online_survives_a_rebuild_of_memory(tmp_path):
    # The rebuild after a failed commit reads the universes from the database again, not
    # those the daemon started with.
    core = core_loop(tmp_path)
    added = cidr("10.99.0.0/24")
    assert (await core.submit(m.AddRange(added)))["ok"]
    assert (await core.submit(m.Allocate("a", added)))["address"] == "10.99.0.1/24"
    core._rebuild(CommitFailed("test"))
    assert held_in_memory(core) == held_in_db(core) == {"10.99.0.1": "a"}
    assert (await core.submit(m.Allocate("b", added)))["address"] == "10.99.0.2/24"
    assert held_in_memory(core) == held_in_db(core)
    core.store.close()
