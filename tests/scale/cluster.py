"""Real daemons on loopback, one data dir each, joined as users join them (`--peer` one or two
hosts already running), and what /proc and `status` say about each."""
from __future__ import annotations

import os
import http.client
import random
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import apsw

from appliance.client import Client
from tests.daemon_proc import Daemon, cpu_times

SECRET = "scale-test-secret-0123456789abcdef"
CALL_TIMEOUT = 30.0  # seconds a status call or a metrics scrape may take
METRICS_CACHE = 1.05  # seconds a metrics scrape is served again (plus a margin)


class Host:
    def __init__(self, root: Path, index: int, iprange: str, peers: list[Host]):
        self.index = index
        self.name = f"h{index:03d}"
        directory = root / self.name
        directory.mkdir()
        secret = root / "secret"
        flags = ["--iprange", iprange, "--name", self.name, "--listen", "127.0.0.1:0",
                 "--secret-file", str(secret), "--metrics", "127.0.0.1:0",
                 "--log-level", os.environ.get("SCALE_LOG_LEVEL", "error")]
        for p in peers:
            flags += ["--peer", p.addr]
        self.daemon = Daemon(directory, *flags)
        self.id = ""
        self.addr = ""
        self.metrics = ""
        self.started_at = 0.0
        self.killed = False
        self.scraped = 0.0

    def start(self) -> float:
        """Launch; seconds until its ready line."""
        self.started_at = time.monotonic()
        line = self.daemon.start(timeout=120)
        self.addr = "127.0.0.1:" + re.search(r"listen=\S+:(\d+)", line).group(1)
        self.metrics = re.search(r"metrics=(\S+)", line).group(1)
        self.id = re.search(r"peer=(\S+)", line).group(1)
        return time.monotonic() - self.started_at

    @property
    def pid(self) -> int:
        return self.daemon.proc.pid

    @property
    def socket(self) -> Path:
        return self.daemon.socket

    def call(self, request: dict, timeout: float = CALL_TIMEOUT) -> dict:
        with Client(self.daemon.socket, timeout=timeout) as c:
            return c.call(request)

    def status(self) -> dict:
        r = self.call({"v": 1, "op": "status"})
        if not r.get("ok"):
            raise RuntimeError(f"{self.name}: status refused: {r}")
        return r

    def cpu_seconds(self) -> float:
        return sum(cpu_times(self.pid))

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def donations(self) -> int:
        """Allocations that needed space from a peer (ipamd_donation_seconds_count)."""
        import urllib.request
        # A scrape within a second of the last is answered from the daemon's cache (README,
        # Metrics): wait that second out, so the count is of now.
        time.sleep(max(0.0, self.scraped + METRICS_CACHE - time.monotonic()))
        self.scraped = time.monotonic()
        # As long as a hook call may take: 100 daemons on 2 shared cores answered a scrape in
        # over 10 s (load average 90).
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=CALL_TIMEOUT) as r:
            text = r.read().decode()
        m = re.search(r"^ipamd_donation_seconds_count (\S+)$", text, re.M)
        return int(float(m.group(1))) if m else 0

    def kill(self) -> None:
        self.killed = True
        self.daemon.kill(signal.SIGKILL)

    def running(self) -> bool:
        return self.daemon.proc is not None and self.daemon.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Send, without waiting: a hundred daemons stop together, not one after another."""
        if self.running():
            self.daemon.proc.send_signal(sig)

    def allocations(self) -> dict[str, str]:
        """address -> handle, read from the database (daemon stopped) read-only."""
        db = apsw.Connection(str(self.daemon.db), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            return {a: h for a, h in db.execute("SELECT address, handle FROM allocations")}
        finally:
            db.close()


def stop_all(hosts: list[Host], sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
    """Signal every running host, then wait for them all, `timeout` seconds in all; a host
    still running then is killed -9 and named in a TimeoutError."""
    running = [h for h in hosts if h.running()]
    for h in running:
        h.signal(sig)
    deadline = time.monotonic() + timeout
    late = []
    for h in running:
        try:
            h.daemon.reap(max(0.1, deadline - time.monotonic()), f"signal {sig}")
        except TimeoutError:
            late.append(h.name)
            h.daemon.kill(signal.SIGKILL)
    if late:
        raise TimeoutError(f"{', '.join(late)} still running {timeout:g}s after signal {sig} "
                           "(killed -9)")


def each(hosts: list[Host], fn, what: str) -> list:
    """fn(host) for every host, a few at a time (a hundred sequential round trips to loaded
    daemons take minutes); the first failure is raised naming its host."""
    def one(h: Host):
        for attempt in range(3):
            try:
                return fn(h)
            except (OSError, http.client.HTTPException) as e:
                # A loaded daemon may close a slow scrape (its write deadline): try again,
                # twice, before the run gives up naming the host.
                if attempt == 2:
                    raise RuntimeError(f"{what} of {h.name} failed 3 times: "
                                       f"{type(e).__name__}: {e}") from e
            except Exception as e:  # noqa: BLE001 - re-raised with the host's name
                raise RuntimeError(f"{what} of {h.name} failed: {type(e).__name__}: {e}") from e
    with ThreadPoolExecutor(max_workers=min(16, len(hosts) or 1)) as pool:
        return list(pool.map(one, hosts))


def choose_peers(rng: random.Random, running: list[Host], fanout: int) -> list[Host]:
    """One or a few hosts already running, as an operator would name them."""
    alive = [h for h in running if not h.killed]
    return rng.sample(alive, min(len(alive), rng.randint(1, fanout)))


def disagreement(hosts: list[Host]) -> str | None:
    """None when every host knows every other as a member, reaches it, and has the same ring;
    else what is not so yet, briefly (a wait that times out says it)."""
    ids = {h.id for h in hosts}
    apart, unreached, digests = [], [], {}
    # Read a few at a time: one by one, a hundred loaded daemons took longer to read than the
    # rings stayed still (quarantined addresses coming free change hints), so no reading
    # could ever find them equal.
    for h, s in zip(hosts, each(hosts, Host.status, "status")):
        if s["standing"] != "member" or not ids <= set(s["members"]):
            apart.append(f"{h.name} ({s['standing']}, {len(ids - set(s['members']))} unknown)")
        missing = ids - {h.id} - set(s["reachable"])
        if missing:
            unreached.append(f"{h.name} reaches {len(ids) - 1 - len(missing)} of {len(ids) - 1}")
        digests.setdefault(s["ring_digest"], []).append(h.name)
    why = []
    if apart:
        why.append("not members or missing members: " + ", ".join(apart[:5]))
    if unreached:
        why.append(f"{len(unreached)} hosts do not reach all others: " + ", ".join(unreached[:5]))
    if len(digests) > 1:
        groups = sorted(digests.values(), key=len, reverse=True)
        why.append(f"{len(digests)} different rings, the largest shared by {len(groups[0])}; "
                   "apart: " + ", ".join(n for g in groups[1:] for n in g[:3]))
    return "; ".join(why) or None


def wait_agreed(hosts: list[Host], what: str, timeout: float, interval: float) -> float:
    """Seconds until disagreement(hosts) is None; TimeoutError naming what still differed."""
    t0 = time.monotonic()
    while True:
        why = disagreement(hosts)
        if why is None:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}: {why}")
        time.sleep(interval)
