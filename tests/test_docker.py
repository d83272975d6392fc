"""Docker's remote IPAM driver, over HTTP on its unix socket, as libnetwork drives it.

The calls are the ones libnetwork makes (ipamapi, ipams/remote): network create asks for a
pool, then its gateway (RequestAddressType) and its --aux-address entries (no options); a new
endpoint sends its MAC address (we declare RequiresMACAddress); a restarted docker daemon
replays pools, gateways, aux addresses and endpoints (no options), under new pool ids.
tests/test_docker_engine.py does the same with a real docker engine.
"""
import http.client
import json
import os
import re
import socket
import subprocess
import sys

import pytest

from .daemon_proc import Daemon, wait_until

GW = {"RequestAddressType": "com.docker.network.gateway"}
MAC_KEY = "com.docker.network.endpoint.macaddress"


def mac(n: int) -> dict:
    return {MAC_KEY: f"02:42:c6:12:00:{n:02x}"}


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(self.path))


class Driver:
    def __init__(self, path):
        self.conn = UnixHTTP(path)  # one connection, kept alive, as docker's client does

    def __call__(self, endpoint, body=None, status=200):
        self.conn.request("POST", endpoint, body=json.dumps(body or {}),
                          headers={"Content-Type": "application/json"})
        r = self.conn.getresponse()
        assert r.status == status
        assert r.getheader("Content-Type") == "application/vnd.docker.plugins.v1+json"
        return json.loads(r.read())

    def pool(self, pool="198.18.60.0/24", sub="", v6=False):
        reply = self("/IpamDriver.RequestPool", {"AddressSpace": "local", "Pool": pool,
                                                 "SubPool": sub, "Options": {}, "V6": v6})
        assert "Error" not in reply, reply
        return reply["PoolID"]

    def address(self, pool_id, address="", options=None):
        return self("/IpamDriver.RequestAddress", {"PoolID": pool_id, "Address": address,
                                                   "Options": options})

    def release(self, pool_id, address):
        return self("/IpamDriver.ReleaseAddress", {"PoolID": pool_id, "Address": address})


@pytest.fixture
def docker(tmp_path):
    sock = tmp_path / "plugins" / "ipamd.sock"
    d = Daemon(tmp_path, "--iprange", "198.18.0.0/16", "--iprange", "2001:2::/64",
               "--docker-plugin", str(sock))
    d.start()
    yield d, sock
    d.stop()


def held(d) -> dict[str, str]:
    """Every allocation: address -> handle."""
    return {a["address"]: a["handle"] for a in d.call({"op": "list"})["allocations"]}


def pool_id_re(pool: str, pid: int) -> str:
    return re.escape(f"ipamd:{pool}#") + r"[0-9a-f]{12}" + re.escape(f"@p{pid}.") + r"\d+"


def other_daemon(sock, calls) -> list[dict]:
    """Make calls from another process, which then exits: a docker daemon that is gone."""
    script = ("import json, socket, sys, http.client\n"
              "class C(http.client.HTTPConnection):\n"
              "    def connect(self):\n"
              "        self.sock = socket.socket(socket.AF_UNIX); self.sock.connect(sys.argv[1])\n"
              "c, out, pool = C('localhost', timeout=30), [], None\n"
              "for path, body in json.loads(sys.argv[2]):\n"
              "    if pool: body['PoolID'] = pool\n"
              "    c.request('POST', path, body=json.dumps(body))\n"
              "    out.append(json.loads(c.getresponse().read()))\n"
              "    pool = pool or out[-1].get('PoolID')\n"
              "print(json.dumps(out))\n")
    p = subprocess.run([sys.executable, "-c", script, str(sock), json.dumps(calls)],
                       capture_output=True, text=True, timeout=60, check=True)
    return json.loads(p.stdout)


def test_capabilities_declare_mac_and_replay(docker):
    d, sock = docker
    api = Driver(sock)
    assert api("/Plugin.Activate") == {"Implements": ["IpamDriver"]}
    assert api("/IpamDriver.GetCapabilities") == {"RequiresMACAddress": True,
                                                  "RequiresRequestReplay": True}
    assert api("/IpamDriver.GetDefaultAddressSpaces") == {
        "LocalDefaultAddressSpace": "local", "GlobalDefaultAddressSpace": "global"}


