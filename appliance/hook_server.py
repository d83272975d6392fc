"""The hook socket: each connection's lines (protocols/hook.py frames and parses them) become
core requests through CoreLoop.submit (or submit_then), the one gate, and their replies go
back in order, each only once what it changed is durable. Served by unixsock.serve_unix:
0660, capped."""
from __future__ import annotations

import functools
import logging
import socket
import typing
from pathlib import Path

import trio

from . import cni_ops, host_routes
from .core import messages as m
from .core.messages import error
from .daemon import CommitFailed, CoreBug, CoreLoop
from .protocols import cni
from .read_hub import ReadHub
from .protocols.hook import (CLOSED, NEED_DATA, CniRequest, HookConnection, HookError,
                             RangeAdd, encode_cni_reply, encode_reply)
from .unixsock import serve_unix

log = logging.getLogger("ipamd")
HOOK_IDLE = 300.0  # seconds a hook connection may sit idle before it is closed


async def serve_hooks(path: Path, core: CoreLoop, task_status=trio.TASK_STATUS_IGNORED,
                      cap: int = 512) -> None:
    opened: list = []  # the batch the hub's handlers opened (_Quick), for it to commit

    async def commit_opened() -> None:
        # While batches are shared, one yield first, then what came meanwhile joins too:
        # measured under 8 clients, about 5% fewer of the daemon's CPU seconds a request than
        # committing at once (more requests a commit); a second yield gained nothing. While
        # each batch holds one request (one client), the yield would only add latency.
        if opened and core.shared:
            await trio.lowlevel.cancel_shielded_checkpoint()
            hub.dispatch()
        while opened:
            await core.lead(opened.pop())

    hub = ReadHub(after=commit_opened)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.run)
        await serve_unix(path, lambda stream: _serve_connection(stream, core, hub, opened),
                         "hook", cap, 256, task_status=task_status)
        nursery.cancel_scope.cancel()


async def _serve_connection(stream: trio.SocketStream, core: CoreLoop, hub: ReadHub,
                            opened: list) -> None:
    # The plain socket under the stream: trio's socket methods add a checkpoint to every send
    # and receive that did not block, two scheduler passes per request that the commit wait
    # makes needless (every request waits there, or checkpoints below). The nursery is for
    # a reply the socket does not take at once (_Replies).
    # Waits for requests go through the hub (read_hub.py): one registration per connection,
    # not one per request. While this task waits for a request, the hub serves the plain
    # ones itself (_Quick), and this task sleeps on.
    sock = socket.socket(fileno=stream.socket.detach())
    sock.setblocking(False)
    replies = None
    try:
        with trio.CancelScope(deadline=trio.current_time() + HOOK_IDLE) as idle:
            async with trio.open_nursery() as nursery:
                replies = _Replies(sock, nursery)
                conn = HookConnection()
                hub.add(sock, _Quick(sock, conn, replies, idle, hub, core, opened))
                await _serve_lines(sock, conn, core, idle, replies, hub)
    finally:
        if replies is not None:
            replies.gone = True  # a reply still to come has nowhere to go
        hub.remove(sock)
        trio.lowlevel.notify_closing(sock)
        sock.close()


async def _serve_lines(sock: socket.socket, conn: HookConnection, core: CoreLoop,
                       idle: trio.CancelScope, replies: _Replies, hub: ReadHub) -> None:
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            # After a reply, or with one to come, the client is reading it: wait for more
            # rather than try a read that would fail.
            data = await _receive(sock, conn, idle, replies.answered or replies.pending, hub)
            if data is None:  # reset by the client
                return
            if data is not HANDED:
                conn.receive_data(data)
            continue
        # One request at a time: the next (or the hang-up) once the last one's reply is out.
        if replies.pending:
            await replies.wait()
        # Nearly every reply went out whole: then there is nothing to wait for, and no
        # coroutine is made to find that out (drained is True unless these hold).
        if (replies.unsent or replies.gone) and not await replies.drained():
            return
        if event is CLOSED:
            return
        if isinstance(event, HookError):
            log.info("event=bad_request code=%s message=%r", event.code, event.message)
            await trio.lowlevel.checkpoint()  # a flood of bad lines must not hog the loop
            replies.put(encode_reply(event.reply()))
        elif type(event) in PLAIN:
            replies.pending = True
            try:
                yielded = await core.submit_then(event, replies.deliver)
            except CoreBug as e:
                replies.deliver(e)
                yielded = False
            if not (yielded or replies.pending):
                # Answered at once (nothing to commit), as submit would: the loop needs the
                # yield.
                await trio.lowlevel.checkpoint()
        else:
            replies.put(await _answer(core, event))
        replies.answered = True


# Requests whose reply is the core's, as it is: handed to the connection by whoever has it
# (CoreLoop.submit_then). The others (status, range_add, CNI) add to it or check first.
PLAIN = frozenset(typing.get_args(m.Request)) - {m.Status}


