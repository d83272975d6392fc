"""Fed garbage, the daemon keeps every address it should (issue: starved, flooded and fed
garbage): requests naming subnets or addresses no range gives, peer addresses that cannot be
dialled, and IPv6 ranges whose counts do not fit in 64 bits."""
import json
import os
import subprocess

import pytest

from appliance.client import Unreachable
from appliance.core import messages as m
from appliance.core.addr import AddrError, cidr, parse_addr, parse_hostport
from appliance.core.peer import Peer

from .conftest import need
from .daemon_proc import PYTHON_IPAMD, ROOT, wait_until
from .test_gate_hosts import launch_ranges
from .test_peers import status

V4, V6 = cidr("198.18.0.0/24"), cidr("2001:db8::/64")


def host():
    peer, _ = Peer.founder("me", "c", [V4, V6], V4)
    return peer


def ask(peer, req):
    ((_, reply),) = peer.request("r", req, 1000.0).replies
    return reply


@pytest.mark.parametrize("req, code, words", [
    (m.Claim("x", *parse_addr("8.8.8.8"), cidr("8.8.8.0/24")), "bad_subnet",
     "subnet 8.8.8.0/24 is neither the default subnet 198.18.0.0/24 nor inside an allocation "
     "range (198.18.0.0/24, 2001:db8::/64)"),
    (m.Claim("x", *parse_addr("255.255.255.255"), cidr("255.255.255.255/32")), "bad_subnet",
     "subnet 255.255.255.255/32 is neither"),
    (m.Claim("x", *parse_addr("::ffff:198.18.0.5"), cidr("::ffff:198.18.0.0/120")),
     "bad_subnet", "subnet ::ffff:c612:0/120 is neither"),
    (m.Claim("x", *parse_addr("::ffff:198.18.0.5")), "bad_address",
     "::ffff:c612:5 lies in no allocation range"),
    (m.Allocate("x", cidr("0.0.0.0/0")), "bad_subnet", "subnet 0.0.0.0/0 is neither"),
    (m.Allocate("x", cidr("198.18.0.0/23")), "bad_subnet", "subnet 198.18.0.0/23 is neither"),
    (m.Claim("x", *parse_addr("198.18.0.0")), "reserved", "network or broadcast"),
])
def test_claims_and_subnets_no_range_gives_are_refused(req, code, words):
    peer = host()
    reply = ask(peer, req)
    assert not reply["ok"] and reply["error"]["code"] == code, reply
    assert words in reply["error"]["message"], reply
    assert peer.allocator.by_addr == {}


def test_ipv4_mapped_form_of_a_held_address_is_refused():
    peer, _ = Peer.founder("me", "c", [V4, cidr("::ffff:198.18.0.0/120")], V4)
    assert ask(peer, m.Claim("a", *parse_addr("198.18.0.5")))["ok"]
    reply = ask(peer, m.Claim("b", *parse_addr("::ffff:198.18.0.5")))
    assert reply == m.error("bad_address", "::ffff:c612:5 is an IPv4-mapped IPv6 address; claim "
                            "the IPv4 address 198.18.0.5")


@pytest.mark.parametrize("text", ["peer1..example.com:6786", "a" * 64 + ".example.com:1",
                                  "-a.example.com:1", "x_y:1", "[not-an-ip]:1", "a b:1",
                                  "h:65536", "h:-1", "h"])
def test_undiallable_peer_addresses_are_refused(text):
    with pytest.raises(AddrError):
        parse_hostport(text)


def test_launch_refuses_a_bad_peer_with_exit_2(tmp_path):
    r = subprocess.run([*PYTHON_IPAMD, "launch", "--data-dir", str(tmp_path), "--peer",
                        "peer1..example.com:6786"], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    assert r.returncode == 2 and "neither an IP address nor a valid DNS name" in r.stderr, r
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "ipamd.db").exists()


@pytest.mark.parametrize("ranges", [["fd00:1::/48"], ["fd00:2::/56"], ["fd00:3::/32"],
                                    ["198.18.20.0/24", "2001:db8::/32"]])
def test_ipv6_ranges_wider_than_a_64_travel_between_hosts(tmp_path, ranges):
    a = launch_ranges(tmp_path, "a", ranges)
    b = launch_ranges(tmp_path, "b", ranges, "--peer", a.addr)
    v6 = ranges[-1]
    r = b.call({"op": "allocate", "handle": "first", "subnet": v6})  # needs a donation
    assert r["ok"] and r["address"].endswith("/" + v6.split("/")[1]), r
    r = b.call({"op": "claim", "handle": "mine", "address": v6.split("/")[0] + "99"})
    assert r["ok"], r
    wait_until("one ring", lambda: status(a)["ring_digest"] == status(b)["ring_digest"])
    for d in (a, b):
        assert d.proc.poll() is None, d.stderr()
        assert "Traceback" not in d.stderr() and "encode_failed" not in d.stderr()
    shares = status(a)["universes"][-1]["peers"]
    assert all(0 <= v["free_hint"] <= v["owned"] for v in shares.values()), shares
    assert json.dumps(shares)  # counts above 2^64 are plain JSON integers


def _start_time(pid: int) -> int:
    from pathlib import Path
    return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[19])