def test_network_lifecycle_across_an_ipamd_restart(docker):
    d, sock = docker
    api = Driver(sock)
    reply = api("/IpamDriver.RequestPool", {"AddressSpace": "local", "Pool": "198.18.60.0/24",
                                            "SubPool": "", "Options": {}, "V6": False})
    pid = reply["PoolID"]
    assert re.fullmatch(pool_id_re("198.18.60.0/24", os.getpid()), pid)
    # No gateway in Data: libnetwork asks for one, so a --gateway anywhere works.
    assert reply == {"PoolID": pid, "Pool": "198.18.60.0/24", "Data": {}}
    assert held(d) == {}
    assert api.address(pid, "", GW) == {"Address": "198.18.60.1/24", "Data": {}}
    c1 = api.address(pid, "", mac(1))
    c2 = api.address(pid, "198.18.60.50", mac(2))
    assert c1 == {"Address": "198.18.60.2/24", "Data": {}}
    assert c2 == {"Address": "198.18.60.50/24", "Data": {}}
    handles = held(d)
    assert sorted(handles) == ["198.18.60.1/24", "198.18.60.2/24", "198.18.60.50/24"]
    assert handles["198.18.60.1/24"] == f"docker/{pid}/gateway"
    assert re.fullmatch(re.escape(f"docker/{pid}/ep/") + r"[0-9a-f]{12}/02:42:c6:12:00:01",
                        handles["198.18.60.2/24"])
    # ipamd restarts; docker goes on with the pool ids it has.
    d.kill()
    d.start()
    api = Driver(sock)
    assert held(d) == handles
    assert api.address(pid, "", mac(3)) == {"Address": "198.18.60.3/24", "Data": {}}
    assert api.release(pid, "198.18.60.2") == {}
    assert api.release(pid, "198.18.60.2") == {}  # idempotent
    assert sorted(held(d)) == ["198.18.60.1/24", "198.18.60.3/24", "198.18.60.50/24"]
    assert api.release(pid, "198.18.60.1") == {}
    assert api("/IpamDriver.ReleasePool", {"PoolID": pid}) == {}  # takes the rest with it
    assert held(d) == {}
    assert d.call({"op": "status"})["allocations"] == 0


def test_an_address_held_by_another_endpoint_is_refused_naming_it(docker):
    d, sock = docker
    api = Driver(sock)
    pid = api.pool()
    assert api.address(pid, "198.18.60.50", mac(1)) == {"Address": "198.18.60.50/24",
                                                         "Data": {}}
    holder = held(d)["198.18.60.50/24"]
    before = held(d)
    # docker run --ip 198.18.60.50 for a second container: refused, the first keeps it.
    assert api.address(pid, "198.18.60.50", mac(2)) == {
        "Error": f"in_use: 198.18.60.50 is held by handle '{holder}'"}
    # The same MAC address with a different one cannot pass either, nor a gateway.
    assert api.address(pid, "198.18.60.50", GW) == {
        "Error": f"in_use: 198.18.60.50 is held by handle '{holder}'"}
    assert held(d) == before
    # The refused container is removed: docker releases nothing it was not given. Even if it
    # did, the address goes only when its holder's own pool releases it.
    other = api.pool()
    assert api.release(other, "198.18.60.50") == {}
    assert held(d) == before


def test_a_replay_gets_the_same_answers_and_holds_nothing_new(docker):
    d, sock = docker
    api = Driver(sock)
    pid = api.pool("198.18.61.0/24", "198.18.61.128/25")
    gw = api.address(pid, "198.18.61.254", GW)
    aux = api.address(pid, "198.18.61.10")
    c1 = api.address(pid, "", mac(1))
    assert (gw["Address"], aux["Address"], c1["Address"]) == (
        "198.18.61.254/24", "198.18.61.10/24", "198.18.61.128/24")
    before = held(d)
    # The same requests again, under the same pool id (an endpoint replayed without options).
    assert api.address(pid, "198.18.61.254", GW) == gw
    assert api.address(pid, "198.18.61.10") == aux
    assert api.address(pid, "198.18.61.128") == c1
    assert api.address(pid, "198.18.61.128", mac(1)) == c1  # its own MAC address
    assert held(d) == before


