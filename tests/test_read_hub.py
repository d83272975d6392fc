"""read_hub.ReadHub: one edge-triggered registration per socket, and the "ready" state that
edge-triggering needs kept by hand. Real socket pairs, a real epoll; a wait that should not
block is bounded by a virtual clock (autojump), so a regression fails at once, not by hanging."""
import socket
from contextlib import asynccontextmanager, contextmanager

import pytest
import trio
import trio.testing

from appliance.read_hub import ReadHub


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


async def _wait_then(hub, sock, log, tag, done=None):
    await hub.wait_readable(sock)
    log.append(tag)
    if done is not None:
        done.set()


idle = trio.testing.wait_all_tasks_blocked  # every other task parked: nothing more will happen


@asynccontextmanager
async def serving(sock):
    """A running hub with sock added and found empty (as after a receive that found nothing),
    and a nursery for waiters; removed and ended afterwards."""
    hub = ReadHub()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.run)
        hub.add(sock)
        hub.empty(sock)
        yield hub, nursery
        hub.remove(sock)
        nursery.cancel_scope.cancel()


async def test_data_there_before_the_registration_is_not_missed(pair, autojump_clock):
    a, b = pair
    b.sendall(b"early")  # before add: registering reports it as an event
    async with serving(a) as (hub, nursery):
        with trio.fail_after(5):
            await hub.wait_readable(a)
        assert a.recv(100) == b"early"


async def test_after_empty_a_wait_blocks_until_data_comes(pair, autojump_clock):
    a, b = pair
    log = []
    async with serving(a) as (hub, nursery):
        for tag, data in (("woken", b"x"), ("again", b"y")):
            # Taken whole (short of the buffer) or found empty: the next wait parks.
            hub.empty(a)
            done = trio.Event()
            nursery.start_soon(_wait_then, hub, a, log, tag, done)
            await idle()
            assert log[-1:] != [tag]  # parked: nothing arrived
            b.sendall(data)
            with trio.fail_after(5):
                await done.wait()
            assert log[-1] == tag and a.recv(10) == data
        assert log == ["woken", "again"]


async def test_a_receive_that_filled_its_buffer_leaves_the_socket_ready(pair, autojump_clock):
    # Edge-triggered: data left unread after a full buffer makes no new event. Without
    # more() the next wait would park for good with requests waiting in the socket.
    a, b = pair
    b.sendall(b"z" * 3000)
    async with serving(a) as (hub, nursery):
        with trio.fail_after(5):
            await hub.wait_readable(a)
        assert a.recv(1000) == b"z" * 1000
        hub.more(a)
        with trio.fail_after(5):
            await hub.wait_readable(a)  # at once: no new data came
        assert len(a.recv(5000)) == 2000


async def test_recv_says_what_each_receive_leaves(pair, autojump_clock):
    # hub.recv: a full buffer leaves the socket ready, a short one or none leaves it empty
    # (the next wait parks until data comes, rather than spinning on empty receives).
    a, b = pair
    async with serving(a) as (hub, nursery):
        b.sendall(b"z" * 1500)
        await idle()  # the hub took the event, with nobody waiting: the socket is ready
        assert hub.recv(a, 1000) == b"z" * 1000
        with trio.fail_after(5):
            await hub.wait_readable(a)  # at once: 500 bytes wait unread
        assert hub.recv(a, 1000) == b"z" * 500
        with pytest.raises(BlockingIOError):
            hub.recv(a, 1000)
        for expect_empty in (True, False):
            if not expect_empty:
                hub.more(a)  # as after a full receive...
                with pytest.raises(BlockingIOError):
                    hub.recv(a, 1000)  # ...that was followed by one that found nothing
            log = []
            nursery.start_soon(_wait_then, hub, a, log, "woken")
            await idle()
            assert log == []  # parked: nothing came since
            b.sendall(b"y")
            await idle()
            assert log == ["woken"] and hub.recv(a, 1000) == b"y"


async def test_a_half_close_after_data_stays_ready_after_empty(pair, autojump_clock):
    # The data and the end come as one event; the receive that takes the data is short, and
    # the end is only seen by the next receive: the socket must stay ready for it.
    a, b = pair
    async with serving(a) as (hub, nursery):
        b.sendall(b"last request\n")
        b.shutdown(socket.SHUT_WR)
        with trio.fail_after(5):
            await hub.wait_readable(a)
        assert a.recv(65536) == b"last request\n"
        hub.empty(a)
        with trio.fail_after(5):
            await hub.wait_readable(a)  # at once
        assert a.recv(65536) == b""


