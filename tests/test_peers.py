"""Real daemons on loopback sharing one range through the peer protocol: join through one
--peer, space spreading by donation, status agreeing, and refusals of a wrong secret,
another range, and garbage on the peer port."""
import re
import socket

from .daemon_proc import Daemon, wait_until
from .multihost import owner_spans

RANGE = "10.40.0.0/24"
SECRET = "peer-test-secret-0123456789"


def launch(tmp_path, name, *flags, secret=SECRET, iprange=RANGE):
    (tmp_path / name).mkdir()
    (tmp_path / name / "secret").write_text(secret)
    d = Daemon(tmp_path / name, "--iprange", iprange, "--name", name, "--listen",
               "127.0.0.1:0", "--secret-file", str(tmp_path / name / "secret"), *flags)
    d.start()
    d.port = int(re.search(r"listen=\S+:(\d+)", d.ready_line).group(1))
    d.addr = f"127.0.0.1:{d.port}"
    return d


def status(d):
    r = d.call({"op": "status"})
    assert r["ok"], r
    return r


def test_three_daemons_join_through_one_peer_and_share_the_range(tmp_path):
    a = launch(tmp_path, "a")
    b = launch(tmp_path, "b", "--peer", a.addr)
    c = launch(tmp_path, "c", "--peer", b.addr)  # learns a from b
    ids = {d: status(d)["peer"] for d in (a, b, c)}
    for d in (a, b, c):
        wait_until(f"{d.dir.name} to reach both others",
                   lambda d=d: set(status(d)["reachable"]) == set(ids.values()) - {ids[d]})
    assert status(c)["cluster"] == status(a)["cluster"]
    wait_until("the ring to reach every peer",
               lambda: len({status(d)["ring_digest"] for d in (a, b, c)}) == 1)
    got = {}
    for d in (a, b, c):
        for i in range(5):
            r = d.call({"op": "allocate", "handle": f"{d.dir.name}-{i}"})
            assert r["ok"], r
            got[r["address"]] = d.dir.name
    assert len(got) == 15  # no address twice
    owned = {d.dir.name: status(d)["universes"][0]["owned"] for d in (a, b, c)}
    assert all(v > 0 for v in owned.values()) and sum(owned.values()) == 254, owned
    wait_until("every ring digest to agree",
               lambda: len({status(d)["ring_digest"] for d in (a, b, c)}) == 1)
    shares = status(c)["universes"][0]["peers"]
    assert set(shares) == set(ids.values()) and all(v["reachable"] for v in shares.values())
    # Every host learns every nickname (--name here), c those of a and b from their books.
    for d in (a, b, c):
        wait_until(f"{d.dir.name} to know every nickname", lambda d=d: status(d)["nicknames"]
                   == {p: x.dir.name for x, p in ids.items()})
    out = c.cli("status")
    assert out.returncode == 0, out
    for d, peer in ids.items():
        assert re.search(rf"{peer}  {d.dir.name}\s+\d+\.\d%\s+\d+\.\d%\s+"
                         r"(this peer|reachable)", out.stdout), out.stdout
    out = c.cli("peers").stdout.splitlines()
    assert sorted(out) == sorted(f"{p}  {d.dir.name:<10}{'this peer' if d is c else 'reachable'}"
                                 for d, p in ids.items()), out


def test_wrong_secret_other_range_and_garbage_are_refused(tmp_path):
    a = launch(tmp_path, "a")
    a.call({"op": "allocate", "handle": "x"})
    before = status(a)["ring_digest"]
    bad = launch(tmp_path, "bad", "--peer", a.addr, secret="not-the-secret-0123456789")
    other = launch(tmp_path, "other", "--peer", a.addr, iprange="10.41.0.0/24")
    for raw in (b"\x00\x00\x00\x05hello", b"GET / HTTP/1.0\r\n\r\n", b"\xff" * 64):
        with socket.create_connection(("127.0.0.1", a.port), timeout=5) as s:
            s.sendall(raw)
            s.settimeout(5)
            try:
                while s.recv(4096):  # the hello, then the close
                    pass
            except ConnectionResetError:
                pass
    wait_until("a to log the refusals", lambda: "failed authentication" in a.stderr()
               and "has ranges 10.41.0.0/24" in a.stderr() and "not an ipamd peer hello"
               in a.stderr())
    # bad owns nothing and reaches no peer: it waits for one, then says so.
    r = bad.call({"op": "allocate", "handle": "y"})
    assert not r["ok"] and r["error"]["code"] == "timeout", r
    assert "reached none of the peers" in r["error"]["message"], r
    assert status(bad)["reachable"] == [] and status(other)["reachable"] == []
    s = status(a)
    assert s["reachable"] == [] and s["ring_digest"] == before and s["allocations"] == 1
    assert a.call({"op": "allocate", "handle": "z"})["ok"]


