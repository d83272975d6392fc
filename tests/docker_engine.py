"""A real docker engine (Debian's docker.io) for tests: its own dirs, socket, cgroup parent and
containerd namespace, no network access, no iptables, no default bridge. Everything it makes
is removed by close(): containers, networks, the daemon and its containerd, mounts, dirs.

Root only. The image is made here with `docker import` from a tarball of one file, busybox-static's
/bin/busybox; containers run `/bin/busybox sleep` and nothing else.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
from pathlib import Path

from .conftest import need
from .daemon_proc import wait_until

DOCKERD = "/usr/sbin/dockerd"
BUSYBOX = "/bin/busybox"
IMAGE = "ipamd-test/busybox:1"
PLUGIN_DIR = Path("/run/docker/plugins")
# Made by dockerd or containerd's shims whatever their dirs are; removed again if we made them.
SIDE_EFFECTS = [Path("/etc/docker/key.json"), Path("/run/containerd/s"), Path("/run/containerd")]


def docker_client() -> str | None:
    """The client of the docker.io package, not some other docker on the PATH."""
    return "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else shutil.which("docker")


def need_docker() -> None:
    need(os.geteuid() == 0, "a docker engine needs root")
    need(os.path.exists(DOCKERD) and docker_client() is not None,
         "docker.io is not installed (make sysdeps installs it as root)")
    need(os.path.exists(BUSYBOX), "busybox-static is not installed (make sysdeps installs it)")


class DockerError(AssertionError):
    pass


class Engine:
    def __init__(self):
        self.tag = os.urandom(4).hex()
        # Short: containerd's sockets live under exec-root, and a socket path has 108 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix=f"ipd-{self.tag}-", dir="/tmp"))
        self.sock = self.dir / "docker.sock"
        self.config = self.dir / "daemon.json"
        self.config.write_text("{}\n")  # not /etc/docker/daemon.json, whatever it says
        self.cgroup = f"ipamd-test-{self.tag}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.live_restore = False
        self.client = docker_client()
        self.existed = {p: p.exists() for p in SIDE_EFFECTS + [PLUGIN_DIR, PLUGIN_DIR.parent]}

    # -- the daemon ----------------------------------------------------------------------------

    def start(self, live_restore: bool = False) -> None:
        self.starts += 1
        self.live_restore = live_restore
        argv = [DOCKERD, "--config-file", str(self.config),
                "--data-root", str(self.dir / "root"), "--exec-root", str(self.dir / "exec"),
                "--pidfile", str(self.dir / "docker.pid"), "-H", f"unix://{self.sock}",
                "--storage-driver", "vfs", "--iptables=false", "--ip6tables=false",
                "--ip-masq=false", "--bridge=none", "--cgroup-parent", f"/{self.cgroup}",
                "--containerd-namespace", self.cgroup,
                "--containerd-plugins-namespace", f"{self.cgroup}-plugins"]
        if live_restore:
            argv.append("--live-restore")
        log = open(self.dir / f"dockerd-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited with {self.proc.returncode}:\n"
                                   f"{self.log()[-3000:]}")
            return self.run("version", "--format", "{{.Server.Version}}",
                            check=False).returncode == 0
        wait_until("dockerd to answer", up, timeout=90, interval=0.1)

    def log(self) -> str:
        return (self.dir / f"dockerd-{self.starts}.log").read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM, and wait for dockerd to exit (it stops containers unless live-restore)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def restart(self, live_restore: bool = False) -> None:
        self.stop()
        self.start(live_restore)

    # -- the client ----------------------------------------------------------------------------

    def run(self, *args: str, check: bool = True, timeout: float = 120,
            stdin: bytes | None = None) -> subprocess.CompletedProcess:
        p = subprocess.run([self.client, "-H", f"unix://{self.sock}", *args], input=stdin,
                           capture_output=True, timeout=timeout)
        p.stdout, p.stderr = p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
        if check and p.returncode != 0:
            raise DockerError(f"docker {' '.join(args)} exited {p.returncode}: {p.stderr}")
        return p

    def __call__(self, *args: str) -> str:
        return self.run(*args).stdout.strip()

    def import_image(self) -> None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tar.gettarinfo(BUSYBOX, arcname="bin/busybox")
            info.uid = info.gid = 0
            with open(BUSYBOX, "rb") as f:
                tar.addfile(info, f)
        self.run("import", "-", IMAGE, stdin=buf.getvalue())

    def addresses(self, container: str) -> set[str]:
        """The global addresses on the container's eth0, as its own `ip` shows them."""
        out = self("exec", container, "/bin/busybox", "ip", "-o", "addr", "show", "dev", "eth0")
        return {m[1] for m in re.finditer(r"\binet6? (\S+) .*?scope global", out)}

    # -- cleanup -------------------------------------------------------------------------------

    def remove_all(self) -> None:
        """Every container and custom network, whatever state they are in."""
        ids = self("ps", "-aq").split()
        if ids:
            self.run("rm", "-f", *ids, check=False)
        nets = self("network", "ls", "-q", "--filter", "type=custom").split()
        if nets:
            self.run("network", "rm", *nets, check=False)

    def close(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.remove_all()
            self.stop()
        finally:
            self._kill_containerd()
            self._unmount()
            shutil.rmtree(self.dir, ignore_errors=True)
            for path in [Path(f"/sys/fs/cgroup/{c}/{self.cgroup}")
                         for c in os.listdir("/sys/fs/cgroup")] + \
                    [Path(f"/sys/fs/cgroup/{self.cgroup}")]:
                if path.is_dir():
                    try:
                        path.rmdir()
                    except OSError:
                        pass
            self.tidy()

    def tidy(self) -> None:
        """Remove what dockerd, containerd's shims or the plugin socket made outside our dir."""
        for path, existed in self.existed.items():
            if existed or not path.exists():
                continue
            try:
                path.rmdir() if path.is_dir() else path.unlink()
            except OSError:
                pass  # not empty: someone else uses it now

    def _kill_containerd(self) -> None:
        """The containerd this dockerd started (left running by a live-restore stop)."""
        pidfile = self.dir / "exec" / "containerd" / "containerd.pid"
        try:
            pid = int(pidfile.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if str(self.dir).encode() not in cmdline:
            return  # not ours (a reused pid)
        os.kill(pid, signal.SIGTERM)
        try:
            wait_until("containerd to exit", lambda: not Path(f"/proc/{pid}").exists(),
                       timeout=30, interval=0.1)
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)

    def _unmount(self) -> None:
        prefix = str(self.dir) + "/"
        for _ in range(10):
            mounts = [line.split()[4] for line in
                      Path("/proc/self/mountinfo").read_text().splitlines()]
            ours = sorted({m for m in mounts if (m + "/").startswith(prefix)}, key=len,
                          reverse=True)
            if not ours:
                return
            for m in ours:
                subprocess.run(["umount", "-l", m], capture_output=True, timeout=30)
