"""Ranges online with real daemons on loopback (#14): `ipamd range add` on one host reaches
every host and is served there at once; an overlapping add is refused; retire stops new
allocations on every host and unretire resumes them; a host restarted with its original
--iprange keeps the added range and still talks to the others; a host that was away learns the
range when it is back, and an add that needs spare space from a host that cannot be reached is
refused naming it."""
import json
import signal
import time

from .daemon_proc import wait_until
from .test_peers import joined, status

ADDED = "10.50.0.0/24"


def ranges(d) -> dict[str, bool]:
    """range -> retired, as d's status shows them."""
    return {u["range"]: u["retired"] for u in status(d)["universes"]}


def cli_json(d, *args) -> dict:
    return json.loads(d.cli(*args, "--json").stdout)


def refused(reply: dict, code: str) -> str:
    assert not reply["ok"] and reply["error"]["code"] == code, reply
    return reply["error"]["message"]


def test_a_range_added_on_one_host_is_served_retired_and_kept_by_every_host(tmp_path):
    hosts, ids = joined(tmp_path, ["a", "b", "c"])
    a, b, c = hosts
    # b owns none of the spare space (the founder a does): it asks a for it, as a claim asks.
    out = b.cli("range", "add", ADDED, "--allow-route-overlap")
    added_at = time.monotonic()
    assert (out.returncode, out.stdout) == (0, f"added {ADDED} to the cluster's ranges\n"), out
    wait_until("every host to show the added range",
               lambda: all(ranges(d).get(ADDED) is False for d in hosts), timeout=10)
    shown = time.monotonic() - added_at
    assert shown < 2.0, f"the range took {shown:.2f}s to reach every host's status"
    # Served by every host without a restart: a and c get space in it from b, its owner.
    got = {}
    for d in hosts:
        r = d.cli("allocate", f"{d.dir.name}-1", "--subnet", ADDED)
        assert r.returncode == 0 and r.stdout.startswith("10.50.0."), r
        got[r.stdout.strip()] = d.dir.name
    assert len(got) == 3 and all(a.endswith("/24") for a in got), got
    # Overlap with the added range, or with a range the cluster was made with, is refused.
    for d, cidr_text, clash in ((c, "10.50.0.0/16", ADDED), (a, "10.50.0.128/25", ADDED),
                                (c, "10.40.0.0/25", "10.40.0.0/24")):
        message = refused(d.call({"op": "range_add", "range": cidr_text,
                                  "allow_route_overlap": True}), "overlap")
        assert message == f"{cidr_text} overlaps range {clash}", message
    # Retired on c: no new allocations on any host; those held stay, and status counts them.
    out = c.cli("range", "retire", ADDED)
    assert out.stdout == f"retired {ADDED}: no new allocations there; addresses held stay\n"
    wait_until("every host to show the range retired",
               lambda: all(ranges(d)[ADDED] is True for d in hosts), timeout=10)
    for d in hosts:
        message = refused(d.call({"op": "allocate", "handle": f"{d.dir.name}-2",
                                  "subnet": ADDED}), "retired")
        assert f"range {ADDED} is retired" in message, message
        assert d.call({"op": "lookup", "handle": f"{d.dir.name}-1"})["ok"]
    assert sum(u["allocated"] for d in hosts for u in status(d)["universes"]
               if u["range"] == ADDED) == 3
    ls = a.cli("range", "ls").stdout.splitlines()
    assert ls[0].split() == ["RANGE", "KIND", "STATE", "IN", "USE", "FREE"]
    assert [line.split()[:3] for line in ls[1:]] == [
        ["10.40.0.0/24", "range", "active"], [ADDED, "range", "retired"]], ls
    # Unretired on a: allocations resume everywhere.
    assert a.cli("range", "unretire", ADDED).stdout == f"{ADDED} takes allocations again\n"
    wait_until("every host to show the range active again",
               lambda: all(ranges(d)[ADDED] is False for d in hosts), timeout=10)
    for d in hosts:
        r = d.call({"op": "allocate", "handle": f"{d.dir.name}-2", "subnet": ADDED})
        assert r["ok"] and r["address"].startswith("10.50.0."), r
    # c restarted with the flags it was first launched with: the database is the truth, the
    # added range is kept, and c still talks with a and b (their hellos compare the ranges
    # each database was made with, not those added since).
    c.stop()
    line = c.start()
    assert " ranges=10.40.0.0/24,10.50.0.0/24 " in line, line
    assert ranges(c) == {"10.40.0.0/24": False, ADDED: False}
    wait_until("c to reach a and b again",
               lambda: set(status(c)["reachable"]) == set(ids) - {ids[2]})
    r = c.call({"op": "allocate", "handle": "c-3", "subnet": ADDED})
    assert r["ok"] and r["address"].startswith("10.50.0."), r
    wait_until("one ring everywhere", lambda: len({status(d)["ring_digest"]
                                                   for d in hosts}) == 1)