def test_a_restarted_docker_daemon_replays_under_new_pool_ids(docker):
    d, sock = docker
    api = Driver(sock)
    # A docker daemon makes a network with a gateway, an aux address and two endpoints...
    made = other_daemon(sock, [
        ("/IpamDriver.RequestPool", {"AddressSpace": "local", "Pool": "198.18.62.0/24",
                                     "SubPool": "", "Options": {}, "V6": False}),
        ("/IpamDriver.RequestAddress", {"Address": "198.18.62.254", "Options": GW}),
        ("/IpamDriver.RequestAddress", {"Address": "198.18.62.10", "Options": None}),
        ("/IpamDriver.RequestAddress", {"Address": "", "Options": mac(1)}),
        ("/IpamDriver.RequestAddress", {"Address": "198.18.62.77", "Options": mac(2)}),
    ])
    old = made[0]["PoolID"]
    assert [r["Address"] for r in made[1:]] == ["198.18.62.254/24", "198.18.62.10/24",
                                                "198.18.62.1/24", "198.18.62.77/24"]
    before = held(d)
    # ...and is gone (restarted). The new one replays: a new pool id, the same answers.
    assert api("/Plugin.Activate") == {"Implements": ["IpamDriver"]}
    new = api.pool("198.18.62.0/24")
    assert new != old
    assert api.address(new, "198.18.62.254", GW) == made[1]
    assert api.address(new, "198.18.62.10", None) == made[2]
    assert api.address(new, "198.18.62.1", None) == made[3]
    assert api.address(new, "198.18.62.77", None) == made[4]
    after = held(d)
    assert sorted(after) == sorted(before)
    assert after == {a: h.replace(old, new) for a, h in before.items()}  # roles kept
    # Nothing is left under the old id, and the live network's addresses are its own now.
    assert api("/IpamDriver.ReleasePool", {"PoolID": old}) == {}
    assert held(d) == after
    assert api.release(new, "198.18.62.1") == {}
    assert api("/IpamDriver.ReleasePool", {"PoolID": new}) == {}
    assert held(d) == {}


def test_a_pool_of_a_running_docker_daemon_is_never_taken_over(docker):
    d, sock = docker
    api = Driver(sock)
    n1 = api.pool("198.18.63.0/24")
    assert api.address(n1, "", GW)["Address"] == "198.18.63.1/24"
    assert api.address(n1, "198.18.63.9")["Address"] == "198.18.63.9/24"  # an aux address
    c1 = api.address(n1, "", mac(1))
    before = held(d)
    # docker network create --subnet 198.18.63.0/24 --gateway 198.18.63.1 n2: refused.
    n2 = api.pool("198.18.63.0/24")
    assert api.address(n2, "198.18.63.1", GW) == {
        "Error": f"in_use: 198.18.63.1 is held by handle 'docker/{n1}/gateway', a pool of a "
                 "docker daemon that is still running"}
    # Docker rolls back with the refused pool's own id: n1 keeps everything.
    assert api("/IpamDriver.ReleasePool", {"PoolID": n2}) == {}
    assert held(d) == before
    # --aux-address of a live network's address, from a second network: refused.
    n3 = api.pool("198.18.63.0/24")
    assert api.address(n3, "198.18.63.9")["Error"].startswith(
        f"in_use: 198.18.63.9 is held by handle 'docker/{n1}/addr/198.18.63.9'")
    assert api.address(n3, c1["Address"].split("/")[0])["Error"].startswith("in_use: ")
    assert api("/IpamDriver.ReleasePool", {"PoolID": n3}) == {}
    assert held(d) == before


def test_a_refused_duplicate_network_leaves_the_live_one_alone(docker):
    d, sock = docker
    api = Driver(sock)
    n1 = api.pool("198.18.64.0/24")
    api.address(n1, "", GW)
    c1 = api.address(n1, "", mac(1))
    before = held(d)
    # docker network create --subnet 198.18.64.0/24 n2: the bridge driver refuses it after
    # the IPAM calls; the gateway it was given is its own, and so is what the rollback frees.
    n2 = api.pool("198.18.64.0/24")
    gw2 = api.address(n2, "", GW)
    assert gw2 == {"Address": "198.18.64.3/24", "Data": {}}  # .1 is n1's
    assert held(d)["198.18.64.3/24"] == f"docker/{n2}/gateway"
    assert api.release(n2, "198.18.64.3") == {}
    assert api.release(n2, c1["Address"].split("/")[0]) == {}  # not n2's: kept
    assert api("/IpamDriver.ReleasePool", {"PoolID": n2}) == {}
    assert held(d) == before


