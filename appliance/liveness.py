"""Is a process or a network namespace still there? Gone only on proof (DESIGN.md rule 10).

One reading of /proc for the sweeper (anchors), the Docker driver (the docker daemon that made a
pool) and the CLI (`--anchor-pid`): ENOENT/ESRCH, or a pid whose start time differs, is proof;
any other error proves nothing.
"""
from __future__ import annotations

import errno
import os

ALIVE, GONE, UNKNOWN = "alive", "gone", "unknown"
_ABSENT = (errno.ENOENT, errno.ESRCH)


def start_time(pid: int) -> tuple[str, int | str]:
    """(ALIVE, start time: field 22 of /proc/PID/stat), or (GONE | UNKNOWN, why)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError as e:
        if e.errno in _ABSENT:
            return GONE, f"no process {pid}"
        return UNKNOWN, f"cannot read /proc/{pid}/stat: {e.strerror}"
    try:
        # Counted after the command name, which may hold spaces and parentheses.
        return ALIVE, int(stat.rsplit(b")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return UNKNOWN, f"cannot parse /proc/{pid}/stat"


def pid_state(pid: int, started: int | None = None) -> tuple[str, str]:
    """(ALIVE | GONE | UNKNOWN, why) of process pid, which started at `started` if given (a
    pid alone is alive while any process has it)."""
    state, value = start_time(pid)
    if state != ALIVE:
        return state, value
    if started is not None and value != started:
        return GONE, f"process {pid} started at {value}, not {started}"
    return ALIVE, ""


def path_state(path: str) -> tuple[str, str]:
    """(ALIVE | GONE | UNKNOWN, why) of a netns path."""
    try:
        os.lstat(path)
    except OSError as e:
        if e.errno in _ABSENT:
            return GONE, f"{path} does not exist"
        return UNKNOWN, f"cannot look at {path}: {e.strerror}"
    except (TypeError, ValueError) as e:
        return UNKNOWN, f"bad netns path: {e}"
    return ALIVE, ""
