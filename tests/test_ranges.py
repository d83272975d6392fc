"""Ranges added and retired online (core/spare.py), beyond the operator's log in
tests/scenarios/ranges_online.txt: seeds' spare space, a range spanning several owners,
concurrent retires, bad markers from a peer, clusters made before spare space."""
import pytest

from appliance.core import messages as m
from appliance.core.addr import cidr
from appliance.core.durable import Durable
from appliance.core.gossip import Delta
from appliance.core.peer import Gossip
from appliance.core.ring import Entry
from appliance.core.spare import SPARE, marker

from .scenario import CLUSTER, TICK, Cluster


def _ask(c: Cluster, p: str, req) -> dict:
    ref = c.submit(p, req)
    for _ in range(60):
        if ref in c.replies:
            break
        c.settle(1)
    c.settle()
    return c.replies[ref]


def test_seeds_compute_the_same_spare_rings_and_a_range_may_span_two_owners():
    c = Cluster(3, cidr("192.168.0.0/24"), seeds=["p0", "p1", "p2"])
    c.settle()
    v4 = SPARE[0]
    rings = [c.peers[p].rings[v4].entries for p in ("p0", "p1", "p2")]
    assert rings[0] == rings[1] == rings[2]
    # The split deals /2s: p0 0/2, p1 64/2, p2 128/2, p0 192/2 (192.168.0.0/24 carved there).
    assert c.peers["p0"].rings[v4].owner_of(cidr("64.0.0.0/2").start) == "p1"
    assert c.alarms == []
    r = _ask(c, "p2", m.AddRange(cidr("0.0.0.0/1")))  # p0's and p1's spare space
    assert r == m.ok(range="0.0.0.0/1", owner="p2", blocks=False)
    for p in ("p0", "p1", "p2"):
        ring = c.peers[p].rings[cidr("0.0.0.0/1")]
        assert [(e.start, e.end, e.owner) for e in ring.entries] == [(0, 2**31, "p2")]
        assert c.peers[p].rings[v4].owner_of(5) == marker("range", cidr("0.0.0.0/1"))
    assert c.alarms == []


def test_retires_made_at_once_on_two_hosts_settle_on_one_write_without_an_alarm():
    # Each host's writes of a marker alternate retired/open from the state both knew, so two
    # writes of one version say the same thing; only their stamps differ, and the larger wins.
    c = Cluster(2, cidr("10.0.0.0/24"))
    c.settle()
    r = cidr("10.1.0.0/24")
    assert _ask(c, "p1", m.AddRange(r))["ok"]
    c.blocked = {("p0", "p1"), ("p1", "p0")}
    c._links()
    assert _ask(c, "p0", m.RetireRange(r, True)) == m.ok(range=str(r), retired=True)
    assert _ask(c, "p1", m.RetireRange(r, True)) == m.ok(range=str(r), retired=True)
    assert _ask(c, "p1", m.RetireRange(r, False)) == m.ok(range=str(r), retired=False)
    c.blocked = set()
    c._links()
    c.settle()
    v4 = SPARE[0]
    assert c.peers["p0"].rings[v4].get(r.start) == c.peers["p1"].rings[v4].get(r.start)
    assert c.peers["p0"].allocator.retired == c.peers["p1"].allocator.retired == frozenset()
    assert c.alarms == []


def test_a_retired_range_refuses_allocate_but_keeps_and_counts_what_it_holds():
    c = Cluster(2, cidr("10.0.0.0/24"))
    c.settle()
    r = cidr("10.1.0.0/28")
    assert _ask(c, "p1", m.AddRange(r))["ok"]
    held = _ask(c, "p0", m.Allocate("a", r))
    assert held["ok"] and held["address"].startswith("10.1.0.")
    assert _ask(c, "p1", m.RetireRange(r))["ok"]
    assert _ask(c, "p0", m.Allocate("b", r)) == m.error(
        "retired", "no new allocations in subnet 10.1.0.0/28: range 10.1.0.0/28 is retired "
        "(ipamd range unretire to resume)")
    row = next(x for x in c.peers["p0"].status(c.now)["universes"] if x["range"] == str(r))
    assert (row["retired"], row["allocated"]) == (True, 1)
    assert _ask(c, "p0", m.Lookup("a"))["addresses"][0]["address"] == held["address"]


