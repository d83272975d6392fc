"""Tenants, leased blocks and name pools with three real daemons on loopback (#14): block
space added on one host; a tenant created there, allocated from on the two others (inside its
block, never its gateway), full, grown, at its limit, refused deletion while an address is
held or in quarantine (naming it), then deleted; names leased on all three hosts at once with
none twice; a block leased and given back; a restart keeping tenants, blocks and names."""
import json
import re
import signal
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from .daemon_proc import wait_until
from .test_peers import joined, status

SPACE = "10.64.0.0/16"
DELAY = 3  # --reuse-delay: long enough to see the quarantine refuse a delete, short to wait out


def cli_json(d, *args) -> dict:
    return json.loads(d.cli(*args, "--json").stdout)


def refused(reply: dict, code: str) -> str:
    assert not reply["ok"] and reply["error"]["code"] == code, reply
    return reply["error"]["message"]


def ok(d, *args) -> str:
    r = d.cli(*args)
    assert r.returncode == 0, r
    return r.stdout


def scrape(d) -> str:
    port = int(re.search(r"metrics=\S+:(\d+)", d.ready_line).group(1))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_tenants_blocks_and_names_on_three_hosts(tmp_path):
    hosts, ids = joined(tmp_path, ["h0", "h1", "h2"], lambda name: (
        "--reuse-delay", str(DELAY), "--metrics", "127.0.0.1:0"))
    h0, h1, h2 = hosts
    assert ok(h0, "range", "add", SPACE, "--blocks", "--allow-route-overlap") == \
        f"added {SPACE} to the cluster's ranges\n"
    assert ok(h0, "tenant", "create", "acme", "--prefix-len", "28", "--max-blocks", "2") == \
        "created tenant acme with block 10.64.0.0/28\n"
    wait_until("every host to know tenant acme",
               lambda: all("acme" in status(d)["tenants"] for d in hosts), timeout=10)

    # Allocated on h1 and h2: inside the block, never its gateway .1. Then the rest of the
    # /28's 13 host addresses claimed by turns (a claim asks the address's owner, so the fill
    # does not depend on which host was given which part), and it is full.
    got = {}
    for d in (h1, h2):
        r = d.call({"op": "allocate", "handle": f"{d.dir.name}-a", "tenant": "acme"})
        assert r["ok"] and r["gateway"] == "10.64.0.1" and r["subnet"] == "10.64.0.0/28", r
        got[r["address"]] = r["handle"]
    for i, n in enumerate(n for n in range(2, 15) if f"10.64.0.{n}/28" not in got):
        d = (h1, h2)[i % 2]
        # not_owned: the address moved on by a claim just before, news this host has not
        # heard yet; asked again once it has.
        r = wait_until(f"claim of 10.64.0.{n}", lambda d=d, n=n: (
            lambda r: None if r.get("error", {}).get("code") == "not_owned" else r)(
            d.call({"op": "claim", "handle": f"{d.dir.name}-{n}", "address": f"10.64.0.{n}",
                    "tenant": "acme"})), timeout=10)
        assert r["ok"] and r["gateway"] == "10.64.0.1", r
        got[r["address"]] = r["handle"]
    assert sorted(got) == sorted(f"10.64.0.{n}/28" for n in range(2, 15)), got
    message = refused(cli_json(h2, "allocate", "h2-x", "--tenant", "acme"), "tenant_full")
    asked = re.fullmatch(r"tenant acme is full: no free address in its 1 block\(s\) "
                         rf"\(10\.64\.0\.0/28\) on {ids[2]}(?:, nor on the peers it asked "
                         r"\(([0-9a-f, ]+)\))?; it may have 2 block\(s\) \(ipamd tenant grow "
                         r"acme\)", message)
    assert asked and set((asked[1] or "").split(", ")) - {""} <= {ids[0], ids[1]}, message

    # Grown from h2 (h0 owns the tenant's key: only it adds blocks, as h2 asks it to).
    out = ok(h2, "tenant", "grow", "acme")
    assert out == "tenant acme grew by 10.64.0.16/28; blocks 10.64.0.0/28 10.64.0.16/28\n", out
    r = h2.call({"op": "allocate", "handle": "h2-x", "tenant": "acme"})
    assert r["ok"] and r["address"] == "10.64.0.18/28" and r["gateway"] == "10.64.0.17", r
    message = refused(cli_json(h1, "tenant", "grow", "acme"), "limit")
    assert message == "tenant acme has 2 blocks, its limit (--max-blocks 2)", message

    # tenant show on h1: its own count exact, the others estimated from their hints.
    view = cli_json(h1, "tenant", "show", "acme")
    assert [b["block"] for b in view["blocks"]] == ["10.64.0.0/28", "10.64.0.16/28"]
    assert [b["gateway"] for b in view["blocks"]] == ["10.64.0.1", "10.64.0.17"]
    assert view["blocks"][0]["in_use"][ids[1]] == 7 and ids[1] not in \
        view["blocks"][0]["estimated"], view
    shown = ok(h1, "tenant", "ls").splitlines()
    assert shown[1].split()[:4] == ["acme", "IPv4", "/28", "2/2"], shown
    metrics = scrape(h1)
    assert 'ipamd_tenant_blocks{tenant="acme"} 2.0' in metrics, metrics
    assert 'ipamd_tenant_addresses_in_use{tenant="acme"} 7.0' in metrics, metrics

    # Deleted: refused while held, naming the holder; then while in quarantine; then done.
    message = refused(cli_json(h0, "tenant", "delete", "acme"), "in_use")
    holder = re.fullmatch(r"tenant acme: (\w+) gave nothing: \1 has \d+ address\(es\) in use "
                          r"in 10\.64\.0\.(?:0|16)/28 \((10\.64\.0\.\d+) held by handle "
                          r"'([^']+)'(?:, \.\.\.)?\)", message)
    assert holder and holder[1] in (ids[1], ids[2]), message
    host = hosts[ids.index(holder[1])]
    assert host.call({"op": "lookup", "handle": holder[3]})["addresses"][0]["address"] == \
        f"{holder[2]}/28"
    for d in (h1, h2):
        for a in d.call({"op": "list"})["allocations"]:
            assert d.call({"op": "release", "handle": a["handle"]})["ok"]
    message = refused(cli_json(h0, "tenant", "delete", "acme"), "in_use")
    assert f"in quarantine for {DELAY}s after its release" in message, message
    out = wait_until("the quarantine to end and the delete to pass", lambda: (
        lambda r: r.stdout if r.returncode == 0 else None)(h0.cli("tenant", "delete", "acme")),
        timeout=30, interval=0.5)
    assert out == "deleted tenant acme; gave back 10.64.0.0/28 10.64.0.16/28\n", out
    wait_until("every host to forget tenant acme",
               lambda: all(status(d)["tenants"] == {} for d in hosts), timeout=10)
    message = refused(h1.call({"op": "allocate", "handle": "late", "tenant": "acme"}),
                      "no_tenant")
    assert message == "no tenant acme with blocks is known here", message

    # Names: 3 x 50 leases at once from a pool of 200, none twice, every one kept.
    assert ok(h0, "names", "create", "web", "web-{000..199}") == \
        "created pool web: 200 names (web-{000..199})\n"
    wait_until("every host to know pool web",
               lambda: all("web" in status(d)["pools"] for d in hosts), timeout=10)

    def lease(job):
        d, i = job
        return d, d.call({"op": "lease_name", "handle": f"{d.dir.name}-n{i}", "pool": "web"})

    with ThreadPoolExecutor(12) as pool:
        leased = list(pool.map(lease, [(d, i) for i in range(50) for d in hosts]))
    assert all(r["ok"] for _, r in leased), [r for _, r in leased if not r["ok"]][:3]
    names = [r["name"] for _, r in leased]
    assert len(set(names)) == 150 and all(re.fullmatch(r"web-\d{3}", n) for n in names)
    for d in hosts:
        held = {a["handle"]: a["name"] for a in d.call({"op": "list"})["allocations"]}
        assert held == {r["handle"]: r["name"] for x, r in leased if x is d}
    taken = next(r for x, r in leased if x is h1)
    message = refused(cli_json(h2, "claim-name", "h2-c", taken["name"]), "in_use")
    assert f"held by handle {taken['handle']!r}" in message and ids[1] in message, message
    assert 'ipamd_names_in_use{pool="web"} 50.0' in scrape(h2)

    # A block leased whole on h1, seen by every host, and given back by release.
    out = ok(h1, "lease-block", "vpn-1", "--prefix-len", "24")
    block = re.fullmatch(r"vpn-1 holds (10\.64\.\d+\.0/24)\n", out)[1]
    wait_until("every host to see the lease",
               lambda: all(status(d)["leases"] == {block: "vpn-1"} for d in hosts), timeout=10)
    assert ok(h1, "release", "vpn-1") == f"released {block}\n"
    wait_until("every host to see it given back",
               lambda: all(status(d)["leases"] == {} for d in hosts), timeout=10)

    # A restart keeps tenants, blocks and names.
    out = ok(h0, "tenant", "create", "beta", "--prefix-len", "29")
    beta = re.fullmatch(r"created tenant beta with block 10\.64\.(\d+)\.0/29\n", out)
    assert beta, out
    wait_until("h2 to know tenant beta", lambda: "beta" in status(h2)["tenants"], timeout=10)
    before = status(h2)
    h2.kill(signal.SIGKILL)
    h2.start()
    after = status(h2)
    assert (after["tenants"], after["pools"]) == (before["tenants"], before["pools"])
    assert sorted(a["name"] for a in h2.call({"op": "list"})["allocations"]) == \
        sorted(r["name"] for x, r in leased if x is h2)
    r = h2.call({"op": "allocate", "handle": "b-1", "tenant": "beta"})
    assert r["ok"] and r["address"] == f"10.64.{beta[1]}.2/29", r  # .1: its gateway


def test_a_block_gateway_is_never_given_as_free_space():
    """In the core's simulator (this was a core bug: the gateway counted as free space, so a
    donor could give just the gateway): p1 and p2 take 12 of a /28's 13 host addresses by turns;
    p0, which made the block, still owns .14 (free) and the gateway .1. p1's next allocate
    must get .14."""
    from appliance.core import messages as m
    from appliance.core.addr import cidr

    from .scenario import Cluster
    c = Cluster(3, cidr("10.0.0.0/24"))
    c.settle()

    def run(p, req):
        ref = c.submit(p, req)
        c.settle()
        return c.replies[ref]
    assert run("p0", m.AddRange(cidr(SPACE), blocks=True))["ok"]
    assert run("p0", m.TenantCreate("acme", 28, 4, 2))["blocks"] == ["10.64.0.0/28"]
    for i in range(12):
        p = ("p1", "p2")[i % 2]
        assert run(p, m.Allocate(f"{p}-{i}", tenant="acme"))["ok"]
    r = run("p1", m.Allocate("p1-12", tenant="acme"))
    assert r["ok"] and r["address"] == "10.64.0.14/28", r
