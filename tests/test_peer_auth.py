"""The peer handshake and frames, in process over memory streams: both sides prove the
secret, a wrong secret or a replayed proof fails, and a replayed, reordered or altered frame
ends the connection (its counter is implicit: such a frame fails authentication)."""
import hashlib
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from appliance.core.addr import cidr
from appliance.peer_net import PeerNet, _Framed, _Session
from appliance.protocols.peer_book import Entry, decode_book
from appliance.protocols.peer_frames import (ADDRESSES, CORE, HEAD, PROTOCOL, TAG_SIZE,
                                            ProtocolError, Sealer, mac, tag)

SECRET = b"a-cluster-secret-of-some-length"
AUTH_FAILED = "frame failed authentication (forged, corrupted, replayed or out of order)"


@dataclass
class Loaded:
    peer_id: str
    cluster_id: str = "c1"
    universes: list = field(default_factory=lambda: [cidr("10.0.0.0/24")])


@dataclass
class FakePeer:
    cluster: str
    base_cluster: str


class FakeCore:
    """The core loop as PeerNet sees it (peer_net.CoreSide), over plain fields."""

    def __init__(self, peer_id, cluster="c1"):
        self.loaded = Loaded(peer_id, cluster)
        self.peer = FakePeer(cluster, cluster)
        self.reachable = set()

    @property
    def me(self):
        return self.loaded.peer_id

    @property
    def ranges(self):
        return sorted(map(str, self.loaded.universes))

    def cluster(self):
        return self.peer.cluster, self.peer.base_cluster

    def heard_from(self):
        return set()

    def members(self):
        return {self.me}

    def removed(self):
        return set()

    async def receive(self, sender, msg):
        pass

    def set_reachable(self, peers, dialling):
        self.reachable = set(peers)

    async def join_cluster(self, cluster):
        self.loaded.cluster_id = self.peer.cluster = self.peer.base_cluster = cluster

    async def identified(self, address, peer):
        pass


def net(peer_id, secret=SECRET, cluster="c1"):
    return PeerNet(FakeCore(peer_id, cluster), secret, None)


async def both(x, y):
    """Run the handshake on both ends of a memory stream; return each side's outcome."""
    left, right = trio.testing.memory_stream_pair()
    got = {}

    async def one(n, stream, outbound, key):
        try:
            got[key] = await n._handshake(stream, outbound)
        except (ProtocolError, trio.BrokenResourceError) as e:  # the other side hung up
            got[key] = e
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, x, left, True, "x")
        nursery.start_soon(one, y, right, False, "y")
    return got["x"], got["y"]


async def test_handshake_proves_the_secret_both_ways():
    (sx, px, _), (sy, py, _) = await both(net("a"), net("b"))
    assert (px, py) == ("b", "a")
    assert sx.send_key == sy.recv_key and sx.recv_key == sy.send_key


async def test_wrong_secret_fails_on_both_sides():
    x, y = await both(net("a"), net("b", secret=b"another-secret-entirely"))
    assert isinstance(x, ProtocolError) or isinstance(y, ProtocolError)
    assert any("failed authentication" in str(e) for e in (x, y) if isinstance(e, Exception))


async def test_foreign_cluster_refused():
    x, y = await both(net("a"), net("b", cluster="c2"))
    assert any("belongs to cluster" in str(e) for e in (x, y) if isinstance(e, Exception))


async def test_a_joiner_takes_the_cluster_of_the_peer_it_dials():
    joiner = net("j", cluster="")
    (s, peer, _), _ = await both(joiner, net("b"))
    assert peer == "b" and joiner.core.peer.cluster == "c1"
    # Nor by one that cannot prove the secret: the joiner's cluster stays unset.
    stranger = net("j3", cluster="")
    x, _ = await both(stranger, net("evil", secret=b"not-the-cluster-secret", cluster="c9"))
    assert isinstance(x, Exception) and stranger.core.peer.cluster == ""
    # ... and a peer with no cluster is never taken in by one it did not dial.
    _, y = await both(net("b"), net("j2", cluster=""))
    assert isinstance(y, ProtocolError) and "not joined" in str(y)


async def test_a_recorded_handshake_replayed_to_a_new_connection_fails():
    # Record what b says in one handshake with a, then replay it word for word to a again.
    left, right = trio.testing.memory_stream_pair()
    a1, b = net("a"), net("b")
    recorded = []
    reader = _Framed(left)

    async def record():
        await b._handshake(right, False)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(record)
        # Play a's part by hand so b's frames can be kept.
        hello = a1._hello(b"\x01" * 16)
        await reader.write(hello)
        recorded.append(await reader.read())
        theirs = PeerNet._check_hello(a1, recorded[0])[2]
        both = hashlib.sha256(hello + recorded[0]).digest()
        await reader.write(mac(SECRET, b"proof", b"a", theirs, b"\x01" * 16, both))
        recorded.append(await reader.read())
    # Replay to a fresh a, which picks a fresh nonce: the old proof cannot match it.
    left, right = trio.testing.memory_stream_pair()
    a2 = net("a")
    replayer = _Framed(right)

    async def replay():
        await replayer.read()
        for frame in recorded:
            await replayer.write(frame)

    result = {}

    async def fresh_a():
        try:
            await a2._handshake(left, True)
        except ProtocolError as e:
            result["error"] = e

    async with trio.open_nursery() as nursery:
        nursery.start_soon(replay)
        nursery.start_soon(fresh_a)
    assert "failed authentication" in str(result.get("error")), result


async def test_replayed_reordered_or_altered_frames_end_the_connection():
    left, right = trio.testing.memory_stream_pair()
    tx = _Session(_Framed(left), b"k1" * 16, b"k2" * 16, "b")
    wire = _Framed(right)
    frames = []
    for payload in (b"one", b"two"):
        await tx.send(CORE, payload)
        frames.append(await wire.read())

    async def feed(*fs):
        l2, r2 = trio.testing.memory_stream_pair()
        rx = _Session(_Framed(r2), b"k2" * 16, b"k1" * 16, "a")
        out = _Framed(l2)
        for f in fs:
            await out.write(f)
        return rx

    rx = await feed(frames[0], frames[0])  # replayed
    assert await rx.receive() == (CORE, b"one")
    with pytest.raises(ProtocolError) as e:
        await rx.receive()
    assert str(e.value) == AUTH_FAILED
    rx = await feed(frames[1])  # reordered (or the first dropped)
    with pytest.raises(ProtocolError) as e:
        await rx.receive()
    assert str(e.value) == AUTH_FAILED
    for i in (0, 1, 3, len(frames[0]) - 1):  # version, kind, payload, tag
        altered = frames[0][:i] + bytes([frames[0][i] ^ 1]) + frames[0][i + 1:]
        rx = await feed(altered)
        with pytest.raises(ProtocolError) as e:
            await rx.receive()
        assert str(e.value) == AUTH_FAILED


def test_the_counter_is_implicit_not_on_the_wire():
    """Protocol 6: a frame is version, kind, payload and a 16-byte tag; its counter is only in
    the tag, so a frame tagged for counter n passes only where n is the one expected."""
    tx = Sealer(b"k1" * 16, b"k2" * 16)
    first, second = tx.seal(CORE, b"same"), tx.seal(CORE, b"same")
    assert first[:-TAG_SIZE] == second[:-TAG_SIZE] == bytes([PROTOCOL, CORE]) + b"same"
    assert len(first) == HEAD.size + len(b"same") + TAG_SIZE == 22
    assert first[-TAG_SIZE:] != second[-TAG_SIZE:]  # the counters differ, in the tag alone
    assert second[-TAG_SIZE:] == tag(b"k1" * 16, 2, first[:HEAD.size], b"same")

    ahead = Sealer(b"k2" * 16, b"k1" * 16)
    ahead.received = 2  # expects 3: the frame of counter 2 is a replay
    with pytest.raises(ProtocolError) as e:
        ahead.unseal(second)
    assert str(e.value) == AUTH_FAILED
    assert ahead.received == 2
    due = Sealer(b"k2" * 16, b"k1" * 16)
    due.received = 1  # expects 2
    assert due.unseal(second) == (CORE, b"same")
    assert due.received == 2


def test_an_authenticated_frame_of_another_version_is_refused():
    head = HEAD.pack(PROTOCOL - 1, CORE)
    rx = Sealer(b"k2" * 16, b"k1" * 16)
    with pytest.raises(ProtocolError) as e:
        rx.unseal(head + b"x" + tag(b"k1" * 16, 1, head, b"x"))
    assert str(e.value) == f"frame of protocol version {PROTOCOL - 1}, expected {PROTOCOL}"
    assert rx.received == 0
    with pytest.raises(ProtocolError, match="^frame too short to be authenticated$"):
        rx.unseal(bytes(HEAD.size + TAG_SIZE - 1))


async def test_oversized_frame_is_refused_before_it_is_read():
    left, right = trio.testing.memory_stream_pair()
    await left.send_all(b"\xff\xff\xff\xff")
    with pytest.raises(ProtocolError, match="exceeds"):
        await _Framed(right).read()


def test_hellos_of_another_protocol_version_or_malformed_are_refused():
    import msgpack
    n = net("a")
    good = msgpack.unpackb(net("b")._hello(b"\x02" * 16))
    for bad, reason in ((good[:1] + [0] + good[2:], "protocol version 0"),
                        (good[:-1], "malformed hello"),
                        (["HTTP/1.1"] + good[1:], "not an ipamd peer hello"),
                        (good[:5] + [["10.9.0.0/24"]] + good[6:], "has ranges 10.9.0.0/24")):
        with pytest.raises(ProtocolError, match=reason):
            n._check_hello(msgpack.packb(bad))
    with pytest.raises(ProtocolError, match="not an ipamd peer hello"):
        n._check_hello(b"\xc1garbage")


