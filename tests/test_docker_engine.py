"""ipamd as the IPAM driver of a real docker engine (Debian's docker.io), driven by its CLI.

One dockerd for the module (tests/docker_engine.py: its own dirs and socket, vfs, no iptables,
no default bridge), one ipamd with --docker-plugin on a socket of its own name under
/run/docker/plugins. Containers run busybox-static's `sleep`; addresses are read inside them
with busybox `ip`, and from `ipamd ls`. Root only; in CI a missing docker.io is a failure.
"""
from __future__ import annotations

import ipaddress

import pytest

from .daemon_proc import Daemon, wait_until
from .docker_engine import IMAGE, PLUGIN_DIR, Engine, need_docker

V4, V6 = "198.19.0.0/16", "fd00:19::/48"  # inside 198.18.0.0/15; clear of the CNI tests' 198.18


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    need_docker()
    engine = Engine()
    ipamd = None
    try:
        plugin = f"ipamd-test-{engine.tag}"
        ipamd = Daemon(tmp_path_factory.mktemp("ipamd"), "--iprange", V4, "--subnet", V4,
                       "--iprange", V6, "--docker-plugin", str(PLUGIN_DIR / f"{plugin}.sock"))
        ipamd.start()
        engine.start()
        engine.import_image()
        yield engine, ipamd, plugin
    finally:
        engine.close()  # while ipamd runs: docker's network rm asks it to release
        if ipamd is not None:
            ipamd.stop()
        engine.tidy()  # the plugin folder, once ipamd's socket has gone from it


@pytest.fixture
def docker(world):
    engine, ipamd, plugin = world
    yield world
    engine.remove_all()  # whatever a failed test left: gone before the next one starts


def held(ipamd) -> dict[str, str]:
    """address -> handle, from the daemon."""
    return {a["address"]: a["handle"] for a in ipamd.call({"op": "list"})["allocations"]}


def ls(ipamd) -> dict[str, str]:
    """address -> handle, from `ipamd ls` as a user reads it."""
    out = ipamd.cli("ls")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[1:]]
    return {address: handle for handle, address in rows}


def network(engine, plugin, name, *flags):
    engine("network", "create", "--ipam-driver", plugin, *flags, name)


def container(engine, name, net, *flags):
    engine("run", "-d", "--stop-timeout", "1", "--name", name, "--network", net, *flags, IMAGE,
           "/bin/busybox", "sleep", "3600")


def ipam_config(engine, net) -> list[tuple[str, str]]:
    out = engine("network", "inspect", "-f",
                 "{{range .IPAM.Config}}{{.Subnet}} {{.Gateway}};{{end}}", net)
    return [tuple(c.split()) for c in out.split(";") if c]


def gateways(engine, name) -> set[str]:
    """The default routes inside the container: its networks' gateways."""
    out = engine("exec", name, "/bin/busybox", "ip", "-4", "route") + "\n" + \
        engine("exec", name, "/bin/busybox", "ip", "-6", "route")
    return {line.split()[2] for line in out.splitlines() if line.startswith("default via ")}


def mac(engine, name) -> str:
    return engine("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.MacAddress}}{{end}}",
                  name)


def own(ipamd, engine, name) -> set[str]:
    """The addresses ipamd holds for the container (its handles end with its MAC address)."""
    return {a for a, h in held(ipamd).items() if h.endswith("/" + mac(engine, name))}


def in_block(addresses, *blocks) -> bool:
    """One host address (not .0, .1: the gateway) in each block, as the container shows them."""
    nets = [ipaddress.ip_network(b) for b in blocks]
    found = [ipaddress.ip_interface(a) for a in addresses]
    return len(found) == len(nets) and all(
        any(i.network == n and int(i.ip) - int(n.network_address) > 1 for i in found)
        for n in nets)


def pool_of(handle: str) -> str:
    """The pool id in a Docker handle (docker/ipamd:SUBNET#TOKEN@OWNER/ROLE)."""
    head, _, rest = handle.partition("#")
    return head + "#" + rest.split("/")[0]


