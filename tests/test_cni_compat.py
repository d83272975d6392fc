"""Our CNI results against host-local's for the same config, field for field (addresses aside),
and every verb against bad input through the real forwarder: the right code, nothing allocated."""
import json
import os
import re
import subprocess

import pytest

from .daemon_proc import Daemon
from .netns import need_netns
from .test_cni_e2e import forwarder

HOST_LOCAL = "/usr/lib/cni/host-local"


def run(plugin, command, conf, cid="c1", extra_env=None):
    env = {**os.environ, "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
           "CNI_NETNS": "/var/run/netns/x", "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni",
           **(extra_env or {})}
    r = subprocess.run([plugin], input=json.dumps(conf), capture_output=True, text=True,
                       env=env, timeout=60)
    return r.returncode, r.stdout


def masked(text: str) -> str:
    """The output with every address replaced, so only the shape and the fields are compared."""
    return re.sub(r'"[0-9a-f.:]+(/\d+)?"', lambda m: '"ADDR' + (m.group(1) or "") + '"', text)


@pytest.fixture
def daemon(tmp_path):
    need_netns()  # host-local comes with the CNI plugins
    d = Daemon(tmp_path, "--iprange", "198.18.0.0/16", "--iprange", "2001:2::/64")
    d.start()
    yield d
    d.stop()


CONFIGS = [
    ("1.0.0", [[{"subnet": "198.18.1.0/24"}]], None),
    ("1.0.0", [[{"subnet": "198.18.2.0/24", "gateway": "198.18.2.254"}],
               [{"subnet": "2001:2::/64"}]], [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]),
    ("0.4.0", [[{"subnet": "198.18.3.0/24", "rangeStart": "198.18.3.100",
                 "rangeEnd": "198.18.3.200"}]], [{"dst": "192.0.2.0/24", "gw": "198.18.3.1"}]),
    ("0.3.1", [[{"subnet": "198.18.4.0/24"}], [{"subnet": "2001:2::/64"}]], None),
]


@pytest.mark.parametrize("version, ranges, routes", CONFIGS)
def test_add_output_matches_host_local(daemon, tmp_path, version, ranges, routes):
    outs = []
    for kind, plugin in (("host-local", HOST_LOCAL), ("ipamd", forwarder())):
        ipam = {"type": kind, "ranges": ranges,
                "dataDir": str(tmp_path / "hl"), "socket": str(daemon.socket)}
        if routes:
            ipam["routes"] = routes
        conf = {"cniVersion": version, "name": "compat", "ipam": ipam}
        code, out = run(plugin, "ADD", conf)
        assert code == 0, out
        outs.append(out)
        assert run(plugin, "DEL", conf)[0] == 0
    assert masked(outs[1]) == masked(outs[0])  # the very text, addresses aside
    assert json.loads(outs[1])["ips"][0]["address"].split("/")[1] == \
        json.loads(outs[0])["ips"][0]["address"].split("/")[1]


GOOD = {"cniVersion": "1.1.0", "name": "bad", "ipam": {"type": "ipamd",
                                                     "ranges": [[{"subnet": "198.18.9.0/24"}]]}}
BAD = [
    ("bad JSON", b"{not json", {}, 6),
    ("wrong cniVersion", {**GOOD, "cniVersion": "0.0.1"}, {}, 1),
    ("bad CIDR", {**GOOD, "ipam": {"ranges": [[{"subnet": "198.18.9.0/40"}]]}}, {}, 7),
    ("overlapping ranges", {**GOOD, "ipam": {"ranges": [[{"subnet": "198.18.9.0/24"}],
                                                        [{"subnet": "198.18.9.128/25"}]]}}, {}, 7),
    ("missing env", GOOD, {"CNI_CONTAINERID": "", "CNI_IFNAME": ""}, 4),
]


CASES = [(verb, *bad) for verb in ("ADD", "DEL", "CHECK", "GC", "STATUS") for bad in BAD
         if not (bad[0] == "missing env" and verb in ("GC", "STATUS"))]  # they take none


@pytest.mark.parametrize("verb, what, stdin, env, code", CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_every_verb_refuses_bad_input(daemon, verb, what, stdin, env, code):
    raw = stdin if isinstance(stdin, bytes) else json.dumps(stdin).encode()
    e = {**os.environ, "CNI_COMMAND": verb, "CNI_CONTAINERID": "c1", "CNI_NETNS": "/x",
         "CNI_IFNAME": "eth0", "IPAMD_SOCKET": str(daemon.socket), **env}
    r = subprocess.run([forwarder()], input=raw, capture_output=True, env=e, timeout=60)
    out = json.loads(r.stdout)
    assert r.returncode == 1 and out["code"] == code, out
    assert daemon.call({"op": "status"})["allocations"] == 0


def test_args_cni_ips_and_cni_args_ip_become_claims(daemon):
    conf = {**GOOD, "ipam": {**GOOD["ipam"], "socket": str(daemon.socket)},
            "args": {"cni": {"ips": ["198.18.9.77"]}}}
    code, out = run(forwarder(), "ADD", conf)
    assert code == 0 and json.loads(out)["ips"][0]["address"] == "198.18.9.77/24"
    plain = {**GOOD, "ipam": {**GOOD["ipam"], "socket": str(daemon.socket)}}
    code, out = run(forwarder(), "ADD", plain, "c2", {"CNI_ARGS": "IgnoreUnknown=1;IP=198.18.9.88"})
    assert code == 0 and json.loads(out)["ips"][0]["address"] == "198.18.9.88/24"