def joined(tmp_path, names, flags=lambda name: ()):
    """Daemons joined through the first; flags(name) adds each one's own flags."""
    first = launch(tmp_path, names[0], *flags(names[0]))
    ds = [first] + [launch(tmp_path, n, "--peer", first.addr, *flags(n)) for n in names[1:]]
    ids = [status(d)["peer"] for d in ds]
    for d, me in zip(ds, ids):
        wait_until(f"{d.dir.name} to reach every other peer",
                   lambda d=d, me=me: set(status(d)["reachable"]) == set(ids) - {me})
    wait_until("one ring everywhere", lambda: len({status(d)["ring_digest"] for d in ds}) == 1)
    return ds, ids


def test_leave_rmpeer_and_a_wiped_rejoin_with_real_processes(tmp_path):
    import json
    import shutil
    (a, b, c, d), (ia, ib, ic, idd) = joined(tmp_path, ["a", "b", "c", "d"],
                                             lambda name: ("--reuse-delay", "1"))
    for x in (b, c, d):
        assert x.call({"op": "allocate", "handle": f"{x.dir.name}-1"})["ok"]
    # leave: refused while c holds an address, then hands c's space to live peers.
    r = json.loads(c.cli("leave", "--json").stdout)
    assert not r["ok"] and r["error"]["code"] == "busy", r
    assert r["error"]["message"] == f"{ic} still holds 1 address: release them before it " \
        "leaves", r
    assert c.call({"op": "release", "handle": "c-1"})["ok"]
    # Not while the freed address is in quarantine: its new owner would hand it out at once.
    r = json.loads(c.cli("leave", "--json").stdout)
    assert not r["ok"] and r["error"]["code"] == "busy" and \
        r["error"]["message"].startswith(f"{ic} freed 1 address less than 1s ago"), r
    out = wait_until("c to leave once the quarantine is over", lambda: (
        lambda o: o if o.returncode == 0 else None)(c.cli("leave")))
    assert "left the cluster" in out.stdout, out
    wait_until("c's space to be owned by others everywhere",
               lambda: all(status(x)["universes"][0]["peers"].get(ic, {"owned": 0})["owned"] == 0
                           for x in (a, b, d)))
    assert status(c)["standing"] == "left"
    r = c.call({"op": "allocate", "handle": "c-2"})
    assert not r["ok"] and r["error"]["code"] == "left", r
    assert r["error"]["message"] == f"{ic} left the cluster", r
    # rmpeer: d dies holding space; reachable targets are refused, dead ones reclaimed.
    r = json.loads(a.cli("rmpeer", ib, "--json").stdout)
    assert not r["ok"] and r["error"]["code"] == "reachable", r
    d.kill()
    wait_until("a to see d unreachable", lambda: idd not in status(a)["reachable"])
    r = json.loads(a.cli("rmpeer", idd, "--json").stdout)
    assert r["ok"] and r["removed"] == [idd], r
    wait_until("d's space reclaimed everywhere",
               lambda: all(idd not in status(x)["universes"][0]["peers"] for x in (a, b)))
    # A removed peer that comes back is refused and told so.
    d.start()
    wait_until("d to learn it was removed", lambda: status(d)["standing"] == "removed")
    r = d.call({"op": "allocate", "handle": "d-2"})
    assert not r["ok"] and r["error"]["code"] == "removed", r
    assert f"{idd} was removed from the cluster by {ia}" in r["error"]["message"] and \
        "start it afresh with an empty database" in r["error"]["message"], r
    # b loses its database: it comes back under a new id, owning nothing of its old space.
    b.kill()
    shutil.rmtree(b.dir / "data")
    b.start()
    nb = status(b)["peer"]
    assert nb != ib and status(b)["universes"][0]["owned"] == 0
    wait_until("the new b to hear the ring", lambda: status(b)["ring_digest"]
               == status(a)["ring_digest"])
    assert status(b)["universes"][0]["peers"][ib]["owned"] > 0  # the old id's, unused
    r = b.call({"op": "allocate", "handle": "b-2"})
    assert r["ok"], r
    assert a.call({"op": "rmpeer", "peers": [ib]})["ok"]