def test_bad_markers_from_a_peer_are_refused_and_change_nothing():
    c = Cluster(2, cidr("10.0.0.0/24"))
    c.settle()
    v4 = SPARE[0]
    before = dict(c.durable["p1"].ring)
    base = tuple(sorted(c.peers["p1"].replica.vector.items()))
    for owner in (marker("range", cidr("10.0.0.0/16")),  # overlaps 10.0.0.0/24
                  "@range 10.5.0.0/16",                    # lies outside its marker entry
                  "@bogus 10.6.0.0/16"):
        e = Entry(cidr("10.6.0.0/16").start, cidr("10.6.0.0/16").end, owner, 9, 0, ("p0", 99))
        ready = c.peers["p1"].receive("p0", Gossip(CLUSTER, Delta(base, ((v4, e),), base)),
                                      c.now)
        c.handle("p1", ready)
        assert any("refused ring data from p0" in a for a in ready.alarms), owner
    assert c.durable["p1"].ring == before
    assert cidr("10.6.0.0/16") not in c.peers["p1"].rings


def test_a_cluster_made_before_spare_space_refuses_with_not_supported():
    d = Durable.new("p0", CLUSTER, [cidr("10.0.0.0/24")], mode="single")
    peer = d.load(cidr("10.0.0.0/24"), 30.0)
    out = peer.request("r", m.AddRange(cidr("10.1.0.0/24")), 1.0)
    assert out.replies[0][1]["error"]["code"] == "not_supported"
    assert out.rows == []
    out = peer.request("r", m.RetireRange(cidr("10.0.0.0/24")), 1.0)
    assert out.replies[0][1]["error"]["code"] == "not_supported"


def test_bad_requests_name_the_problem_and_write_nothing():
    c = Cluster(1, cidr("10.0.0.0/24"))
    c.settle()
    p = c.peers["p0"]
    for req, code in ((m.AddRange(cidr("0.0.0.0/0")), "bad_range"),
                      (m.AddRange(cidr("10.0.0.0/8")), "overlap"),
                      (m.RetireRange(cidr("10.9.0.0/24")), "no_range")):
        out = p.request("r", req, c.now)
        assert out.replies[0][1]["error"]["code"] == code
        assert out.rows == [] and out.messages == []


def test_a_host_that_left_refuses_range_requests_with_its_standing():
    c = Cluster(2, cidr("10.0.0.0/24"))
    c.settle()
    assert _ask(c, "p1", m.Leave())["ok"]
    for req in (m.AddRange(cidr("10.1.0.0/24")), m.RetireRange(cidr("10.0.0.0/24"))):
        r = _ask(c, "p1", req)
        assert r["error"]["code"] == "left"


def test_a_tenants_block_keeps_its_gateway_and_its_addresses_for_the_tenant():
    c = Cluster(2, cidr("10.0.0.0/24"))
    c.settle()
    assert _ask(c, "p0", m.AddRange(cidr("10.64.0.0/16"), blocks=True))["ok"]
    r = _ask(c, "p1", m.TenantCreate("acme", 29, max_blocks=1))
    block = cidr(r["blocks"][0])
    first = _ask(c, "p0", m.Allocate("a", tenant="acme"))
    assert first["address"] == f"{block.addr(block.start + 2)}/29"
    assert (first["tenant"], first["gateway"]) == ("acme", block.addr(block.start + 1))
    gw, other = block.start + 1, block.start + 5
    assert _ask(c, "p1", m.Claim("b", 4, gw, tenant="acme"))["error"]["message"] == (
        f"{block.addr(gw)} may not be claimed: it is the gateway of tenant acme's block {block}")
    assert _ask(c, "p1", m.Claim("b", 4, other))["error"]["message"] == (
        f"{block.addr(other)} may not be claimed: it lies in tenant acme's block {block}: "
        "claim it for the tenant")
    held = _ask(c, "p1", m.Claim("b", 4, other, tenant="acme"))
    assert held["address"] == f"{block.addr(other)}/29" and held["tenant"] == "acme"
    # Plain allocations never land in block space or blocks, even with the range full.
    for i in range(260):
        r = _ask(c, "p0", m.Allocate(f"plain-{i}"))
        if not r["ok"]:
            break
        assert cidr("10.0.0.0/24").start <= __import__("appliance.core.addr", fromlist=["x"]) \
            .parse_addr(r["address"].split("/")[0])[1] < cidr("10.0.0.0/24").end
    assert r["error"]["code"] == "exhausted"