class _Replies:
    """What goes back on one connection, in order: at most one request is out at a time.
    A reply is sent as soon as it is known, by whichever task has it; what the socket does not
    take at once a task of the connection's nursery sends as the client reads, and the
    connection reads no more requests meanwhile (drained)."""
    __slots__ = ("sock", "nursery", "unsent", "pending", "answered", "gone", "_sent",
                 "_flushed")

    def __init__(self, sock: socket.socket, nursery: trio.Nursery):
        self.sock, self.nursery = sock, nursery
        self.unsent = bytearray()
        self.pending = False  # a request is out: its reply is still to come
        self.answered = False  # a reply has gone (or is going) out
        self.gone = False  # the client is gone, or the connection is over
        self._sent: trio.Event | None = None  # set when the pending reply comes
        self._flushed: trio.Event | None = None  # set when _flush has sent all of unsent

    def put(self, data: bytes) -> None:
        """Send data, or have _flush send what the socket does not take; never waits or
        raises."""
        if self.gone:
            return
        if not self.unsent:
            try:
                data = data[self.sock.send(data):]
            except BlockingIOError:
                pass
            except OSError:  # the client hung up
                self.gone = True
                return
            if not data:
                return
        self.unsent += data
        if self._flushed is None:
            self._flushed = trio.Event()
            self.nursery.start_soon(self._flush)

    async def _flush(self) -> None:
        try:
            while self.unsent and not self.gone:
                await trio.lowlevel.wait_writable(self.sock)
                try:
                    del self.unsent[:self.sock.send(self.unsent)]
                except BlockingIOError:
                    pass
                except OSError:
                    self.gone = True
        finally:
            done, self._flushed = self._flushed, None
            done.set()

    async def drained(self) -> bool:
        """Wait until all that was put has gone out; False if the client is gone."""
        if self._flushed is not None:
            await self._flushed.wait()
        return not self.gone

    def deliver(self, reply) -> None:
        """CoreLoop.submit_then's `then`: the reply to the request that is out."""
        if isinstance(reply, (CommitFailed, CoreBug)):
            reply = error("internal", str(reply))
        self.put(encode_reply(reply))
        self.pending = False
        if self._sent is not None:
            self._sent.set()
            self._sent = None

    async def wait(self) -> None:
        """Until the pending reply comes."""
        self._sent = trio.Event()
        await self._sent.wait()


class _Quick:
    """The hub's handler for one connection (read_hub.ReadHub.add): while the connection's
    task waits for a request, the hub reads what came and, if it is one plain request and
    nothing more, applies it (CoreLoop.apply_nowait) and leaves the task asleep; the reply
    goes out when the batch is committed (serve_hooks' commit_opened, after the hub has read
    every socket that had something). Anything else (a partial line, several lines, a status
    or CNI request, a bad line, a reply still going out) is handed to the task as it is.
    Measured under 8 clients: 10 to 20% less of the daemon's CPU a request than a task
    switch per request and a yielding leader (docs/design.md, rule 2)."""
    __slots__ = ("sock", "conn", "replies", "idle", "hub", "core", "opened")

    def __init__(self, sock, conn, replies, idle, hub, core, opened):
        self.sock, self.conn, self.replies, self.idle = sock, conn, replies, idle
        self.hub, self.core, self.opened = hub, core, opened

    def __call__(self) -> bool:
        try:
            return self._serve()
        except Exception as e:  # a bug must cost one connection, never the hub (serve_unix)
            log.exception("event=hook_connection_failed")
            replies = self.replies
            replies.gone = True
            if replies.pending:  # the task must not wait for a reply that may never come
                replies.deliver(CoreBug(f"internal error ({type(e).__name__}: {e})"))
            self.conn.receive_data(b"")  # the task wakes to an end, and hangs up
            return False

    def _serve(self) -> bool:
        replies, conn = self.replies, self.conn
        if replies.pending or replies.unsent or replies.gone or not conn.idle:
            return False
        try:
            data = self.hub.recv(self.sock, RECEIVE)
        except BlockingIOError:
            return True  # nothing after all
        except OSError:
            return False  # the task's own receive finds the error
        full = len(data) == RECEIVE  # more may wait unread: the task reads it
        conn.receive_data(data)  # the task sees it was fed (_receive)
        event = conn.next_event()
        if type(event) not in PLAIN:
            if event is not NEED_DATA:
                conn.put_back(event)
            return False
        _in_use(self.idle)
        replies.pending = replies.answered = True
        try:
            batch = self.core.apply_nowait(event, replies.deliver)
        except CoreBug as e:
            replies.deliver(e)
        else:
            if batch is not None:
                self.opened.append(batch)
        return conn.idle and not full  # or more came with it: the task takes it from here


RECEIVE = 65536
HANDED = object()  # _receive: the hub read for the task (_Quick): look at the connection