def test_a_handover_that_died_with_its_receiver_is_sent_again(tmp_path):
    """b gets space from a (an allocation), frees it, and leaves while a is stopped
    (SIGSTOP): the Handover waits unread in a's socket, the leave answers timeout naming a,
    and b's status lists a in handing_over. a is killed (the unread Handover dies with it)
    and started again: b, still running, sends the Handover again, a acknowledges, and a's
    ring gives it b's space. (Before, a peer that left never sent it again: b's space stayed
    b's until an rmpeer of it.)"""
    import os
    import signal
    (a, b), (ia, ib) = joined(tmp_path, ["a", "b"], lambda name: ("--reuse-delay", "1"))
    assert b.call({"op": "allocate", "handle": "b-1"})["ok"]
    assert b.call({"op": "release", "handle": "b-1"})["ok"]
    wait_until("b's quarantine to end and a to know of b's space", lambda: (
        status(b)["universes"][0]["quarantined"] == 0
        and status(a)["universes"][0]["peers"].get(ib, {"owned": 0})["owned"] > 0))
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        r = b.call({"op": "leave"})
    finally:
        a.kill()  # SIGKILL ends a stopped process too
    assert not r["ok"] and r["error"]["code"] == "timeout", r
    assert f"but {ia} did not acknowledge in time" in r["error"]["message"], r
    assert status(b)["standing"] == "left" and status(b)["handing_over"] == [ia]
    assert ib in {o for _, _, o in owner_spans(a)}  # a's database: the Handover never landed
    a.start()
    wait_until("b's handover to be acknowledged", lambda: status(b)["handing_over"] == [])
    assert ib not in {p for p, x in status(a)["universes"][0]["peers"].items() if x["owned"]}


def test_prometheus_metrics_show_use_peers_and_donations(tmp_path):
    import urllib.request
    a = launch(tmp_path, "a")
    b = launch(tmp_path, "b", "--peer", a.addr, "--metrics", "127.0.0.1:0")
    port = int(re.search(r"metrics=\S+:(\d+)", b.ready_line).group(1))
    wait_until("b to hear the ring", lambda: status(b)["ring_digest"] == status(a)["ring_digest"])
    assert b.call({"op": "allocate", "handle": "x"})["ok"]  # b owns nothing: a donation

    def scrape():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert r.headers["content-type"].startswith("text/plain")
            return r.read().decode()

    text = scrape()
    assert f'ipamd_addresses_in_use{{subnet="{RANGE}",universe="{RANGE}"}} 1.0' in text
    assert 'ipamd_peers{state="reachable"} 1.0' in text
    assert "ipamd_donation_seconds_count 1.0" in text
    assert "ipamd_pending_requests 0.0" in text and "ipamd_ring_conflicts_total 0.0" in text
    assert "ipamd_wal_pinned 0.0" in text and "ipamd_wal_waits_total 0.0" in text
    assert float(re.search(r"^ipamd_wal_pages (\S+)$", text, re.M).group(1)) > 0
    owned = float(re.search(r'ipamd_addresses_owned\{universe="[^"]+"\} (\S+)', text).group(1))
    free = float(re.search(r'ipamd_addresses_free\{subnet="[^"]+",universe="[^"]+"\} (\S+)',
                           text).group(1))
    assert owned > 0 and free == owned - 1  # one address held
    a.kill()
    wait_until("a to show as unreachable", lambda: 'ipamd_peers{state="unreachable"} 1.0'
               in scrape())


def test_a_restarted_host_finds_its_peers_without_peer_flags(tmp_path):
    a = launch(tmp_path, "a")
    b = launch(tmp_path, "b", "--peer", a.addr)
    ia = status(a)["peer"]
    wait_until("b to reach a", lambda: status(b)["reachable"] == [ia])
    b.kill()
    again = Daemon(b.dir, "--name", "b", "--listen", "127.0.0.1:0", "--secret-file",
                   str(b.dir / "secret"))  # no --peer: the database remembers where a is
    again.start()
    wait_until("b to reach a again", lambda: status(again)["reachable"] == [ia])
    r = again.call({"op": "allocate", "handle": "x"})
    assert r["ok"], r


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def launch_fixed(tmp_path, name, port, *flags):
    (tmp_path / name).mkdir()
    (tmp_path / name / "secret").write_text(SECRET)
    d = Daemon(tmp_path / name, "--iprange", RANGE, "--name", name, "--listen",
               f"127.0.0.1:{port}", "--secret-file", str(tmp_path / name / "secret"), *flags)
    d.start()
    return d