def test_name_pools_are_unique_and_names_parse_exactly():
    from appliance.core.names import Pattern
    p = Pattern.parse("web-{000..999}")
    assert (p.size, p.name(7), p.ordinal("web-007"), p.ordinal("web-7"), p.ordinal("web-1000"))\
        == (1000, "web-007", 7, None, None)
    q = Pattern.parse("{1..12}.example")
    assert (q.size, q.name(0), q.ordinal("12.example"), q.ordinal("012.example")) == \
        (12, "1.example", 11, None)
    for bad in ("web", "web-{9..1}", "Web-{0..9}", "web-{00..9}", "a{0..1}{0..1}"):
        try:
            Pattern.parse(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} was accepted")
    c = Cluster(2, cidr("10.0.0.0/24"))
    c.settle()
    assert _ask(c, "p0", m.NamesCreate("web", "web-{0..2}"))["size"] == 3
    assert _ask(c, "p1", m.NamesCreate("web", "web-{0..5}"))["error"]["code"] == "exists"
    names = {_ask(c, p, m.LeaseName(h, "web"))["name"] for p, h in
             (("p0", "a"), ("p1", "b"), ("p0", "c"))}
    assert names == {"web-0", "web-1", "web-2"}
    assert _ask(c, "p1", m.LeaseName("d", "web"))["error"]["code"] == "exhausted"


def test_a_new_database_carves_its_static_space_as_static():
    r, s = cidr("10.40.10.0/28"), cidr("10.40.10.16/28")
    for mode, extra in (("single", {}), ("seeds", {"seeds": ("p0", "p1")})):
        d = Durable.new("p0", CLUSTER, [r, s, *SPARE], mode=mode, static=(s,), spare=SPARE,
                        **extra)
        peer = d.load(r, 30.0)
        assert (peer.allocator.kind(r), peer.allocator.kind(s)) == ("range", "static"), mode
        assert peer.rings[SPARE[0]].owner_of(s.start) == marker("static", s)
        assert peer.allocator.candidates(cidr("10.40.8.0/22")) == [r]


def test_a_block_given_back_and_carved_again_is_written_above_what_it_had():
    c = Cluster(2, cidr("10.0.0.0/24"))
    c.settle()
    assert _ask(c, "p0", m.AddRange(cidr("10.64.0.0/23"), blocks=True))["ok"]
    assert _ask(c, "p1", m.LeaseBlock("x", 23))["error"]["code"] == "exhausted"
    seen = []
    for i in range(3):
        r = _ask(c, "p1", m.LeaseBlock("vpn", 24))
        assert r == m.ok(handle="vpn", block="10.64.0.0/24"), r
        block = cidr(r["block"])
        seen.append(c.peers["p0"].rings[block].entries[0].version)
        assert c.peers["p0"].allocator.lease_blocks == {"vpn": [block]}
        assert _ask(c, "p1", m.Release("vpn"))["released"] == ["10.64.0.0/24"]
        assert c.peers["p0"].allocator.kind(block) == "dissolved"
    assert seen[0] < seen[1] < seen[2] and c.alarms == []


