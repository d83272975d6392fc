"""hook_server._Quick: the hub serves a plain request itself while the connection's task
sleeps (read_hub handlers). In process, a real core and socket pair: what it takes, what it
leaves to the task untouched, and that a reply still waits for its commit."""
import json
import socket
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from appliance import hook_server
from appliance.core import messages as m
from appliance.daemon import CoreBug
from appliance.protocols.hook import NEED_DATA, HookConnection, HookError
from appliance.read_hub import ReadHub

from .test_gate import core_loop, held_in_db

ALLOCATE = b'{"op":"allocate","handle":"x"}\n'


@asynccontextmanager
async def quick(tmp_path):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    b.settimeout(5)
    core = core_loop(tmp_path)
    try:
        async with trio.open_nursery() as nursery:
            with trio.CancelScope(deadline=trio.current_time() + 1) as idle:
                replies = hook_server._Replies(a, nursery)
                q = hook_server._Quick(a, HookConnection(), replies, idle, ReadHub(), core,
                                       [])
                yield q, b
    finally:
        a.close()
        b.close()
        core.store.close()


def _reply(b) -> dict:
    line = b.recv(65536)
    assert line.endswith(b"\n") and line.count(b"\n") == 1, line
    return json.loads(line)


def _nothing_there(b) -> bool:
    b.setblocking(False)
    try:
        b.recv(1)
    except BlockingIOError:
        return True
    finally:
        b.settimeout(5)
    return False


async def test_a_plain_request_is_applied_and_answered_only_once_committed(tmp_path):
    async with quick(tmp_path) as (q, b):
        before = q.idle.deadline
        b.sendall(ALLOCATE)
        assert q() is True  # served: the task sleeps on
        assert q.replies.pending and len(q.opened) == 1
        assert q.idle.deadline >= before - 1 + hook_server.HOOK_IDLE  # in use: not idle
        assert _nothing_there(b) and held_in_db(q.core) == {}  # no reply before the commit
        await q.core.lead(q.opened.pop())
        reply = _reply(b)
        assert reply["ok"] and reply["address"] == "198.18.0.1/24" and reply["handle"] == "x"
        assert held_in_db(q.core) == {"198.18.0.1": "x"} and not q.replies.pending
        assert q() is True and _nothing_there(b)  # an event with nothing to read: taken


@pytest.mark.parametrize("sent, left", [
    (b'{"op":"status"}\n', m.Status),  # its reply adds what only the shell knows
    (b'{"op":"allocate"}\n', HookError),  # answered by the task, which logs it
    (b'{"op":"alloc', NEED_DATA),  # a partial line
])
async def test_what_is_not_one_plain_request_is_left_to_the_task(tmp_path, sent, left):
    async with quick(tmp_path) as (q, b):
        b.sendall(sent)
        assert q() is False  # the task wakes, and finds it in the connection
        event = q.conn.next_event()
        assert event is left if left is NEED_DATA else isinstance(event, left)
        if left is HookError:
            assert event.code == "bad_request"
        assert q.opened == [] and not q.replies.pending and _nothing_there(b)
        assert q.core.allocator.by_addr == {}


async def test_lines_beyond_the_first_are_left_to_the_task(tmp_path):
    async with quick(tmp_path) as (q, b):
        b.sendall(ALLOCATE + b'{"op":"release","handle":"x"}\n')
        assert q() is False
        assert q.replies.pending and len(q.opened) == 1  # the first applied ...
        assert q.conn.next_event() == m.Release("x")  # ... the second for the task
        await q.core.lead(q.opened.pop())
        assert _reply(b)["address"] == "198.18.0.1/24"


@pytest.mark.parametrize("busy", ["pending", "unsent", "gone", "buffered"])
async def test_a_connection_not_ready_for_a_request_is_not_read(tmp_path, busy):
    """A reply still to come (one request at a time), one the client has not read yet (it
    must read before it may send more), a client gone, or bytes the task has not parsed:
    the hub leaves the socket alone and wakes the task."""
    async with quick(tmp_path) as (q, b):
        if busy == "unsent":
            q.replies.unsent += b"reply"
        elif busy == "buffered":
            q.conn.receive_data(b'{"op":')
        else:
            setattr(q.replies, busy, True)
        b.sendall(ALLOCATE)
        assert q() is False
        assert q.core.allocator.by_addr == {} and q.opened == []
        assert q.sock.recv(65536) == ALLOCATE  # still there for the task


async def test_a_core_bug_is_answered_at_once(tmp_path, monkeypatch):
    async with quick(tmp_path) as (q, b):
        def bug(request, then):
            raise CoreBug("internal error (KeyError: 1); nothing was changed")
        monkeypatch.setattr(q.core, "apply_nowait", bug)
        b.sendall(ALLOCATE)
        assert q() is True
        assert _reply(b) == {"ok": False, "error": {
            "code": "internal", "message": "internal error (KeyError: 1); nothing was changed"}}
        assert not q.replies.pending and q.opened == []


