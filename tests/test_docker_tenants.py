"""The Docker driver's plans with tenants' blocks (#14), run against the sim (two hosts of one
cluster, each with its own driver state, as each host's ipamd has): networks without --subnet
get blocks of their own from block space, disjoint across hosts; --ipam-opt tenant=NAME takes a
block of the tenant; replays and released networks. tests/test_docker.py and
tests/test_docker_engine.py drive the same over HTTP and from a real docker engine."""
import itertools

import pytest

from appliance.core import messages as m
from appliance.core.addr import cidr
from appliance.protocols import docker_ipam
from appliance.protocols.docker_ipam import DockerError, DriverState, Gone

from .scenario import Cluster
from .test_ranges import _ask as ask

GW = {"RequestAddressType": "com.docker.network.gateway"}
MAC = "com.docker.network.endpoint.macaddress"


class Host:
    """One host's docker driver; `gone`: the docker daemons it may take for gone."""

    def __init__(self, c: Cluster, peer: str):
        counter = itertools.count()
        self.c, self.peer, self.gone = c, peer, set()
        self.state = DriverState(token=lambda: f"{peer[1:]}{next(counter):011x}")

    def plan(self, plan):
        answer = None
        try:
            while True:
                step = plan.send(answer)
                answer = step.owner in self.gone if isinstance(step, Gone) else \
                    ask(self.c, self.peer, step)
        except StopIteration as done:
            return done.value

    def __call__(self, path, body, caller="p100.1"):
        try:
            return self.plan(docker_ipam.call(path, body, self.state, caller))
        except DockerError as e:  # as the shell answers it
            return {"Error": str(e)}

    def pool(self, pool="", caller="p100.1", v6=False, **options):
        return self("/IpamDriver.RequestPool", {"AddressSpace": "local", "Pool": pool,
                                                "Options": options, "V6": v6}, caller)

    def address(self, pool_id, address="", options=None):
        return self("/IpamDriver.RequestAddress", {"PoolID": pool_id, "Address": address,
                                                   "Options": options or {}})

    def held(self) -> dict[str, str]:
        """address (without its prefix) -> handle"""
        return {h.text: h.handle for h in self.c.peers[self.peer].allocator.by_addr.values()}


def world(block_space=True):
    c = Cluster(2, cidr("198.18.0.0/16"))
    c.settle()
    if block_space:
        assert ask(c, "p0", m.AddRange(cidr("10.64.0.0/16"), blocks=True))["ok"]
    return c, Host(c, "p0"), Host(c, "p1")


def tenants(c, peer="p0") -> dict[str, list[str]]:
    return {n: t["blocks"] for n, t in ask(c, peer, m.Status())["tenants"].items()}