def test_a_small_tenant_block_is_filled_from_any_host_and_claims_stay_inside_it():
    # The block's network, gateway and broadcast addresses are neither free space in hints
    # nor given to a peer: a peer asking for room never gets only those.
    c = Cluster(2, cidr("198.18.0.0/24"))
    c.settle()
    assert _ask(c, "p0", m.AddRange(cidr("10.64.0.0/16"), blocks=True))["ok"]
    assert _ask(c, "p0", m.TenantCreate("acme", 29, max_blocks=2))["blocks"] == ["10.64.0.0/29"]
    got = [_ask(c, "p1", m.Allocate(f"h{i}", tenant="acme")) for i in range(6)]
    assert sorted(r["address"] for r in got[:5]) == [f"10.64.0.{i}/29" for i in range(2, 7)]
    assert got[5]["error"]["code"] == "tenant_full"
    r = _ask(c, "p0", m.Claim("x", 4, cidr("198.18.0.0/24").start + 9, tenant="acme"))
    assert r == m.error("bad_address", "198.18.0.9 may not be claimed: it is not in a block of "
                        "tenant acme")


def test_a_host_that_joins_after_a_block_was_given_back_learns_the_rings():
    # The given-back block's own ring ("@dissolved" entries) reaches a newcomer that never
    # heard of the block, whose marker in the parent is gone: it must still merge the rest
    # (found by the simulator, seed 8: the newcomer refused every gossip, "entry for unknown
    # universe"). And a block carved later over part of it is no clash.
    c = Cluster(2, cidr("10.0.0.0/24"))
    c.settle()
    assert _ask(c, "p0", m.AddRange(cidr("10.64.0.0/23"), blocks=True))["ok"]
    assert _ask(c, "p0", m.LeaseBlock("vpn", 27)) == m.ok(handle="vpn", block="10.64.0.0/27")
    assert _ask(c, "p1", m.Release("vpn"))["released"] == ["10.64.0.0/27"]
    assert _ask(c, "p1", m.LeaseBlock("small", 28)) == m.ok(handle="small", block="10.64.0.0/28")
    c.join("p2")
    c.settle()
    for p in ("p0", "p1", "p2"):
        a = c.peers[p].allocator
        assert (a.kind(cidr("10.64.0.0/27")), a.lease_blocks) == \
            ("dissolved", {"small": [cidr("10.64.0.0/28")]}), p
    assert c.peers["p2"].replica.rings.keys() == c.peers["p0"].replica.rings.keys()
    assert all(c.peers["p2"].rings[u].entries == c.peers["p0"].rings[u].entries
               for u in c.peers["p0"].rings)
    assert c.alarms == []


def test_a_host_that_left_gives_no_leased_block_back():
    # Giving a block back moves space: outside good standing the release answers the
    # standing and neither writes nor asks for anything (found by the simulator, seed 186: a
    # waiting seed asked the block's owner for it; a left host asked for it too).
    c = Cluster(2, cidr("10.0.0.0/24"))
    c.settle()
    assert _ask(c, "p0", m.AddRange(cidr("10.64.0.0/23"), blocks=True))["ok"]
    assert _ask(c, "p1", m.LeaseBlock("vpn", 28)) == m.ok(handle="vpn", block="10.64.0.0/28")
    assert _ask(c, "p1", m.Leave())["ok"]
    ring = dict(c.durable["p1"].ring)
    ref = c.submit("p1", m.Release("vpn"))
    assert c.replies[ref] == m.error("left", "p1 left the cluster") and c.inbox == []
    c.settle()
    assert c.durable["p1"].ring == ring and c.alarms == []
    assert c.peers["p0"].allocator.lease_blocks == {"vpn": [cidr("10.64.0.0/28")]}


def test_an_allocate_naming_a_pool_takes_only_its_names():
    c = Cluster(1, cidr("10.0.0.0/24"))
    c.settle()
    assert _ask(c, "p0", m.NamesCreate("small", "n-{0..2}"))["size"] == 3
    from appliance.core.spare import key_of
    pool = key_of("names", "small")
    got = [_ask(c, "p0", m.Allocate(f"a{i}", pool)) for i in range(4)]
    assert [r.get("name") for r in got[:3]] == ["n-0", "n-1", "n-2"]
    assert got[3]["error"]["code"] == "exhausted"
    r = _ask(c, "p0", m.Claim("b", 6, pool.start + 4))
    assert r == m.error("bad_address", f"{pool.addr(pool.start + 4)} may not be claimed: it is "
                        "not a name of name pool small (n-{0..2})")