def role_of(handle: str) -> str:
    return handle[len(pool_of(handle)) + 1:]


def held_when(ipamd, what: str, ok) -> dict[str, str]:
    """Poll ipamd's allocations until ok(them); return them."""
    def check():
        h = held(ipamd)
        return (h,) if ok(h) else None
    return wait_until(what, check, timeout=60, interval=0.1)[0]


def gone_from(ipamd, addresses) -> dict[str, str]:
    return held_when(ipamd, f"ipamd to release {sorted(addresses)}",
                     lambda h: not set(addresses) & set(h))


def test_five_containers_on_networks_with_and_without_subnet(docker):
    engine, ipamd, plugin = docker
    network(engine, plugin, "sub", "--subnet", "198.19.10.0/24")
    network(engine, plugin, "auto")
    assert ipam_config(engine, "sub") == [("198.19.10.0/24",)]  # docker shows what was given
    assert ipam_config(engine, "auto") == [("198.19.0.0/24", "198.19.0.1")]
    names = {"c1": "sub", "c2": "sub", "c3": "sub", "c4": "auto", "c5": "auto"}
    for name, net in names.items():
        container(engine, name, net)
    inside = {name: engine.addresses(name) for name in names}
    assert {n: inside[n] for n in ("c1", "c2", "c3")} == {
        "c1": {"198.19.10.2/24"}, "c2": {"198.19.10.3/24"}, "c3": {"198.19.10.4/24"}}
    # On the default block, freed addresses of earlier tests wait out their quarantine.
    assert in_block(inside["c4"], "198.19.0.0/24") and in_block(inside["c5"], "198.19.0.0/24")
    assert len(set.union(*inside.values())) == 5
    assert {name: gateways(engine, name) for name in names} == {
        name: {"198.19.10.1" if net == "sub" else "198.19.0.1"} for name, net in names.items()}
    table = ls(ipamd)
    assert sorted(table) == sorted(["198.19.10.1/24", "198.19.0.1/24"] +
                                   [a for s in inside.values() for a in s])
    for name, addresses in inside.items():
        (address,) = addresses
        handle = table[address]
        subnet = "198.19.10.0/24" if names[name] == "sub" else "198.19.0.0/24"
        assert handle.startswith(f"docker/ipamd:{subnet}#")
        assert role_of(handle).startswith("ep/") and handle.endswith("/" + mac(engine, name))
    assert role_of(table["198.19.10.1/24"]) == "gateway"
    # docker rm releases that container's address, and only that one.
    engine("rm", "-f", "c2")
    after = gone_from(ipamd, ["198.19.10.3/24"])
    assert after == {a: h for a, h in table.items() if a != "198.19.10.3/24"}
    engine("rm", "-f", "c1", "c3", "c4", "c5")
    assert set(gone_from(ipamd, [a for s in inside.values() for a in s])) == {
        "198.19.10.1/24", "198.19.0.1/24"}
    engine("network", "rm", "sub", "auto")
    assert held(ipamd) == {}


