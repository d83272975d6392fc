"""Docker's remote IPAM driver, over HTTP on its unix socket, as libnetwork drives it."""
import http.client
import json
import socket

import pytest

from .daemon_proc import Daemon


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


@pytest.fixture
def docker(tmp_path):
    sock = tmp_path / "plugins" / "ipamd.sock"
    d = Daemon(tmp_path, "--iprange", "198.18.0.0/16", "--iprange", "2001:2::/64",
               "--docker-plugin", str(sock))
    d.start()
    yield d, sock
    d.stop()


def create_network(api, pool="198.18.60.0/24", **extra):
    assert api("/Plugin.Activate") == {"Implements": ["IpamDriver"]}
    assert api("/IpamDriver.GetCapabilities") == {"RequiresMACAddress": False,
                                                  "RequiresRequestReplay": True}
    assert api("/IpamDriver.GetDefaultAddressSpaces") == {
        "LocalDefaultAddressSpace": "local", "GlobalDefaultAddressSpace": "global"}
    return api("/IpamDriver.RequestPool", {"AddressSpace": "local", "Pool": pool, "SubPool": "",
                                           "Options": {}, "V6": False, **extra})


def test_network_lifecycle_and_replay_after_restart(docker):
    d, sock = docker
    api = Driver(sock)
    pool = create_network(api)
    assert pool == {"PoolID": "ipamd:198.18.60.0/24", "Pool": "198.18.60.0/24",
                    "Data": {"com.docker.network.gateway": "198.18.60.1/24"}}
    pid = pool["PoolID"]
    gw = api("/IpamDriver.RequestAddress", {"PoolID": pid, "Address": "", "Options": {
        "RequestAddressType": "com.docker.network.gateway"}})
    assert gw == {"Address": "198.18.60.1/24", "Data": {}}
    # Two containers start: one gets an address chosen by us, one asks for its own.
    c1 = api("/IpamDriver.RequestAddress", {"PoolID": pid, "Address": "", "Options": {}})
    c2 = api("/IpamDriver.RequestAddress", {"PoolID": pid, "Address": "198.18.60.50",
                                            "Options": {}})
    assert c1["Address"] == "198.18.60.2/24" and c2["Address"] == "198.18.60.50/24"
    # Docker restarts and replays what it had: the same answers, nothing new held.
    d.kill()
    d.start()
    api = Driver(sock)
    assert create_network(api) == pool
    for want in (gw, c1, c2):
        opts = {"RequestAddressType": "com.docker.network.gateway"} if want is gw else {}
        assert api("/IpamDriver.RequestAddress", {"PoolID": pid, "Address": want["Address"],
                                                  "Options": opts}) == want
    assert d.call({"op": "status"})["allocations"] == 3
    # Container stops; network is deleted.
    assert api("/IpamDriver.ReleaseAddress", {"PoolID": pid, "Address": "198.18.60.2"}) == {}
    assert api("/IpamDriver.ReleaseAddress", {"PoolID": pid, "Address": "198.18.60.2"}) == {}
    assert api("/IpamDriver.ReleaseAddress", {"PoolID": pid, "Address": "198.18.60.50"}) == {}
    assert api("/IpamDriver.ReleaseAddress", {"PoolID": pid, "Address": "198.18.60.1"}) == {}
    assert api("/IpamDriver.ReleasePool", {"PoolID": pid}) == {}
    assert d.call({"op": "status"})["allocations"] == 0


def test_default_pools_subpool_and_v6(docker):
    d, sock = docker
    api = Driver(sock)
    v4 = create_network(api, pool="")
    assert v4["Pool"] == "198.18.0.0/16"
    v6 = create_network(api, pool="", V6=True)
    assert v6["Pool"] == "2001:2::/64" and v6["Data"]["com.docker.network.gateway"] == \
        "2001:2::1/64"
    narrow = create_network(api, pool="198.18.70.0/24", SubPool="198.18.70.128/25")
    a = api("/IpamDriver.RequestAddress", {"PoolID": narrow["PoolID"], "Address": "",
                                           "Options": {}})
    assert a["Address"] == "198.18.70.128/24"


@pytest.mark.parametrize("endpoint, body, words", [
    ("/IpamDriver.RequestPool", {"Pool": "192.0.2.0/24"}, "overlaps no ipamd range"),
    ("/IpamDriver.RequestPool", {"Pool": "banana"}, "Pool"),
    ("/IpamDriver.RequestPool", {"Pool": "198.18.80.0/24", "SubPool": "198.18.81.0/25"},
     "not inside"),
    ("/IpamDriver.RequestPool", {"Pool": 7}, "must be a string"),
    ("/IpamDriver.RequestAddress", {"PoolID": "nope"}, "unknown PoolID"),
    ("/IpamDriver.RequestAddress", {"PoolID": "ipamd:198.18.60.0/24", "Address": "10.0.0.1"},
     "not in pool"),
    ("/IpamDriver.ReleaseAddress", {"PoolID": "ipamd:198.18.60.0/24", "Address": "x"},
     "Address"),
])
def test_errors_are_named_and_change_nothing(docker, endpoint, body, words):
    d, sock = docker
    api = Driver(sock)
    reply = api(endpoint, body)
    assert words in reply["Error"]
    assert d.call({"op": "status"})["allocations"] == 0


def test_bad_http_and_unknown_endpoints(docker):
    d, sock = docker
    api = Driver(sock)
    assert "no such endpoint" in api("/IpamDriver.Nope", status=404)["Error"]
    api.conn.request("POST", "/IpamDriver.RequestPool", body=b"{not json")
    r = api.conn.getresponse()
    assert r.status == 400 and "not JSON" in json.loads(r.read())["Error"]
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.sendall(b"GARBAGE\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    assert d.call({"op": "status"})["ok"]