def test_networks_without_subnet_on_two_hosts_get_disjoint_blocks_of_their_own():
    c, a, b = world()
    pa, pb = a.pool(), b.pool()
    assert pa == {"PoolID": "ipamd:10.64.0.0/24~docker-000000000001-p100.1"
                            "#000000000001@p100.1", "Pool": "10.64.0.0/24", "Data": {}}
    assert pb["Pool"] == "10.64.1.0/24" and pb["PoolID"] == \
        "ipamd:10.64.1.0/24~docker-100000000001-p100.1#100000000001@p100.1"
    assert tenants(c) == {"docker-000000000001-p100.1": ["10.64.0.0/24"],
                          "docker-100000000001-p100.1": ["10.64.1.0/24"]}
    # The gateway is the block's own: named, held by nobody; endpoints get the block's others.
    assert a.address(pa["PoolID"], options=GW) == {"Address": "10.64.0.1/24", "Data": {}}
    assert a.address(pa["PoolID"], "10.64.0.1", GW) == {"Address": "10.64.0.1/24", "Data": {}}
    ep = a.address(pa["PoolID"], options={MAC: "02:42:00:00:00:01"})["Address"]
    aux = a.address(pa["PoolID"], "10.64.0.200")["Address"]
    assert (ep, aux) == ("10.64.0.2/24", "10.64.0.200/24")
    assert b.address(pb["PoolID"], options={MAC: "02:42:00:00:00:02"}) == \
        {"Address": "10.64.1.2/24", "Data": {}}
    assert a.held() == {"10.64.0.2": f"docker/{pa['PoolID']}/ep/000000000002/"
                        "02:42:00:00:00:01", "10.64.0.200":
                        f"docker/{pa['PoolID']}/addr/10.64.0.200"}
    # The gateway may not be taken by an address request of another role.
    assert a.address(pa["PoolID"], "10.64.0.1") == {"Error": (
        "bad_address: 10.64.0.1 may not be claimed: it is the gateway of tenant "
        "docker-000000000001-p100.1's block 10.64.0.0/24")}
    # network rm: its addresses released; its tenant deleted once their quarantine is over.
    assert a("/IpamDriver.ReleasePool", {"PoolID": pa["PoolID"]}) == {}
    assert a.held() == {}
    assert a.state.doomed == {"docker-000000000001-p100.1"}
    assert "docker-000000000001-p100.1" in tenants(c)
    c.now += 31
    a.plan(docker_ipam.delete_doomed(a.state))
    assert a.state.doomed == set() and a.state.notes == [
        "event=docker_tenant_deleted tenant=docker-000000000001-p100.1"]
    assert tenants(c) == {"docker-100000000001-p100.1": ["10.64.1.0/24"]}
    # A network that never held an address goes at once.
    pc = b.pool()
    assert pc["Pool"] == "10.64.2.0/24"
    b("/IpamDriver.ReleasePool", {"PoolID": pc["PoolID"]})
    assert b.state.doomed == set()
    assert tenants(c) == {"docker-100000000001-p100.1": ["10.64.1.0/24"]}


def test_without_block_space_a_network_gets_a_block_of_the_default_subnet_as_before():
    c, a, b = world(block_space=False)
    pa = a.pool()
    assert pa["Pool"] == "198.18.0.0/24" and "~" not in pa["PoolID"]
    assert a.state.notes == ["event=docker_pool_on_this_host pool=198.18.0.0/24 why='no IPv4 "
                             "block space: ipamd range add CIDR --blocks'"]
    # Each host chooses alone: the overlap that block space removes.
    assert b.pool()["Pool"] == "198.18.0.0/24"
    # IPv6 without IPv6 block space: as before too, next to IPv4 blocks of their own.
    c, a, _ = world()
    assert a.pool(v6=True) == {"Error": "ipamd has no IPv6 range; start it with an IPv6 "
                                        "--iprange, or give the network a --subnet"}
    assert a.pool()["Pool"] == "10.64.0.0/24"


def test_a_named_tenant_gives_blocks_no_live_network_here_uses_and_grows_to_its_limit():
    c, a, b = world()
    assert ask(c, "p1", m.TenantCreate("acme", 26, max_blocks=2))["blocks"] == ["10.64.0.0/26"]
    n1 = a.pool(tenant="acme")
    assert n1["Pool"] == "10.64.0.0/26" and "~acme#" in n1["PoolID"]
    # Another host's network may share the block: the core keeps its addresses apart.
    assert b.pool(tenant="acme")["Pool"] == "10.64.0.0/26"
    n2 = a.pool(tenant="acme")
    assert n2["Pool"] == "10.64.0.64/26"  # grown: the first block is used here
    assert tenants(c)["acme"] == ["10.64.0.0/26", "10.64.0.64/26"]
    assert a.pool(tenant="acme") == {"Error": (
        "limit: every block of tenant acme is used by a network here, and it may not grow: "
        "tenant acme has 2 blocks, its limit (--max-blocks 2)")}
    assert a.address(n2["PoolID"], options=GW)["Address"] == "10.64.0.65/26"
    assert a.address(n2["PoolID"], options={MAC: "02:42:00:00:00:03"})["Address"] == \
        "10.64.0.66/26"
    # Released: the block is free for the next network; the tenant, not the driver's, stays.
    a("/IpamDriver.ReleasePool", {"PoolID": n1["PoolID"]})
    assert a.pool(tenant="acme")["Pool"] == "10.64.0.0/26"
    assert a.state.doomed == set() and "acme" in tenants(c)
    # --subnet with a tenant: one of its blocks, with a --ip-range inside it.
    named = a("/IpamDriver.RequestPool", {"Pool": "10.64.0.64/26", "SubPool": "10.64.0.96/27",
                                          "Options": {"tenant": "acme"}})
    assert named["PoolID"].startswith("ipamd:10.64.0.64/26,10.64.0.96/27~acme#")
    assert a.address(named["PoolID"], options={MAC: "02:42:00:00:00:04"})["Address"] == \
        "10.64.0.96/26"