def test_idle_connections_on_every_listener_cannot_starve_the_daemon(tmp_path):
    """Under a low descriptor limit, hundreds of idle connections on each listener in turn:
    each listener refuses what is over its cap, the sweeper keeps the live container's
    address (and still frees a dead one's), and everything answers once they close."""
    import socket

    from .daemon_proc import Daemon
    from .test_peers import SECRET, free_ports
    (tmp_path / "secret").write_text(SECRET)
    metrics_port, peer_port = free_ports(2)
    d = Daemon(tmp_path, "--iprange", "198.18.30.0/24", "--sweep-interval", "0.2",
               "--metrics", f"127.0.0.1:{metrics_port}", "--listen", f"127.0.0.1:{peer_port}",
               "--secret-file", str(tmp_path / "secret"),
               "--docker-plugin", str(tmp_path / "docker.sock"),
               command=["prlimit", "--nofile=256:256", *PYTHON_IPAMD])
    d.start()
    live = subprocess.Popen(["sleep", "600"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        for handle, p in (("live", live.pid), ("dead", dead.pid)):
            anchor = {"pid": p, "start_time": _start_time(live.pid)} if p == live.pid else \
                {"pid": p}
            assert d.call({"op": "allocate", "handle": handle, "anchor": anchor})["ok"]
        wait_until("the dead one swept", lambda: d.call({"op": "status"})["swept"] == 1)

        def tcp(port):
            return socket.create_connection(("127.0.0.1", port), timeout=5)

        def unix(path):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(path))
            return s
        for what, connect in (("metrics", lambda: tcp(metrics_port)),
                              ("peer", lambda: tcp(peer_port)),
                              ("hook", lambda: unix(d.socket)),
                              ("docker", lambda: unix(tmp_path / "docker.sock"))):
            held = []
            try:
                for _ in range(300):
                    try:
                        held.append(connect())
                    except OSError:
                        break  # the backlog is full: refused early, as it should be
                wait_until(f"{what} connections over the cap refused",
                           lambda: f"event={what}_connection_refused" in d.stderr())
                if what != "hook":  # (with the hook socket full, status must wait)
                    assert d.call({"op": "status"})["ok"]
                else:
                    # A CNI ADD meanwhile: "try again later" once its deadline passes, not a
                    # hang (the subprocess timeout only guards the test itself).
                    code, out = _cni_add(d.socket, {"IPAMD_CNI_TIMEOUT": "2"})
                    assert code == 1 and out["code"] == 11, out
            finally:
                for s in held:
                    s.close()
            # Answered once the daemon has seen them close: a connection it accepts before
            # that is still over the cap, and closed at once (the client sees a reset).
            r = wait_until(f"a lookup answered after the {what} connections closed",
                           lambda: _answered(d, {"op": "lookup", "handle": "live"}), timeout=10)
            assert r["ok"] and r["addresses"][0]["address"] == "198.18.30.1/24", r
            assert d.proc.poll() is None, d.stderr()
        assert d.call({"op": "status"})["swept"] == 1  # the live container kept its address
        assert "Traceback" not in d.stderr()
    finally:
        live.kill()
        live.wait()
        d.stop()


def _answered(d, request):
    """The daemon's reply, or None if it closed the connection unanswered (over its cap)."""
    try:
        return d.call(request)
    except Unreachable:
        return None


def _cni_add(sock, env):
    from .test_gate_hosts import forwarder
    conf = {"cniVersion": "1.1.0", "name": "starved",
            "ipam": {"type": "ipamd", "socket": str(sock), "ranges": [[{"subnet":
                                                                          "198.18.30.0/24"}]]}}
    r = subprocess.run([forwarder()], input=json.dumps(conf), capture_output=True, text=True,
                       timeout=60, env={**os.environ, **env, "CNI_COMMAND": "ADD",
                                        "CNI_CONTAINERID": "c1", "CNI_NETNS": "/x",
                                        "CNI_IFNAME": "eth0", "CNI_PATH": "/x"})
    return r.returncode, json.loads(r.stdout)


def test_descriptor_budget_and_flood_summaries(caplog):
    from appliance import limits
    assert limits.caps(256) == {"hook": 76, "peer": 57, "docker": 28, "metrics": 16}
    assert limits.caps(1 << 20) == {"hook": 512, "peer": 1024, "docker": 64, "metrics": 16}
    assert min(limits.caps(10).values()) == 2  # never none at all
    now = [0.0]
    s = limits.Summary("x_refused", clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="ipamd"):
        for i in range(3500):
            s.note("failed authentication" if i % 2 else "not an ipamd peer hello")
        now[0] = 11.0
        s.note("failed authentication")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["event=x_refused reason='not an ipamd peer hello'",
                     "event=x_refused reason='failed authentication'",
                     "event=x_refused count=3498 reason='more of the reasons above'",
                     "event=x_refused reason='failed authentication'"], lines
    assert s.count == 3501


@pytest.mark.parametrize("which", ["--socket", "--docker-plugin"])
def test_a_socket_path_naming_a_regular_file_is_refused_and_the_file_kept(tmp_path, which):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    argv = [*PYTHON_IPAMD, "launch", "--data-dir", str(tmp_path / "data"),
            "--iprange", "198.18.40.0/24"]
    argv += [which, str(victim)] + (["--socket", str(tmp_path / "s")] if which != "--socket"
                                    else [])
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode != 0 and f"{victim} exists and is not a socket; not removing it" in \
        r.stderr, r
    assert "Traceback" not in r.stderr and victim.read_text() == "keep me"


def test_a_socket_folder_another_user_owns_is_refused(tmp_path):
    import os
    need(os.geteuid() == 0, "needs root to give a folder to another user")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 12345, 12345)
    r = subprocess.run([*PYTHON_IPAMD, "launch", "--data-dir", str(tmp_path / "data"),
                        "--iprange", "198.18.40.0/24", "--socket", str(theirs / "ipamd.sock")],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 1 and f"{theirs} belongs to uid 12345, not to this user (uid 0)" \
        in r.stderr, r
    assert not (theirs / "ipamd.sock").exists()
