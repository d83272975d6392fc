"""Bootstrap and removal rules, one message at a time (the scenarios show them end to end)."""
from appliance.core import messages as m
from appliance.core.addr import cidr, range_to_cidrs
from appliance.core.durable import Durable
from appliance.core.peer import Peer, Ready
from appliance.core.ring import Ring
from appliance.core.peer_messages import (Accept, Accepted, HandoverAck, Prepare, Promise, Refuse,
                                          RemoveAck, RemoveNack, RemovePrepare, VoteNack)

U = cidr("10.0.0.0/24")


def blocks(ring, owner):
    return [str(c) for lo, hi in ring.owned_by(owner) for c in range_to_cidrs(4, lo, hi)]


def test_seed_split_is_the_design_example_and_the_same_everywhere():
    r = Ring.split(U, ["c", "a", "b"])
    assert blocks(r, "a") == ["10.0.0.0/26", "10.0.0.192/26"]
    assert blocks(r, "b") == ["10.0.0.64/26"] and blocks(r, "c") == ["10.0.0.128/26"]
    assert r.entries == Ring.split(U, ["b", "c", "a"]).entries


def test_split_of_a_tiny_range_among_many_gives_some_nothing():
    r = Ring.split(cidr("10.0.0.0/31"), ["a", "b", "c"])
    assert [e.owner for e in r.entries] == ["a", "b"] and blocks(r, "c") == []


def voter(name, durable=None):
    d = durable or Durable(name, "c", [U], mode="quorum", quorum=3)
    if durable is None:
        peer, rows = Peer.voter(name, "c", [U], U, 3)
        d.apply(rows)
    else:
        peer = d.load(U, 30.0)
    return peer, d


def test_a_restarted_voter_keeps_its_promise():
    peer, d = voter("p1")
    ready = peer.receive("p2", Prepare("c", (2, "p2")), 0)
    d.apply(ready.rows)
    assert isinstance(ready.messages[0][1], Promise)
    peer, _ = voter("p1", d)  # restart from what was committed
    ready = peer.receive("p0", Prepare("c", (1, "p0")), 0)
    assert ready.messages == [("p0", VoteNack("c", (1, "p0"), (2, "p2")))]
    ready = peer.receive("p0", Accept("c", (1, "p0"), ("p0", "p1")), 0)
    assert isinstance(ready.messages[0][1], VoteNack) and not ready.rows


def test_a_restarted_acceptor_reports_what_it_accepted():
    peer, d = voter("p1")
    d.apply(peer.receive("p0", Accept("c", (1, "p0"), ("p0", "p1")), 0).rows)
    peer, _ = voter("p1", d)
    ready = peer.receive("p2", Prepare("c", (5, "p2")), 0)
    assert ready.messages == [("p2", Promise("c", (5, "p2"), ((1, "p0"), ("p0", "p1"))))]


def test_proposer_decides_with_a_majority_and_the_cluster_gets_a_new_identity():
    peer, d = voter("p0")
    peer.reachable = {"p1", "p2"}
    ready = peer.tick(0)
    ballot = next(msg.ballot for _, msg in ready.messages if isinstance(msg, Prepare))
    d.apply(ready.rows)
    ready = peer.receive("p1", Promise("c", ballot, None), 0)
    assert {type(msg) for _, msg in ready.messages} == {Accept}
    ready = peer.receive("p1", Accepted("c", ballot), 0)
    assert peer.standing == "member" and peer.decision == ("p0", "p1", "p2")
    assert peer.cluster.startswith("c/") and len(peer.cluster) > 4


def seeded_three():
    peers = {}
    for p in ("p0", "p1", "p2"):
        peers[p], _ = Peer.seeded(p, "c", [U], U, ["p0", "p1", "p2"])
        for q in ("p0", "p1", "p2"):  # as if each had heard the other seeds
            peers[p]._heard_seed(q, Ready())
    return peers


def test_a_peer_that_can_reach_the_target_refuses_to_promise():
    peers = seeded_three()
    peers["p1"].reachable = {"p0", "p2"}
    ready = peers["p1"].receive("p0", RemovePrepare("c", 1, ("p2",), ()), 0)
    assert ready.messages == [("p0", RemoveNack("c", 1, "p1 can still reach p2"))]
    assert not peers["p1"].promised


