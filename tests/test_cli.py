"""The command line: client commands, launch refusals, `ipamd sql`."""
import json
import re
import subprocess

import apsw
import pytest

from .daemon_proc import PYTHON_IPAMD, ROOT, Daemon


def ipamd(*args, **kw):
    return subprocess.run([*PYTHON_IPAMD, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, **kw)


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path, "--iprange", "10.1.0.1/16")
    d.start()
    yield d
    d.stop()


def test_client_commands(daemon):
    r = daemon.cli("allocate", "web-1")
    assert (r.returncode, r.stdout) == (0, "10.1.0.1/16\n")
    r = daemon.cli("allocate", "db-1", "--subnet", "10.1.8.0/24", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["address"] == "10.1.8.1/24"
    assert daemon.cli("claim", "legacy-1", "10.1.5.5").stdout == "10.1.5.5/16\n"
    assert daemon.cli("lookup", "web-1").stdout == "10.1.0.1/16\n"
    ls = daemon.cli("ls").stdout.splitlines()
    assert ls[0].split() == ["HANDLE", "ADDRESS"] and len(ls) == 4
    assert "legacy-1  10.1.5.5/16" in ls
    status = daemon.cli("status").stdout
    assert "3 addresses held by 3 handles" in status and "10.1.0.0/16" in status
    assert json.loads(daemon.cli("status", "--json").stdout)["universes"][0]["allocated"] == 3
    assert daemon.cli("release", "web-1").stdout == "released 10.1.0.1/16\n"
    assert daemon.cli("release", "web-1").returncode == 0  # idempotent


def test_status_shows_reserved_gateways_and_who_holds_them(daemon):
    r = daemon.call({"op": "allocate", "handle": "ctr-1", "subnet": "10.1.9.0/24",
                     "gateway": "10.1.9.1"})
    assert r["ok"] and r["address"] == "10.1.9.2/24", r
    lines = daemon.cli("status").stdout.splitlines()
    at = lines.index(f"{'RESERVED':<28}HELD BY")
    assert lines[at + 1] == f"{'10.1.9.1':<28}handle ctr-1"
    assert daemon.cli("release", "ctr-1").returncode == 0
    assert "RESERVED" not in daemon.cli("status").stdout  # released with its holder


def test_error_reply_exit_code_and_message(daemon):
    r = daemon.cli("claim", "x", "10.2.0.1")
    assert r.returncode == 1 and r.stderr.startswith("ipamd: bad_address: 10.2.0.1")
    r = daemon.cli("lookup", "nobody", "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["code"] == "not_found"


def test_ready_line_and_weave_form_notice(daemon):
    assert "ranges=10.1.0.0/16" in daemon.ready_line
    assert "--iprange 10.1.0.1/16 taken as 10.1.0.0/16" in daemon.stderr()


def test_daemon_not_running(tmp_path):
    r = ipamd("allocate", "x", "--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 3
    assert "cannot reach the ipamd daemon" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, words", [
    (["--iprange", "10.0.0.0/8", "--iprange", "10.1.0.0/16"], "overlap"),
    (["--iprange", "banana"], "not a CIDR block"),
    (["--iprange", "10.0.0.0/8", "--subnet", "192.168.0.0/16"], "overlaps no allocation range"),
    (["--reuse-delay", "-1"], "between 0 and a year"),
    (["--durability", "never"], "invalid choice"),
    (["--gateway", "10.0.0.999"], "not an IPv4 or IPv6 address"),
    (["--nickname", "bad\tname"], "argument --nickname/--name: 'bad\\tname': a nickname may not "
                                   "hold spaces or control characters"),
    (["--nickname", "x" * 65], "a nickname is at most 64 characters, this one has 65"),
    (["--name", ""], "a nickname must be a non-empty string"),
])
def test_launch_rejects_bad_arguments(tmp_path, args, words):
    r = ipamd("launch", "--data-dir", str(tmp_path / "d"), "--socket", str(tmp_path / "s"), *args)
    assert r.returncode in (1, 2) and words in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "d" / "ipamd.db").exists()


def test_launch_refuses_foreign_database(tmp_path):
    (tmp_path / "d").mkdir()
    c = apsw.Connection(str(tmp_path / "d" / "ipamd.db"))
    c.execute("CREATE TABLE t (x)")
    c.close()
    r = ipamd("launch", "--data-dir", str(tmp_path / "d"), "--socket", str(tmp_path / "s"))
    assert r.returncode == 1 and "another application" in r.stderr
    assert "Traceback" not in r.stderr


