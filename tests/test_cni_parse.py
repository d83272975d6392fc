"""CNI parsing and the verbs against bad input: the right error code, nothing allocated."""
import json

import pytest

from appliance import cni_ops
from appliance.core import messages as m
from appliance.core.addr import cidr, parse_addr
from appliance.core.peer import Peer
from appliance.protocols import cni
from appliance.protocols.cni import CniError, parse_call

from .scenario import Cluster
from .test_ranges import _ask as ask

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/c1",
       "CNI_IFNAME": "eth0"}


def conf(**ipam):
    base = {"type": "ipamd", "ranges": [[{"subnet": "198.18.0.0/24"}]]}
    base.update(ipam)
    return {"cniVersion": "1.0.0", "name": "net1", "ipam": base}


def call(env=None, stdin=None, **over):
    return parse_call({**ENV, **(env or {})}, json.dumps(stdin or conf(**over)).encode())


class Host:
    """One peer owning both universes, served through the core's gate as the daemon does."""

    def __init__(self):
        universes = [cidr("198.18.0.0/16"), cidr("2001:2::/64")]
        self.peer, _ = Peer.founder("me", "c", universes, universes[0])
        self.by_handle = self.peer.allocator.by_handle
        self.by_addr = self.peer.allocator.by_addr


def allocator():
    return Host()


def run(a, env=None, stdin=None, **over):
    c = call(env, stdin, **over)
    try:
        req, reply, rows = cni_ops.request_for(c), None, []
    except CniError as e:  # as the daemon answers it
        return json.loads(cni.error_result(e, c.version)), 1, []
    if req is not None:
        ready = a.peer.request("r", req, 1000.0)
        ((_, reply),) = ready.replies
        rows = ready.rows
    out, code = cni_ops.result(c, reply)
    return (json.loads(out) if out else None), code, rows


def test_defaults_match_host_local():
    c = call()
    (r,) = c.range_sets[0]
    assert (r.subnet.addr(r.gateway), r.subnet.addr(r.first), r.subnet.addr(r.last)) == \
        ("198.18.0.1", "198.18.0.1", "198.18.0.254")
    assert c.handle == "cni/net1/c1/eth0" and c.dns == {} and c.routes == []


def test_legacy_single_range_form_and_unknown_fields_ignored():
    stdin = {"cniVersion": "0.4.0", "name": "n", "futureField": {"x": 1},
             "ipam": {"type": "ipamd", "subnet": "198.18.1.0/24", "rangeStart": "198.18.1.10",
                      "rangeEnd": "198.18.1.20", "whatever": True}}
    (r,) = call(stdin=stdin).range_sets[0]
    assert (r.subnet.addr(r.first), r.subnet.addr(r.last)) == ("198.18.1.10", "198.18.1.20")