def test_ip_range_gateway_aux_static_and_a_duplicate_ip(docker):
    engine, ipamd, plugin = docker
    network(engine, plugin, "rng", "--subnet", "198.19.20.0/24", "--ip-range",
            "198.19.20.128/25", "--gateway", "198.19.20.254", "--aux-address",
            "a=198.19.20.10", "--aux-address", "b=198.19.20.200")
    assert ipam_config(engine, "rng") == [("198.19.20.0/24", "198.19.20.254")]
    pools = held(ipamd)
    assert {a: role_of(h) for a, h in pools.items()} == {
        "198.19.20.254/24": "gateway", "198.19.20.10/24": "addr/198.19.20.10",
        "198.19.20.200/24": "addr/198.19.20.200"}
    container(engine, "c1", "rng")
    container(engine, "c2", "rng", "--ip", "198.19.20.50")  # outside --ip-range: allowed
    assert engine.addresses("c1") == {"198.19.20.128/24"}  # the range; .200 is an aux address
    assert engine.addresses("c2") == {"198.19.20.50/24"}
    assert gateways(engine, "c1") == gateways(engine, "c2") == {"198.19.20.254"}
    before = held(ipamd)
    holder = before["198.19.20.50/24"]
    assert holder.endswith("/" + mac(engine, "c2"))
    # A second container asking for c2's address is refused, naming the holder.
    for name, address, handle in [("c3", "198.19.20.50", holder),
                                  ("c4", "198.19.20.10", pools["198.19.20.10/24"]),
                                  ("c5", "198.19.20.254", pools["198.19.20.254/24"])]:
        p = engine.run("run", "-d", "--name", name, "--network", "rng", "--ip", address, IMAGE,
                       "/bin/busybox", "sleep", "3600", check=False)
        assert p.returncode == 125
        assert f"in_use: {address} is held by handle '{handle}'" in p.stderr, p.stderr
    assert held(ipamd) == before
    # Removing the refused containers frees nothing of c2's.
    engine("rm", "-f", "c3", "c4", "c5")
    assert held(ipamd) == before
    assert engine.addresses("c2") == {"198.19.20.50/24"}
    engine("rm", "-f", "c1", "c2")
    assert gone_from(ipamd, ["198.19.20.128/24", "198.19.20.50/24"]) == pools
    engine("network", "rm", "rng")  # the gateway and the aux addresses go with the network
    assert held(ipamd) == {}


def test_dual_stack(docker):
    engine, ipamd, plugin = docker
    network(engine, plugin, "ds", "--ipv6", "--subnet", "198.19.30.0/24", "--subnet",
            "fd00:19:0:30::/64")
    network(engine, plugin, "ds-auto", "--ipv6")
    assert ipam_config(engine, "ds-auto") == [("198.19.0.0/24", "198.19.0.1"),
                                              ("fd00:19::/64", "fd00:19::1/64")]
    container(engine, "c1", "ds")
    container(engine, "c2", "ds-auto")
    assert engine.addresses("c1") == {"198.19.30.2/24", "fd00:19:0:30::2/64"}
    assert engine.addresses("c2") == own(ipamd, engine, "c2")
    assert in_block(engine.addresses("c2"), "198.19.0.0/24", "fd00:19::/64")
    assert gateways(engine, "c1") == {"198.19.30.1", "fd00:19:0:30::1"}
    assert gateways(engine, "c2") == {"198.19.0.1", "fd00:19::1"}
    table = ls(ipamd)
    for name in ("c1", "c2"):
        assert all(table[a].endswith("/" + mac(engine, name)) for a in engine.addresses(name))
    assert {a for a, h in table.items() if role_of(h) == "gateway"} == {
        "198.19.30.1/24", "fd00:19:0:30::1/64", "198.19.0.1/24", "fd00:19::1/64"}
    engine("rm", "-f", "c1", "c2")
    engine("network", "rm", "ds", "ds-auto")
    assert held(ipamd) == {}


def test_a_refused_duplicate_network_leaves_the_first_alone(docker):
    engine, ipamd, plugin = docker
    network(engine, plugin, "n1", "--subnet", "198.19.40.0/24")
    container(engine, "c1", "n1")
    before = held(ipamd)
    assert sorted(before) == ["198.19.40.1/24", "198.19.40.2/24"]
    # The bridge driver refuses it after the IPAM calls; docker rolls back with n2's pool id.
    p = engine.run("network", "create", "--ipam-driver", plugin, "--subnet", "198.19.40.0/24",
                   "n2", check=False)
    assert p.returncode == 1 and "networks have overlapping IPv4" in p.stderr, p.stderr
    assert held(ipamd) == before
    # Naming n1's gateway: ipamd refuses it, naming the holder.
    p = engine.run("network", "create", "--ipam-driver", plugin, "--subnet", "198.19.40.0/24",
                   "--gateway", "198.19.40.1", "n3", check=False)
    assert p.returncode == 1
    assert (f"in_use: 198.19.40.1 is held by handle '{before['198.19.40.1/24']}', a pool of a "
            "docker daemon that is still running") in p.stderr, p.stderr
    assert held(ipamd) == before
    assert engine("network", "ls", "--format", "{{.Name}}", "--filter", "type=custom") == "n1"
    assert engine.addresses("c1") == {"198.19.40.2/24"}
    engine("rm", "-f", "c1")
    engine("network", "rm", "n1")
    assert held(ipamd) == {}


