"""The peer codec: every message the simulator's peers send survives encode and decode
unchanged, and malformed input of any kind is a CodecError, never another exception."""
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.protocols import peer_codec
from appliance.core import peer_messages as wire
from appliance.core.addr import cidr
from appliance.core.gossip import Delta
from appliance.core.ring import Entry
from appliance.protocols.peer_codec import CodecError, decode, encode
from tests.sim.simulator import Faults, Sim

V6 = cidr("fd00::/64")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_simulated_message_round_trips(seed, monkeypatch):
    seen = {}
    real = Sim._send

    def send(self, src, dst, msg):
        again = decode(encode(msg))
        assert again == msg, (msg, again)
        seen[type(msg).__name__] = seen.get(type(msg).__name__, 0) + 1
        real(self, src, dst, msg)

    monkeypatch.setattr(Sim, "_send", send)
    sim = Sim.for_seed(seed)
    sim.run(300)
    assert {"Gossip", "SpaceRequest", "SpaceGrant"} <= set(seen), seen


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_simulated_message_round_trips_on_its_connection(seed, monkeypatch):
    """Each pair's messages in order through one Vectors at each end, as a connection carries
    them: every delta read back with the vectors it was sent with."""
    ends: dict = {}
    real = Sim._send

    def send(self, src, dst, msg):
        ours, theirs = ends.setdefault((src, dst), (peer_codec.Vectors(), peer_codec.Vectors()))
        again = decode(encode(msg, ours), theirs)
        if isinstance(getattr(msg, "delta", None), Delta):
            d, e = msg.delta, again.delta
            assert (dict(e.vector), e.entries) == (dict(d.vector), d.entries)
            assert (e.base is None, dict(e.base or ())) == (d.base is None, dict(d.base or ()))
        else:
            assert again == msg, (msg, again)
        real(self, src, dst, msg)

    monkeypatch.setattr(Sim, "_send", send)
    Sim.for_seed(seed).run(300)
    assert ends


def test_a_connection_carries_vectors_as_their_changes():
    ours, theirs = peer_codec.Vectors(), peer_codec.Vectors()
    vector = tuple((f"p{i:02}", 10 + i) for i in range(100))
    first = wire.Gossip("c", Delta(vector, (), vector))
    whole = encode(first, ours)
    assert decode(whole, theirs) == first and len(whole) > 1200  # 2 x 100 x (name, seq)
    moved = (*vector[:7], ("p07", 99), *vector[8:], ("new", 1))
    base = vector[1:]  # p00 dropped from what it assumes we have
    second = encode(wire.Gossip("c", Delta(moved, (), base), answer=True), ours)
    assert msgpack.unpackb(second)[2] == [[[["p07", 99], ["new", 1]], []], [], [[], ["p00"]]]
    got = decode(second, theirs)
    assert dict(got.delta.vector) == dict(moved) and dict(got.delta.base) == dict(base)
    assert len(second) < 100
    hello = decode(encode(wire.Gossip("c", Delta(moved, (), None)), ours), theirs)
    assert hello.delta.base is None and theirs.base == dict(base)  # a hello keeps the base
    probe = wire.Gossip("c", Delta((), ()), digest=b"12345678")
    raw = encode(probe, ours)
    assert msgpack.unpackb(raw)[2] is None and len(raw) < 30
    assert decode(raw, theirs) == probe and theirs.vector == dict(moved)  # left as they were
    # Decoded alone (no connection), the same bytes name changes against nothing.
    with pytest.raises(CodecError, match="base drops 'p00', a peer not in the last one"):
        decode(second)


def test_a_message_that_fails_to_encode_leaves_the_connection_s_vectors_as_they_were():
    ours = peer_codec.Vectors()
    encode(wire.Gossip("c", Delta((("a", 1),), (), (("a", 1),))), ours)
    bad = wire.Gossip("c", Delta((("a", 2),), (), (("a", 2),)), removed=((object(), "x"),))
    with pytest.raises(TypeError):
        encode(bad, ours)
    assert (ours.vector, ours.base) == ({"a": 1}, {"a": 1})


