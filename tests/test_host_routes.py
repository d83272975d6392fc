"""The launch check of ranges against the host's routes and addresses (appliance/host_routes.py).

The real daemon is launched inside a network namespace whose routes and addresses the test
sets (pyroute2), so the refusals below are what an operator sees. Test hosts' interfaces have
addresses from 198.18.0.0/15 and 2001:2::/48; every namespace is removed afterwards.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from appliance import host_routes
from appliance.core.addr import cidr

from .daemon_proc import ROOT, Daemon
from .netns import Namespaces, add_address, need_root, rtnl, set_up
from .test_frozen import frozen

HINT = "; pass --allow-route-overlap if this is intended"


# -- what counts (pure) ------------------------------------------------------------------------

NAMES = {1: "lo", 2: "eth1", 3: "eth2"}
ADDRS = [("127.0.0.1", 8, 1), ("::1", 128, 1), ("198.18.0.2", 24, 2), ("fe80::1", 64, 2),
         ("10.33.0.5", 16, 3)]
ROUTES = [  # family, dst, dst_len, type, proto, oifs, gateway
    (4, None, 0, 1, 3, [2], "198.18.0.1"),           # default
    (6, None, 0, 1, 3, [2], "2001:2::1"),            # default
    (4, "169.254.0.0", 16, 1, 3, [2], None),         # link-local
    (6, "fe80::", 64, 1, 2, [2], None),              # link-local, the kernel's
    (4, "198.18.0.0", 24, 1, 2, [2], None),          # the kernel's, for an address
    (4, "10.33.0.0", 16, 1, 2, [3], None),           # the kernel's, for an address
    (4, "10.40.0.0", 16, 1, 3, [2, 3], "198.18.0.9"),  # multipath
    (4, "10.41.0.0", 16, 6, 3, [], None),            # blackhole
    (6, "fd00:32:0:5::", 64, 1, 3, [3], None),
]


def test_only_what_this_host_routes_elsewhere_counts():
    host = host_routes.host_nets(NAMES, ADDRS, ROUTES)
    found = host_routes.overlaps([cidr("10.32.0.0/11"), cidr("fd00:32::/48"),
                                  cidr("10.64.0.0/16")], host)
    assert host_routes.describe(found) == (
        "range 10.32.0.0/11 overlaps address 10.33.0.5/16 on eth2, "
        "route 10.40.0.0/16 via 198.18.0.9 dev eth1,eth2, route blackhole 10.41.0.0/16 "
        "on this host; range fd00:32::/48 overlaps route fd00:32:0:5::/64 dev eth2 on this host")


def test_default_loopback_and_link_local_never_count():
    host = host_routes.host_nets(NAMES, ADDRS, ROUTES)
    assert host_routes.overlaps([cidr("127.0.0.0/16"), cidr("169.254.0.0/24"),
                                 cidr("fe80::/64"), cidr("::1/128"), cidr("11.0.0.0/8"),
                                 cidr("2001:db8::/32")], host) == {}


def test_unreadable_routes_are_logged_and_the_launch_goes_on(monkeypatch, caplog):
    def refused():
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(host_routes, "_dump", refused)
    with caplog.at_level(logging.WARNING, logger="ipamd"):
        host_routes.check_ranges([cidr("10.32.0.0/12")], allow=False)
    assert [r.getMessage() for r in caplog.records] == [
        "event=route_check_skipped reason=\"cannot read this host's routes (PermissionError: "
        "[Errno 1] Operation not permitted); ranges are not checked against them\""]


# -- the real daemon in a namespace ------------------------------------------------------------

@pytest.fixture
def host():
    """A namespace standing for a host: eth1 (a veth whose peer stays inside) with 198.18.0.2/24 and
    2001:2::2/64, default routes through it, and lo."""
    need_root()
    ns = Namespaces()
    try:
        name = ns.add("rt")
        ns.veth(name, "eth1", name, "wire")  # (this kernel may lack dummy links)
        set_up(name, "lo")
        add_address(name, "eth1", "198.18.0.2/24")
        add_address(name, "eth1", "2001:2::2/64")
        route(name, "0.0.0.0/0", gateway="198.18.0.1")
        route(name, "::/0", gateway="2001:2::1")
        yield name
    finally:
        ns.cleanup()


def route(ns: str, dst: str, **how) -> None:
    with rtnl(ns) as ipr:
        if "gateway" not in how and "type" not in how:
            how["oif"] = ipr.link_lookup(ifname="eth1")[0]
        ipr.route("add", dst=dst, **how)


def launch(ns: str, tmp_path, *flags: str) -> subprocess.CompletedProcess:
    """A launch expected to be refused: it ends by itself."""
    return subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "appliance", "launch",
         "--data-dir", str(tmp_path / "data"), "--socket", str(tmp_path / "ipamd.sock"),
         *flags], capture_output=True, text=True, cwd=ROOT, timeout=60)


def daemon(ns: str, directory, *flags: str) -> Daemon:
    directory.mkdir(exist_ok=True)
    return Daemon(directory, *flags, route_check=True,
                  command=["ip", "netns", "exec", ns, sys.executable, "-m", "appliance"])


def refused(r: subprocess.CompletedProcess, message: str) -> None:
    assert (r.returncode, r.stdout, r.stderr) == (1, "", f"ipamd: {message}{HINT}\n")


@pytest.mark.parametrize("setup, flags, message", [
    ({"route": "10.40.0.0/16"}, ["--iprange", "10.32.0.0/12"],
     "range 10.32.0.0/12 overlaps route 10.40.0.0/16 dev eth1 on this host"),
    ({"address": "10.33.0.5/16"}, ["--iprange", "10.32.0.0/12"],
     "range 10.32.0.0/12 overlaps address 10.33.0.5/16 on eth1 on this host"),
    ({"route": "fd00:32:0:5::/64"}, ["--iprange", "10.32.0.0/12", "--iprange", "fd00:32::/48"],
     "range fd00:32::/48 overlaps route fd00:32:0:5::/64 dev eth1 on this host"),
    ({"route": "10.0.0.0/8"}, ["--iprange", "10.32.0.0/12"],   # a route wider than the range
     "range 10.32.0.0/12 overlaps route 10.0.0.0/8 dev eth1 on this host"),
    ({"route": "10.40.0.0/16"}, ["--iprange", "10.32.0.0/16", "--subnet", "10.32.0.0/12"],
     "range 10.40.0.0/13 overlaps route 10.40.0.0/16 dev eth1 on this host"),  # static space
], ids=["route", "address", "ipv6", "wider-route", "static-space"])
def test_a_new_range_overlapping_the_host_is_refused(host, tmp_path, setup, flags, message):
    if "route" in setup:
        route(host, setup["route"])
    else:
        add_address(host, "eth1", setup["address"])
    refused(launch(host, tmp_path, *flags), message)
    # Nothing was taken: the same database is refused again, not started on its ranges.
    refused(launch(host, tmp_path, *flags), message)


def test_the_frozen_executable_reads_the_routes_too(host, tmp_path):
    route(host, "10.40.0.0/16")
    r = subprocess.run(["ip", "netns", "exec", host, frozen(), "launch",
                        "--data-dir", str(tmp_path / "data"), "--socket",
                        str(tmp_path / "ipamd.sock"), "--iprange", "10.32.0.0/12"],
                       capture_output=True, text=True, timeout=60)
    refused(r, "range 10.32.0.0/12 overlaps route 10.40.0.0/16 dev eth1 on this host")


def test_several_overlaps_are_named_together(host, tmp_path):
    add_address(host, "eth1", "10.33.0.5/16")
    route(host, "10.40.0.0/16", gateway="198.18.0.9")
    route(host, "10.41.0.0/16", type="blackhole")
    refused(launch(host, tmp_path, "--iprange", "10.32.0.0/12"),
            "range 10.32.0.0/12 overlaps address 10.33.0.5/16 on eth1, route 10.40.0.0/16 via "
            "198.18.0.9 dev eth1, route blackhole 10.41.0.0/16 on this host")


def test_allow_route_overlap_launches_and_logs_the_overlap(host, tmp_path):
    route(host, "10.40.0.0/16")
    d = daemon(host, tmp_path, "--iprange", "10.32.0.0/12", "--allow-route-overlap")
    d.start()
    try:
        assert d.call({"op": "allocate", "handle": "web-1"})["address"] == "10.32.0.1/12"
    finally:
        d.stop()
    assert ("event=route_overlap_allowed overlaps='range 10.32.0.0/12 overlaps route "
            "10.40.0.0/16 dev eth1 on this host'") in d.stderr()


def test_routes_elsewhere_default_and_link_local_do_not_block(host, tmp_path):
    route(host, "10.64.0.0/16")
    route(host, "169.254.0.0/16")
    route(host, "fd00:33::/64")
    d = daemon(host, tmp_path, "--iprange", "10.32.0.0/12", "--iprange", "fd00:32::/48")
    assert "ranges=10.32.0.0/12,fd00:32::/48 " in d.start()
    d.stop()
    assert "event=route" not in d.stderr()


def test_a_restart_is_not_judged_by_the_routes_of_its_own_containers(host, tmp_path):
    d = daemon(host, tmp_path / "a", "--iprange", "10.32.0.0/12")
    d.start()
    assert d.call({"op": "allocate", "handle": "web-1"})["address"] == "10.32.0.1/12"
    d.stop()
    # What a CNI bridge of ours installs: the gateway of a subnet of the range, and its route.
    ns = Namespaces()
    try:
        ns.bridge(host, "cni0")
        add_address(host, "cni0", "10.32.0.254/24")
        d.start()
        assert d.call({"op": "lookup", "handle": "web-1"})["addresses"][0]["address"] == \
            "10.32.0.1/12"
        d.stop()
        # A new database is judged: the range is not ours there yet.
        refused(launch(host, tmp_path / "b", "--iprange", "10.32.0.0/12"),
                "range 10.32.0.0/12 overlaps address 10.32.0.254/24 on cni0 on this host")
    finally:
        ns.cleanup()


def test_range_add_is_judged_by_this_hosts_routes_before_anything_is_submitted(host, tmp_path):
    d = daemon(host, tmp_path, "--iprange", "10.32.0.0/12")
    d.start()
    try:
        route(host, "10.50.0.0/16")
        before = d.call({"op": "status"})
        r = d.cli("range", "add", "10.50.0.0/24", "--json")
        assert r.returncode == 1 and json.loads(r.stdout)["error"] == {
            "code": "route_overlap",
            "message": "range 10.50.0.0/24 overlaps route 10.50.0.0/16 dev eth1 on this host"
                       + HINT}
        after = d.call({"op": "status"})
        assert [u["range"] for u in after["universes"]] == ["10.32.0.0/12"]
        assert after["ring_digest"] == before["ring_digest"]  # nothing reached the core
        r = d.cli("range", "add", "10.50.0.0/24", "--allow-route-overlap")
        assert (r.returncode, r.stdout) == (0, "added 10.50.0.0/24 to the cluster's ranges\n")
        assert d.call({"op": "allocate", "handle": "x", "subnet": "10.50.0.0/24"})["address"] \
            == "10.50.0.1/24"
        r = d.cli("range", "add", "10.60.0.0/24")  # no route there: no flag needed
        assert (r.returncode, r.stdout) == (0, "added 10.60.0.0/24 to the cluster's ranges\n")
    finally:
        d.stop()
    assert ("event=route_overlap_allowed overlaps='range 10.50.0.0/24 overlaps route "
            "10.50.0.0/16 dev eth1 on this host'") in d.stderr()
