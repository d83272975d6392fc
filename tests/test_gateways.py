"""Gateways reserved across hosts, one message at a time: held by the handles that named them,
reserved by their owner for the peers that asked, released with the last holder (a lost
release is retried), and carried with the space on leave and rmpeer (the scenario
gateways.txt shows them end to end)."""
import msgpack
import pytest

from appliance.protocols import peer_codec
from appliance.core import messages as m
from appliance.core.addr import cidr, parse_addr
from appliance.core.peer_messages import GatewayRelease, GatewayReleased, Handover, RemoveAck, \
    RemovePrepare, SpaceRequest

from .scenario import Cluster

U = cidr("10.0.0.0/24")
GW = parse_addr("10.0.0.1")


def reserved(c, p):
    return c.peers[p].allocator.status(c.now)["reserved"]


def cluster(n=3):
    c = Cluster(n, U)
    c.settle()
    return c


def test_a_release_lost_on_the_way_is_sent_again_until_the_owner_answers():
    c = cluster()
    assert c.requests([("p1", m.Allocate("a", gateway=GW[1]))]) == ["10.0.0.64/24"]
    assert reserved(c, "p0") == {"10.0.0.1": ["peer p1"]}
    c.blocked.add(("p1", "p0"))  # p1's messages to p0 are lost (p0 still looks reachable)
    c.requests([("p1", m.Release("a"))])
    c.settle(10)
    assert reserved(c, "p1") == {"10.0.0.1": ["releasing"]}
    assert reserved(c, "p0") == {"10.0.0.1": ["peer p1"]}  # kept: safe, if not yet useful
    c.blocked.clear()
    c.settle(60)  # the next reminder round
    assert reserved(c, "p1") == {} and reserved(c, "p0") == {}
    # Freed by p0 through quarantine, and the rows say the same after a restart.
    c.crash("p0")
    c.restart("p0")
    assert reserved(c, "p0") == {}
    assert c.durable["p0"].freed["10.0.0.1"].freed_at > 1000.0


def test_a_holder_is_kept_while_a_request_of_its_handle_is_in_flight():
    c = cluster()
    c.blocked.add(("p0", "p1"))  # p0's answers to p1 are lost: p1's request waits
    ref = c.submit("p1", m.Allocate("a", gateway=GW[1]))
    c.settle(3)
    assert ref not in c.replies
    assert reserved(c, "p0") == {"10.0.0.1": ["peer p1"]}  # p0 did reserve it
    c.settle(30)  # the request times out: then, and only then, p1 gives the gateway up
    assert c.replies[ref]["error"]["code"] == "timeout"
    assert reserved(c, "p1") == {"10.0.0.1": ["releasing"]}
    c.blocked.clear()
    c.settle(60)
    assert reserved(c, "p0") == {} and reserved(c, "p1") == {}


def test_an_ack_to_a_removal_carries_the_gateways_held_in_the_targets_space():
    c = cluster(4)
    assert c.requests([("p1", m.Allocate("a", gateway=GW[1]))])[0].startswith("10.0.0.")
    c.crash("p0")  # the owner of 10.0.0.1 is gone
    ready = c.peers["p1"].receive(
        "p2", RemovePrepare("c1", 7, ("p0",), tuple(c.peers["p2"].replica.vector.items())),
        c.now)
    ack = next(msg for dst, msg in ready.messages if isinstance(msg, RemoveAck))
    assert ack.reserved == ((U, GW[1], ("p1",)),)
    # The reclaimer keeps it reserved for p1 from the moment it owns the space.
    assert c.requests([("p2", m.RemovePeer(("p0",), force=True))])[0].startswith("removed p0")
    assert reserved(c, "p2") == {"10.0.0.1": ["peer p1"]}


def test_the_new_messages_travel_whole():
    big = cidr("fd00::/16")
    address = big.start + (1 << 100)
    for msg in (GatewayRelease("c", big, address), GatewayReleased("c", U, GW[1]),
                Handover("c", 3, c_delta(), ((U, GW[1], ("p1", "kept")),)),
                RemoveAck("c", 4, c_delta(), (), ("p0",), ((big, address, ("p2",)),))):
        assert peer_codec.decode(peer_codec.encode(msg)) == msg


def c_delta():
    from appliance.core.gossip import Delta
    return Delta((("p0", 1),), (), None)


def test_a_release_naming_no_address_or_a_foreign_range_changes_nothing():
    c = cluster()
    c.requests([("p1", m.Allocate("a", gateway=GW[1]))])
    before = dict(c.durable["p0"].reserved)
    bad = msgpack.packb(["GatewayRelease", "c1", str(U), None])
    with pytest.raises(peer_codec.CodecError, match="GatewayRelease.address must be an address"):
        peer_codec.decode(bad)
    for bad in (GatewayRelease("c1", cidr("10.9.0.0/24"), 1),  # not a universe of ours
                GatewayRelease("c1", U, U.end + 5)):  # ours, but not in it
        ready = c.peers["p0"].receive("p1", bad, c.now)
        assert ready.alarms == ["refused a gateway release from p1: bad address"]
        assert not ready.rows and c.durable["p0"].reserved == before