def test_a_grant_merged_in_part_never_turns_a_given_back_block_into_a_range():
    # Found by the simulator, seed 30 at 169ad4c (I10: "universes 10.253.168.0/25 and
    # 10.253.168.0/28 overlap"). p0 gives a leased block back (one write, stamp s: the
    # parent's marker becomes p0's plain space, the block's ring "@dissolved"); its gossip of
    # s to p1 is lost, but p0 counts it sent. p0's hint refresh then rewrites the parent entry
    # (stamp s + 1). p1's next grant was a delta made against what p0 thought p1 had: it held
    # s + 1 but not s, so p1 merged it in part and saw the marker gone, the block undissolved.
    # Grants are now made against the vector p1 told p0 (Peer.grant_delta): merged whole.
    c = Cluster(2, cidr("10.0.0.0/24"))
    c.settle()
    space, block = cidr("10.64.0.0/23"), cidr("10.64.0.0/28")
    assert _ask(c, "p0", m.AddRange(space, blocks=True))["ok"]
    assert _ask(c, "p0", m.LeaseBlock("vpn", 28)) == m.ok(handle="vpn", block=str(block))
    p0, p1 = c.peers["p0"], c.peers["p1"]
    assert p1.allocator.kind(block) == "lease"
    assert c.replies[c.submit("p0", m.Release("vpn"))]["released"] == [str(block)]
    given_back = p0.rings[block].entries[0].stamp
    c.now += TICK
    c.handle("p0", p0.tick(c.now))
    assert [(dst, type(msg)) for _, dst, msg in c.inbox] == [("p1", Gossip)]
    c.inbox = []  # lost on the way
    assert p0.sent["p1"]["p0"] == given_back[1]
    p0.reachable = set()  # p0 ticks on alone until its hint refresh rewrites the parent entry
    for _ in range(20):
        c.now += TICK
        c.handle("p0", p0.tick(c.now))
        if p0.rings[space].entries[0].stamp[1] > given_back[1]:
            break
    assert p0.rings[space].entries[0].stamp == ("p0", given_back[1] + 1) and c.inbox == []
    c._links()
    ref = c.submit("p1", m.Allocate("a"))  # p1 owns nothing there: it asks p0, which grants
    while c.inbox:
        src, dst, msg = c.inbox.pop(0)
        c.handle(dst, c.peers[dst].receive(src, msg, c.now))
    assert c.replies[ref]["ok"]
    assert p1.allocator.kind(block) in ("lease", "dissolved")
    assert block not in p1.allocator.candidates(space)


def test_a_freed_tenant_address_is_in_its_block_again_after_a_restart():
    # Freed rows do not name their universe (schema 7): a restart puts each into the innermost
    # universe holding it, the tenant's block rather than its block space, with its time.
    c = Cluster(2, cidr("10.0.0.0/24"))
    c.settle()
    assert _ask(c, "p0", m.AddRange(cidr("10.64.0.0/16"), blocks=True))["ok"]
    block = cidr(_ask(c, "p1", m.TenantCreate("acme", 29, max_blocks=1))["blocks"][0])
    got = [_ask(c, "p0", m.Allocate(h, tenant="acme"))["address"] for h in ("a", "b")]
    assert _ask(c, "p0", m.Allocate("plain"))["ok"]
    for h in ("b", "plain", "a"):
        assert _ask(c, "p0", m.Release(h))["ok"]

    def freed():
        return {str(u): [(u.addr(x), t) for x, t in fl.items()]
                for u, fl in c.peers["p0"].allocator.freed.items() if len(fl)}
    before = freed()
    assert [a for a, _ in before[str(block)]] == [got[1].split("/")[0], got[0].split("/")[0]]
    assert sorted(before) == sorted(["10.0.0.0/24", str(block)])
    c.restart("p0")
    assert freed() == before