def test_second_daemon_on_same_data_dir_is_refused(daemon):
    r = ipamd("launch", "--data-dir", str(daemon.db.parent), "--socket",
              str(daemon.dir / "other.sock"))
    assert r.returncode == 1 and "already running" in r.stderr
    r = ipamd("launch", "--data-dir", str(daemon.dir / "other"), "--socket", str(daemon.socket))
    assert r.returncode == 1 and "already serving" in r.stderr
    assert daemon.cli("status").returncode == 0


def test_sql_shell_reads_while_daemon_runs(daemon):
    daemon.cli("allocate", "web-1")
    r = ipamd("sql", str(daemon.db), "SELECT handle, address FROM held")
    assert r.returncode == 0 and "web-1" in r.stdout and "10.1.0.1/16" in r.stdout


def test_help_names_every_command():
    out = ipamd("--help").stdout
    for cmd in ("launch", "allocate", "claim", "release", "lookup", "ls", "status", "sql",
                "range", "tenant", "lease-block", "names", "lease-name", "claim-name"):
        assert re.search(rf"\n    {cmd}( |\n)", out), cmd


def test_free_is_what_allocate_can_take_now_and_big_counts_fit_their_column(daemon):
    assert daemon.cli("allocate", "q").returncode == 0
    assert daemon.cli("release", "q").returncode == 0  # in quarantine now
    (u,) = json.loads(daemon.cli("status", "--json").stdout)["universes"]
    assert (u["allocated"], u["quarantined"], u["free"]) == (0, 1, u["owned"] - 1)
    row = next(x for x in daemon.cli("status").stdout.splitlines()
               if x.startswith("10.1.0.0/16 "))
    assert row.split()[1:] == [str(u["owned"]), "0", "1", str(u["owned"] - 1)]
    from appliance.cli import _count
    assert [_count(n) for n in (0, 99_999_999_999, 2**64, 2**64 - 2)] == \
        ["0", "99999999999", "1.84e19", "1.84e19"]


@pytest.mark.parametrize("argv", [["status"], ["sql", "-", "WITH RECURSIVE c(x) AS (SELECT 1 "
                                   "UNION ALL SELECT x + 1 FROM c LIMIT 200000) SELECT x FROM c"]])
