"""Serving a unix socket (the hook socket, Docker's plugin socket): its folder checked, only
ever a stale socket removed, the socket born 0660, connections capped, a failing connection
logged rather than fatal, the socket file removed at the end."""
from __future__ import annotations

import logging
import os
import socket
import stat
from pathlib import Path

import trio

from .limits import ConnectionCap
from .paths import fallback_runtime_dir

log = logging.getLogger("ipamd")


class SocketPathError(Exception):
    """The path cannot be ours: the message says why."""


def prepare_dir(path: Path) -> None:
    """Make the socket's folder (0700 for the per-user fallback in /tmp), and refuse one that
    another user owns or that is a link: its owner could swap our socket for theirs."""
    parent = path.parent
    private = parent == fallback_runtime_dir()
    parent.mkdir(parents=True, exist_ok=True, mode=0o700 if private else 0o777)
    st = parent.lstat()
    if stat.S_ISLNK(st.st_mode) and private:
        raise SocketPathError(f"{parent} is a symbolic link; not serving a socket there")
    if st.st_uid not in (os.geteuid(), 0):
        raise SocketPathError(f"{parent} belongs to uid {st.st_uid}, not to this user "
                              f"(uid {os.geteuid()}); not serving a socket there")
    if private and stat.S_IMODE(st.st_mode) & 0o077:
        raise SocketPathError(f"{parent} is open to other users (mode "
                              f"{stat.S_IMODE(st.st_mode):o}); make it 0700")


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


async def serve_unix(path: Path, handler, name: str, cap: int, backlog: int,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve handler(stream) on path, at most `cap` connections at once. Raises
    SocketPathError before it starts when the path cannot be ours."""
    prepare_dir(path)
    claim_socket_path(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old = os.umask(0o117)  # born 0660: no window in which others could connect
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(backlog)

    async def guarded(stream):
        try:
            await handler(stream)
        except Exception:  # a bug must cost one connection, never the daemon
            log.exception("event=%s_connection_failed", name)

    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(ConnectionCap(name, cap).wrap(guarded),
                                       [trio.SocketListener(sock)], handler_nursery=nursery)
    finally:
        with trio.CancelScope(shield=True):
            path.unlink(missing_ok=True)
