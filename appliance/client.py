"""A blocking hook-protocol client on a plain socket.

The CLI and the CNI plugin use this; it imports neither trio nor apsw so that a client command
starts in milliseconds.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path


class Unreachable(Exception):
    """The daemon did not answer on its socket."""


class Client:
    def __init__(self, path: Path | str, timeout: float | None = 30.0):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except OSError as e:
            self.sock.close()
            raise Unreachable(f"cannot reach the ipamd daemon at {self.path}: {e.strerror or e} "
                              "(is `ipamd launch` running? --socket or IPAMD_SOCKET pick another "
                              "socket)") from None
        self.file = self.sock.makefile("rb")

    def call(self, request: dict) -> dict:
        try:
            self.sock.sendall(json.dumps(request, separators=(",", ":")).encode() + b"\n")
            line = self.file.readline()
        except OSError as e:
            raise Unreachable(f"the ipamd daemon at {self.path} went away: {e}") from None
        if not line:
            raise Unreachable(f"the ipamd daemon at {self.path} closed the connection")
        return json.loads(line)

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