def test_a_host_away_learns_the_range_later_and_an_unreachable_owner_is_named(tmp_path):
    (a, b, c), (ia, ib, ic) = joined(tmp_path, ["a", "b", "c"])
    # c is stopped (SIGSTOP: silent, as behind a partition) while a adds a range.
    c.proc.send_signal(signal.SIGSTOP)
    try:
        wait_until("a to see c unreachable", lambda: ic not in status(a)["reachable"])
        assert cli_json(a, "range", "add", ADDED, "--allow-route-overlap")["ok"]
        wait_until("b to show the range", lambda: ADDED in ranges(b))
    finally:
        c.proc.send_signal(signal.SIGCONT)
    wait_until("c, back, to learn the range", lambda: ADDED in ranges(c))
    r = c.call({"op": "allocate", "handle": "c-1", "subnet": ADDED})
    assert r["ok"] and r["address"].startswith("10.50.0."), r
    # The spare space of 10.60.0.0/24 is a's (the founder's): with a away, b cannot add it,
    # and says whom it cannot reach. Nothing was added: once a is back, b can.
    a.proc.send_signal(signal.SIGSTOP)
    try:
        wait_until("b to see a unreachable", lambda: ia not in status(b)["reachable"])
        message = refused(b.call({"op": "range_add", "range": "10.60.0.0/24",
                                  "allow_route_overlap": True}), "unreachable")
        assert message == ("range 10.60.0.0/24: spare space 10.60.0.0-10.60.0.255 is owned "
                           f"by {ia}, which {ib} cannot reach; only the owner of that space may "
                           "give it"), message
        assert "10.60.0.0/24" not in ranges(b)
    finally:
        a.proc.send_signal(signal.SIGCONT)
    wait_until("b to reach a again", lambda: ia in status(b)["reachable"])
    assert b.call({"op": "range_add", "range": "10.60.0.0/24",
                   "allow_route_overlap": True})["ok"]
    wait_until("every host to show 10.60.0.0/24",
               lambda: all("10.60.0.0/24" in ranges(d) for d in (a, b, c)))


def test_a_cluster_made_before_schema_5_cannot_add_ranges(tmp_path):
    import apsw

    from .daemon_proc import Daemon
    from .test_store import as_version_4
    d = Daemon(tmp_path, "--iprange", "10.40.0.0/24")
    d.start()
    d.stop()
    c = apsw.Connection(str(d.db))
    as_version_4(c)  # as the release before ranges online left it
    c.close()
    d.start()  # migrated: spare universes with no owner
    message = refused(d.call({"op": "range_add", "range": ADDED, "allow_route_overlap": True}),
                      "not_supported")
    assert message == ("this cluster keeps no spare space for IPv4 (its databases were made "
                       "before ranges could be added online, schema 5): ranges, blocks, tenants and name pools cannot be added")
    assert list(ranges(d)) == ["10.40.0.0/24"]
    assert d.call({"op": "allocate", "handle": "x"})["address"] == "10.40.0.1/24"
    d.stop()
