"""PeerNet's keepalive ticker (_keepalives): a keepalive on each connection we dialled that was
silent since before its grid point, all written in one pass without a task switch per
connection; never in the middle of a send; and every frame on the wire still authenticates in
order. Over real socket pairs, on a virtual clock (autojump): wall time is the trio clock
plus a constant, so grid points are exact."""
import trio
import trio.testing

from appliance.core import peer_messages as wire
from appliance.core.gossip import Delta
from appliance.peer_net import PeerNet, _Framed, _Session
from appliance.protocols import peer_codec
from appliance.protocols import peer_liveness as liveness
from appliance.protocols.peer_frames import (ADDRESSES, CORE, KEEPALIVE_FRAME, FrameReader,
                                            Sealer)

from .test_peer_auth import SECRET, FakeCore

K1, K2 = b"k1" * 16, b"k2" * 16
EPOCH = 1_000_000.0  # wall time at trio time 0: a multiple of every interval used here


def ticking_net() -> PeerNet:
    return PeerNet(FakeCore("a"), SECRET, None, wall=lambda: EPOCH + trio.current_time())


async def connect(net: PeerNet, peer: str, nursery) -> tuple[trio.MemorySendChannel, list]:
    """A connection from net to peer over a socket pair, its sender running; the frames the
    far end reads (each authenticated in order), as (trio time, kind, payload)."""
    a, b = trio.socket.socketpair()
    session = _Session(_Framed(trio.SocketStream(a)), K1, K2, peer)
    send, recv = trio.open_memory_channel(100)
    net.out[peer] = send
    nursery.start_soon(net._sender, session, recv)
    got = []

    async def read():
        far, rx = _Framed(trio.SocketStream(b)), Sealer(K2, K1)
        while True:
            kind, payload = rx.unseal(await far.read())
            got.append((trio.current_time(), kind, payload))
    nursery.start_soon(read)
    return send, got


def keepalive_times(got) -> list[float]:
    return [t for t, kind, _ in got if kind == KEEPALIVE_FRAME]


async def test_keepalives_go_on_the_grid_and_only_where_the_connection_is_silent(
        autojump_clock):
    net = ticking_net()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(net._keepalives)
        _, quiet = await connect(net, "quiet", nursery)
        busy_q, busy = await connect(net, "busy", nursery)
        every = liveness.interval(2)
        assert every == 0.5
        t0 = trio.current_time()
        # busy sends a frame every 0.04 s for 5 s: never silent for a tenth of an interval
        # before a grid point, so no keepalive goes on it.
        while trio.current_time() - t0 < 5.0:
            busy_q.send_nowait((ADDRESSES, b"x"))
            await trio.sleep(0.04)
        stopped = trio.current_time()
        await trio.sleep(3.0)
        nursery.cancel_scope.cancel()
    # The first keepalive of each goes at once, announcing the interval.
    assert quiet[0] == (t0, KEEPALIVE_FRAME, liveness.encode(every))
    assert busy[0] == (t0, KEEPALIVE_FRAME, liveness.encode(every))
    # quiet: then one on every grid point (wall time a multiple of the interval), no gaps.
    ticks = keepalive_times(quiet)[1:]
    assert len(ticks) >= 15
    for t in ticks:
        assert abs(((EPOCH + t) / every) - round((EPOCH + t) / every)) < 1e-6
    assert all(0.5 - 1e-6 <= b - a <= 0.5 + 1e-6 for a, b in zip(ticks, ticks[1:]))
    # busy: none while it was busy; once silent, on the grid again, within an interval.
    late = keepalive_times(busy)[1:]
    assert late and all(t > stopped for t in late)
    assert late[0] - stopped <= every + 1e-6
    assert sum(kind == ADDRESSES for _, kind, _ in busy) == 125


async def test_a_new_connection_is_kept_alive_at_its_own_interval(autojump_clock):
    """The ticker sleeps until the first keepalive due; a connection that comes up meanwhile
    with a shorter interval wakes it (retick), or the peer would hold that connection to a
    silence it did not keep."""
    net = ticking_net()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(net._keepalives)
        _, slow = await connect(net, "slow", nursery)
        await trio.testing.wait_all_tasks_blocked()
        net.sessions["slow"].every = liveness.INTERVAL_MAX  # the ticker sleeps ~10 s
        await trio.sleep(1.0)
        _, fresh = await connect(net, "fresh", nursery)
        await trio.sleep(3.0)
        nursery.cancel_scope.cancel()
    times = keepalive_times(fresh)
    assert len(times) >= 6
    assert all(b - a <= 0.5 + 1e-6 for a, b in zip(times, times[1:]))


class SlowStream:
    """A socket that is slow to take what is sent: a send writes half, waits 0.03 s, then the
    rest; a write without waiting (write_now, below) takes half of what it is given."""

    def __init__(self):
        self.wire = bytearray()

    async def send_all(self, data):
        half = len(data) // 2
        self.wire += data[:half]
        await trio.sleep(0.03)
        self.wire += data[half:]


class SlowFramed(_Framed):
    def write_now(self, data: bytes) -> int:
        half = len(data) // 2
        self.stream.wire += data[:half]
        return half


