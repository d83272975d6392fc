"""The one gate with real processes: hosts that are removed, stale or still waiting refuse
every entrance (hook, CNI through the C forwarder) naming their standing; a joiner allocates
right after `ready`; a small range fills to its very last address across three hosts."""
import json
import os
import shutil
import subprocess

from .daemon_proc import ROOT, Daemon, wait_until
from .test_docker import GW, Driver, mac
from .test_peers import SECRET, free_ports, launch, status
from .test_peers import joined as peers_joined

FORWARDER = ROOT / "dist" / "ipamd-cni"


def forwarder() -> str:
    if not FORWARDER.exists():
        subprocess.run(["make", "-C", str(ROOT), "dist/ipamd-cni"], check=True,
                       capture_output=True)
    return str(FORWARDER)


def cni_add(d, container, subnet="10.40.0.0/24", command="ADD"):
    """A CNI call through the C forwarder, as a runtime makes it."""
    conf = {"cniVersion": "1.1.0", "name": "gate",
            "ipam": {"type": "ipamd", "socket": str(d.socket), "ranges": [[{"subnet": subnet}]]}}
    env = {**os.environ, "CNI_COMMAND": command, "CNI_CONTAINERID": container,
           "CNI_NETNS": f"/var/run/netns/{container}", "CNI_IFNAME": "eth0", "CNI_PATH": "/x"}
    r = subprocess.run([forwarder()], input=json.dumps(conf), capture_output=True, text=True,
                       env=env, timeout=60)
    return r.returncode, json.loads(r.stdout) if r.stdout.strip() else None


