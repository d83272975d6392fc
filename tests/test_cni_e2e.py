"""CNI end to end: Debian's bridge plugin with "ipam": {"type": "ipamd"} into real netns.

Test hosts get addresses from 198.18.0.0/15 (IPv6: 2001:2::/48, the benchmarking range); every
namespace and link the test makes is removed afterwards.
"""
import json
import os
import subprocess
import sys

import pytest

from .daemon_proc import ROOT, Daemon
from .hook_tenants import block_space, tenant
from .netns import BRIDGE_PLUGIN, Namespaces, addresses, need_netns, sh
from .test_frozen import frozen

FORWARDER = ROOT / "dist" / "ipamd-cni"
CONTAINERS = 50


def forwarder() -> str:
    if not FORWARDER.exists():
        subprocess.run(["make", "-C", str(ROOT), "dist/ipamd-cni"], check=True,
                       capture_output=True)
    return str(FORWARDER)


@pytest.fixture
def world(tmp_path):
    need_netns()
    ns = Namespaces()
    d = Daemon(tmp_path, "--iprange", "198.18.0.0/16", "--iprange", "2001:2::/64",
               "--sweep-interval", "0.2")
    d.start()
    plugins = tmp_path / "cni-bin"
    plugins.mkdir()
    (plugins / "bridge").symlink_to(BRIDGE_PLUGIN)
    (plugins / "ipamd").symlink_to(forwarder())
    try:
        yield d, ns, plugins
    finally:
        d.stop()
        ns.cleanup()


def netconf(d, ns, ranges, version="1.0.0", **extra):
    return {"cniVersion": version, "name": f"e2e{ns.tag}", "type": "bridge",
            "bridge": ns.link("ipdbr"), "isGateway": True,
            "ipam": {"type": "ipamd", "socket": str(d.socket), "ranges": ranges}, **extra}


def cni(plugin, command, conf, container="", netns="", ifname="eth0", path=None):
    env = {**os.environ, "CNI_COMMAND": command, "CNI_CONTAINERID": container,
           "CNI_NETNS": f"/var/run/netns/{netns}" if netns else "", "CNI_IFNAME": ifname,
           "CNI_PATH": str(path or "")}
    r = subprocess.run([str(plugin)], input=json.dumps(conf), capture_output=True, text=True,
                       env=env, timeout=60)
    out = json.loads(r.stdout) if r.stdout.strip() else None
    return r.returncode, out, r.stderr


def addresses_in(netns: str) -> set[str]:
    return addresses(netns, "eth0")


def test_fifty_containers_on_a_bridge(world):
    d, ns, plugins = world
    conf = netconf(d, ns, [[{"subnet": "198.18.10.0/24"}]])
    bridge = plugins / "bridge"
    results = {}
    for i in range(CONTAINERS):
        name = ns.add(i)
        code, out, err = cni(bridge, "ADD", conf, f"c{i}", name, path=plugins)
        assert code == 0, (out, err)
        (ip,) = out["ips"]
        assert ip["gateway"] == "198.18.10.1"
        results[name] = (f"c{i}", out)
        assert addresses_in(name) == {ip["address"]}  # configured inside the container
    addresses = [r[1]["ips"][0]["address"].split("/")[0] for r in results.values()]
    assert len(set(addresses)) == CONTAINERS and "198.18.10.1" not in addresses
    for a in addresses:  # reachable from the host over the bridge
        assert sh("ping", "-c", "1", "-W", "2", a, check=False).returncode == 0, a
    for name, (cid, out) in list(results.items())[:5]:
        code, out2, err = cni(bridge, "CHECK", {**conf, "prevResult": out}, cid, name,
                              path=plugins)
        assert code == 0, (out2, err)
    held = {a["handle"] for a in d.call({"op": "list"})["allocations"]}
    assert len(held) == CONTAINERS
    # DEL releases; DEL again succeeds.
    for name, (cid, _) in list(results.items())[:10]:
        assert cni(bridge, "DEL", conf, cid, name, path=plugins)[0] == 0
        assert cni(bridge, "DEL", conf, cid, name, path=plugins)[0] == 0
        assert d.call({"op": "lookup", "handle": f"cni/{conf['name']}/{cid}/eth0"})["ok"] is False
    # GC (CNI 1.1.0; Debian's bridge predates it, so the runtime's call goes to our plugin):
    # keep five of the forty left.
    keep = [cid for cid, _ in list(results.values())[10:15]]
    gc = {**conf, "cniVersion": "1.1.0",
          "cni.dev/valid-attachments": [{"containerID": c, "ifname": "eth0"} for c in keep]}
    assert cni(plugins / "ipamd", "GC", gc)[0] == 0
    left = sorted(a["handle"].split("/")[2] for a in d.call({"op": "list"})["allocations"])
    assert left == sorted(keep)


def test_dual_stack_gives_one_address_of_each_family(world):
    d, ns, plugins = world
    conf = netconf(d, ns, [[{"subnet": "198.18.20.0/24"}], [{"subnet": "2001:2::/64"}]])
    name = ns.add("dual")
    code, out, err = cni(plugins / "bridge", "ADD", conf, "dual", name, path=plugins)
    assert code == 0, (out, err)
    got = [ip["address"] for ip in out["ips"]]
    assert got[0].startswith("198.18.20.") and got[1].startswith("2001:2::")
    assert addresses_in(name) == set(got)


