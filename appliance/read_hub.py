"""Waiting for many sockets to become readable, each registered once for its lifetime.

trio registers a socket with its epoll for one wait at a time (EPOLLONESHOT): an epoll_ctl
system call and its bookkeeping per wait, so per request on a hook connection (an eighth of
the daemon's work under 8 clients, measured with py-spy). Here each socket is registered
once, edge-triggered, in an epoll of the hub's own, and trio waits on that one descriptor:
one wake of the hub serves every socket that became readable since, whatever their number.

Edge-triggered means an event says "something arrived", once. So a socket is "ready" from
its event until a receive finds nothing (BlockingIOError) or takes less than its buffer: the
user receives with `recv(sock, size)`, which calls `empty(sock)` then, or `more(sock)` when
the receive filled its whole buffer (more may wait unread, and no event will come for it).
An end (the peer's half-close, a hang-up or an error) stays ready for good, whatever empty()
says: a unix socket gives the data before it first and the end only to the next receive, and
the event for both may be one.

A socket may have a handler (add(sock, on_event)): the hub calls it, in its own task, when
the socket has an event while its task waits in wait_readable. It returns True if it dealt
with the event itself (it read the socket with recv(), which says whether it is empty):
the task stays asleep. So a connection whose requests the handler can serve costs no task
switch per request (the hook socket's plain requests, hook_server.py). After each batch of
events the hub awaits `after()`, if given: what the handlers started is finished there (the
hook server commits what they applied, in one transaction). Then it polls again at once, with
a checkpoint between, and parks in trio's wait only once a poll finds nothing: under load the
next requests came while `after` ran.

A short receive does not mean an empty socket for a client that passes descriptors or
out-of-band data (the kernel stops a receive there): that client's next request then waits
for its next write, or the connection's idle deadline. Only that client is delayed; the hook
protocol has neither.
"""
from __future__ import annotations

import select
import socket
import typing

import trio

_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET  # HUP and ERR always come
_ENDS = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR


class ReadHub:
    __slots__ = ("_ep", "_parked", "_ready", "_ended", "_closed", "_handlers", "_after")

    def __init__(self, after=None) -> None:
        self._ep = select.epoll()
        self._handlers: dict[int, typing.Callable[[], bool]] = {}  # fd: its on_event
        self._after = after
        self._parked: dict[int, trio.lowlevel.Task] = {}  # fd: the task waiting for it
        self._ready: set[int] = set()  # fds with an event since their last empty()
        self._ended: set[int] = set()  # fds whose peer half-closed or hung up: ready for good
        self._closed = False

    def add(self, sock: socket.socket, on_event=None) -> None:
        """From now on wait_readable(sock) may be used; remove(sock) before closing it.
        on_event: see the module's docstring."""
        if self._closed:
            return  # shutting down: waits fall back to trio's own
        # Data already there makes an event at once: registration reports the state.
        self._ep.register(sock.fileno(), _EVENTS)
        if on_event is not None:
            self._handlers[sock.fileno()] = on_event

    def remove(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        self._handlers.pop(fd, None)
        self._ready.discard(fd)
        self._ended.discard(fd)  # the number may come back, for another connection
        task = self._parked.pop(fd, None)
        if task is not None:  # its socket is going: let it find that out
            trio.lowlevel.reschedule(task)
        if fd >= 0 and not self._closed:
            try:
                self._ep.unregister(fd)
            except (OSError, ValueError):
                pass  # already closed: the kernel dropped it

    def empty(self, sock: socket.socket) -> None:
        """A receive found nothing, or took all there was (less than its buffer): wait for
        the next event. Anything arriving after that receive makes one."""
        self._ready.discard(sock.fileno())

    def more(self, sock: socket.socket) -> None:
        """A receive filled its buffer: the next wait must not block."""
        self._ready.add(sock.fileno())

    def recv(self, sock: socket.socket, size: int) -> bytes:
        """sock.recv(size), and what it says of the socket: empty after a receive that found
        nothing (BlockingIOError, raised on) or took less than `size`, still ready after one
        that filled it. Other errors pass through as they are."""
        try:
            data = sock.recv(size)
        except BlockingIOError:
            self.empty(sock)
            raise
        if len(data) < size:
            self.empty(sock)  # all there was: what comes next makes an event
        else:
            self.more(sock)
        return data

    async def wait_readable(self, sock: socket.socket) -> None:
        """Until sock has had an event since its last empty(): at once if it has (a
        checkpoint all the same). Cancellable."""
        fd = sock.fileno()
        if fd in self._ready or fd in self._ended:
            await trio.lowlevel.checkpoint()
            return
        if self._closed:  # the hub is gone (shutting down): trio's own wait, as before
            await trio.lowlevel.wait_readable(sock)
            return
        if fd in self._parked:
            raise trio.BusyResourceError("another task is already waiting for this socket")
        self._parked[fd] = trio.lowlevel.current_task()

        def abort(_):
            self._parked.pop(fd, None)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def run(self) -> None:
        """The hub's task: for as long as sockets are served. On its end (cancelled) every
        waiter is woken, and finds its socket as it is."""
        try:
            while True:
                await trio.lowlevel.wait_readable(self._ep)
                # Under load more has come by the time `after` is done: take it without
                # parking (each park registers the epoll with trio again, a system call).
                while self.dispatch():
                    if self._after is not None:
                        await self._after()
                    await trio.lowlevel.checkpoint()
        finally:
            self._closed = True
            for task in self._parked.values():
                trio.lowlevel.reschedule(task)
            self._parked.clear()
            trio.lowlevel.notify_closing(self._ep)
            self._ep.close()

    def dispatch(self) -> int:
        """Take the events there are now, without waiting: each to its socket's handler, or
        its waiting task. run() does this at every wake; `after` may too, to take what came
        while it yielded."""
        events_now = self._ep.poll(0)
        for fd, events in events_now:
            if events & _ENDS:
                self._ended.add(fd)  # the task's to see: no handler is called
            elif fd in self._parked and fd in self._handlers and self._handlers[fd]():
                continue
            task = self._parked.pop(fd, None)
            if task is None:
                self._ready.add(fd)
            else:
                trio.lowlevel.reschedule(task)
        return len(events_now)