def test_gateway_anywhere_and_aux_addresses_for_the_pools_life(docker):
    d, sock = docker
    api = Driver(sock)
    pid = api.pool("198.18.65.0/24")
    assert api.address(pid, "198.18.65.254", GW) == {"Address": "198.18.65.254/24", "Data": {}}
    assert api.address(pid, "198.18.65.2", None) == {"Address": "198.18.65.2/24", "Data": {}}
    assert api.address(pid, "198.18.65.3", {}) == {"Address": "198.18.65.3/24", "Data": {}}
    # .1 is free for a container; the aux addresses are not.
    assert [api.address(pid, "", mac(i))["Address"] for i in range(3)] == [
        "198.18.65.1/24", "198.18.65.4/24", "198.18.65.5/24"]
    assert api.address(pid, "198.18.65.2", mac(9)) == {
        "Error": f"in_use: 198.18.65.2 is held by handle 'docker/{pid}/addr/198.18.65.2'"}
    assert held(d)["198.18.65.254/24"] == f"docker/{pid}/gateway"
    assert api("/IpamDriver.ReleasePool", {"PoolID": pid}) == {}
    assert held(d) == {}


def test_default_pools_are_distinct_blocks(docker):
    d, sock = docker
    api = Driver(sock)
    # libnetwork asks again while a pool overlaps a host route: each answer must differ.
    first = api("/IpamDriver.RequestPool", {"Pool": "", "V6": False})
    second = api("/IpamDriver.RequestPool", {"Pool": "", "V6": False})
    assert (first["Pool"], second["Pool"]) == ("198.18.0.0/24", "198.18.1.0/24")
    assert api("/IpamDriver.ReleasePool", {"PoolID": first["PoolID"]}) == {}
    third = api("/IpamDriver.RequestPool", {"Pool": "", "V6": False})
    assert third["Pool"] == "198.18.0.0/24"
    api.address(third["PoolID"], "", GW)
    # A pool someone asked for by name is avoided too.
    named = api.pool("198.18.2.0/23")
    assert api("/IpamDriver.RequestPool", {"Pool": "", "V6": False})["Pool"] == "198.18.4.0/24"
    api("/IpamDriver.ReleasePool", {"PoolID": named})
    v6 = api("/IpamDriver.RequestPool", {"Pool": "", "V6": True})
    assert v6["Pool"] == "2001:2::/64"
    assert api.address(v6["PoolID"], "", GW) == {"Address": "2001:2::1/64", "Data": {}}
    assert api("/IpamDriver.RequestPool", {"Pool": "", "V6": True}) == {
        "Error": "every /64 of 2001:2::/64 is used by a Docker pool; give the network a "
                 "--subnet"}
    narrow = api.pool("198.18.70.0/24", "198.18.70.128/25")
    assert api.address(narrow, "", mac(1))["Address"] == "198.18.70.128/24"
    assert api.address(narrow, "198.18.70.5", mac(2))["Address"] == "198.18.70.5/24"