def test_cni_status_counts_only_free_space_that_must_lie_inside_the_window():
    """A peer's hint covers a whole ring entry; a rangeStart-rangeEnd window that cuts the
    entry may hold none of that free space. STATUS says "available" only when the hints prove
    free space inside the window."""
    c = cluster(2)  # p0 owns 10.0.0.0/24; p1 nothing
    # p0 fills 10.0.0.1-10.0.0.100: its one entry still has 154 free, all above .100.
    for i in range(100):
        assert c.requests([("p0", m.Allocate(f"x{i}"))])[0] == f"10.0.0.{i + 1}/24"
    c.settle(20)  # hints refreshed and gossiped
    window = m.CanServe((((U, U.start + 1, U.start + 20),),))
    ref = c.submit("p1", window)
    assert c.replies[ref] == m.error(
        "exhausted", "set 0: no free address in 10.0.0.0/24 on p1 or any peer it can reach")
    wider = m.CanServe((((U, U.start + 1, U.start + 150),),))
    ref = c.submit("p1", wider)
    assert c.replies[ref] == m.ok()
    # What an ADD over the narrow window gets agrees: nothing.
    assert c.requests([("p1", m.Allocate("y", range=(U.start + 1, U.start + 20)))])[0] \
        .startswith("error exhausted")


def test_a_space_request_naming_an_address_outside_its_bounds_is_refused():
    """Found by make fuzz: an address outside the request's bounds reached the formatting of
    a refusal and raised in the core (then rebuilt from the database)."""
    c = cluster()
    bad = SpaceRequest("c1", 7, U, U.start + 200, U.start + 201, (1 << 136) - 1, False)
    ready = c.peers["p0"].receive("p1", bad, c.now)
    assert ready.alarms == ["refused a space request from p1: bad bounds"]
    assert not ready.rows and not ready.messages


def test_a_handover_reserves_only_inside_the_space_it_hands_over():
    """Found by make fuzz: reservations named outside the handed space (here an address the
    receiver holds) made an address both held and reserved, a negative free hint, and a
    database the daemon would not start on."""
    c = cluster(2)
    assert c.requests([("p0", m.Allocate("web"))]) == ["10.0.0.1/24"]
    held = (U, U.start + 1, ("kept",))
    ready = c.peers["p0"].receive("p1", Handover("c1", 1, c_delta(), (held,)), c.now)
    c.handle("p0", ready)
    assert reserved(c, "p0") == {}
    # Nor does a reservation of a held address count twice against the free space.
    a = c.peers["p0"].allocator
    assert a.adopt_reserved(U, U.start + 1, ("kept",)) == []
    assert a.free_count(U, U.start, U.end, c.now) == 256 - 1
    c.settle(20)
    c.crash("p0")
    c.restart("p0")  # rebuilt from its rows: starts
    assert c.peers["p0"].allocator.free_count(U, U.start, U.end, c.now) == 255


def test_a_lost_answer_never_marks_a_gateway_that_is_ours_meanwhile():
    """Found by the simulator (seed 238): p1 asked the owner to reserve a gateway, a claim
    nearby brought that address's block to p1 (free, so never reserved there), p1 handed it
    out, and then the first request timed out: p1 must not mark it "releasing" too (held and
    reserved at once: its free space was counted wrong)."""
    c = cluster(2)
    assert c.requests([("p1", m.Claim("s", *parse_addr("10.0.0.2")))]) == ["10.0.0.2/24"]
    a = c.peers["p1"].allocator
    assert c.peers["p1"].replica.rings[U].owner_of(GW[1]) == "p1"  # came with the block
    assert c.requests([("p1", m.Allocate("t", range=(GW[1], GW[1])))]) == ["10.0.0.1/24"]
    assert a.maybe_reserved(GW) == [] and a.reserved == {}
    owned = sum(hi - lo for lo, hi in a._owned[U])
    assert a.free_count(U, U.start, U.end, c.now) == owned - len(a._blocked(U, U.start, U.end,
                                                                          c.now))


