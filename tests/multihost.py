"""Daemons in network namespaces on one bridge (198.18.0.0/24), and what tests do to them:
cut links, nft drop rules, reading every database. Everything made is removed by close()."""
from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import apsw

from .daemon_proc import Daemon, wait_until
from .netns import Namespaces, add_address, need_netns, set_up, sh

SECRET = "multihost-test-secret-0123456789"
PORT = 7300


def ip(i: int) -> str:
    return f"198.18.0.{i + 1}"


class Cluster:
    def __init__(self, tmp: Path, n: int, iprange: str, *extra: str):
        need_netns()
        self.ns = Namespaces()
        self.hosts: list[str] = []
        self.daemons: list[Daemon] = []
        try:
            self.hub = self.ns.add("hub")
            self.ns.bridge(self.hub, "br0")
            (tmp / "secret").write_text(SECRET)
            for i in range(n):
                h = self.ns.add(f"h{i}")
                self.hosts.append(h)
                # Made inside the hub namespace, one end moved to the host: nothing in ours.
                self.ns.veth(self.hub, f"p{i}", h, "eth0", master="br0")
                add_address(h, "eth0", f"{ip(i)}/24")
                set_up(h, "lo")
                (tmp / f"h{i}").mkdir()
                flags = ["--iprange", iprange, "--name", f"h{i}", "--listen", f"{ip(i)}:{PORT}",
                         "--secret-file", str(tmp / "secret"), *extra]
                if i:
                    flags += ["--peer", f"{ip(i - 1)}:{PORT}"]  # one --peer each, a chain
                # In a namespace of our own making: the launch checks its routes for real.
                d = Daemon(tmp / f"h{i}", *flags, route_check=True,
                           command=["ip", "netns", "exec", h, sys.executable, "-m", "appliance"])
                d.start()
                self.daemons.append(d)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for d in self.daemons:
            if d.proc is not None and d.proc.poll() is None:
                d.kill()
        self.ns.cleanup()

    # -- looking -------------------------------------------------------------------------------

    def status(self, i: int) -> dict:
        r = self.daemons[i].call({"op": "status"})
        assert r["ok"], r
        return r

    def converged(self) -> bool:
        ss = [self.status(i) for i in range(len(self.daemons))]
        ids = {s["peer"] for s in ss}
        return len({s["ring_digest"] for s in ss}) == 1 and all(
            set(s["reachable"]) == ids - {s["peer"]} for s in ss)

    # -- partitions ----------------------------------------------------------------------------

    def link(self, i: int, up: bool) -> None:
        set_up(self.hub, f"p{i}", up)

    def cut(self, side_a: list[int], side_b: list[int]) -> None:
        """nft rules in each host's namespace dropping everything to and from the other side
        (hosts on neither side, a bridge, still reach both)."""
        for mine, other in ((side_a, side_b), (side_b, side_a)):
            for i in mine:
                self._drop(i, other, both_ways=True)

    def one_way(self, deaf: int, unheard: int) -> None:
        """deaf drops whatever unheard sends it; the other direction is left alone."""
        self._drop(deaf, [unheard], both_ways=False)

    def _drop(self, i: int, others: list[int], both_ways: bool) -> None:
        addrs = ", ".join(ip(j) for j in others)
        out = (f"chain out {{ type filter hook output priority 0; ip daddr {{ {addrs} }} "
               "drop; }") if both_ways else ""
        rules = f"""
            table inet cut {{
                chain in {{ type filter hook input priority 0; ip saddr {{ {addrs} }} drop; }}
                {out}
            }}"""
        subprocess.run(["ip", "netns", "exec", self.hosts[i], "nft", "-f", "-"], input=rules,
                       text=True, check=True, capture_output=True, timeout=30)

    def heal(self) -> None:
        for i, h in enumerate(self.hosts):
            sh("ip", "netns", "exec", h, "nft", "delete", "table", "inet", "cut", check=False)
            self.link(i, True)


# -- the databases -----------------------------------------------------------------------------

def read_db(path: Path, sql: str, *params) -> list[tuple]:
    c = apsw.Connection(f"file:{path}?mode=ro",
                        flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
    try:
        c.set_busy_timeout(5000)
        return c.execute(sql, params).fetchall()
    finally:
        c.close()


def allocations(d: Daemon) -> dict[str, str]:
    return dict(read_db(d.db, "SELECT address, handle FROM allocations"))


def owner_spans(d: Daemon) -> list[tuple[int, int, str]]:
    """The ring as this database has it: [lo, hi) and owner, each entry cut at the next start
    (the ring's rule, core/ring.py)."""
    # The universes addresses are held in (not spare or block space, which hold carved ones).
    rows = sorted((int(ipaddress.ip_address(s)), int(ipaddress.ip_address(last)) + 1, o)
                  for s, last, o in read_db(
                      d.db, "SELECT r.start, r.last, r.owner FROM ring r JOIN universes u ON "
                      "u.cidr = r.universe WHERE u.kind IN ('range', 'static', 'block', "
                      "'names')"))
    return [(lo, min(hi, rows[k + 1][0]) if k + 1 < len(rows) else hi, o)
            for k, (lo, hi, o) in enumerate(rows)]


def owner_at(spans: list[tuple[int, int, str]], address: str) -> str | None:
    v = int(ipaddress.ip_address(address))
    return next((o for lo, hi, o in spans if lo <= v < hi), None)