async def _receive(sock: socket.socket, conn: HookConnection, idle: trio.CancelScope,
                   wait: bool, hub: ReadHub):
    """What the client sent (b"" once it closed), None if it reset the connection, or
    HANDED if the hub read something meanwhile that is still in conn for the task. (The hub
    may also have read and served a request meanwhile, and then woken the task for data it
    would not read: a reply still to come. That data is the task's to receive.)

    `wait`: wait for the socket to be readable before the first try, as after a reply, which
    a client reads before it sends more: trying at once would nearly always fail, a system
    call and an exception for nothing. A client that pipelines loses a scheduler pass.

    A connection idle for HOOK_IDLE is closed (a slot for someone else) by the `idle` scope,
    whose deadline moves here at most once a second: moving it costs about what the rest of a
    receive does. So it is closed after HOOK_IDLE - 1 to HOOK_IDLE s of silence, or of a
    reply the client does not read."""
    if wait and await _wait_readable(sock, conn, idle, hub):
        return HANDED
    while True:
        try:
            return hub.recv(sock, RECEIVE)
        except BlockingIOError:
            pass
        except OSError:
            return None
        if await _wait_readable(sock, conn, idle, hub):
            return HANDED


async def _wait_readable(sock: socket.socket, conn: HookConnection, idle: trio.CancelScope,
                         hub: ReadHub) -> bool:
    """Until sock is readable; True if the hub meanwhile read what came and left it in conn
    for this task (not a request it served itself)."""
    _in_use(idle)
    fed = conn.fed
    await hub.wait_readable(sock)  # past the deadline, `idle` ends the connection
    return conn.fed != fed and not conn.idle


def _in_use(idle: trio.CancelScope) -> None:
    """The connection is in use: its idle deadline moves (at most once a second, _receive)."""
    now = trio.current_time()
    if idle.deadline < now + HOOK_IDLE - 1:
        idle.deadline = now + HOOK_IDLE


async def _answer(core: CoreLoop, request) -> bytes:
    try:
        if isinstance(request, CniRequest):
            return await _answer_cni(core, request)
        if isinstance(request, RangeAdd):
            refused = await _routes_refuse(request)
            if refused is not None:
                return encode_reply(refused)
            request = request.request
        reply = await core.submit(request)
        if isinstance(request, m.Status) and reply["ok"]:
            reply["swept"] = core.sweeper.swept
            reply["conflicts"] = core.conflicts
            if core.checkpoints is not None:
                reply["wal"] = core.checkpoints.view()
            names = {}
            if core.net is not None:
                reply["peer_bytes_sent"] = core.net.traffic()
                reply["candidates"] = len(core.net.candidates())
                reply["candidates_expired"] = core.net.expired
                names = core.net.nicknames
            reply["nicknames"] = _nicknames(reply, {**names, core.me: core.config.name})
        return encode_reply(reply)
    except (CommitFailed, CoreBug) as e:
        if isinstance(request, CniRequest):
            return encode_cni_reply(cni.error_result(cni.CniError(cni.IO_FAILURE, str(e))), 1)
        return encode_reply(error("internal", str(e)))


async def _routes_refuse(request: RangeAdd) -> dict | None:
    """The error for a range this host already routes (host_routes.py), before anything is
    submitted; None if it may go on. Only this host is judged: the others learn the range
    from the ring, as a launch's ranges are judged only where a database takes them. In a
    thread: reading the routes is a netlink dump."""
    check = functools.partial(host_routes.check_ranges, [request.request.cidr],
                              allow=request.allow_route_overlap)
    try:
        await trio.to_thread.run_sync(check)
    except host_routes.RangeOverlapsHost as e:
        log.info("event=range_add_refused code=route_overlap message=%r", str(e))
        return error("route_overlap", str(e))
    return None


def _nicknames(status: dict, known: dict[str, str]) -> dict[str, str]:
    """The nicknames of the peers a status reply names (members, removed, owners)."""
    named = {status["peer"], *status["members"], *status["removed"],
             *status.get("handing_over", ())}
    for u in status["universes"]:
        named.update(u["peers"])
    return {p: known[p] for p in sorted(named) if p in known}


async def _answer_cni(core: CoreLoop, request: CniRequest) -> bytes:
    try:
        call = cni.parse_call(request.env, request.stdin)
        req = cni_ops.request_for(call)
    except cni.CniError as e:
        log.info("event=cni_refused code=%d msg=%r", e.code, e.msg)
        await trio.lowlevel.checkpoint()  # as submit would: the connection's loop relies on it
        return encode_cni_reply(cni.error_result(e), 1)
    if req is not None:
        reply = await core.submit(req)
    else:
        reply = None
        await trio.lowlevel.checkpoint()
    output, code = cni_ops.result(call, reply)
    log.info("event=cni command=%s handle=%r exit=%d", call.command, call.handle, code)
    return encode_cni_reply(output, code)