def test_leave_hands_over_each_reservation_with_its_holders_in_the_same_message():
    c = cluster(3)
    for p, h in (("p1", "a"), ("p2", "b")):
        assert c.requests([(p, m.Allocate(h, gateway=GW[1]))])[0].startswith("10.0.0.")
    p0 = c.peers["p0"]
    p0.allocator.load_reserved((4, U.start + 9), "kept")  # a --gateway of p0's
    ready = p0.request("leave", m.Leave(), c.now)
    handovers = {dst: msg for dst, msg in ready.messages if isinstance(msg, Handover)}
    carried = {dst: msg.reserved for dst, msg in handovers.items() if msg.reserved}
    (dst, reserved_), = carried.items()
    assert reserved_ == ((U, GW[1], ("p1", "p2")), (U, U.start + 9, ("kept",)))
    c.handle("p0", ready)
    # The receiver keeps them from the very message that makes it the owner.
    c.handle(dst, c.peers[dst].receive("p0", handovers[dst], c.now))
    other = "p1" if dst == "p2" else "p2"
    assert reserved(c, dst) == {"10.0.0.1": [f"handle {'a' if dst == 'p1' else 'b'}",
                                             f"peer {other}"],
                                "10.0.0.9": ["kept"]}
    # Restarted before any acknowledgement came (p0 is told none here), p0 does not know who
    # acknowledged: it sends each Handover again, with the reservations it holds in that
    # space (10.0.0.9's "kept" was never a row, so only 10.0.0.1's is on its disk).
    c.crash("p0")
    c.restart("p0")
    again = {d: msg for d, msg in c.peers["p0"].tick(c.now).messages if isinstance(msg, Handover)}
    assert set(again) == set(handovers)
    assert {d: msg.reserved for d, msg in again.items() if msg.reserved} == {
        dst: ((U, GW[1], ("p1", "p2")),)}


def test_a_lost_answer_is_marked_only_for_a_gateway_another_peer_owns():
    c = cluster(2)
    a = c.peers["p1"].allocator
    assert a.maybe_reserved(GW) == [m.Reserve("10.0.0.1", "releasing", str(U),
                                              "gateway, owner to be told")]
    c2 = cluster(2)
    assert c2.requests([("p1", m.Claim("s", *parse_addr("10.0.0.2")))]) == ["10.0.0.2/24"]
    assert c2.peers["p1"].allocator.maybe_reserved(GW) == []  # p1's own now, not held


def test_a_new_holder_while_a_release_is_pending_cancels_it():
    c = cluster()
    assert c.requests([("p1", m.Allocate("a", gateway=GW[1]))]) == ["10.0.0.64/24"]
    c.blocked.add(("p1", "p0"))
    c.requests([("p1", m.Release("a"))])  # its GatewayRelease is lost
    assert reserved(c, "p1") == {"10.0.0.1": ["releasing"]}
    c.blocked.clear()  # before the next reminder round: the release is still pending
    assert c.requests([("p1", m.Allocate("b", gateway=GW[1]))])[0].startswith("10.0.0.")
    assert reserved(c, "p1") == {"10.0.0.1": ["handle b"]}
    assert reserved(c, "p0") == {"10.0.0.1": ["peer p1"]}
    c.settle(60)  # reminder rounds: nothing is released, b still names it
    assert reserved(c, "p0") == {"10.0.0.1": ["peer p1"]}
    c.crash("p1")
    c.restart("p1")  # and so say its rows
    assert reserved(c, "p1") == {"10.0.0.1": ["handle b"]}


def test_reservations_for_a_removed_peer_go_and_only_theirs():
    c = cluster(4)
    for p, h in (("p1", "a"), ("p2", "b")):
        assert c.requests([(p, m.Allocate(h, gateway=GW[1]))])[0].startswith("10.0.0.")
    assert reserved(c, "p0") == {"10.0.0.1": ["peer p1", "peer p2"]}
    c.crash("p1")
    assert c.requests([("p0", m.RemovePeer(("p1",)))])[0].startswith("removed p1")
    c.settle(60)  # a reminder round
    assert reserved(c, "p0") == {"10.0.0.1": ["peer p2"]}  # p2 still names it


def test_a_pending_release_of_a_gateway_that_became_ours_frees_it_here():
    c = cluster(3)
    assert c.requests([("p1", m.Allocate("a", gateway=GW[1]))])[0].startswith("10.0.0.")
    c.blocked.add(("p1", "p0"))  # p1's release (and later its ack of the handover) are lost
    c.requests([("p1", m.Release("a"))])
    assert reserved(c, "p1") == {"10.0.0.1": ["releasing"]}
    ref = c.submit("p0", m.Leave())  # p0's first block (with 10.0.0.1) goes to p1
    c.settle(60)
    assert c.peers["p1"].replica.rings[U].owner_of(GW[1]) == "p1"
    # Ours now: nobody else keeps it for us, so it is simply free again, via quarantine.
    assert reserved(c, "p1") == {}
    assert GW[1] in c.peers["p1"].allocator.freed[U]
    assert c.replies[ref]["error"]["code"] == "timeout"  # p1's ack never came