def held(d) -> list[str]:
    out = subprocess.run(["sqlite3", str(d.db), "SELECT address FROM allocations"],
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


def refused_everywhere(d, standing: str, words: str) -> None:
    r = d.call({"op": "allocate", "handle": f"x-{standing}"})
    assert not r["ok"] and r["error"]["code"] == standing and words in r["error"]["message"], r
    r = d.call({"op": "claim", "handle": f"y-{standing}", "address": "10.40.0.200"})
    assert not r["ok"] and r["error"]["code"] == standing, r
    for i in range(3):
        code, out = cni_add(d, f"{standing}{i}")
        assert code == 1 and out["code"] == 100, out
        assert out["msg"].startswith(f"ADD refused ({standing}): ") and words in out["msg"], out
        assert out["details"] == standing, out
    code, out = cni_add(d, f"{standing}-s", command="STATUS")
    assert code == 1 and out["code"] == 50 and out["details"] == standing, out
    api = Driver(d.dir / "docker.sock")
    pool = api.pool("10.40.0.0/24")
    for address, options in (("", GW), ("", mac(1)), ("10.40.0.201", mac(2))):
        r = api.address(pool, address, options)
        assert r["Error"].startswith(f"{standing}: ") and words in r["Error"], r


def joined(tmp_path, names):
    """Hosts joined through the first, each also serving the Docker driver."""
    return peers_joined(tmp_path, names, lambda name: (
        "--docker-plugin", str(tmp_path / name / "docker.sock")))


def test_hosts_not_in_good_standing_refuse_every_entrance(tmp_path):
    (a, b, c, d), (ia, ib, ic, idd) = joined(tmp_path, ["a", "b", "c", "d"])
    for x in (a, b, c, d):
        assert x.call({"op": "allocate", "handle": f"{x.dir.name}-1"})["ok"]
    # A removed host: killed, removed by a, back on its old database.
    d.kill()
    wait_until("a to see d unreachable", lambda: idd not in status(a)["reachable"])
    r = a.call({"op": "rmpeer", "peers": [idd]})
    assert r["ok"] and r["removed"] == [idd], r
    d.start()
    wait_until("d to learn it was removed", lambda: status(d)["standing"] == "removed")
    refused_everywhere(d, "removed", f"{idd} was removed from the cluster by {ia}")
    # A stale host: its database restored from a copy older than what its peers heard of it.
    b.stop()
    shutil.copytree(b.dir / "data", tmp_path / "b-old")
    b.start()
    wait_until("b back in touch", lambda: {ia, ic} <= set(status(b)["reachable"]))
    digest = status(a)["ring_digest"]
    for i in range(40):  # enough that b's free hints change: ring writes under b's stamp
        assert b.call({"op": "allocate", "handle": f"b-more-{i}"})["ok"]
    wait_until("b's writes to reach a", lambda: status(a)["ring_digest"] != digest and
               status(a)["ring_digest"] == status(b)["ring_digest"])
    b.kill()
    shutil.rmtree(b.dir / "data")
    shutil.copytree(tmp_path / "b-old", b.dir / "data")
    b.start()
    wait_until("b to learn it is stale", lambda: status(b)["standing"] == "stale")
    refused_everywhere(b, "stale", "")
    # A seed still waiting for the other seeds.
    port, missing = free_ports(2)
    w = Daemon(tmp_path / "w", "--iprange", "10.40.0.0/24", "--listen", f"127.0.0.1:{port}",
               "--init-peers", f"127.0.0.1:{port},127.0.0.1:{missing}", "--secret-file",
               str(tmp_path / "w-secret"), "--docker-plugin", str(tmp_path / "w" / "docker.sock"))
    (tmp_path / "w").mkdir()
    (tmp_path / "w-secret").write_text(SECRET)
    w.start()
    refused_everywhere(w, "waiting", f"127.0.0.1:{missing}")
    # Releases pass the gate in every standing: a container that is gone frees its address.
    r = d.call({"op": "release", "handle": "d-1"})
    assert r["ok"] and len(r["released"]) == 1, r
    # Nothing was given twice, across every host's database.
    everything = [x for h in (a, b, c, d, w) for x in held(h)]
    assert len(everything) == len(set(everything)), sorted(everything)
    for x in (a, c):  # the cluster itself still serves
        assert x.call({"op": "allocate", "handle": f"{x.dir.name}-2"})["ok"]


def test_a_joiner_allocates_right_after_ready(tmp_path):
    a = launch(tmp_path, "a")
    b = launch(tmp_path, "b", "--peer", a.addr)
    # No wait of any kind: the joiner owns nothing, has not reached a yet, and must wait for
    # it rather than answer "exhausted".
    r = b.call({"op": "allocate", "handle": "first"})
    assert r["ok"] and r["address"].startswith("10.40.0."), r
    c = launch(tmp_path, "c", "--peer", a.addr)
    code, out = cni_add(c, "s", command="STATUS")  # a newcomer's STATUS asks the cluster
    assert (code, out) == (0, None), out
    code, out = cni_add(c, "first")
    assert code == 0 and out["ips"][0]["address"].startswith("10.40.0."), out


def test_a_small_range_fills_to_its_last_address_one_host_at_a_time(tmp_path):
    hosts, ids = joined(tmp_path, ["h0", "h1", "h2"])
    for h in hosts:  # every host gets a share first
        assert h.call({"op": "allocate", "handle": f"{h.dir.name}-0"})["ok"]
    got = {}
    for h in hosts:
        i = 1
        while True:
            r = h.call({"op": "allocate", "handle": f"{h.dir.name}-{i}"})
            if not r["ok"]:
                assert r["error"]["code"] == "exhausted", r
                break
            assert r["address"] not in got, r
            got[r["address"]] = h.dir.name
            i += 1
    # 10.40.0.0/24 has 254 host addresses; three were taken first.
    assert len(got) + 3 == 254, (len(got), {n: list(got.values()).count(n) for n in ids})
    for h in hosts:  # and the hints everyone shows stay within what each peer owns
        for peer, share in status(h)["universes"][0]["peers"].items():
            assert 0 <= share["free_hint"] <= share["owned"], (h.dir.name, peer, share)


def launch_ranges(tmp_path, name, ranges, *flags):
    (tmp_path / name).mkdir()
    (tmp_path / name / "secret").write_text(SECRET)
    d = Daemon(tmp_path / name, *[x for r in ranges for x in ("--iprange", r)], "--name", name,
               "--listen", "127.0.0.1:0", "--secret-file", str(tmp_path / name / "secret"),
               *flags)
    d.start()
    d.addr = "127.0.0.1:" + d.ready_line.split(" listen=")[1].split()[0].rsplit(":", 1)[1]
    return d


def test_cni_gateways_are_reserved_cluster_wide_by_their_owner(tmp_path):
    ranges = ["10.40.0.0/24", "fd00:40::/120"]
    a = launch_ranges(tmp_path, "a", ranges)
    b = launch_ranges(tmp_path, "b", ranges, "--peer", a.addr)
    ia, ib = status(a)["peer"], status(b)["peer"]
    wait_until("a and b to reach each other", lambda: status(a)["reachable"] == [ib]
               and status(b)["reachable"] == [ia])
    conf = {"cniVersion": "1.1.0", "name": "dual",
            "ipam": {"type": "ipamd", "socket": str(b.socket),
                     "ranges": [[{"subnet": ranges[0]}], [{"subnet": ranges[1]}]]}}

    def cni(command, container):
        env = {**os.environ, "CNI_COMMAND": command, "CNI_CONTAINERID": container,
               "CNI_NETNS": f"/var/run/netns/{container}", "CNI_IFNAME": "eth0",
               "CNI_PATH": "/x"}
        r = subprocess.run([forwarder()], input=json.dumps(conf), capture_output=True,
                           text=True, env=env, timeout=60)
        return r.returncode, json.loads(r.stdout) if r.stdout.strip() else None

    code, out = cni("ADD", "c1")
    assert code == 0, out
    assert [ip["gateway"] for ip in out["ips"]] == ["10.40.0.1", "fd00:40::1"], out
    # b owned nothing: the gateways are a's, and a reserved them for b before b answered;
    # b holds them for the container that named them.
    gateways = ["10.40.0.1", "fd00:40::1"]
    assert status(a)["reserved"] == {g: [f"peer {ib}"] for g in gateways}, status(a)
    mine = status(b)["reserved"]
    assert sorted(mine) == gateways and all(
        len(h) == 1 and h[0].startswith("handle ") and "c1" in h[0] for h in mine.values()), mine
    given = set()
    for d in (a, b):  # every address of both ranges, from both hosts: never a gateway
        for subnet in ranges:
            i = 0
            while True:
                r = d.call({"op": "allocate", "handle": f"{d.dir.name}-{subnet}-{i}",
                            "subnet": subnet})
                if not r["ok"]:
                    assert r["error"]["code"] == "exhausted", r
                    break
                given.add(r["address"].split("/")[0])
                i += 1
    assert not given & {"10.40.0.1", "fd00:40::1"}
    # Everything else was handed out: 254 - 1 gateway - c1's, 255 - 1 - c1's.
    assert len(given) == (254 - 2) + (255 - 2), len(given)

    # A request that fails reserves nothing: the owner reserves the gateways for b again
    # (they are b's container's still), the ADD finds no address anywhere, and nothing new
    # stays reserved.
    code, out = cni("ADD", "c2")
    assert code == 1 and out["code"] == 100 and out["details"] == "exhausted", out
    assert status(a)["reserved"] == {g: [f"peer {ib}"] for g in gateways}
    assert status(b)["reserved"] == mine

    # Released with the container that named them: b tells a, which frees them through
    # quarantine (so, for now, they are the only addresses not handed out).
    code, out = cni("DEL", "c1")
    assert code == 0, out
    wait_until("both hosts to drop the gateways", lambda: status(a)["reserved"] == {}
               and status(b)["reserved"] == {})
    assert [u["quarantined"] for u in status(a)["universes"]] == [1, 1], status(a)
    code, out = cni("ADD", "c3")  # c1's addresses, on b, are in b's quarantine
    assert code == 1 and out["code"] == 100 and out["details"] == "exhausted", out
    wait_until("a failed ADD's gateway reservation to be given back",
               lambda: status(a)["reserved"] == {} and status(b)["reserved"] == {})


def test_a_claim_of_an_address_another_host_holds_names_the_holder(tmp_path):
    (a, b), (ia, ib) = joined(tmp_path, ["a", "b"])
    r = a.call({"op": "claim", "handle": "s0", "address": "10.40.0.77"})
    assert r["ok"], r
    r = b.call({"op": "claim", "handle": "s1", "address": "10.40.0.77"})
    assert r == {"ok": False, "error": {"code": "in_use", "message":
                 f"10.40.0.77 is held by handle 's0' on peer {ia}"}}, r
    assert a.call({"op": "release", "handle": "s0"})["ok"]
    r = b.call({"op": "claim", "handle": "s1", "address": "10.40.0.77"})
    assert not r["ok"] and r["error"]["code"] == "quarantined" and ia in \
        r["error"]["message"], r


def test_static_addresses_in_the_subnet_have_one_owner_cluster_wide(tmp_path):
    """--subnet outside the ranges is claim-only space in the ring: one owner decides each
    static address, as for the ranges, and allocate never hands it out."""
    ranges = ["10.40.10.0/28"]
    h0 = launch_ranges(tmp_path, "h0", ranges, "--subnet", "10.40.8.0/22")
    h1 = launch_ranges(tmp_path, "h1", ranges, "--subnet", "10.40.8.0/22", "--peer", h0.addr)
    assert " static=10.40.8.0/23,10.40.10.16/28,10.40.10.32/27,10.40.10.64/26," \
           "10.40.10.128/25,10.40.11.0/24 " in h0.ready_line, h0.ready_line
    i0, i1 = status(h0)["peer"], status(h1)["peer"]
    # h1 is still reaching h0, which owns everything: the claim waits for it, then asks it.
    r = h1.call({"op": "claim", "handle": "s1", "address": "10.40.8.5"})
    assert r["ok"] and r["address"] == "10.40.8.5/22", r
    r = h0.call({"op": "claim", "handle": "s0", "address": "10.40.8.5"})
    assert r == {"ok": False, "error": {"code": "in_use", "message":
                 f"10.40.8.5 is held by handle 's1' on peer {i1}"}}, r
    assert held(h0) == [] and held(h1) == ["10.40.8.5"]
    # Allocate takes only the range: 16 addresses, then nothing, static space or not.
    got = []
    while (r := h0.call({"op": "allocate", "handle": f"a{len(got)}"}))["ok"]:
        got.append(r["address"])
    assert r["error"]["code"] == "exhausted", r
    assert sorted(got) == sorted(f"10.40.10.{i}/22" for i in range(16)), got
    static = {u["range"]: u for u in status(h0)["universes"] if u["static"]}
    assert sorted(static) == ["10.40.10.128/25", "10.40.10.16/28", "10.40.10.32/27",
                              "10.40.10.64/26", "10.40.11.0/24", "10.40.8.0/23"]
    # Given back, the address goes through quarantine on its owner, h1.
    assert h1.call({"op": "release", "handle": "s1"})["ok"]
    r = h0.call({"op": "claim", "handle": "s0", "address": "10.40.8.5"})
    assert not r["ok"] and r["error"]["code"] == "quarantined" and i1 in \
        r["error"]["message"], r
    assert i0 != i1


def test_a_database_without_static_space_refuses_static_claims_in_a_cluster(tmp_path):
    """Universes are fixed when the cluster is made: a host made without --subnet that is
    started with one later says so, and (with peers) refuses what no host owns."""
    (tmp_path / "solo").mkdir()
    solo = Daemon(tmp_path / "solo", "--iprange", "10.40.10.0/24", "--subnet", "10.40.8.0/22")
    solo.start()
    r = solo.call({"op": "claim", "handle": "s0", "address": "10.40.8.5"})
    assert r["ok"] and r["address"] == "10.40.8.5/22", r
    ranges = ["10.40.10.0/24"]
    p0, p1 = free_ports(2)  # fixed: the restarts below must find each other again
    h0 = launch_ranges(tmp_path, "h0", ranges, "--listen", f"127.0.0.1:{p0}")
    h1 = launch_ranges(tmp_path, "h1", ranges, "--listen", f"127.0.0.1:{p1}",
                       "--peer", f"127.0.0.1:{p0}")
    wait_until("h0 to know h1", lambda: status(h0)["reachable"] == [status(h1)["peer"]])
    for h in (h0, h1):
        h.stop()
        h.flags += ["--subnet", "10.40.8.0/22"]
        h.start()
        assert "event=no_static_space" in h.stderr() and "static=" not in h.ready_line
    wait_until("h0 to know h1 again", lambda: status(h0)["reachable"] == [status(h1)["peer"]])
    for h, handle in ((h1, "s1"), (h0, "s0")):
        r = h.call({"op": "claim", "handle": handle, "address": "10.40.8.5"})
        assert not r["ok"] and r["error"]["code"] == "no_owner", r
        assert r["error"]["message"].startswith("10.40.8.5 lies outside every allocation range "
                                                "(10.40.10.0/24)"), r
    assert held(h0) == held(h1) == []
    r = h1.call({"op": "claim", "handle": "s1", "address": "10.40.10.5"})
    assert r["ok"] and r["address"] == "10.40.10.5/22", r
