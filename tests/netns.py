"""Network namespaces and links made by a test, and removed by it afterwards."""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess

from .conftest import need

BRIDGE_PLUGIN = "/usr/lib/cni/bridge"


def need_netns() -> None:
    need(os.geteuid() == 0, "network namespaces need root")
    need(shutil.which("ip") is not None, "iproute2 is not installed")
    need(os.path.exists(BRIDGE_PLUGIN), "containernetworking-plugins is not installed")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=60)


class Namespaces:
    """Names every namespace and link it makes, so that cleanup() removes exactly those."""

    def __init__(self):
        self.tag = secrets.token_hex(3)
        self.netns: list[str] = []
        self.links: list[str] = []

    def add(self, i: int | str) -> str:
        name = f"ipd-{self.tag}-{i}"
        sh("ip", "netns", "add", name)
        self.netns.append(name)
        return name

    def remove(self, name: str) -> None:
        sh("ip", "netns", "del", name, check=False)
        if name in self.netns:
            self.netns.remove(name)

    def link(self, prefix: str) -> str:
        name = f"{prefix}{self.tag}"[:15]
        self.links.append(name)
        return name

    def cleanup(self) -> None:
        for name in list(self.netns):
            self.remove(name)
        for link in self.links:
            sh("ip", "link", "del", link, check=False)