def test_ipamd_restarted_while_networks_exist(docker):
    engine, ipamd, plugin = docker
    network(engine, plugin, "n", "--subnet", "198.19.50.0/24", "--gateway", "198.19.50.254")
    container(engine, "c1", "n")
    assert engine.addresses("c1") == {"198.19.50.1/24"}  # .1 is no gateway here
    assert gateways(engine, "c1") == {"198.19.50.254"}
    before = held(ipamd)
    ipamd.kill()
    ipamd.start()
    assert held(ipamd) == before
    container(engine, "c2", "n")
    assert engine.addresses("c2") == {"198.19.50.2/24"}
    engine("rm", "-f", "c1")
    assert set(gone_from(ipamd, ["198.19.50.1/24"])) == {"198.19.50.254/24", "198.19.50.2/24"}
    engine("rm", "-f", "c2")
    engine("network", "rm", "n")
    assert held(ipamd) == {}


def test_dockerd_restarted_without_live_restore(docker):
    engine, ipamd, plugin = docker
    network(engine, plugin, "n", "--subnet", "198.19.60.0/24", "--ip-range", "198.19.60.0/25",
            "--gateway", "198.19.60.254", "--aux-address", "x=198.19.60.100")
    network(engine, plugin, "auto")
    container(engine, "c1", "n")
    container(engine, "c2", "n", "--ip", "198.19.60.50")
    container(engine, "c3", "auto")
    assert [engine.addresses(c) for c in ("c1", "c2")] == [{"198.19.60.1/24"},
                                                           {"198.19.60.50/24"}]
    c3 = engine.addresses("c3")
    assert in_block(c3, "198.19.0.0/24") and c3 == own(ipamd, engine, "c3")
    before = held(ipamd)
    engine.restart(live_restore=False)  # stops the containers: their endpoints go
    kept = ["198.19.60.254/24", "198.19.60.100/24", "198.19.0.1/24"]
    after = held_when(ipamd, "only the networks' own addresses to stay",
                      lambda h: sorted(h) == sorted(kept))
    # Replayed under new pool ids: the same addresses in the same roles, nothing left behind.
    for address in kept:
        assert role_of(after[address]) == role_of(before[address])
        assert pool_of(after[address]) != pool_of(before[address])
    assert ipam_config(engine, "n") == [("198.19.60.0/24", "198.19.60.254")]  # as given
    assert ipam_config(engine, "auto") == [("198.19.0.0/24", "198.19.0.1")]
    engine("start", "c1", "c2", "c3")
    # Freed addresses wait out their quarantine: new endpoints get fresh ones, --ip its own.
    assert [engine.addresses(c) for c in ("c1", "c2")] == [{"198.19.60.2/24"},
                                                           {"198.19.60.50/24"}]
    assert in_block(engine.addresses("c3"), "198.19.0.0/24")
    assert engine.addresses("c3") == own(ipamd, engine, "c3") != c3
    engine("rm", "-f", "c1", "c2", "c3")
    engine("network", "rm", "n", "auto")
    assert held(ipamd) == {}


