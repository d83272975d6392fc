"""Taking over a unix socket path: only ever a stale socket is removed."""
from __future__ import annotations

import socket
import stat
from pathlib import Path


class SocketPathError(Exception):
    """The path cannot be ours: the message says why."""


def claim_socket_path(path: Path) -> None:
    """Remove a stale socket file at path. Refuse when a live daemon answers there, or when
    something other than a socket is there (a mistyped --socket must not delete a file)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(f"{path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
    else:
        raise SocketPathError(f"another daemon is already serving {path}")
    finally:
        probe.close()