def test_ipv6_addresses_beyond_64_bits():
    e = Entry(V6.start, V6.end, "p1", 3, 2**63 - 1, ("p1", 9))
    msg = wire.SpaceGrant("c", 1, Delta((("p1", 9),), ((V6, e),), ()))
    assert decode(encode(msg)) == msg
    req = wire.SpaceRequest("c", 2, V6, V6.start + 1, V6.end, V6.end - 1)
    assert decode(encode(req)) == req
    gw = wire.SpaceRequest("c", 3, V6, V6.start + 1, V6.start + 2, V6.start + 1, gateway=True)
    assert decode(encode(gw)) == gw
    exact = wire.SpaceRequest("c", 5, V6, V6.start, V6.end, exact=True)
    assert decode(encode(exact)) == exact
    marked = wire.SpaceGrant("c", 6, Delta((), ((V6, Entry(V6.start, V6.end, "@names " + str(V6)
                                                          + " web " + "w" * 180 + "{0..9}", 2)),),
                                              ()))
    assert decode(encode(marked)) == marked  # carve markers may be long (protocol 5)
    no = wire.SpaceDenied("c", 4, "fd00::1 is held by handle 'x' on peer p", "in_use")
    assert decode(encode(no)) == no


@pytest.mark.parametrize("raw, match", [
    (b"\xc1", "not a msgpack"),
    (msgpack.packb(["Nope", "c"]), "unknown message kind"),
    (msgpack.packb(["HandoverAck", "c"]), "needs 2 fields"),
    (msgpack.packb(["HandoverAck", "c", -1]), "req must be an integer"),
    (msgpack.packb(["HandoverAck", "c", True]), "req must be an integer"),
    (msgpack.packb(["HandoverAck", "", 1]), "cluster must be a string"),
    (msgpack.packb(["SpaceRequest", "c", 1, "10.0.0.1/24", b"\x01", b"\x02", None, False, False]),
     "host bits"),
    (msgpack.packb(["SpaceRequest", "c", 1, "10.0.0.0/24", 5, b"\x02", None, False, False]),
     "lo must be 1 to 17 bytes"),
    (msgpack.packb(["SpaceRequest", "c", 1, "10.0.0.0/24", b"\x01", b"\x02", None, 1, False]),
     "gateway must be a boolean"),
    (msgpack.packb(["SpaceRequest", "c", 1, "10.0.0.0/24", b"\x01", b"\x02", None, False, 0]),
     "exact must be a boolean"),
    # A SpaceRequest of protocol 4 (no exact): refused by name.
    (msgpack.packb(["SpaceRequest", "c", 1, "10.0.0.0/24", b"\x01", b"\x02", None, False]),
     "SpaceRequest needs 8 fields"),
    (msgpack.packb(["SpaceDenied", "c", 1, "why", "x" * 33]), "code must be a string"),
    (msgpack.packb(["Gossip", "c", [[[["a", 1], ["a", 2]], []], [], None], False, [], b"",
                    False]), "names a peer twice"),
    (msgpack.packb(["Gossip", "c", [[[], []], [], [[], []]], False, [], "digest", False]),
     "digest must be"),
    (msgpack.packb(["Gossip", "c", [[[], []], [], [[], []]], False, [], b"x" * 65, False]),
     "digest must be"),
    (msgpack.packb(["Gossip", "c", [[[], []], [], [[], []]], False, [], b"", 1]),
     "answer must be a boolean"),
    # Vectors are changes since the last delta on the connection: none before the first.
    (msgpack.packb(["Gossip", "c", [[[], ["a"]], [], None], False, [], b"", False]),
     "vector drops 'a', a peer not in the last one"),
    (msgpack.packb(["Gossip", "c", [[["a", 1]], [], None], False, [], b"", False]),
     "vector must be a list of 2"),
    (msgpack.packb(["Gossip", "c", [[[], []], [], [[["a", -1]], []]], False, [], b"", False]),
     "base must be an integer"),
    # A Gossip of protocol 3 (no digest) or 6 (no answer): refused by name, never read with a
    # field missing.
    (msgpack.packb(["Gossip", "c", [[], [], None], False, []]), "Gossip needs 6 fields"),
    (msgpack.packb(["Gossip", "c", [[], [], None], False, [], b""]), "Gossip needs 6 fields"),
    (msgpack.packb({"a": 1}), "message must be a list"),
    (msgpack.packb([["Gossip"], "c"]), "unknown message kind"),
])
def test_malformed_messages_are_refused_with_the_reason(raw, match):
    with pytest.raises(CodecError, match=match):
        decode(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_are_a_codec_error_or_a_message(data):
    try:
        msg = decode(data)
    except CodecError:
        return
    assert type(msg).__name__ in peer_codec.KINDS


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.text(max_size=5)
                    | st.binary(max_size=5),
                    lambda c: st.lists(c, max_size=6), max_leaves=30))
def test_random_structures_are_a_codec_error_or_a_message(obj):
    for kind in ("Gossip", "SpaceRequest", "RemoveAck", "Promise"):
        data = msgpack.packb([kind, *obj] if isinstance(obj, list) else [kind, obj])
        try:
            decode(data)
        except CodecError:
            pass