def test_dockerd_restarted_with_live_restore(docker):
    engine, ipamd, plugin = docker
    engine.restart(live_restore=True)
    try:
        network(engine, plugin, "n", "--subnet", "198.19.70.0/24", "--gateway",
                "198.19.70.254", "--aux-address", "x=198.19.70.9")
        network(engine, plugin, "auto", "--ipv6")
        container(engine, "c1", "n")
        container(engine, "c2", "n", "--ip", "198.19.70.77")
        container(engine, "c3", "auto")
        inside = {c: engine.addresses(c) for c in ("c1", "c2", "c3")}
        assert {c: inside[c] for c in ("c1", "c2")} == {"c1": {"198.19.70.1/24"},
                                                        "c2": {"198.19.70.77/24"}}
        assert in_block(inside["c3"], "198.19.0.0/24", "fd00:19::/64")
        before = held(ipamd)
        pids = {c: engine("inspect", "-f", "{{.State.Pid}}", c) for c in inside}
        engine.restart(live_restore=True)  # the containers keep running
        assert {c: engine("inspect", "-f", "{{.State.Pid}}", c) for c in inside} == pids
        assert {c: engine.addresses(c) for c in inside} == inside
        after = held(ipamd)
        # Each address replayed, moved to its network's new pool id, in its role (the same MAC).
        assert sorted(after) == sorted(before)
        for address, handle in before.items():
            assert role_of(after[address]) == role_of(handle)
            assert pool_of(after[address]) != pool_of(handle)
        old_pools = {pool_of(h) for h in before.values()}
        assert not {pool_of(h) for h in after.values()} & old_pools
        # The live network goes on: a new container gets a new address, a duplicate is refused.
        container(engine, "c4", "n")
        assert engine.addresses("c4") == {"198.19.70.2/24"}
        p = engine.run("run", "-d", "--name", "c5", "--network", "n", "--ip", "198.19.70.77",
                       IMAGE, "/bin/busybox", "sleep", "3600", check=False)
        assert p.returncode == 125
        assert f"in_use: 198.19.70.77 is held by handle '{after['198.19.70.77/24']}'" in p.stderr
        engine("rm", "-f", "c1", "c2", "c3", "c4", "c5")
        engine("network", "rm", "n", "auto")
        assert held(ipamd) == {}
    finally:
        engine.restart(live_restore=False)


def test_networks_without_subnet_from_two_hosts_drivers_never_overlap(docker, tmp_path):
    """Two ipamd of one cluster, each a docker IPAM driver (as on two hosts; here both serve
    this one engine, whose bridge driver refuses overlapping networks): with block space,
    each network without --subnet gets a block of its own. Without it, both drivers would
    choose the default subnet's first /24, and docker would refuse the second network."""
    from .hook_tenants import block_space
    from .test_peers import joined, status
    engine, _, plugin = docker
    names = {h: f"{plugin}-{h}" for h in ("a", "b")}
    hosts = []
    try:
        hosts, _ = joined(tmp_path, ["a", "b"], lambda h: (
            "--docker-plugin", str(PLUGIN_DIR / f"{names[h]}.sock"), "--reuse-delay", "0.5"))
        a, b = hosts
        block_space(a, "198.19.200.0/21")
        wait_until("b to learn the block space", lambda: any(
            u["kind"] == "blocks" for u in status(b)["universes"]), timeout=10)
        for h, d in zip("ab", hosts):
            for i in (1, 2):
                network(engine, names[h], f"{h}{i}")
        subnets = {n: ipam_config(engine, n) for n in ("a1", "a2", "b1", "b2")}
        blocks = sorted(c[0][0] for c in subnets.values())
        assert blocks == [f"198.19.20{i}.0/24" for i in range(4)], subnets
        for n, ((subnet, gateway),) in subnets.items():
            assert gateway == subnet.replace(".0/24", ".1")
            container(engine, f"c-{n}", n)
            assert engine.addresses(f"c-{n}") == {subnet.replace(".0/24", ".2/24")}
            assert gateways(engine, f"c-{n}") == {gateway}
        assert sorted(held(a)) == sorted(c[0][0].replace(".0/24", ".2/24")
                                         for n, c in subnets.items() if n[0] == "a")
        engine.remove_all()
        assert held(a) == held(b) == {}
        wait_until("the networks' tenants to be deleted",
                   lambda: status(a)["tenants"] == {} and status(b)["tenants"] == {},
                   timeout=30)
    finally:
        engine.remove_all()  # while the drivers run: network rm asks them
        for d in hosts:
            d.stop()