async def test_a_socket_added_once_the_hub_has_ended_still_waits(pair, autojump_clock):
    # A connection accepted while shutting down: its add must not fail (the epoll is gone).
    a, b = pair
    hub = ReadHub()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.run)
        await idle()
        nursery.cancel_scope.cancel()
    hub.add(a)
    b.sendall(b"r")
    with trio.fail_after(5):
        await hub.wait_readable(a)
    assert a.recv(10) == b"r"
    hub.remove(a)
    trio.lowlevel.notify_closing(a)


async def test_an_event_while_nobody_waits_is_kept_for_the_next_wait(pair, autojump_clock):
    a, b = pair
    async with serving(a) as (hub, nursery):
        b.sendall(b"while busy")  # the connection is busy elsewhere (a batch)
        await idle()  # the hub has taken the event; nobody was parked
        with trio.fail_after(5):
            await hub.wait_readable(a)
        assert a.recv(100) == b"while busy"
        # All of it was taken: empty() ends that readiness, so the next wait parks.
        hub.empty(a)
        log = []
        nursery.start_soon(_wait_then, hub, a, log, "woken")
        await idle()
        assert log == []


async def test_a_cancelled_wait_leaves_no_waiter_behind(pair, autojump_clock):
    a, b = pair
    async with serving(a) as (hub, nursery):
        with trio.move_on_after(3) as scope:  # as the idle deadline does
            await hub.wait_readable(a)
        assert scope.cancelled_caught
        # The same socket can be waited for again (no "another task is waiting").
        b.sendall(b"next")
        with trio.fail_after(5):
            await hub.wait_readable(a)
        assert a.recv(10) == b"next"


async def test_two_waiters_for_one_socket_refused(pair, autojump_clock):
    a, b = pair
    async with serving(a) as (hub, nursery):
        nursery.start_soon(hub.wait_readable, a)
        await idle()
        with pytest.raises(trio.BusyResourceError):
            await hub.wait_readable(a)


async def test_remove_wakes_its_waiter(pair, autojump_clock):
    a, b = pair
    log = []
    async with serving(a) as (hub, nursery):
        nursery.start_soon(_wait_then, hub, a, log, "woken")
        await idle()
        hub.remove(a)  # its socket is going: the waiter must find that out
        await idle()
        assert log == ["woken"]


async def test_once_the_hub_ends_waits_still_work(pair, autojump_clock):
    # Shutting down: the hub's task is cancelled before the connections'. A parked waiter
    # is woken; a later wait uses trio's own registration and still sees data.
    a, b = pair
    hub = ReadHub()
    log = []
    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as hub_nursery:
            hub_nursery.start_soon(hub.run)
            hub.add(a)
            hub.empty(a)
            nursery.start_soon(_wait_then, hub, a, log, "woken by the end")
            await idle()
            hub_nursery.cancel_scope.cancel()
        await idle()
        assert log == ["woken by the end"]
        done = trio.Event()
        nursery.start_soon(_wait_then, hub, a, log, "data", done)
        await idle()
        assert log == ["woken by the end"]  # trio's wait: blocks while there is nothing
        b.sendall(b"late")
        with trio.fail_after(5):
            await done.wait()
        assert a.recv(10) == b"late"
        hub.remove(a)
        trio.lowlevel.notify_closing(a)


@contextmanager
def socket_pairs(n):
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(n)]
    for a, _ in pairs:
        a.setblocking(False)
    try:
        yield pairs
    finally:
        for a, b in pairs:
            a.close()
            b.close()


@asynccontextmanager
async def each_waited(hub, pairs, log):
    """hub running with the first socket of each pair added and found empty, and a task
    waiting on each, which logs its index when woken; every task blocked on entry."""
    async with trio.open_nursery() as nursery:
        for a, _ in pairs:
            hub.add(a)
            hub.empty(a)
        nursery.start_soon(hub.run)
        for i, (a, _) in enumerate(pairs):
            nursery.start_soon(_wait_then, hub, a, log, i)
        await idle()
        yield
        for a, _ in pairs:
            hub.remove(a)
        nursery.cancel_scope.cancel()


