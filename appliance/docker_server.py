"""HTTP/1.1 on a unix socket for Docker's plugin API, with h11 doing the HTTP."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import h11
import trio

from .docker_ipam import DockerError, handle

log = logging.getLogger("ipamd")
MAX_BODY = 1 << 20
CONTENT_TYPE = b"application/vnd.docker.plugins.v1+json"


async def _respond(stream, conn: h11.Connection, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=[
        (b"content-type", CONTENT_TYPE), (b"content-length", str(len(data)).encode())])))
    await stream.send_all(conn.send(h11.Data(data=data)))
    await stream.send_all(conn.send(h11.EndOfMessage()))


async def next_event(stream, conn: h11.Connection):
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await stream.receive_some(65536)
        conn.receive_data(data)  # b"" tells h11 the peer closed


async def _serve(stream, core) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    async with stream:
        while True:
            try:
                event = await next_event(stream, conn)
                if not isinstance(event, h11.Request):  # closed, or paused after an error
                    return
                body = b""
                while True:
                    e = await next_event(stream, conn)
                    if isinstance(e, h11.Data):
                        body += e.data
                        if len(body) > MAX_BODY:
                            await _respond(stream, conn, 413, {"Error": "request too large"})
                            return
                    elif isinstance(e, h11.EndOfMessage):
                        break
                    else:
                        return
                status, reply = await _answer(core, event.target.decode("latin-1"), body)
                await _respond(stream, conn, status, reply)
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
            except h11.RemoteProtocolError as e:
                log.info("event=docker_bad_http error=%r", str(e))
                try:
                    await _respond(stream, conn, e.error_status_hint, {"Error": str(e)})
                except (h11.LocalProtocolError, trio.BrokenResourceError):
                    pass
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return


async def _answer(core, path: str, raw: bytes) -> tuple[int, dict]:
    try:
        body = json.loads(raw) if raw.strip() else {}
    except (ValueError, RecursionError) as e:
        return 400, {"Error": f"request body is not JSON: {e}"}
    if not isinstance(body, dict):
        return 400, {"Error": "request body must be a JSON object"}

    def step(allocator, now):
        rows: list = []
        try:
            return (200, handle(path, body, allocator, now, rows)), rows
        except DockerError as e:
            # A refusal may follow requests that already changed something (a pool's
            # gateway): those rows stand, as they would after a successful call.
            return (200, {"Error": str(e)}), rows
        except LookupError:
            return (404, {"Error": f"no such endpoint {path}"}), []

    status, reply = await core.submit_fn(step)
    log.info("event=docker path=%s status=%d error=%r", path, status, reply.get("Error"))
    return status, reply


async def serve_docker(path: Path, core, task_status=trio.TASK_STATUS_IGNORED) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        path.unlink()  # the lock on the data dir already keeps a second daemon out
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old = os.umask(0o117)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(64)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()

            async def handler(stream):
                try:
                    await _serve(stream, core)
                except Exception:
                    log.exception("event=docker_connection_failed")

            await trio.serve_listeners(handler, [trio.SocketListener(sock)],
                                       handler_nursery=nursery)
    finally:
        with trio.CancelScope(shield=True):
            path.unlink(missing_ok=True)