def test_a_promise_excludes_other_runners_then_lapses():
    peers = seeded_three()
    p1 = peers["p1"]
    p1.reachable = {"p0"}
    ready = p1.receive("p0", RemovePrepare("c", 1, ("p2",), ()), 0)
    assert isinstance(ready.messages[0][1], RemoveAck)
    assert ready.rows == [m.PeerSeen("p0"), m.Removal("p2", "p0", "promised", 0)]
    assert isinstance(p1.receive("p3", RemovePrepare("c", 7, ("p2",), ()), 1).messages[0][1],
                      RemoveNack)
    # Messages from the target are ignored while the promise holds.
    assert p1.receive("p2", RemovePrepare("c", 9, ("p0",), ()), 1).messages == []
    p1.tick(2 * p1.request_timeout + 1)
    assert not p1.promised


def test_rmpeer_refuses_without_a_majority_unless_forced():
    peers = seeded_three()
    del peers["p2"]
    p0 = peers["p0"]
    p0.reachable = set()
    p0.removed["p1"] = "p1"  # p1 left: the membership is p0 and p2
    out = p0.request("r", m.RemovePeer(("p2",)), 0)
    assert out.replies[0][1]["error"]["code"] == "no_majority"
    out = p0.request("r", m.RemovePeer(("p2",), force=True), 0)
    assert out.replies[0][1]["ok"] and blocks(p0.replica.rings[U], "p0") == [
        "10.0.0.0/26", "10.0.0.128/25"]


def test_a_handover_is_taken_from_a_peer_that_left_and_refused_from_one_removed():
    """A Handover sent again by a peer that left (the receiver counts it removed by itself,
    having merged the first) is merged and acknowledged; the same frame from a peer an
    rmpeer removed is refused, and changes nothing."""
    for by, taken in (("p1", True), ("p2", False)):
        peers = seeded_three()
        p0, p1 = peers["p0"], peers["p1"]
        p1.reachable = {"p0"}
        out = p1.request("r", m.Leave(), 0)
        (to, handover), = out.messages
        assert to == "p0" and blocks(p1.replica.rings[U], "p0") == [
            "10.0.0.0/25", "10.0.0.192/26"]
        p0.removed[p1.me] = by
        before = blocks(p0.replica.rings[U], "p0")
        ready = p0.receive("p1", handover, 0)
        if taken:
            assert ready.messages == [("p1", HandoverAck("c", handover.req))]
            assert blocks(p0.replica.rings[U], "p0") == ["10.0.0.0/25", "10.0.0.192/26"]
        else:
            (to, refuse), = ready.messages
            assert to == "p1" and isinstance(refuse, Refuse) and refuse.removed_by == "p2"
            assert blocks(p0.replica.rings[U], "p0") == before == [
                "10.0.0.0/26", "10.0.0.192/26"]


def test_a_leave_not_acknowledged_in_time_says_so_and_its_handover_is_sent_again():
    peers = seeded_three()
    p1 = peers["p1"]
    p1.reachable = {"p0"}
    (to, handover), = p1.request("r", m.Leave(), 0).messages
    p1.reachable = {"p0", "p2"}  # p2 got nothing: it is sent nothing again
    ready = p1.tick(p1.request_timeout)  # no acknowledgement came
    assert ready.replies == [("r", m.error("timeout", (
        "p1 handed its space over, but p0 did not acknowledge in time; it sends the handover "
        "again every 1s while it runs: stop it only once `ipamd status` shows no peer in "
        "handing_over (one that never answers: rmpeer it once this one is stopped)")))]
    assert ready.messages == [("p0", handover)]  # the same space, sent again
    assert p1.status(2.0)["handing_over"] == ["p0"]
    assert p1.tick(2.5).messages == []  # a second apart, not every tick
    assert p1.tick(3.0).messages == [("p0", handover)]
    ready = p1.receive("p0", HandoverAck("c", handover.req), 3.1)
    assert ready.replies == [] and p1.status(3.1)["handing_over"] == []  # answered before
    assert p1.tick(5.0).messages == []