async def test_one_wake_of_the_hub_serves_many_sockets(autojump_clock):
    # 64 connections each with a request: every waiter is woken, and the hub took them from
    # its one descriptor in a single poll (one trio wait, not 64).
    hub = ReadHub()
    polls = []
    real_poll = hub._ep.poll

    class CountingEpoll:  # the epoll object's methods are read-only: wrap it
        def __getattr__(self, name):
            return getattr(real_ep, name)

        def poll(self, *args):
            got = real_poll(*args)
            polls.append(len(got))
            return got

    real_ep = hub._ep
    hub._ep = CountingEpoll()
    hub._ep.fileno = real_ep.fileno
    log = []
    with socket_pairs(64) as pairs:
        async with each_waited(hub, pairs, log):
            assert log == [] and polls == []
            for _, b in pairs:
                b.sendall(b"r")
            await idle()
            assert sorted(log) == list(range(64))
            assert polls == [64, 0]  # all in one poll; a second found nothing, and it parked


async def test_a_handler_serves_an_event_while_the_task_sleeps_on(pair, autojump_clock):
    """add(sock, on_event): called in the hub's task only while sock's task waits; True keeps
    that task asleep, False wakes it; after() is awaited after each batch of events."""
    a, b = pair
    calls, log, afters = [], [], []
    answers = [True, False]

    def on_event():
        calls.append(a.recv(10))  # the handler reads, and says so as a receive would
        hub.empty(a)
        return answers[len(calls) - 1]

    async def after():
        afters.append(len(calls))

    hub = ReadHub(after=after)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.run)
        hub.add(a, on_event)
        hub.empty(a)
        b.sendall(b"early")  # no task waits: the handler is not called, the socket is ready
        await idle()
        assert calls == [] and afters == [0]
        assert a.recv(10) == b"early"
        hub.empty(a)
        done = trio.Event()
        nursery.start_soon(_wait_then, hub, a, log, "woken", done)
        await idle()
        b.sendall(b"one")
        await idle()
        assert calls == [b"one"] and log == [] and afters == [0, 1]  # served; still asleep
        b.sendall(b"two")
        with trio.fail_after(5):
            await done.wait()
        assert calls == [b"one", b"two"] and log == ["woken"] and afters == [0, 1, 2]
        hub.remove(a)
        nursery.cancel_scope.cancel()


async def test_an_end_goes_to_the_task_never_to_the_handler(pair, autojump_clock):
    a, b = pair
    calls, log = [], []

    def on_event():
        calls.append(1)
        return True

    hub = ReadHub()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.run)
        hub.add(a, on_event)
        hub.empty(a)
        done = trio.Event()
        nursery.start_soon(_wait_then, hub, a, log, "woken", done)
        await idle()
        b.shutdown(socket.SHUT_WR)  # a handler returning True would leave the task asleep
        with trio.fail_after(5):
            await done.wait()
        assert log == ["woken"] and calls == [] and a.recv(10) == b""
        hub.remove(a)
        nursery.cancel_scope.cancel()


async def test_what_comes_while_after_runs_is_taken_without_parking(autojump_clock, monkeypatch):
    # Under load the next requests arrive while `after` commits: the hub takes them at its
    # next poll, without parking in trio's wait (a registration, a system call, each time);
    # it parks once a poll finds nothing.
    waits = []
    real_wait = trio.lowlevel.wait_readable

    async def counting_wait(fd):
        waits.append(fd)
        await real_wait(fd)
    monkeypatch.setattr(trio.lowlevel, "wait_readable", counting_wait)
    afters, log = [], []
    with socket_pairs(3) as pairs:
        async def after():
            afters.append(len(afters))
            if len(afters) < len(pairs):
                pairs[len(afters)][1].sendall(b"r")  # the next one comes while this one runs

        hub = ReadHub(after=after)
        async with each_waited(hub, pairs, log):
            assert waits == [hub._ep]
            pairs[0][1].sendall(b"r")
            await idle()
            assert sorted(log) == [0, 1, 2] and afters == [0, 1, 2]  # an `after` for each
            assert waits == [hub._ep, hub._ep]  # and the hub parked once, when all was done