@pytest.mark.parametrize("endpoint, body, error", [
    ("/IpamDriver.RequestPool", {"Pool": "192.0.2.0/24"},
     "pool 192.0.2.0/24 lies outside every ipamd range (198.18.0.0/16, 2001:2::/64); ipamd "
     "hands out addresses only from its ranges"),
    ("/IpamDriver.RequestPool", {"Pool": "banana"},
     "Pool: 'banana' is not a CIDR block (expected ADDRESS/PREFIX)"),
    ("/IpamDriver.RequestPool", {"Pool": "198.18.80.0/24", "SubPool": "198.18.81.0/25"},
     "SubPool 198.18.81.0/25 is not inside 198.18.80.0/24"),
    ("/IpamDriver.RequestPool", {"Pool": "198.18.0.0/15", "SubPool": "198.19.0.0/24"},
     "SubPool 198.19.0.0/24 lies outside every ipamd range (198.18.0.0/16, 2001:2::/64)"),
    ("/IpamDriver.RequestPool", {"Pool": "2001:2::/64", "V6": False},
     "Pool 2001:2::/64 is not IPv4, as V6=False asks"),
    ("/IpamDriver.RequestPool", {"Pool": 7}, "Pool must be a string"),
    ("/IpamDriver.RequestAddress", {"PoolID": "nope"}, "unknown PoolID 'nope'"),
    ("/IpamDriver.RequestAddress", {"PoolID": "ipamd:198.18.60.0/24#00@p1.1",
                                    "Address": "10.0.0.1"},
     "10.0.0.1 is not in pool 198.18.60.0/24"),
    ("/IpamDriver.RequestAddress", {"PoolID": "ipamd:198.18.60.0/24#00@p1.1",
                                    "Options": {MAC_KEY: "x"}},
     f"{MAC_KEY} 'x' is not a MAC address"),
    ("/IpamDriver.RequestAddress", {"PoolID": "ipamd:198.18.60.0/24#00@p1.1",
                                    "Address": "198.18.60.0"},
     "reserved: 198.18.60.0 is the network or broadcast address of 198.18.60.0/24"),
    ("/IpamDriver.ReleaseAddress", {"PoolID": "ipamd:198.18.60.0/24#00@p1.1", "Address": "x"},
     "Address: 'x' is not an IPv4 or IPv6 address"),
    ("/IpamDriver.ReleasePool", {"PoolID": "ipamd:banana"}, "unknown PoolID 'ipamd:banana'"),
])
def test_errors_are_named_and_change_nothing(docker, endpoint, body, error):
    d, sock = docker
    api = Driver(sock)
    assert api(endpoint, body) == {"Error": error}
    assert d.call({"op": "status"})["allocations"] == 0


def test_bad_http_unknown_endpoints_and_connection_cap(docker):
    d, sock = docker
    api = Driver(sock)
    assert api("/IpamDriver.Nope", status=404) == {"Error": "no such endpoint /IpamDriver.Nope"}
    api.conn.request("POST", "/IpamDriver.RequestPool", body=b"{not json")
    r = api.conn.getresponse()
    assert r.status == 400 and "not JSON" in json.loads(r.read())["Error"]
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.sendall(b"GARBAGE\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    # At most 64 connections at once: the next is closed unanswered, then room comes back.
    api.conn.close()
    held_open = []
    for _ in range(64):
        held_open.append(Driver(sock))
        assert held_open[-1]("/Plugin.Activate") == {"Implements": ["IpamDriver"]}
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(sock))
        assert s.recv(100) == b""
    for h in held_open:
        h.conn.close()
    wait_until("a connection to be served again", lambda: answered(sock), timeout=30)


def answered(sock) -> bool:
    try:
        return Driver(sock)("/Plugin.Activate") == {"Implements": ["IpamDriver"]}
    except (ConnectionError, http.client.HTTPException):
        return False


def test_pools_of_an_older_ipamd_keep_working_and_are_replayed(docker):
    d, sock = docker
    api = Driver(sock)
    # An ipamd before unique pool ids named a pool by its subnet, and held its gateway so.
    legacy = "ipamd:198.18.66.0/24"
    for handle, address in [(f"docker/{legacy}/gateway", "198.18.66.1"),
                            (f"docker/{legacy}/198.18.66.50", "198.18.66.50")]:
        assert d.call({"op": "claim", "handle": handle, "address": address,
                       "subnet": "198.18.66.0/24"})["ok"]
    # The docker daemon that made it goes on using the old id.
    c = api.address(legacy, "", mac(1))
    assert c == {"Address": "198.18.66.2/24", "Data": {}}
    assert api.release(legacy, "198.18.66.2") == {}
    # A docker daemon that starts (Activate) replays it under a new id, which takes it over.
    assert api("/Plugin.Activate") == {"Implements": ["IpamDriver"]}
    new = api.pool("198.18.66.0/24")
    assert api.address(new, "198.18.66.1", GW) == {"Address": "198.18.66.1/24", "Data": {}}
    assert api.address(new, "198.18.66.50") == {"Address": "198.18.66.50/24", "Data": {}}
    assert held(d) == {"198.18.66.1/24": f"docker/{new}/gateway",
                       "198.18.66.50/24": f"docker/{new}/198.18.66.50"}
    assert api("/IpamDriver.ReleasePool", {"PoolID": legacy}) == {}
    assert len(held(d)) == 2
    assert api("/IpamDriver.ReleasePool", {"PoolID": new}) == {}
    assert held(d) == {}