async def test_a_keepalive_never_cuts_into_a_send_and_the_wire_stays_in_order(
        autojump_clock, monkeypatch):
    """A keepalive falls due while a slow send is under way: it waits (send_now refuses), so
    no frame is cut into and no counter skipped; the part of one the socket does not take at
    once is written by the sender (woken for it) before its next frame. (Before, each sender waited for its keepalive under
    a timer, and a send cancelled by that timer had taken its counter: the peer hung up on
    the next frame with 'frame failed authentication', and a request in flight was lost.)"""
    monkeypatch.setattr(liveness, "until_next", lambda wall, every: 0.02)
    net = ticking_net()
    stream = SlowStream()
    session = _Session(SlowFramed(stream), K1, K2, "p")
    send, recv = trio.open_memory_channel(100)
    net.out["p"] = send
    for i in range(10):
        send.send_nowait((ADDRESSES, b"m%d" % i))
    with trio.move_on_after(1.0):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(net._keepalives)
            nursery.start_soon(net._sender, session, recv)
    reader, rx, frames = FrameReader(), Sealer(K2, K1), []
    reader.receive_data(bytes(stream.wire))
    while (f := reader.next_frame()) is not None:
        frames.append(rx.unseal(f))  # raises on a frame out of order, cut or forged
    assert len(reader.buf) < liveness.FRAME_BYTES  # at most a keepalive cut by the test's end
    assert [p for k, p in frames if k == ADDRESSES] == [b"m%d" % i for i in range(10)]
    keepalives = [k for k, _ in frames if k == KEEPALIVE_FRAME]
    assert len(keepalives) >= 10  # liveness: they went on after the sends, each written
    assert session.sent - rx.received <= 1  # at most the one cut by the test's end


async def test_a_keepalive_to_a_peer_that_hung_up_ends_that_connection_not_the_ticker(
        autojump_clock):
    """The far end closes; the next keepalive's write fails (EPIPE or ECONNRESET). Raised in
    the ticker, it ended the daemon (found by bench-host at 100 daemons on one core: a daemon
    went away mid-join). The sender finds the broken socket on its own write and ends its
    connection (redialled as any other); the ticker keeps the other connections alive."""
    net = ticking_net()
    a, b = trio.socket.socketpair()
    session = _Session(_Framed(trio.SocketStream(a)), K1, K2, "gone")
    send, recv = trio.open_memory_channel(100)
    net.out["gone"] = send
    ended = []

    async def sender():
        try:
            await net._sender(session, recv)
        except (trio.BrokenResourceError, OSError) as e:
            ended.append(e)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(net._keepalives)
        nursery.start_soon(sender)
        _, alive = await connect(net, "alive", nursery)
        await trio.testing.wait_all_tasks_blocked()
        b.close()  # the peer hangs up
        await trio.sleep(3.0)
        nursery.cancel_scope.cancel()
    assert len(ended) == 1 and "gone" not in net.sessions
    assert len(keepalive_times(alive)) >= 6  # the ticker went on


async def test_a_wall_clock_stepped_back_never_silences_a_connection(autojump_clock):
    """The grid is on wall time; a step back of 30 s (NTP at boot, say) left every idle
    connection's last frame in the future, and the ticker waited for it: 30.5 s without a
    keepalive, so every peer called this host gone and hung up (found in review). Now the
    gap stays within the peer's tolerance (3 intervals, at least 2 s)."""
    step = [0.0]
    net = PeerNet(FakeCore("a"), SECRET, None,
                  wall=lambda: EPOCH + trio.current_time() + step[0])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(net._keepalives)
        _, got = await connect(net, "p", nursery)
        await trio.sleep(2.1)
        step[0] = -30.0
        await trio.sleep(5.0)
        nursery.cancel_scope.cancel()
    times = keepalive_times(got)
    assert len(times) >= 12
    every = liveness.interval(1)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps) <= 2.2 * every + 1e-6 < liveness.dead_after(every)


async def test_a_core_slow_to_take_a_message_is_no_silence(autojump_clock):
    """The silence deadline covers waiting for the peer's next frame, not the core taking the
    last one: a core busy for longer than twice the silence (a commit behind a slow disk)
    must not have the connection cut under it, mid-delivery."""
    class SlowCore(FakeCore):
        taken = []

        async def receive(self, sender, msg):
            await trio.sleep(10.0)  # twice the silence is 4 s here
            self.taken.append(msg)
    net = PeerNet(SlowCore("a"), SECRET, None)
    probe = wire.Gossip("c1", Delta((), ()), digest=b"12345678")
    payload = peer_codec.encode(probe, peer_codec.Vectors())
    a, b = trio.socket.socketpair()
    tx = _Session(_Framed(trio.SocketStream(a)), K1, K2, "a")
    rx = _Session(_Framed(trio.SocketStream(b)), K2, K1, "b")
    await tx.send(CORE, payload)
    await tx.send(CORE, payload)
    t0 = trio.current_time()
    try:
        await net._reader(rx, inbound=True)
    except trio.TooSlowError:
        pass
    # Both delivered whole (20 s), then hung up on 4 s after the last frame was taken.
    assert SlowCore.taken == [probe, probe]
    assert trio.current_time() - t0 == 24.0


async def test_a_send_writes_what_a_keepalive_left_first(autojump_clock):
    """send_now's rest (the socket took half) goes out before the next frame's bytes: the
    far end reads both whole, in counter order."""
    stream = SlowStream()
    session = _Session(SlowFramed(stream), K1, K2, "p")
    assert session.send_now(KEEPALIVE_FRAME, liveness.encode(0.5))
    assert session.pending  # half of it waits
    await session.send(ADDRESSES, b"after")
    reader, rx = FrameReader(), Sealer(K2, K1)
    reader.receive_data(bytes(stream.wire))
    frames = []
    while (f := reader.next_frame()) is not None:
        frames.append(rx.unseal(f))
    assert frames == [(KEEPALIVE_FRAME, liveness.encode(0.5)), (ADDRESSES, b"after")]
    assert not reader.buf and not session.pending