@pytest.mark.parametrize("pool, options, error", [
    ("10.64.5.0/26", {"tenant": "acme"},
     "bad_subnet: 10.64.5.0/26 is not a block of tenant acme (10.64.0.0/26)"),
    ("", {"tenant": "nobody"}, "no_tenant: no tenant nobody is known; create it first "
                               "(ipamd tenant create)"),
    ("", {"tenant": "Bad Name"}, "--ipam-opt tenant: tenant name 'Bad Name' must be 1 to 63 "
                                 "characters of a-z, 0-9, '.', '_' and '-', starting with a "
                                 "letter or digit"),
    ("", {"tenant": "docker-x"}, "--ipam-opt tenant=docker-x: names starting with docker- are "
                                 "the driver's own (one per network without --subnet)"),
    ("10.64.0.0/26", {}, "pool 10.64.0.0/26 is a block of tenant acme: add --ipam-opt "
                         "tenant=acme"),
    ("10.64.9.0/24", {}, "pool 10.64.9.0/24 lies in block space 10.64.0.0/16: give no "
                         "--subnet, or name a tenant (--ipam-opt tenant=NAME)"),
])
def test_bad_tenant_pools_are_refused_naming_why_and_change_nothing(pool, options, error):
    c, a, _ = world()
    assert ask(c, "p0", m.TenantCreate("acme", 26))["ok"]
    before = tenants(c)
    assert a("/IpamDriver.RequestPool", {"Pool": pool, "Options": options}) == {"Error": error}
    assert tenants(c) == before and a.state.pools == {} and a.held() == {}


def test_a_restarted_daemon_replays_into_the_same_tenant_and_a_live_one_is_refused():
    c, a, _ = world()
    old = a.pool(caller="p100.1")
    ep = a.address(old["PoolID"], options={MAC: "02:42:00:00:00:01"})["Address"]
    tenant = old["PoolID"].split("~")[1].split("#")[0]
    # The same daemon naming the block (a second network on it): refused, nothing changes.
    assert a.pool("10.64.0.0/24", caller="p100.1") == {"Error": (
        f"in_use: pool 10.64.0.0/24 is the block of tenant {tenant}, made for a network of a "
        "docker daemon that is still running")}
    # Restarted: its replay binds a new pool id to the same tenant, and its endpoint moves.
    a.gone.add("p100.1")
    new = a.pool("10.64.0.0/24", caller="p200.2")
    assert new["PoolID"].startswith(f"ipamd:10.64.0.0/24~{tenant}#")
    assert new["PoolID"].endswith("@p200.2")
    assert a.address(new["PoolID"], "10.64.0.1", GW)["Address"] == "10.64.0.1/24"
    assert a.address(new["PoolID"], ep.split("/")[0]) == {"Address": ep, "Data": {}}
    assert a.held() == {"10.64.0.2": f"docker/{new['PoolID']}/ep/000000000002/"
                                     "02:42:00:00:00:01"}
    # Now the restarted daemon's network: a duplicate from it is refused in turn.
    assert "in_use" in a.pool("10.64.0.0/24", caller="p200.2")["Error"]
    assert tenants(c) == {tenant: ["10.64.0.0/24"]}
