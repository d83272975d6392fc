"""The hook socket: each connection's lines (protocols/hook.py frames and parses them) become
core requests through CoreLoop.submit, the one gate, and their replies go back in order, each
only once what it changed is durable. Served by unixsock.serve_unix: 0660, capped."""
from __future__ import annotations

import functools
import logging
import socket
from pathlib import Path

import trio

from . import cni_ops, host_routes
from .core import messages as m
from .core.messages import error
from .daemon import CommitFailed, CoreBug, CoreLoop
from .protocols import cni
from .protocols.hook import (CLOSED, NEED_DATA, CniRequest, HookConnection, HookError,
                             RangeAdd, encode_cni_reply, encode_reply)
from .unixsock import serve_unix

log = logging.getLogger("ipamd")
HOOK_IDLE = 300.0  # seconds a hook connection may sit idle before it is closed


async def serve_hooks(path: Path, core: CoreLoop, task_status=trio.TASK_STATUS_IGNORED,
                      cap: int = 512) -> None:
    await serve_unix(path, lambda stream: _serve_connection(stream, core), "hook", cap, 256,
                     task_status=task_status)


async def _serve_connection(stream: trio.SocketStream, core: CoreLoop) -> None:
    # The plain socket under the stream: trio's socket methods add a checkpoint to every send
    # and receive that did not block, two scheduler passes per request that the commit wait
    # makes needless (every request waits there, or checkpoints below).
    sock = socket.socket(fileno=stream.socket.detach())
    sock.setblocking(False)
    try:
        with trio.CancelScope(deadline=trio.current_time() + HOOK_IDLE) as idle:
            await _serve_lines(sock, core, idle)
    finally:
        trio.lowlevel.notify_closing(sock)
        sock.close()


async def _serve_lines(sock: socket.socket, core: CoreLoop, idle: trio.CancelScope) -> None:
    conn = HookConnection()
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            data = await _receive(sock, idle)
            if data is None:  # reset by the client
                return
            conn.receive_data(data)
            continue
        if event is CLOSED:
            return
        if isinstance(event, HookError):
            log.info("event=bad_request code=%s message=%r", event.code, event.message)
            await trio.lowlevel.checkpoint()  # a flood of bad lines must not hog the loop
            out = encode_reply(event.reply())
        else:
            out = await _answer(core, event)
        if not await _send(sock, out):
            return


async def _receive(sock: socket.socket, idle: trio.CancelScope) -> bytes | None:
    """What the client sent (b"" once it closed), or None if it reset the connection.

    A connection idle for HOOK_IDLE is closed (a slot for someone else) by the `idle` scope,
    whose deadline moves here at most once a second: moving it costs about what the rest of a
    receive does. So it is closed after HOOK_IDLE - 1 to HOOK_IDLE s of silence, or of a
    reply the client does not read."""
    while True:
        try:
            return sock.recv(65536)
        except BlockingIOError:
            pass
        except OSError:
            return None
        now = trio.current_time()
        if idle.deadline < now + HOOK_IDLE - 1:
            idle.deadline = now + HOOK_IDLE
        await trio.lowlevel.wait_readable(sock)  # past the deadline, `idle` ends the connection


async def _send(sock: socket.socket, data: bytes) -> bool:
    """All of data, waiting while the socket is full; False if the client is gone."""
    view = memoryview(data)
    while True:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            pass
        except OSError:
            return False
        if not view:
            return True
        await trio.lowlevel.wait_writable(sock)


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
    named = {status["peer"], *status["members"], *status["removed"]}
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
