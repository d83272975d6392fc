"""HTTP/1.1 on a unix socket for Docker's plugin API, with h11 doing the HTTP.

The I/O side of protocols/docker_ipam.py: runs its plan of core requests through `core.submit` (the one
gate, DESIGN.md rule 9), answers its questions about docker daemons from /proc, and learns who
asks from the socket's peer credentials. Bounded (rule 10): at most MAX_CONNECTIONS at once (fewer
under a low descriptor limit: limits.py), a connection idle for IDLE_TIMEOUT is closed, a request
must arrive whole within REQUEST_TIMEOUT.
"""
from __future__ import annotations

import json
import logging
import secrets
import socket
import struct
from pathlib import Path

import h11
import trio

from .http_serve import next_event, respond
from .liveness import ALIVE, GONE, UNKNOWN, pid_state, start_time
from .protocols import docker_ipam
from .protocols.docker_ipam import CONTENT_TYPE, BadCall, DockerError, DriverState, Gone
from .unixsock import serve_unix

log = logging.getLogger("ipamd")
MAX_BODY = 1 << 20
MAX_CONNECTIONS = 64
IDLE_TIMEOUT = 300.0  # docker's plugin client keeps connections open, and redials if closed
REQUEST_TIMEOUT = 30.0
DELETE_RETRY = 5.0  # a released network's own tenant waits out its addresses' quarantine


async def _respond(stream, conn: h11.Connection, status: int, body: dict) -> None:
    await respond(stream, conn, status, CONTENT_TYPE, docker_ipam.encode_answer(body))


async def _read_request(stream, conn: h11.Connection):
    """(request, body), None when the peer closed, or ("too_large", None)."""
    with trio.move_on_after(IDLE_TIMEOUT):
        event = await next_event(stream, conn)
        if not isinstance(event, h11.Request):  # closed, or paused after an error
            return None
        with trio.move_on_after(REQUEST_TIMEOUT):
            body = b""
            while True:
                e = await next_event(stream, conn)
                if isinstance(e, h11.Data):
                    body += e.data
                    if len(body) > MAX_BODY:
                        return "too_large", None
                elif isinstance(e, h11.EndOfMessage):
                    return event, body
                else:
                    return None
    return None  # idle, or too slow to send one request: hang up


async def _serve(stream, core, state: DriverState, caller: str) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    async with stream:
        while True:
            try:
                got = await _read_request(stream, conn)
                if got is None:
                    return
                event, body = got
                if event == "too_large":
                    await _respond(stream, conn, 413, {"Error": "request too large"})
                    return
                status, reply = await _answer(core, state, caller,
                                              event.target.decode("latin-1"), body)
                await _respond(stream, conn, status, reply)
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
            except h11.RemoteProtocolError as e:
                log.info("event=docker_bad_http error=%r", str(e))
                try:
                    await _respond(stream, conn, e.error_status_hint, {"Error": str(e)})
                except (h11.LocalProtocolError, trio.BrokenResourceError,
                        trio.ClosedResourceError):
                    pass
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return


async def _answer(core, state: DriverState, caller: str, path: str,
                  raw: bytes) -> tuple[int, dict]:
    try:
        body = docker_ipam.decode_call(path, raw)
    except BadCall as e:
        return e.status, {"Error": str(e)}
    log.debug("event=docker_call path=%s caller=%s body=%s", path, caller or "?",
              json.dumps(body, sort_keys=True))
    try:
        reply = await _run(core, docker_ipam.call(path, body, state, caller))
    except DockerError as e:
        reply = {"Error": str(e)}
    except Exception as e:  # a bug, or the database refused a commit: this call fails only
        log.exception("event=docker_failed path=%s", path)
        reply = {"Error": f"internal: {e}"}
    _log_notes(state)
    log.info("event=docker path=%s status=200 error=%r", path, reply.get("Error"))
    return 200, reply


async def _run(core, plan):
    """Run a plan of docker_ipam: submit its core requests, answer its questions; its value."""
    answer = None
    try:
        while True:
            step = plan.send(answer)
            if isinstance(step, Gone):
                answer = _pid_gone(step.owner)  # procfs: answers at once
            else:
                answer = await core.submit(step)
    except StopIteration as done:
        return done.value
    finally:
        plan.close()


def _log_notes(state: DriverState) -> None:
    for note in state.notes:
        log.info(note)
    state.notes.clear()


async def _delete_doomed(core, state: DriverState) -> None:
    """Released networks' own tenants, deleted once their addresses' quarantine is over."""
    while True:
        await trio.sleep(DELETE_RETRY)
        if state.doomed:
            try:
                await _run(core, docker_ipam.delete_doomed(state))
            except Exception:  # the database refused a commit: tried again next round
                log.exception("event=docker_tenant_delete_failed")
            _log_notes(state)


def _caller(sock) -> str:
    """The connecting process (a docker daemon) as "p<pid>.<start time>", or "" if unknown."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", creds)[0]
    except (OSError, AttributeError, struct.error):
        return ""
    state, start = start_time(pid) if pid > 0 else (UNKNOWN, "")
    return f"p{pid}.{start}" if state == ALIVE else ""


def _pid_gone(owner: str) -> bool:
    """Gone only on proof: no process with that pid, or one started at another time."""
    try:
        pid, start = (int(x) for x in owner[1:].split("."))
    except ValueError:
        return False
    return pid_state(pid, start)[0] == GONE


async def serve_docker(path: Path, core, task_status=trio.TASK_STATUS_IGNORED,
                       cap: int = MAX_CONNECTIONS) -> None:
    state = DriverState(token=lambda: secrets.token_hex(6))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_delete_doomed, core, state)
        await serve_unix(path, lambda stream: _serve(stream, core, state, _caller(stream.socket)),
                         "docker", cap, 64, task_status=task_status)
        nursery.cancel_scope.cancel()
