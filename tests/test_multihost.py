"""Five daemons, each in its own network namespace on a shared bridge (198.18.0.0/24), joined
one by one with one --peer each; then real partitions (a link taken down, nft drop rules),
allocations on every side, claims across the cut, healing, and a check of every database."""
import itertools
import subprocess
import sys
import time

import apsw
import pytest

from .daemon_proc import Daemon
from .netns import Namespaces, need_netns, sh

RANGE = "10.50.0.0/22"
PORT = 7300
SECRET = "multihost-test-secret-0123456789"
N = 5


def ip(i: int) -> str:
    return f"198.18.0.{i + 1}"


def wait_until(what: str, fn, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def cluster(tmp_path):
    need_netns()
    ns = Namespaces()
    hub = ns.add("hub")
    hosts, daemons = [], []
    try:
        sh("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", hub, "link", "set", "br0", "up")
        for i in range(N):
            h = ns.add(f"h{i}")
            hosts.append(h)
            # Made inside the hub namespace, one end moved to the host: nothing in ours.
            sh("ip", "-n", hub, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0",
               "netns", h)
            sh("ip", "-n", hub, "link", "set", f"p{i}", "master", "br0", "up")
            sh("ip", "-n", h, "addr", "add", f"{ip(i)}/24", "dev", "eth0")
            sh("ip", "-n", h, "link", "set", "eth0", "up")
            sh("ip", "-n", h, "link", "set", "lo", "up")
        (tmp_path / "secret").write_text(SECRET)
        for i, h in enumerate(hosts):
            (tmp_path / f"h{i}").mkdir()
            flags = ["--iprange", RANGE, "--name", f"h{i}", "--listen", f"{ip(i)}:{PORT}",
                     "--secret-file", str(tmp_path / "secret"), "--reuse-delay", "1"]
            if i:
                flags += ["--peer", f"{ip(i - 1)}:{PORT}"]  # one --peer each, a chain
            d = Daemon(tmp_path / f"h{i}", *flags,
                       command=["ip", "netns", "exec", h, sys.executable, "-m", "appliance"])
            d.start()
            daemons.append(d)
        yield hub, hosts, daemons
    finally:
        for d in daemons:
            d.stop()
        ns.cleanup()


def status(d):
    r = d.call({"op": "status"})
    assert r["ok"], r
    return r


def converged(daemons):
    ss = [status(d) for d in daemons]
    ids = {s["peer"] for s in ss}
    return len({s["ring_digest"] for s in ss}) == 1 and all(
        set(s["reachable"]) == ids - {s["peer"]} for s in ss)


def cut(hosts, side_a, side_b):
    """nft rules in each host's namespace dropping everything to and from the other side."""
    for mine, other in ((side_a, side_b), (side_b, side_a)):
        for i in mine:
            addrs = ", ".join(ip(j) for j in other)
            rules = f"""
                table inet cut {{
                    chain in {{ type filter hook input priority 0; ip saddr {{ {addrs} }} drop; }}
                    chain out {{ type filter hook output priority 0; ip daddr {{ {addrs} }} drop; }}
                }}"""
            subprocess.run(["ip", "netns", "exec", hosts[i], "nft", "-f", "-"], input=rules,
                           text=True, check=True, capture_output=True, timeout=30)


def heal_cut(hosts):
    for h in hosts:
        sh("ip", "netns", "exec", h, "nft", "delete", "table", "inet", "cut", check=False)


def probe(d) -> str:
    """An address in d's own space: one it hands out and takes back at once."""
    r = d.call({"op": "allocate", "handle": "probe"})
    assert r["ok"], r
    assert d.call({"op": "release", "handle": "probe"})["ok"]
    return r["address"].split("/")[0]


def allocations(d) -> dict[str, str]:
    c = apsw.Connection(f"file:{d.db}?mode=ro", flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
    try:
        return {a: h for a, h in c.execute("SELECT address, handle FROM allocations")}
    finally:
        c.close()


def test_five_hosts_share_the_range_through_partitions(cluster):
    hub, hosts, ds = cluster
    wait_until("all five to reach each other and agree on the ring", lambda: converged(ds))
    ids = [status(d)["peer"] for d in ds]
    given = {}  # address -> handle, as clients were told
    counter = itertools.count()

    def allocate(i, n=5):
        for _ in range(n):
            h = f"h{i}-{next(counter)}"
            r = ds[i].call({"op": "allocate", "handle": h})
            assert r["ok"], (i, r)
            a = r["address"].split("/")[0]
            assert a not in given, f"{a} given twice"
            given[a] = h

    for i in range(N):
        allocate(i)
    assert all(status(d)["universes"][0]["owned"] > 0 for d in ds)  # spread by donation
    wait_until("status to agree on every host", lambda: converged(ds))

    # Cut h4 off: its link on the bridge goes down.
    sh("ip", "-n", hub, "link", "set", "p4", "down")
    wait_until("h4 to be unreachable from the rest and alone",
               lambda: all(ids[4] not in status(d)["reachable"] for d in ds[:4])
               and status(ds[4])["reachable"] == [])
    for i in range(N):
        allocate(i, 3)  # every side owns free space
    r = ds[0].call({"op": "claim", "handle": "static-1", "address": probe(ds[4])})
    assert not r["ok"] and r["error"]["code"] == "unreachable" and ids[4] in \
        r["error"]["message"], r
    sh("ip", "-n", hub, "link", "set", "p4", "up")
    wait_until("the rings to converge after the heal", lambda: converged(ds))

    # Split 2/3 with nft drop rules.
    cut(hosts, [0, 1], [2, 3, 4])
    wait_until("the split to be seen on both sides",
               lambda: set(status(ds[0])["reachable"]) == {ids[1]}
               and set(status(ds[2])["reachable"]) == {ids[3], ids[4]})
    for i in range(N):
        allocate(i, 3)
    r = ds[1].call({"op": "claim", "handle": "static-2", "address": probe(ds[3])})
    assert not r["ok"] and r["error"]["code"] == "unreachable" and ids[3] in \
        r["error"]["message"], r
    heal_cut(hosts)
    wait_until("the rings to converge after the split heals", lambda: converged(ds))

    # Every database: no address twice, every acknowledged allocation present.
    held = {}
    for d in ds:
        for a, h in allocations(d).items():
            assert a not in held, f"{a} held on two hosts"
            held[a] = h
    assert held == given
