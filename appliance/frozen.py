"""Behaviour specific to the PyInstaller one-file executable.

Its bootloader unpacks the program and runs it as a child process, forwarding signals to it. A
SIGKILL cannot be forwarded, so without this a `kill -9` of the daemon's visible pid would leave
the real daemon running, orphaned. The child asks the kernel to kill it when its parent dies.
"""
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def _is_onefile_child() -> bool:
    if not getattr(sys, "frozen", False):
        return False
    try:
        return os.readlink(f"/proc/{os.getppid()}/exe") == os.readlink("/proc/self/exe")
    except OSError:
        return False


def bind_to_bootloader() -> None:
    if not _is_onefile_child():
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if os.getppid() != parent:  # the parent died before the request took hold
        os._exit(1)