def test_a_reader_that_goes_away_ends_the_command_quietly(daemon, argv):
    """`ipamd status | head`, `ipamd sql DB "..." | head`: no traceback, no error line."""
    argv = [a if a != "-" else str(daemon.db) for a in argv]
    p = subprocess.Popen([*PYTHON_IPAMD, *argv, "--socket", str(daemon.socket)]
                         if argv[0] == "status" else [*PYTHON_IPAMD, *argv],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    p.stdout.close()  # the reader is gone before the command writes
    err = p.stderr.read()
    p.wait(timeout=60)
    assert err == b"" and p.returncode == -13, (p.returncode, err)  # killed by SIGPIPE


def test_peers_and_status_show_nicknames_in_columns_and_a_dash_when_unknown(capsys):
    from appliance.cli import _show
    # A reply of a daemon from before nicknames: none known, "-" shown.
    reply = {"peer": "p1", "members": ["p1", "p2"], "reachable": ["p2"], "removed": {"p3": "p1"}}
    _show("peers", reply)
    assert capsys.readouterr().out.splitlines() == [
        "p1  -         this peer", "p2  -         reachable", "p3  -         removed by p1"]
    long = "n" * 64
    reply["nicknames"] = {"p1": long, "p2": "host-2"}
    _show("peers", reply)
    assert capsys.readouterr().out.splitlines() == [
        f"p1  {long}  this peer", f"p2  {'host-2':<66}reachable", f"p3  {'-':<66}removed by p1"]
    # status: IPv6-sized counts and a long nickname keep every column in its place.
    peers = {"p1": {"owned": 2**64, "free_hint": 2**63, "reachable": True},
             "p2": {"owned": 2**64, "free_hint": 0, "reachable": False}}
    reply.update(standing="member", note="", cluster="c", default_subnet="fd00::/63",
                 reuse_delay=30.0, allocations=2**64 - 1, handles=3, pending=0, conflicts=0,
                 universes=[{"range": "fd00::/63", "owned": 2**65, "allocated": 2**64 - 1,
                             "quarantined": 12_345_678_901_234, "free": 2**64 + 1,
                             "ring_entries": 2, "peers": peers}])
    _show("status", reply)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"peer p1 {long}  member  cluster c"
    head, row = lines[2:4]
    assert head == "RANGE                              OWNED   ALLOCATED  QUARANTINED        FREE"
    assert row == "fd00::/63                        3.69e19     1.84e19      1.23e13     1.84e19"
    ends = [[m.end() for m in re.finditer(r"\S+", line)][1:] for line in (head, row)]
    assert ends[0] == ends[1]  # each count ends under its header
    at = lines.index("fd00::/63: 2 ring entries")
    assert lines[at + 1:at + 4] == [
        f"  {'PEER':<18}{'NICKNAME':<66}   SHARE    FREE  STATE",
        f"  {'p1':<18}{long:<66}   50.0%   50.0%  this peer",
        f"  {'p2':<18}{'host-2':<66}   50.0%    0.0%  unreachable"]
    assert not any(line.startswith("handing over") for line in lines)
    # After a leave whose handover p2 has not acknowledged yet.
    reply.update(standing="left", note="p1 left the cluster", handing_over=["p2"])
    _show("status", reply)
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == ("handing over: p2 host-2 not acknowledged yet (sent again every "
                        "second: stop this host once none is)")


def test_range_commands_are_the_hook_ops():
    from appliance.cli import _request, build_parser
    parse = build_parser().parse_args
    assert _request(parse(["range", "add", "10.40.0.0/16"])) == {
        "v": 1, "op": "range_add", "range": "10.40.0.0/16", "allow_route_overlap": False}
    assert _request(parse(["range", "add", "fd40::/64", "--allow-route-overlap"])) == {
        "v": 1, "op": "range_add", "range": "fd40::/64", "allow_route_overlap": True}
    assert _request(parse(["range", "retire", "10.40.0.0/16"])) == {
        "v": 1, "op": "range_retire", "range": "10.40.0.0/16", "undo": False}
    assert _request(parse(["range", "unretire", "10.40.0.0/16", "--json"])) == {
        "v": 1, "op": "range_retire", "range": "10.40.0.0/16", "undo": True}
    assert _request(parse(["range", "ls"])) == {"v": 1, "op": "status"}


def test_range_output(capsys):
    from appliance.cli import _show
    _show("range add", {"ok": True, "range": "10.40.0.0/16"})
    _show("range add", {"ok": True, "range": "10.40.0.0/16", "already": True})
    _show("range retire", {"ok": True, "range": "10.40.0.0/16", "retired": True})
    _show("range unretire", {"ok": True, "range": "10.40.0.0/16", "retired": False})
    assert capsys.readouterr().out.splitlines() == [
        "added 10.40.0.0/16 to the cluster's ranges",
        "10.40.0.0/16 is a range of the cluster already",
        "retired 10.40.0.0/16: no new allocations there; addresses held stay",
        "10.40.0.0/16 takes allocations again"]
    universes = [
        {"range": "10.32.0.0/12", "kind": "range", "retired": False, "allocated": 3,
         "free": 1048570, "static": False},
        {"range": "10.40.0.0/16", "kind": "range", "retired": True, "allocated": 2,
         "free": 0, "static": False},
        {"range": "10.0.0.0/11", "kind": "static", "retired": False, "allocated": 1,
         "free": 0, "static": True},
        {"range": "fd40::/64", "kind": "range", "retired": False, "allocated": 0,
         "free": 2**64 - 1, "static": False}]
    _show("range ls", {"ok": True, "universes": universes})
    assert capsys.readouterr().out.splitlines() == [
        "RANGE                       KIND    STATE          IN USE        FREE",
        "10.32.0.0/12                range   active              3     1048570",
        "10.40.0.0/16                range   retired             2           0",
        "10.0.0.0/11                 static  active              1           0",
        "fd40::/64                   range   active              0     1.84e19"]
    # A daemon from before ranges online says neither kind nor retired.
    _show("range ls", {"ok": True, "universes": [
        {"range": "10.0.0.0/11", "static": True, "allocated": 1, "free": 0}]})
    assert capsys.readouterr().out.splitlines()[1] == \
        "10.0.0.0/11                 static  active              1           0"


def test_range_help_and_bad_arguments(tmp_path):
    out = ipamd("--help").stdout
    assert re.search(r"\n    range +add, retire or list the cluster's allocation ranges", out)
    r = ipamd("range", "--help")
    assert r.returncode == 0
    assert [line.split()[0] for line in r.stdout.splitlines()
            if re.match(r"    (add|retire|unretire|ls) ", line)] == \
        ["add", "retire", "unretire", "ls"]
    r = ipamd("range")
    assert r.returncode == 2 and "the following arguments are required: ACTION" in r.stderr
    r = ipamd("range", "add", "banana", "--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 2 and "'banana' is not a CIDR block" in r.stderr
    # Weave's form is taken as its network, as --iprange is, with a notice; then the daemon
    # (absent here) is asked.
    r = ipamd("range", "add", "10.40.0.1/16", "--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 3
    assert r.stderr.startswith("ipamd: notice: range 10.40.0.1/16 taken as 10.40.0.0/16\n")


def test_tenant_block_and_name_commands_are_the_hook_ops():
    from appliance.cli import _request, build_parser
    parse = build_parser().parse_args
    assert _request(parse(["range", "add", "10.64.0.0/16", "--blocks"])) == {
        "v": 1, "op": "range_add", "range": "10.64.0.0/16", "allow_route_overlap": False,
        "blocks": True}
    assert _request(parse(["tenant", "create", "acme", "--prefix-len", "24"])) == {
        "v": 1, "op": "tenant_create", "tenant": "acme", "prefix_len": 24, "family": 4,
        "max_blocks": 1}
    assert _request(parse(["tenant", "create", "acme", "--prefix-len", "56", "--ipv6",
                           "--max-blocks", "3", "--range", "fd64::/48"])) == {
        "v": 1, "op": "tenant_create", "tenant": "acme", "prefix_len": 56, "family": 6,
        "max_blocks": 3, "range": "fd64::/48"}
    assert _request(parse(["tenant", "grow", "acme", "--range", "10.64.0.0/16"])) == {
        "v": 1, "op": "tenant_grow", "tenant": "acme", "range": "10.64.0.0/16"}
    assert _request(parse(["tenant", "delete", "acme", "--force"])) == {
        "v": 1, "op": "tenant_delete", "tenant": "acme", "force": True}
    for view in (["tenant", "ls"], ["tenant", "show", "acme"], ["names", "ls"]):
        assert _request(parse(view)) == {"v": 1, "op": "status"}
    assert _request(parse(["allocate", "w", "--tenant", "acme"])) == {
        "v": 1, "op": "allocate", "handle": "w", "tenant": "acme"}
    assert _request(parse(["claim", "w", "10.64.0.9", "--tenant", "acme"])) == {
        "v": 1, "op": "claim", "handle": "w", "address": "10.64.0.9", "tenant": "acme"}
    assert _request(parse(["lease-block", "vpn", "--prefix-len", "20"])) == {
        "v": 1, "op": "lease_block", "handle": "vpn", "prefix_len": 20, "family": 4}
    assert _request(parse(["names", "create", "web", "web-{000..999}"])) == {
        "v": 1, "op": "names_create", "pool": "web", "pattern": "web-{000..999}"}
    assert _request(parse(["lease-name", "h", "--pool", "web", "--anchor-netns", "/x"])) == {
        "v": 1, "op": "lease_name", "handle": "h", "pool": "web", "anchor": {"netns": "/x"}}
    assert _request(parse(["claim-name", "h", "web-007"])) == {
        "v": 1, "op": "claim_name", "handle": "h", "pool": None, "name": "web-007"}


def test_tenant_bad_arguments(tmp_path):
    sock = str(tmp_path / "none.sock")
    r = ipamd("tenant", "create", "acme", "--socket", sock)
    assert r.returncode == 2 and "the following arguments are required: --prefix-len" in r.stderr
    r = ipamd("tenant", "create", "acme", "--prefix-len", "65", "--socket", sock)
    assert r.returncode == 2 and "'65' is not a prefix length" in r.stderr
    r = ipamd("tenant", "create", "acme", "--prefix-len", "24", "--max-blocks", "0")
    assert r.returncode == 2 and "'0' is not a number of blocks" in r.stderr
    r = ipamd("lease-name", "h", "--socket", sock)
    assert r.returncode == 2 and "the following arguments are required: --pool" in r.stderr
    r = ipamd("tenant", "--help")
    assert r.returncode == 0 and "estimated from the free-space hints" in " ".join(r.stdout.split())


# A status reply of host p1 in a cluster of p1 and p2: tenant acme with two blocks (p2 owns
# part of the first), a leased block, pool web.
STATUS = {
    "ok": True, "peer": "p1", "nicknames": {"p1": "h1", "p2": "h2"},
    "tenants": {"acme": {"family": 4, "prefix_len": 24, "max_blocks": 3, "within": None,
                         "key": "fdff:ffff:ffff:ffff:ba52:cebc::/96",
                         "blocks": ["10.64.0.0/24", "10.64.1.0/24"]}},
    "leases": {"10.64.16.0/20": "vpn"},
    "pools": {"web": {"pattern": "web-{000..199}", "size": 200,
                      "universe": "fdff:ffff:ffff:ffff:3198:ff88::/96"}},
    "universes": [
        {"range": "10.64.0.0/24", "kind": "block", "for": "acme", "allocated": 3, "peers": {
            "p1": {"owned": 128, "free_hint": 128, "reachable": True},
            "p2": {"owned": 128, "free_hint": 100, "reachable": True}}},
        {"range": "10.64.1.0/24", "kind": "block", "for": "acme", "allocated": 0, "peers": {
            "p1": {"owned": 256, "free_hint": 256, "reachable": True}}},
        {"range": "fdff:ffff:ffff:ffff:3198:ff88::/96", "kind": "names", "for": "web",
         "allocated": 2, "peers": {
             "p1": {"owned": 2**31, "free_hint": 2**31, "reachable": True},
             "p2": {"owned": 2**31, "free_hint": 2**31 - 40, "reachable": False}}}]}


def test_tenant_and_names_views_from_status(capsys):
    from appliance.cli import _show
    from appliance.cli_tenants import json_view, pool_of
    from appliance.cli import build_parser
    parse = build_parser().parse_args
    _show("tenant ls", STATUS)
    assert capsys.readouterr().out.splitlines() == [
        "TENANT              FAMILY  SIZE     BLOCKS    IN USE  BLOCK LIST",
        "acme                IPv4    /24         2/3       ~31  10.64.0.0/24 10.64.1.0/24",
        "block 10.64.16.0/20 leased to vpn"]
    _show("tenant show", STATUS, parse(["tenant", "show", "acme"]))
    assert capsys.readouterr().out.splitlines() == [
        "tenant acme: IPv4 /24 blocks, 2 of at most 3, from any block space; 31 address(es) "
        "in use", "",
        "10.64.0.0/24  gateway 10.64.0.1",
        "  PEER              NICKNAME    IN USE",
        "  p1                h1               3  this peer",
        "  p2                h2             ~28", "",
        "10.64.1.0/24  gateway 10.64.1.1",
        "  PEER              NICKNAME    IN USE",
        "  p1                h1               0  this peer"]
    view = json_view("tenant show", parse(["tenant", "show", "acme"]), STATUS)
    assert view["blocks"][0] == {"block": "10.64.0.0/24", "gateway": "10.64.0.1",
                                 "in_use": {"p1": 3, "p2": 28}, "estimated": ["p2"]}
    _show("names ls", STATUS)
    assert capsys.readouterr().out.splitlines() == [
        "POOL                PATTERN                             SIZE    IN USE      HERE",
        "web                 web-{000..199}                       200        42         2"]
    assert pool_of("web-007", STATUS) == "web"
    from appliance.cli_tenants import Refused
    with pytest.raises(Refused) as e:
        pool_of("db-1", STATUS)
    assert e.value.reply["error"] == {"code": "no_pool", "message":
                                      "no name pool makes 'db-1' (pools: web (web-{000..199}))"}
    two = dict(STATUS, pools={**STATUS["pools"], "all": {
        "pattern": "web-{000..999}", "size": 1000, "universe": "fdff:ffff:ffff:ffff:1::/96"}})
    with pytest.raises(Refused) as e:
        pool_of("web-007", two)
    assert e.value.reply["error"]["message"] == \
        "'web-007' is a name of pools all, web: name one with --pool"
    with pytest.raises(Refused) as e:
        json_view("tenant show", parse(["tenant", "show", "nope"]), STATUS)
    assert e.value.reply["error"] == {"code": "no_tenant",
                                      "message": "no tenant nope is known to p1"}


def test_tenants_blocks_and_names_on_one_daemon(tmp_path):
    d = Daemon(tmp_path, "--iprange", "10.1.0.0/24")
    d.start()
    try:
        def ok(*args) -> str:
            r = d.cli(*args)
            assert r.returncode == 0, r
            return r.stdout
        assert ok("range", "add", "10.64.0.0/16", "--blocks") == \
            "added 10.64.0.0/16 to the cluster's ranges\n"
        assert ok("tenant", "create", "acme", "--prefix-len", "24") == \
            "created tenant acme with block 10.64.0.0/24\n"
        assert ok("allocate", "w1", "--tenant", "acme") == "10.64.0.2/24\n"
        assert ok("names", "create", "web", "web-{000..009}") == \
            "created pool web: 10 names (web-{000..009})\n"
        assert ok("claim-name", "n1", "web-007") == "web-007\n"  # its pool found by pattern
        assert ok("lease-name", "n2", "--pool", "web") == "web-000\n"
        assert ok("lookup", "n1") == "web-007\n"
        r = d.cli("claim-name", "n3", "db-1", "--json")
        assert r.returncode == 1 and json.loads(r.stdout)["error"]["code"] == "no_pool"
        r = d.cli("tenant", "delete", "acme")
        assert r.returncode == 1 and r.stderr.startswith("ipamd: in_use: ") and \
            "10.64.0.2 held by handle 'w1'" in r.stderr, r
        assert ok("release", "n1") == "released web-007\n"
        assert ok("lease-block", "vpn", "--prefix-len", "20") == "vpn holds 10.64.16.0/20\n"
        status = ok("status").splitlines()
        assert [line.split()[0] for line in status if line.startswith("10.64.")
                and "(" in line] == ["10.64.0.0/16", "10.64.0.0/24", "10.64.16.0/20"]
        assert any(line.startswith("10.64.0.0/24 (block of acme)") for line in status)
        assert f"{'acme':<28}10.64.0.0/24 (1 of at most 1 /24)" in status
        assert f"{'10.64.16.0/20':<28}vpn" in status
        view = json.loads(ok("tenant", "show", "acme", "--json"))
        assert view["blocks"][0]["in_use"] == {d.call({"op": "status"})["peer"]: 1}
        r = ipamd("sql", str(d.db), "SELECT block, leased_to, name FROM blocks ORDER BY block")
        assert r.stdout == "10.64.0.0/24|tenant|acme\n10.64.16.0/20|handle|vpn\n", r
        assert ok("release", "vpn") == "released 10.64.16.0/20\n"
        r = ipamd("sql", str(d.db), "SELECT state, cidr, args FROM carved ORDER BY cidr")
        assert r.returncode == 0, r
        # The lease was given back: the carved view no longer has it.
        assert r.stdout.splitlines() == [
            "range|10.1.0.0/24|", "blocks|10.64.0.0/16|", "block|10.64.0.0/24|acme",
            "names|fdff:ffff:ffff:ffff:3198:ff88::/96|web web-{000..009}",
            "tenant|fdff:ffff:ffff:ffff:ba52:cebc::/96|acme 4 24 1"], r
        r = ipamd("sql", str(d.db), "SELECT tenant, key, blocks FROM tenants")
        assert r.stdout == "acme|fdff:ffff:ffff:ffff:ba52:cebc::/96|10.64.0.0/24\n", r
        r = ipamd("sql", str(d.db), "SELECT block, leased_to, name FROM blocks")
        assert r.stdout == "10.64.0.0/24|tenant|acme\n", r
        r = ipamd("sql", str(d.db), "SELECT handle, address FROM held ORDER BY handle")
        assert r.stdout == "n2|fdff:ffff:ffff:ffff:3198:ff88:0:1/96\nw1|10.64.0.2/24\n", r
    finally:
        d.stop()


def test_launch_refuses_an_address_both_held_and_freed_and_writes_nothing(tmp_path):
    d = Daemon(tmp_path, "--iprange", "10.9.0.0/24")
    d.start()
    assert d.call({"op": "allocate", "handle": "kept"})["address"] == "10.9.0.1/24"
    d.stop()
    c = apsw.Connection(str(d.db))
    c.execute("INSERT INTO freed VALUES ('10.9.0.1', 1.0)")
    c.close()
    files = {p: p.read_bytes() for p in d.db.parent.iterdir() if p.name.startswith("ipamd.db")}
    # Another nickname: a start that went on would write it.
    r = ipamd("launch", "--data-dir", str(d.db.parent), "--socket", str(tmp_path / "s2"),
              "--name", "renamed")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "is inconsistent: 10.9.0.1 is held by handle 'kept' and is in table freed" in r.stderr
    assert {p: p.read_bytes() for p in d.db.parent.iterdir()
            if p.name.startswith("ipamd.db")} == files
