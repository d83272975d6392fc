"""Run a real ipamd daemon process for tests: start, wait for its ready line, kill, restart."""
from __future__ import annotations

import os
import select
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

from appliance.client import Client

PYTHON_IPAMD = [sys.executable, "-m", "appliance"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent


class Daemon:
    started: list[Daemon] = []  # every daemon a test started; conftest stops leftovers

    def __init__(self, directory: Path, *flags: str, command: list[str] | None = None,
                 route_check: bool = False):
        self.dir = Path(directory)
        self.socket = self.dir / "ipamd.sock"
        self.db = self.dir / "data" / "ipamd.db"
        self.command = command or PYTHON_IPAMD
        # A daemon in our own namespace would be judged by this machine's routes (and the
        # bridges other tests make there), which no test chose: only daemons in namespaces a
        # test built, or tests of the check, leave the route check on.
        self.flags = list(flags) + ([] if route_check else ["--allow-route-overlap"])
        self.proc: subprocess.Popen | None = None
        self.ready_line = ""
        self.starts = 0

    def argv(self) -> list[str]:
        return [*self.command, "launch", "--data-dir", str(self.dir / "data"),
                "--socket", str(self.socket), *self.flags]

    def start(self, timeout: float = 60.0) -> str:
        self.starts += 1
        Daemon.started.append(self)
        log = open(self.dir / f"daemon-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.PIPE, stderr=log, cwd=ROOT)
        log.close()
        line = _readline(self.proc.stdout, timeout)
        if not line.startswith("ready "):
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"daemon did not become ready: {line!r}\n{self.stderr()}")
        self.ready_line = line
        return line

    def stderr(self) -> str:
        return (self.dir / f"daemon-{self.starts}.log").read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 30.0) -> int:
        # The frozen one-file executable runs the daemon as a child of its bootloader: wait for
        # those children to be gone too, so a restart never races the dying daemon for its lock.
        children = [os.pidfd_open(pid) for pid in _children(self.proc.pid)]
        self.proc.send_signal(sig)
        try:
            return self.reap(timeout, f"signal {sig}", children)
        finally:
            for fd in children:
                os.close(fd)

    def reap(self, timeout: float, after: str, children: list[int] = ()) -> int:
        """Wait, at most `timeout` seconds, for the daemon (and `children`, pidfds) to exit;
        TimeoutError naming it and what it was sent otherwise."""
        deadline = time.monotonic() + timeout
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"daemon pid {self.proc.pid} ({self.dir}) still running "
                               f"{timeout:g}s after {after}") from None
        for fd in children:
            # A pidfd turns readable when its process exits (poll: no FD_SETSIZE limit).
            p = select.poll()
            p.register(fd, select.POLLIN)
            if not p.poll(max(0.0, deadline - time.monotonic()) * 1000):
                raise TimeoutError(f"a child of daemon pid {self.proc.pid} ({self.dir}) still "
                                   f"running {timeout:g}s after {after}")
        self.proc.stdout.close()
        return code

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        return self.kill(signal.SIGTERM)

    def call(self, request: dict) -> dict:
        with Client(self.socket, timeout=30) as c:
            return c.call(request)

    def cli(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([*self.command, *args, "--socket", str(self.socket)],
                              capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, **(env or {})}, timeout=60)


def wait_until(what: str, fn, timeout: float = 60.0, interval: float = 0.05):
    """Poll a condition the daemons reach by themselves (gossip, reconnects); TimeoutError
    naming it if they do not. Returns what fn returned."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    out = []
    for child in text.split():
        try:
            out.append(int(child))
        except ValueError:
            pass
    return out


def _readline(pipe, timeout: float) -> str:
    """One line from the daemon's stdout, or what it printed before dying or hanging."""
    sel = selectors.DefaultSelector()
    sel.register(pipe, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not sel.select(left):
            return buf.decode(errors="replace") + " <timed out>"
        chunk = os.read(pipe.fileno(), 4096)
        if not chunk:
            break
        buf += chunk
    sel.close()
    return buf.decode(errors="replace").strip()


def cpu_times(pid: int) -> tuple[float, float]:
    """The process's user and system CPU seconds so far (/proc/PID/stat: utime, stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK
