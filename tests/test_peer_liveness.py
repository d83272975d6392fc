"""Keepalive intervals and silence (protocols/peer_liveness.py), and PeerNet judging a peer by
them: an idle daemon's keepalive bytes stay flat in the number of peers, a peer that goes
silent is unreachable once its announced silence is over, and not a moment before."""
import pytest
import trio

from appliance.peer_net import PeerNet
from appliance.protocols import peer_liveness as liveness
from appliance.protocols.peer_frames import KEEPALIVE_FRAME, ProtocolError, Sealer, frame

from .test_peer_auth import SECRET, FakeCore


def test_keepalive_bytes_stay_flat_and_detection_grows_only_past_the_budget():
    for peers in (2, 10, 21):  # small clusters: as before (0.5 s, gone after 2 s)
        assert liveness.interval(peers - 1) == 0.5
        assert liveness.dead_after(liveness.interval(peers - 1)) == 2.0
    assert liveness.dead_after(liveness.interval(27)) == 2.0  # 28 peers: 0.648 s, still 2 s
    assert liveness.dead_after(liveness.interval(28)) == pytest.approx(2.016)
    for peers in (22, 40, 100, 200):
        every = liveness.interval(peers - 1)
        assert (peers - 1) * liveness.FRAME_BYTES / every == pytest.approx(liveness.BUDGET)
    assert liveness.interval(39) == pytest.approx(0.936)
    assert liveness.dead_after(liveness.interval(39)) == pytest.approx(2.808)
    assert liveness.interval(99) == pytest.approx(2.376)
    assert liveness.dead_after(liveness.interval(99)) == pytest.approx(7.128)
    # A cluster that grows at once: each interval at most twice the one announced before.
    assert liveness.interval(99, last=0.5) == 1.0
    assert liveness.interval(10_000) == liveness.INTERVAL_MAX


def test_a_keepalive_on_the_wire_is_frame_bytes():
    sealer = Sealer(b"k1" * 16, b"k2" * 16)
    assert len(frame(sealer.seal(KEEPALIVE_FRAME, liveness.encode(2.0)))) \
        == liveness.FRAME_BYTES == 24


def test_keepalives_go_on_a_grid_of_wall_time():
    assert liveness.until_next(1000.25, 0.5) == pytest.approx(0.25)
    assert liveness.until_next(1000.0, 0.5) == pytest.approx(0.5)
    assert liveness.until_next(999.99, 0.5) == pytest.approx(0.51)  # not twice at once
    assert liveness.until_next(-3.2, 2.64) > 0  # a clock gone mad still gives a wait


def test_keepalive_payloads():
    assert liveness.decode(liveness.encode(2.64)) == 2.64
    assert liveness.decode(b"") is None  # says nothing: the default silence applies
    assert liveness.decode(liveness.encode(0.001)) == liveness.INTERVAL_MIN  # clamped
    assert liveness.decode(b"\xff\xff") == liveness.INTERVAL_MAX
    with pytest.raises(ValueError, match="keepalive payload of 3 bytes"):
        liveness.decode(b"abc")


class Frames:
    """A connection's frames as _reader reads them: given in advance, then silence."""

    def __init__(self, frames):
        self.peer, self.frames = "b", list(frames)

    async def receive(self):
        if self.frames:
            return self.frames.pop(0)
        await trio.sleep_forever()


async def read(net, frames):
    with trio.move_on_after(0.1):  # the frames, then the reader waits on silence
        await net._reader(Frames(frames), inbound=True)


async def test_a_peer_is_held_to_the_silence_it_announced():
    now = [100.0]
    net = PeerNet(FakeCore("a"), SECRET, None, clock=lambda: now[0])
    net.out["b"] = None  # our connection to it is up
    await read(net, [(KEEPALIVE_FRAME, liveness.encode(2.64))])  # a peer of a big cluster
    assert net.reachable() == {"b"}
    now[0] += 7.9  # slow, but within 3 of its intervals: not gone
    assert net.reachable() == {"b"}
    now[0] += 0.1  # silent longer: gone
    assert net.reachable() == set()
    await read(net, [(KEEPALIVE_FRAME, liveness.encode(0.5))])  # heard again, small cluster
    assert net.reachable() == {"b"}
    now[0] += 2.0
    assert net.reachable() == set()
    with pytest.raises(ProtocolError, match="bad keepalive from b"):
        await read(net, [(KEEPALIVE_FRAME, b"xyz")])


async def test_a_silent_connection_is_hung_up_on_after_twice_its_silence():
    net = PeerNet(FakeCore("a"), SECRET, None)
    net.dead_after["b"] = 0.2  # as if announced: gone after 0.2 s, hung up on after 0.4 s
    t0 = trio.current_time()
    with pytest.raises(trio.TooSlowError):
        await net._reader(Frames([(KEEPALIVE_FRAME, b"")]), inbound=True)
    assert 0.4 <= trio.current_time() - t0 < 1.0