def test_bad_address_book_entries_are_dropped_one_by_one():
    import msgpack
    n = net("a")
    for book in ({"b": "no-port"}, {"b": "host:99999"}, {"b": "host:0"}, {"b": "host:12x"},
                 {"": "h:1"}, {"b": 5}, {"b": "peer1..example.com:6786"},
                 {"b": "a" * 64 + ".com:1"}, {"b\n": "h:1"}):
        n._learn(msgpack.packb(book))  # dropped with a log line; the connection stays
    assert n.addresses == {}
    n._learn(msgpack.packb({"c": "h:1", "d": "bad", "e": "[fd00::1]:2"}))
    assert n.addresses == {"c": "h:1", "e": "[fd00::1]:2"}
    for book in (["b", "h:1"], b"\xc1"):  # not a book at all: the peer is broken
        with pytest.raises(ProtocolError, match="address book"):
            n._learn(book if isinstance(book, bytes) else msgpack.packb(book))


def test_nicknames_travel_in_address_books():
    import msgpack

    n = net("a")
    # Entries of an older ipamd (an address alone) still parse: no nickname known.
    n._learn(msgpack.packb({"b": "h:1", "c": ["h:2", "host-c"], "d": ["", "host-d"]}), "d")
    assert n.addresses == {"b": "h:1", "c": "h:2"}
    assert n.nicknames == {"c": "host-c", "d": "host-d"}
    # A bad nickname costs its entry only: not the others, nor the connection.
    n._learn(msgpack.packb({"e": ["h:3", "bad\x07"], "f": ["h:4", "x" * 65], "g": ["h:5", 7],
                            "h": ["h:6"], "i": ["h:7", "host-i"], "j": ["h:8", "has space"],
                            "d": ["", ""]}), "d")
    assert n.addresses == {"b": "h:1", "c": "h:2", "i": "h:7"}
    assert n.nicknames == {"c": "host-c", "d": "host-d", "i": "host-i"}
    # A peer's own word wins; another's word only fills a gap; nobody kept, nothing kept.
    n._learn(msgpack.packb({"d": ["", "liar"], "b": ["", "heard-b"], "zz": ["", "ghost"]}), "c")
    assert n.nicknames == {"c": "host-c", "d": "host-d", "i": "host-i", "b": "heard-b"}
    n._learn(msgpack.packb({"b": ["", "real-b"]}), "b")
    n._learn(msgpack.packb({"b": ["", "liar"]}), "c")
    assert n.nicknames["b"] == "real-b"
    # Our books carry our own nickname, and those we know of peers we name.
    n.nickname = "host-a"
    n._proved("b")
    assert n._book_entries("c") == {"a": Entry(None, "host-a"), "b": Entry("h:1", "real-b")}


async def test_a_book_goes_whole_once_then_only_what_changed():
    n = net("a")
    n.nickname = "host-a"
    n._remember("b", "h:1")
    n._proved("b")
    send, recv = trio.open_memory_channel(10)
    n.out["c"] = send

    def sent():
        kind, payload = recv.receive_nowait()
        assert kind == ADDRESSES
        return decode_book(payload)[0]
    n._send_book("c", n._book_entries(None))  # a new connection: all of it
    assert sent() == {"a": Entry(None, "host-a"), "b": Entry("h:1", None)}
    n._remember("d", "h:4")
    n._proved("d")
    n._name("b", "host-b", True)
    n._send_book("c", n._book_entries(None), full=False)  # what changed since
    assert sent() == {"b": Entry("h:1", "host-b"), "d": Entry("h:4", None)}
    n.out["d"] = send
    n._send_book("d", n._book_entries(None))  # never its own entry
    assert sent() == {"a": Entry(None, "host-a"), "b": Entry("h:1", "host-b")}


def test_phantom_peers_from_an_address_book_stay_candidates(tmp_path):
    """A thousand made-up entries: at most MAX_CANDIDATES are kept and dialled, none of them is
    a member after a restart, and so none can block rmpeer."""
    import msgpack

    from appliance import peer_net
    from appliance.core.addr import cidr
    from appliance.core.messages import PeerSeen
    from appliance.store import Store
    store = Store(tmp_path / "ipamd.db")
    loaded = store.open([cidr("198.18.0.0/24")], "t")
    n = net("a")
    n.save = store.save_peer_address
    n._learn(msgpack.packb({f"phantom{i}": f"198.18.9.{i % 250 + 1}:{7000 + i}"
                            for i in range(1000)}))
    assert len(n.addresses) == peer_net.MAX_CANDIDATES
    store.commit([PeerSeen("phantom3")])  # one of them answered, authenticated
    store.close()
    again = Store(tmp_path / "ipamd.db")
    reloaded = again.open(None, "t")
    peer = again.load_peer(reloaded, cidr("198.18.0.0/24"), 30.0, frozenset())
    assert peer.seen == {"phantom3"} and peer.members() == {reloaded.peer_id, "phantom3"}
    assert len(again.peer_addresses()) == peer_net.MAX_CANDIDATES
    again.close()