def test_python_and_frozen_cni_modes_answer_like_the_forwarder(world, tmp_path):
    d, ns, plugins = world
    conf = netconf(d, ns, [[{"subnet": "198.18.30.0/24"}]])["ipam"]
    ipam = {"cniVersion": "1.0.0", "name": "modes", "ipam": conf}
    outs = []
    for i, plugin in enumerate([forwarder(), frozen()]):
        code, out, err = cni(plugin, "ADD", ipam, f"m{i}", "x")
        assert code == 0, (out, err)
        outs.append(out)
    python = tmp_path / "ipamd-python"
    python.write_text(f"#!/bin/sh\ncd {ROOT} && exec {sys.executable} -m appliance\n")
    python.chmod(0o755)
    code, out, err = cni(python, "ADD", ipam, "m2", "x")
    assert code == 0, (out, err)
    outs.append(out)
    assert [o["ips"][0]["address"] for o in outs] == \
        ["198.18.30.2/24", "198.18.30.3/24", "198.18.30.4/24"]
    assert all(set(o) == {"cniVersion", "ips", "dns"} for o in outs)


def test_status_is_50_with_the_daemon_stopped(world):
    d, ns, plugins = world
    conf = {"cniVersion": "1.1.0", "name": "st", "ipam": {"type": "ipamd", "socket": str(d.socket),
                                                          "ranges": [[{"subnet": "198.18.40.0/24"}]]}}
    assert cni(plugins / "ipamd", "STATUS", conf)[0] == 0
    d.stop()
    code, out, _ = cni(plugins / "ipamd", "STATUS", conf)
    assert (code, out["code"]) == (1, 50)
    code, out, _ = cni(plugins / "ipamd", "ADD", conf, "x", "y")
    assert (code, out["code"]) == (1, 11) and str(d.socket) in out["details"]


def test_sweeper_releases_when_netns_or_pid_goes(world):
    d, ns, plugins = world
    conf = {"cniVersion": "1.0.0", "name": "sw", "ipam": {"type": "ipamd", "socket": str(d.socket),
                                                          "ranges": [[{"subnet": "198.18.50.0/24"}]]}}
    name = ns.add("sweep")
    assert cni(plugins / "ipamd", "ADD", conf, "s1", name)[0] == 0
    sleeper = subprocess.Popen(["sleep", "600"])
    r = d.cli("allocate", "by-pid", "--anchor-pid", str(sleeper.pid))
    assert r.returncode == 0, r.stderr
    keep = d.cli("allocate", "alive", "--anchor-pid", str(os.getpid()))
    assert keep.returncode == 0
    ns.remove(name)
    sleeper.kill()
    sleeper.wait()
    wait_released(d, ["cni/sw/s1/eth0", "by-pid"])
    assert d.call({"op": "lookup", "handle": "alive"})["ok"]
    assert d.call({"op": "status"})["swept"] == 2


def wait_released(d, handles, timeout=20.0):
    """Until the daemon logs the sweep of each handle (the sweeper runs every 0.2 s)."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = d.stderr()
        if all(f"event=swept handle={h} " in log for h in handles):
            break
        time.sleep(0.1)
    for h in handles:
        assert d.call({"op": "lookup", "handle": h})["ok"] is False, h


def test_a_tenant_network_on_a_bridge_gets_the_blocks_gateway(world):
    """A tenant's block (from block space) through the bridge plugin: the bridge carries the
    block's gateway, each container an address of the block with its prefix."""
    d, ns, plugins = world
    block_space(d, "198.19.240.0/20")
    (block,) = tenant(d, "acme", 28)
    assert block == "198.19.240.0/28"
    conf = {"cniVersion": "1.0.0", "name": f"e2e{ns.tag}", "type": "bridge",
            "bridge": ns.link("ipdbt"), "isGateway": True,
            "ipam": {"type": "ipamd", "socket": str(d.socket), "tenant": "acme"}}
    bridge, got = plugins / "bridge", {}
    for i in range(3):
        name = ns.add(f"t{i}")
        code, out, err = cni(bridge, "ADD", conf, f"t{i}", name, path=plugins)
        assert code == 0, (out, err)
        (ip,) = out["ips"]
        assert ip["gateway"] == "198.19.240.1"
        assert addresses_in(name) == {ip["address"]}
        got[name] = (f"t{i}", out)
    assert sorted(out["ips"][0]["address"] for _, out in got.values()) == \
        ["198.19.240.2/28", "198.19.240.3/28", "198.19.240.4/28"]
    assert addresses(None, conf["bridge"]) == {"198.19.240.1/28"}  # isGateway: the block's
    for _, out in got.values():  # reachable from the host over the bridge
        a = out["ips"][0]["address"].split("/")[0]
        assert sh("ping", "-c", "1", "-W", "2", a, check=False).returncode == 0, a
    held = {a["handle"]: (a["address"], a.get("tenant")) for a in
            d.call({"op": "list"})["allocations"]}
    assert held == {f"cni/{conf['name']}/{cid}/eth0": (out["ips"][0]["address"], "acme")
                    for cid, out in got.values()}
    name, (cid, out) = next(iter(got.items()))
    assert cni(bridge, "CHECK", {**conf, "prevResult": out}, cid, name, path=plugins)[0] == 0
    status = {**conf, "cniVersion": "1.1.0"}
    assert cni(plugins / "ipamd", "STATUS", status)[0] == 0
    assert cni(bridge, "DEL", conf, cid, name, path=plugins)[0] == 0
    assert d.call({"op": "lookup", "handle": f"cni/{conf['name']}/{cid}/eth0"})["ok"] is False
    # An unknown tenant: refused, naming it, nothing held.
    other = ns.add("t9")
    code, out, _ = cni(bridge, "ADD", {**conf, "ipam": {**conf["ipam"], "tenant": "nobody"}},
                       "t9", other, path=plugins)
    assert (code, out["code"]) == (1, 7)
    assert out["msg"] == "ADD refused (no_tenant): no tenant nobody with blocks is known here"
    assert len(d.call({"op": "list"})["allocations"]) == 2