def test_docker_goes_through_the_gate_on_a_joined_host(tmp_path):
    from .test_peers import launch, status
    a = launch(tmp_path, "a")
    sock = tmp_path / "b.sock"
    b = launch(tmp_path, "b", "--peer", a.addr, "--docker-plugin", str(sock),
               "--reuse-delay", "0.5")
    wait_until("a and b to reach each other",
               lambda: len(status(a)["reachable"]) == 1 and len(status(b)["reachable"]) == 1)
    api = Driver(sock)
    # b owns nothing yet: the gateway is claimed from its owner a, and space for an endpoint
    # comes from a as for any allocate.
    pid = api.pool("10.40.0.0/24")
    assert api.address(pid, "", GW) == {"Address": "10.40.0.1/24", "Data": {}}
    c1 = api.address(pid, "", mac(1))["Address"]
    assert held(b) == {"10.40.0.1/24": f"docker/{pid}/gateway",
                       c1: held(b)[c1]} and held(a) == {}
    # b leaves: its Docker driver then refuses to take addresses, naming why; releases pass.
    assert api.release(pid, c1.split("/")[0]) == {}
    assert api("/IpamDriver.ReleasePool", {"PoolID": pid}) == {}
    # (once what it freed is out of quarantine: leave refuses until then)
    wait_until("b to leave", lambda: json.loads(b.cli("leave", "--json").stdout)["ok"])
    me = status(b)["peer"]
    assert api.address(pid, "", GW) == {"Error": f"left: {me} left the cluster"}
    assert api.address(pid, "10.40.0.9", mac(2)) == {"Error": f"left: {me} left the cluster"}
    assert held(b) == {} and status(b)["standing"] == "left"


def test_networks_without_subnet_on_two_hosts_get_disjoint_blocks(tmp_path):
    """Two ipamd of one cluster, each the driver of its own docker daemon: with block space,
    each network without --subnet gets a block (and a tenant) of its own, carved cluster-wide;
    network rm gives it back once its addresses are out of quarantine."""
    from .hook_tenants import block_space
    from .test_peers import joined, status
    (a, b), _ = joined(tmp_path, ["a", "b"], lambda name: (
        "--docker-plugin", str(tmp_path / f"{name}.sock"), "--reuse-delay", "0.5"))
    block_space(a, "198.19.200.0/21")
    wait_until("b to learn the block space", lambda: any(
        u["kind"] == "blocks" for u in status(b)["universes"]), timeout=10)
    apis = [Driver(tmp_path / "a.sock"), Driver(tmp_path / "b.sock")]
    pools = [api("/IpamDriver.RequestPool", {"AddressSpace": "local", "Options": {}})
             for api in apis for _ in range(2)]
    assert all("Error" not in p for p in pools), pools
    blocks = [p["Pool"] for p in pools]
    assert sorted(blocks) == ["198.19.200.0/24", "198.19.201.0/24", "198.19.202.0/24",
                              "198.19.203.0/24"], pools
    for p in pools:
        assert re.fullmatch(rf"ipamd:{re.escape(p['Pool'])}~docker-[0-9a-f]{{12}}-p\d+\.\d+"
                            r"#[0-9a-f]{12}@p\d+\.\d+", p["PoolID"]), p
    # Each network's gateway is its block's first host address, held by nobody; endpoints on
    # both hosts get addresses of their own network's block.
    got = []
    for i, (api, p) in enumerate(zip([apis[0]] * 2 + [apis[1]] * 2, pools)):
        first = p["Pool"].replace(".0/24", ".1/24")
        assert api.address(p["PoolID"], "", GW) == {"Address": first, "Data": {}}
        got.append(api.address(p["PoolID"], "", mac(i))["Address"])
    assert got == [p["Pool"].replace(".0/24", ".2/24") for p in pools]
    assert sorted(held(a)) == got[:2] and sorted(held(b)) == got[2:]
    wait_until("a to show every network's tenant", lambda: sorted(
        bl for t in status(a)["tenants"].values() for bl in t["blocks"]) == sorted(blocks),
        timeout=10)
    # network rm on b: its tenants go once the released addresses are out of quarantine.
    for p in pools[2:]:
        assert apis[1]("/IpamDriver.ReleasePool", {"PoolID": p["PoolID"]}) == {}
    assert held(b) == {}
    wait_until("b's networks' tenants to be deleted", lambda: sorted(
        bl for t in status(a)["tenants"].values() for bl in t["blocks"]) == sorted(blocks[:2]),
        timeout=20)
