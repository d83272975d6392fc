"""Network namespaces and links made by a test, and removed by it afterwards (pyroute2).

Every namespace and link is made through netlink, so a failure is a NetlinkError naming the
errno instead of an `ip` exit status; what is made is recorded first, so cleanup() removes it
even when a test fails midway, and Namespaces.live lets conftest remove what a test that
crashed before its own cleanup left."""
from __future__ import annotations

import errno
import os
import secrets
import shutil
import subprocess
from contextlib import contextmanager

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from .conftest import need

BRIDGE_PLUGIN = "/usr/lib/cni/bridge"


def need_root() -> None:
    need(os.geteuid() == 0, "network namespaces need root")


def need_netns() -> None:
    need_root()
    need(shutil.which("ip") is not None, "iproute2 is not installed (ip netns exec)")
    need(os.path.exists(BRIDGE_PLUGIN), "containernetworking-plugins is not installed")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=60)


@contextmanager
def rtnl(ns: str | None = None):
    """An IPRoute in namespace ns (None: ours)."""
    with IPRoute(netns=ns) if ns else IPRoute() as ipr:
        yield ipr


def index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LookupError(f"no link {ifname!r}")
    return found[0]


def set_up(ns: str | None, ifname: str, up: bool = True) -> None:
    with rtnl(ns) as ipr:
        ipr.link("set", index=index(ipr, ifname), state="up" if up else "down")


def add_address(ns: str | None, ifname: str, cidr: str) -> None:
    address, prefixlen = cidr.split("/")
    with rtnl(ns) as ipr:
        ipr.addr("add", index=index(ipr, ifname), address=address, prefixlen=int(prefixlen))


def addresses(ns: str | None, ifname: str, scope: int = 0) -> set[str]:
    """The addresses on ifname of the given scope (0: global) as ADDRESS/PREFIXLEN."""
    with rtnl(ns) as ipr:
        return {f"{a.get('address')}/{a['prefixlen']}"
                for a in ipr.addr("dump", index=index(ipr, ifname)) if a["scope"] == scope}


class Namespaces:
    """Names every namespace and link it makes, so that cleanup() removes exactly those."""

    live: list[Namespaces] = []  # not cleaned up yet; conftest cleans what a test left

    def __init__(self):
        self.tag = secrets.token_hex(3)
        self.netns: list[str] = []
        self.links: list[str] = []
        Namespaces.live.append(self)

    def add(self, i: int | str) -> str:
        name = f"ipd-{self.tag}-{i}"
        self.netns.append(name)  # first: a create that fails halfway is still removed
        netns.create(name)
        return name

    def remove(self, name: str) -> None:
        """Unmount and unlink the namespace; the kernel frees it (and its links) once no
        process is left in it. Gone already is fine."""
        try:
            netns.remove(name)
        except FileNotFoundError:
            pass
        if name in self.netns:
            self.netns.remove(name)

    def link(self, prefix: str) -> str:
        """A name for a link in our own namespace (made by the test or a plugin it runs)."""
        name = f"{prefix}{self.tag}"[:15]
        self.links.append(name)
        return name

    def bridge(self, ns: str | None, ifname: str) -> None:
        with rtnl(ns) as ipr:
            ipr.link("add", ifname=ifname, kind="bridge")
            ipr.link("set", index=index(ipr, ifname), state="up")

    def veth(self, ns: str, ifname: str, peer_ns: str, peer: str,
             master: str | None = None) -> None:
        """A veth pair made inside ns, its peer end moved to peer_ns at once (nothing passes
        through our namespace); ifname joins bridge master, and both ends go up."""
        with rtnl(ns) as ipr:
            ipr.link("add", ifname=ifname, kind="veth",
                     peer={"ifname": peer, "net_ns_fd": peer_ns})
            extra = {"master": index(ipr, master)} if master else {}
            ipr.link("set", index=index(ipr, ifname), state="up", **extra)
        set_up(peer_ns, peer)

    def cleanup(self) -> None:
        for name in list(self.netns):
            self.remove(name)
        if self.links:
            with rtnl() as ipr:
                for link in self.links:
                    try:
                        ipr.link("del", index=index(ipr, link))
                    except LookupError:
                        pass  # never made, or gone with its namespace
                    except NetlinkError as e:
                        if e.code != errno.ENODEV:
                            raise
        self.links = []
        if self in Namespaces.live:
            Namespaces.live.remove(self)