async def test_the_requests_of_one_wake_share_one_commit(tmp_path):
    """Two connections' requests applied before the commit: the first opens the batch, the
    second joins it (a second leader would commit the batch twice)."""
    async with quick(tmp_path) as (q, b):
        c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        d.settimeout(5)
        with c, d:
            q2 = hook_server._Quick(c, HookConnection(), hook_server._Replies(c, None), q.idle,
                                    q.hub, q.core, q.opened)
            b.sendall(ALLOCATE)
            d.sendall(b'{"op":"allocate","handle":"y"}\n')
            assert q() is True and q2() is True
            assert len(q.opened) == 1
            assert _nothing_there(b) and _nothing_there(d)
            await q.core.lead(q.opened.pop())
            assert (_reply(b)["address"], _reply(d)["address"]) == ("198.18.0.1/24",
                                                                      "198.18.0.2/24")
            assert held_in_db(q.core) == {"198.18.0.1": "x", "198.18.0.2": "y"}


async def test_a_bug_in_the_hub_s_handler_costs_the_connection_only(tmp_path, monkeypatch,
                                                                       caplog):
    async with quick(tmp_path) as (q, b):
        def bug(request, then):
            raise KeyError("planted")
        monkeypatch.setattr(q.core, "apply_nowait", bug)
        b.sendall(ALLOCATE)
        assert q() is False  # raised nothing into the hub; the task wakes ...
        assert q.conn.next_event() == hook_server.CLOSED and q.replies.gone  # ... and ends,
        assert not q.replies.pending and _nothing_there(b)  # owing no reply, and sent none
        assert "event=hook_connection_failed" in caplog.text and "planted" in caplog.text


async def test_a_read_that_fills_the_buffer_leaves_the_rest_to_the_task(tmp_path):
    """64 KiB read whole, ending in one plain request: it is served, but more may wait
    unread behind it (no new event will say so), so the task must wake and read it."""
    async with quick(tmp_path) as (q, b):
        first = b"\n" * (hook_server.RECEIVE - len(ALLOCATE)) + ALLOCATE
        b.sendall(first + b'{"op":"lookup","handle":"x"}\n')
        assert q() is False
        assert q.replies.pending and len(q.opened) == 1 and q.conn.idle
        assert q.sock.recv(65536) == b'{"op":"lookup","handle":"x"}\n'


@pytest.mark.parametrize("before", [b"", b"{}\n"])  # the task parked before any request,
# or after answering one itself (a bad line): it waits in either of two places
async def test_a_request_sent_before_the_last_reply_is_read_and_answered(
        tmp_path, monkeypatch, autojump_clock, before):
    """The hub serves R1 and leaves its task asleep; R1 waits (for a peer, say). The client
    sends R2 before R1's reply: the hub will not read it (one request at a time) and wakes
    the task, which must read R2 itself, wait for R1's reply, and then answer R2. Found by
    review: the task took the hub's earlier read of R1 for a new one, read nothing, and R2
    waited for the idle deadline (300 s). Served in process, on a real core whose
    apply_nowait (the hub's way in) keeps the first reply's hand-off for the test."""
    core = core_loop(tmp_path)
    held = []
    real = core.apply_nowait

    def keep_first(request, then):
        if not held:
            held.append(then)  # applied nowhere: its reply comes when the test says
            return None
        return real(request, then)
    monkeypatch.setattr(core, "apply_nowait", keep_first)
    path = tmp_path / "hook.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(hook_server.serve_hooks, path, core)
        client = await trio.open_unix_socket(str(path))
        if before:
            await client.send_all(before)
            with trio.fail_after(5):
                assert b'"code":"bad_request"' in await client.receive_some(65536)
        await trio.testing.wait_all_tasks_blocked()  # its task waits: the hub reads
        await client.send_all(ALLOCATE)
        await trio.testing.wait_all_tasks_blocked()
        assert len(held) == 1
        await client.send_all(b'{"op":"allocate","handle":"y"}\n')
        await trio.testing.wait_all_tasks_blocked()
        held[0](m.ok(handle="x", note="answered late"))
        got = b""
        with trio.fail_after(5):
            while got.count(b"\n") < 2:
                got += await client.receive_some(65536)
        first, second = (json.loads(line) for line in got.splitlines())
        assert first == {"ok": True, "handle": "x", "note": "answered late"}
        assert second["ok"] and second["handle"] == "y" and second["address"] == "198.18.0.1/24"
        await client.aclose()
        nursery.cancel_scope.cancel()
    core.store.close()
