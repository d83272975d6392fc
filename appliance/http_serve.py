"""HTTP/1.1 server side over a trio stream, with h11 doing the HTTP: what the Docker plugin
socket (docker_server.py) and the metrics port (metrics.py) share."""
from __future__ import annotations

import h11


async def next_event(stream, conn: h11.Connection):
    """The next h11 event, reading from stream as long as h11 needs more."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await stream.receive_some(65536)
        conn.receive_data(data)  # b"" tells h11 the peer closed


async def respond(stream, conn: h11.Connection, status: int, content_type: bytes, body: bytes,
                  close: bool = False) -> None:
    """One whole response: headers with its length, the body, the end."""
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
    await stream.send_all(conn.send(h11.Data(data=body)))
    await stream.send_all(conn.send(h11.EndOfMessage()))