def test_seeds_split_the_range_once_every_seed_is_reached(tmp_path):
    ports = free_ports(3)
    seeds = ",".join(f"127.0.0.1:{p}" for p in ports)
    a = launch_fixed(tmp_path, "a", ports[0], "--init-peers", seeds)
    s = status(a)
    assert s["standing"] == "waiting" and "127.0.0.1" in s["note"], s
    r = a.call({"op": "allocate", "handle": "early"})
    assert not r["ok"] and r["error"]["code"] == "waiting", r
    # The message names why: the seeds it has not heard from yet, by address.
    assert r["error"]["message"].startswith("waiting ") and all(
        f"127.0.0.1:{p}" in r["error"]["message"] for p in ports[1:]), r
    b = launch_fixed(tmp_path, "b", ports[1], "--init-peers", seeds)
    c = launch_fixed(tmp_path, "c", ports[2], "--init-peers", seeds)
    ds = [a, b, c]
    wait_until("every seed to be a member", lambda: all(
        status(d)["standing"] == "member" for d in ds))
    wait_until("one ring", lambda: len({status(d)["ring_digest"] for d in ds}) == 1)
    owned = [status(d)["universes"][0]["owned"] for d in ds]
    assert all(o >= 63 for o in owned) and sum(owned) == 254, owned  # a /24 in 4 blocks
    for d in ds:
        assert d.call({"op": "allocate", "handle": "x"})["ok"]
    # A restart keeps the split and needs no flags but the secret and where to listen.
    b.kill()
    again = Daemon(b.dir, "--name", "b", "--listen", f"127.0.0.1:{ports[1]}", "--secret-file",
                   str(b.dir / "secret"))
    again.start()
    assert status(again)["universes"][0]["owned"] == owned[1]
    wait_until("b back in touch", lambda: len(status(again)["reachable"]) == 2)


def test_quorum_of_three_decides_the_split(tmp_path):
    ports = free_ports(3)
    addrs = [f"127.0.0.1:{p}" for p in ports]
    ds = []
    for i, name in enumerate("abc"):
        others = [x for a in addrs if a != addrs[i] for x in ("--peer", a)]
        ds.append(launch_fixed(tmp_path, name, ports[i], "--quorum", "3", *others))
    wait_until("the vote to be decided everywhere", lambda: all(
        status(d)["standing"] == "member" and status(d)["decided"] for d in ds), 30)
    decided = {tuple(status(d)["decided"]) for d in ds}
    assert len(decided) == 1
    clusters = {status(d)["cluster"] for d in ds}
    assert len(clusters) == 1 and "/" in clusters.pop()  # the decided identity
    wait_until("one ring", lambda: len({status(d)["ring_digest"] for d in ds}) == 1)
    wait_until("every voter to reach the others",
               lambda: all(len(status(d)["reachable"]) == 2 for d in ds))
    owners = set(status(ds[0])["universes"][0]["peers"])
    assert owners == set(decided.pop())
    for d in ds:
        r = d.call({"op": "allocate", "handle": "x"})
        assert r["ok"], r


def cni_call(d, command, conf, cid="c1"):
    """The hook protocol's cni op, as the forwarder sends it."""
    import json
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": "/var/run/netns/x",
           "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni"}
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(d.socket))
        s.sendall(json.dumps({"op": "cni", "env": env, "stdin": json.dumps(conf)}).encode()
                  + b"\n")
        f = s.makefile("rb")
        head = json.loads(f.readline())
        return head["exit"], f.read(head["length"]).decode()


def test_cni_add_on_a_host_that_owns_nothing_gets_space_from_a_peer(tmp_path):
    import json
    a = launch(tmp_path, "a")
    b = launch(tmp_path, "b", "--peer", a.addr)
    wait_until("b to hear the ring", lambda: status(b)["ring_digest"] == status(a)["ring_digest"])
    assert status(b)["universes"][0]["owned"] == 0
    conf = {"cniVersion": "1.0.0", "name": "net1",
            "ipam": {"type": "ipamd", "ranges": [[{"subnet": RANGE}]]}}
    code, out = cni_call(b, "ADD", conf)
    assert code == 0, out
    address = json.loads(out)["ips"][0]["address"]
    assert status(b)["universes"][0]["owned"] > 0 and status(b)["allocations"] == 1
    assert cni_call(b, "ADD", conf)[1] == out  # idempotent
    # A static address a owns, asked for by name: a hands it over.
    conf2 = dict(conf, args={"cni": {"ips": ["10.40.0.250"]}})
    code, out2 = cni_call(b, "ADD", conf2, cid="c2")
    assert code == 0 and json.loads(out2)["ips"][0]["address"].startswith("10.40.0.250/"), out2
    assert cni_call(b, "DEL", conf)[0] == 0 and address not in json.dumps(
        b.call({"op": "list"}))