@pytest.mark.parametrize("env, stdin, code, words", [
    ({"CNI_COMMAND": "FLY"}, None, 4, "unknown CNI_COMMAND"),
    ({"CNI_COMMAND": ""}, None, 4, "unknown CNI_COMMAND"),
    ({"CNI_CONTAINERID": ""}, None, 4, "[CNI_CONTAINERID] missing"),
    ({"CNI_NETNS": ""}, None, 4, "[CNI_NETNS] missing"),
    ({"CNI_IFNAME": ""}, None, 4, "[CNI_IFNAME] missing"),
    ({"CNI_CONTAINERID": "bad/id"}, None, 4, "invalid CNI_CONTAINERID"),
    ({"CNI_IFNAME": "x" * 16}, None, 4, "invalid CNI_IFNAME"),
    ({"CNI_NETNS": "relative"}, None, 4, "absolute path"),
    ({}, b"{bad", 6, "error unmarshall"),
    ({}, b"[]", 6, "not a JSON object"),
    ({}, {"cniVersion": "9.9.9", "name": "n", "ipam": {}}, 1, "incompatible CNI versions"),
    ({}, {"name": "n", "ipam": {}}, 1, "incompatible CNI versions"),
    ({}, {"cniVersion": "1.0.0", "ipam": {}}, 7, "\"name\""),
    ({}, {"cniVersion": "1.0.0", "name": "n"}, 7, "no \"ipam\""),
    ({}, conf(ranges=[]), 7, "ranges"),
    ({}, conf(ranges=[[]]), 7, "non-empty"),
    ({}, conf(ranges=[[{"subnet": "198.18.0.0/33"}]]), 7, "invalid CIDR"),
    ({}, conf(ranges=[[{"subnet": "banana"}]]), 7, "invalid CIDR"),
    ({}, conf(ranges=[[{"gateway": "198.18.0.1"}]]), 7, "needs a \"subnet\""),
    ({}, conf(ranges=[[{"subnet": "198.18.0.0/24", "gateway": "10.0.0.1"}]]), 7, "not in"),
    ({}, conf(ranges=[[{"subnet": "198.18.0.0/24", "rangeStart": "198.18.0.9",
                        "rangeEnd": "198.18.0.3"}]]), 7, "after rangeEnd"),
    ({}, conf(ranges=[[{"subnet": "198.18.0.0/24"}], [{"subnet": "198.18.0.0/25"}]]), 7,
     "range set 0 overlaps with 1"),
    ({}, conf(ranges=[[{"subnet": "198.18.0.0/24"}, {"subnet": "2001:2::/64"}]]), 7,
     "mixes address families"),
    ({}, conf(routes=[{"dst": "nowhere"}]), 7, "routes"),
    ({}, conf(dns={"nameservers": "1.1.1.1"}), 7, "dns.nameservers"),
    ({"CNI_ARGS": "IP=198.19.0.5"}, None, 7, "not in any range set"),
    ({"CNI_COMMAND": "GC"}, None, 7, "valid-attachments"),
])
def test_bad_input_gets_the_right_code_and_allocates_nothing(env, stdin, code, words):
    raw = stdin if isinstance(stdin, bytes) else json.dumps(stdin or conf()).encode()
    with pytest.raises(CniError) as e:
        parse_call({**ENV, **env}, raw)
    assert e.value.code == code and words in e.value.msg + e.value.details


def test_add_dual_stack_with_claims_and_routes():
    a = allocator()
    stdin = conf(ranges=[[{"subnet": "198.18.0.0/24", "gateway": "198.18.0.254"}],
                         [{"subnet": "2001:2::/64"}]],
                 routes=[{"dst": "0.0.0.0/0", "gw": "198.18.0.254"}],
                 dns={"nameservers": ["198.18.0.254"]})
    stdin["runtimeConfig"] = {"ips": ["198.18.0.77/24"]}
    out, code, rows = run(a, stdin=stdin)
    assert code == 0
    assert out == {"cniVersion": "1.0.0",
                   "ips": [{"address": "198.18.0.77/24", "gateway": "198.18.0.254"},
                           {"address": "2001:2::2/64", "gateway": "2001:2::1"}],
                   "routes": [{"dst": "0.0.0.0/0", "gw": "198.18.0.254"}],
                   "dns": {"nameservers": ["198.18.0.254"]}}
    again, _, _ = run(a, stdin=stdin)  # a repeated ADD gives the same result
    assert again == out


def test_old_versions_name_the_ip_version():
    out, _, _ = run(allocator(), stdin={**conf(), "cniVersion": "0.3.1"})
    assert out["ips"] == [{"version": "4", "address": "198.18.0.2/24", "gateway": "198.18.0.1"}]


def test_half_done_add_is_rolled_back():
    a = allocator()
    # The v6 set asks for an address outside every universe: its claim fails after the v4
    # set was served, and the v4 address must be given back.
    stdin = conf(ranges=[[{"subnet": "198.18.0.0/24"}], [{"subnet": "2001:3::/64"}]])
    out, code, rows = run(a, stdin=stdin)
    assert code == 1 and out["code"] == 7 and "range set 1" in out["msg"]
    assert a.by_handle == {} and a.by_addr == {} and rows == []
    # Undone, not released: the v4 address is not in quarantine, so the next ADD gets it.
    assert all(not f for f in a.peer.allocator.freed.values())
    out, code, _ = run(a, stdin=conf())
    assert code == 0 and out["ips"][0]["address"] == "198.18.0.2/24"


def test_exhausted_range_set_refused_and_status_says_50():
    a = allocator()
    small = conf(ranges=[[{"subnet": "198.18.5.0/29", "rangeStart": "198.18.5.2",
                           "rangeEnd": "198.18.5.3"}]])
    for i in range(2):
        assert run(a, env={"CNI_CONTAINERID": f"c{i}"}, stdin=small)[1] == 0
    out, code, _ = run(a, env={"CNI_CONTAINERID": "c9"}, stdin=small)
    assert code == 1 and out["code"] == 100 and "198.18.5.2-198.18.5.3" in out["msg"]
    out, code, _ = run(a, env={"CNI_COMMAND": "STATUS"}, stdin={**small, "cniVersion": "1.1.0"})
    assert (code, out["code"], out["details"]) == (1, 50, "exhausted")
    assert out["msg"] == "set 0: no free address in 198.18.5.0/29 on me or any peer it can reach"


def test_del_check_gc():
    a = allocator()
    for cid in ("a", "b", "c"):
        run(a, env={"CNI_CONTAINERID": cid})
    assert run(a, env={"CNI_COMMAND": "CHECK", "CNI_CONTAINERID": "a"})[1] == 0
    assert run(a, env={"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "a"})[1] == 0
    assert run(a, env={"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "a"})[1] == 0
    out, code, _ = run(a, env={"CNI_COMMAND": "CHECK", "CNI_CONTAINERID": "a"})
    assert (code, out["code"]) == (1, 3)
    gc = {**conf(), "cniVersion": "1.1.0",
          "cni.dev/valid-attachments": [{"containerID": "b", "ifname": "eth0"}]}
    assert run(a, env={"CNI_COMMAND": "GC"}, stdin=gc)[1] == 0
    assert sorted(a.by_handle) == ["cni/net1/b/eth0"]


def test_two_range_sets_in_one_subnet_are_refused():
    stdin = conf(ranges=[[{"subnet": "198.18.0.0/24", "rangeEnd": "198.18.0.9"}],
                         [{"subnet": "198.18.0.0/24", "rangeStart": "198.18.0.10"}]])
    with pytest.raises(CniError) as e:
        call(stdin=stdin)
    assert e.value.code == 7 and e.value.msg == ("range sets 0 and 1 share subnet "
                                                 "198.18.0.0/24; ipamd gives a container one "
                                                 "address per subnet")


def test_an_add_after_the_range_changed_names_what_the_container_holds():
    a = allocator()
    assert run(a, stdin=conf(ranges=[[{"subnet": "198.18.0.0/24", "rangeEnd": "198.18.0.9"}]]))[1] == 0
    out, code, rows = run(a, stdin=conf(ranges=[[{"subnet": "198.18.0.0/24",
                                                  "rangeStart": "198.18.0.100"}]]))
    assert (code, out["code"], rows) == (1, 7, [])
    assert out["msg"] == ("cni/net1/c1/eth0 already holds 198.18.0.2/24, outside range set 0; "
                          "DEL it first")


def test_version_needs_nothing_but_a_version():
    out, code, _ = run(allocator(), env={"CNI_COMMAND": "VERSION"},
                       stdin={"cniVersion": "1.1.0"})
    assert code == 0 and out["supportedVersions"][-1] == "1.1.0"


def test_error_output_shape():
    e = json.loads(cni.error_result(CniError(7, "bad", "why"), "1.0.0"))
    assert e == {"cniVersion": "1.0.0", "code": 7, "msg": "bad", "details": "why"}
    assert parse_addr("198.18.0.1")[0] == 4


def test_two_requested_addresses_for_one_range_set_are_refused():
    a = allocator()
    stdin = conf()
    stdin["runtimeConfig"] = {"ips": ["198.18.0.7", "198.18.0.8"]}
    out, code, rows = run(a, stdin=stdin)
    assert (code, out["code"], out["msg"], rows) == (
        1, 7, "more than one requested IP for range set 0", [])
    assert a.by_addr == {}


def test_the_anchor_is_the_netns_as_canonical_json():
    a = allocator()
    run(a, env={"CNI_NETNS": "/run/netns/x"})
    (held,) = a.by_addr.values()
    assert held.anchor == '{"netns": "/run/netns/x"}'


@pytest.mark.parametrize("ip", ["198.18.0.70/33", "198.18.0.75/abc", "198.18.0.75/", "2001:2::5/129"])
def test_requested_addresses_are_parsed_strictly(ip):
    stdin = conf(ranges=[[{"subnet": "198.18.0.0/24"}], [{"subnet": "2001:2::/64"}]])
    stdin["runtimeConfig"] = {"ips": [ip]}
    with pytest.raises(CniError) as e:
        call(stdin=stdin)
    assert e.value.code == 7 and e.value.msg == f"invalid requested IP address {ip!r}: bad " \
        "prefix length"
    with pytest.raises(CniError) as e:  # and as IP= in CNI_ARGS
        call(env={"CNI_ARGS": f"IP={ip}"})
    assert e.value.code == 7


def test_check_compares_prev_result_with_what_the_container_holds():
    a = allocator()
    out, code, _ = run(a)
    given = out["ips"][0]["address"]
    ok = {**conf(), "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": given}]}}
    assert run(a, env={"CNI_COMMAND": "CHECK"}, stdin=ok)[1] == 0
    wrong = {**conf(), "prevResult": {"cniVersion": "1.0.0",
                                      "ips": [{"address": "198.18.0.99/24"}]}}
    out, code, _ = run(a, env={"CNI_COMMAND": "CHECK"}, stdin=wrong)
    assert (code, out["code"], out["msg"]) == (
        1, 3, f"prevResult has 198.18.0.99/24 but cni/net1/c1/eth0 holds {given}")


def test_del_releases_even_when_the_requested_ip_left_every_range_set():
    a = allocator()
    stdin = conf()
    stdin["runtimeConfig"] = {"ips": ["198.18.0.77"]}
    assert run(a, stdin=stdin)[1] == 0
    moved = conf(ranges=[[{"subnet": "198.18.1.0/24"}]])
    moved["runtimeConfig"] = {"ips": ["198.18.0.77"]}
    out, code, _ = run(a, env={"CNI_COMMAND": "DEL"}, stdin=moved)
    assert (code, out) == (0, None) and a.by_addr == {}


def test_check_names_the_range_set_the_container_holds_nothing_in():
    a = allocator()
    assert run(a)[1] == 0  # an address of 198.18.0.0/24 only
    dual = conf(ranges=[[{"subnet": "198.18.0.0/24"}], [{"subnet": "2001:2::/64"}]])
    out, code, _ = run(a, env={"CNI_COMMAND": "CHECK"}, stdin=dual)
    assert (code, out["code"], out["msg"]) == (1, 3, "cni/net1/c1/eth0 holds no address of "
                                                     "range set 1")
    out, code, _ = run(a, env={"CNI_COMMAND": "CHECK", "CNI_CONTAINERID": "c9"})
    assert (code, out["code"], out["msg"]) == (1, 3, "no address is held for cni/net1/c9/eth0")


# -- tenants ------------------------------------------------------------------------------------

def tenant_conf(tenant="acme", **ipam):
    return {"cniVersion": "1.1.0", "name": "tnet",
            "ipam": {"type": "ipamd", "tenant": tenant, **ipam}}


@pytest.mark.parametrize("ipam, words", [
    (tenant_conf(ranges=[[{"subnet": "198.18.0.0/24"}]])["ipam"],
     'ipam has both "tenant" and "ranges": a tenant\'s addresses come from its blocks only'),
    (tenant_conf(subnet="198.18.0.0/24")["ipam"], 'ipam has both "tenant" and "subnet"'),
    (tenant_conf(7)["ipam"], "ipam.tenant must be a string"),
    (tenant_conf("Acme")["ipam"], "ipam.tenant: tenant name 'Acme' must be 1 to 63 characters"),
    (tenant_conf("")["ipam"], "ipam.tenant: tenant name '' must be"),
    (tenant_conf("a" * 64)["ipam"], "must be 1 to 63 characters"),
])
def test_a_bad_tenant_is_refused_naming_it(ipam, words):
    with pytest.raises(CniError) as e:
        call(stdin={"cniVersion": "1.1.0", "name": "tnet", "ipam": ipam})
    assert e.value.code == 7 and words in e.value.msg, e.value.msg


def test_a_tenant_replaces_the_range_sets_and_its_requested_ip_is_the_cores_to_judge():
    c = call(stdin=tenant_conf(), env={"CNI_ARGS": "IP=10.64.0.9"})
    assert (c.tenant, c.range_sets, c.ips) == ("acme", [], [parse_addr("10.64.0.9")])
    req = cni_ops.request_for(c)
    (alternatives,) = req.sets
    assert alternatives == (m.Claim("cni/tnet/c1/eth0", 4, parse_addr("10.64.0.9")[1], None,
                                    '{"netns": "/run/netns/c1"}', "acme"),)
    two = call(stdin=tenant_conf(), env={"CNI_ARGS": "IP=10.64.0.9,10.64.0.10"})
    with pytest.raises(CniError) as e:
        cni_ops.request_for(two)
    assert (e.value.code, e.value.msg) == (7, "more than one requested IP for tenant acme")
    assert cni_ops.request_for(call(stdin=tenant_conf(), env={"CNI_COMMAND": "STATUS"})) == \
        m.CanServe(())


class Tenants:
    """A host of the sim with block space 10.64.0.0/16 and tenant acme (/29 blocks, at most
    2), the CNI verbs answered as its daemon would."""

    def __init__(self):
        self.c = Cluster(1, cidr("198.18.0.0/24"))
        self.c.settle()
        assert ask(self.c, "p0", m.AddRange(cidr("10.64.0.0/16"), blocks=True))["ok"]
        self.block = ask(self.c, "p0", m.TenantCreate("acme", 29, max_blocks=2))["blocks"][0]

    def __call__(self, cmd, cid="c1", stdin=None, env=None):
        c = parse_call({**ENV, "CNI_COMMAND": cmd, "CNI_CONTAINERID": cid, **(env or {})},
                       json.dumps(stdin or tenant_conf()).encode())
        req = cni_ops.request_for(c)
        out, code = cni_ops.result(c, ask(self.c, "p0", req))
        return (json.loads(out) if out else None), code


def test_tenant_add_check_del_gc_and_a_full_tenant():
    t = Tenants()
    assert t.block == "10.64.0.0/29"
    out, code = t("ADD")
    # The block's prefix and its gateway (its first host address, which nobody is given).
    assert (code, out["ips"]) == (0, [{"address": "10.64.0.2/29", "gateway": "10.64.0.1"}])
    assert t("ADD") == (out, 0)  # again: the same address
    assert t("CHECK", stdin={**tenant_conf(), "prevResult": out}) == (None, 0)
    assert t("STATUS") == (None, 0)
    claimed, code = t("ADD", "c2", env={"CNI_ARGS": "IP=10.64.0.3"})
    assert (code, claimed["ips"]) == (0, [{"address": "10.64.0.3/29", "gateway": "10.64.0.1"}])
    gw, code = t("ADD", "c3", env={"CNI_ARGS": "IP=10.64.0.1"})
    assert (code, gw["code"]) == (1, 7)
    assert gw["msg"] == ("ADD refused (bad_address): 10.64.0.1 may not be claimed: it is the "
                         "gateway of tenant acme's block 10.64.0.0/29")
    held = {h: a for h, a in t.c.peers["p0"].allocator.by_handle.items()}
    assert sorted(held) == ["cni/tnet/c1/eth0", "cni/tnet/c2/eth0"]
    # Full: 5 host addresses in the /29 but its gateway; ADD does not grow the tenant (an
    # operator's `ipamd tenant grow`), and the error says how many blocks it may have.
    got = [t("ADD", f"f{i}") for i in range(5)]
    assert [code for _, code in got] == [0, 0, 0, 1, 1], got
    assert got[3][0]["code"] == 100 and got[3][0]["msg"] == (
        "ADD refused (tenant_full): tenant acme is full: no free address in its 1 block(s) "
        "(10.64.0.0/29) on p0; it may have 2 block(s) (ipamd tenant grow acme)")
    other, code = t("ADD", "x", stdin=tenant_conf("nobody"))
    assert (code, other["code"]) == (1, 7)
    assert other["msg"] == "ADD refused (no_tenant): no tenant nobody with blocks is known here"
    assert t("DEL") == (None, 0)
    out, code = t("CHECK")
    assert (code, out["code"], out["msg"]) == (1, 3, "no address is held for cni/tnet/c1/eth0")
    gc = {**tenant_conf(), "cni.dev/valid-attachments": [{"containerID": "c2", "ifname": "eth0"}]}
    assert t("GC", stdin=gc) == (None, 0)
    assert sorted(t.c.peers["p0"].allocator.by_handle) == ["cni/tnet/c2/eth0"]


def test_check_for_a_tenant_needs_an_address_of_that_tenant():
    t = Tenants()
    assert ask(t.c, "p0", m.TenantCreate("beta", 29))["ok"]
    assert t("ADD", stdin=tenant_conf("beta"))[1] == 0
    out, code = t("CHECK")
    assert (code, out["code"], out["msg"]) == (
        1, 3, "cni/tnet/c1/eth0 holds no address of tenant acme")
    assert t("CHECK", stdin=tenant_conf("beta")) == (None, 0)
