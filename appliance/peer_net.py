"""The peer protocol over TCP: authenticated, length-prefixed frames carrying core messages.

Each daemon dials every peer it knows of and sends only on the connection it dialled; it
receives on the connections others dialled to it. So a pair of peers has one connection each
way, and there is nothing to deduplicate. Nothing at all goes back on a connection we
accepted: the kernel tells the dialler when what it sends is not acknowledged
(TCP_USER_TIMEOUT), and the dialler hangs up and redials.

The bytes on a connection (frames, the handshake, authenticated frames) are
protocols/peer_frames.py's; core messages are protocols/peer_codec.py's, address books
protocols/peer_book.py's. A wrong secret, another cluster, other ranges, another protocol
version, garbage or an oversized frame each closes the connection with a logged reason, and
nothing in the core changes.

What PeerNet and the core loop say to each other is CoreSide, below: PeerNet reads a view of
the membership and hands in what peers say, who is reachable, who answered at an address, and
a joiner's cluster; the core loop's messages come out through an outbox (a trio channel of
(dst, message)) that PeerNet drains. PeerNet imports nothing of the daemon.

Reachability, which the core needs for its decisions: a peer is reachable while our connection
to it is up and we have heard from it lately on its connection to us (any frame; a keepalive
goes only on a connection silent for the interval, which grows with the number of peers so
that an idle daemon's cost stays flat; protocols/peer_liveness.py has the arithmetic).
Unreachable is never removed: that is rmpeer's decision.

Peers tell each other where the peers they know listen (address books): the whole book when a
connection opens, then on that connection the entries that changed (looked at every
ADDRESS_BOOK_EVERY seconds; a book only adds to what its receiver knows), and every
BOOK_REFRESH_EVERY seconds the whole book to the one connected peer that has had it longest,
so a book lost or cut short (a full queue, a receiver full of candidates) is repaired without
sending O(peers) entries to every peer all the time: an idle cluster sends almost no books.
An id heard of that way is a candidate: dialled, but a member only once the core has
heard from it (it proved the secret and spoke) or it owns ring entries. Candidates are bounded
(MAX_CANDIDATES addresses kept in all) and expire: one that has not completed a handshake with
us for candidate_ttl seconds, is not connected and is not a member is forgotten (its row
deleted, no longer dialled). The clock of a candidate is the time it was learned or last
completed a handshake (peers.last_seen, wall time, so it survives restarts). Hearing of it
again in an address book does not restart it: otherwise a phantom that an authenticated peer
keeps announcing would never go. Books carry only peers that proved the secret to us or are
members, never candidates, so honest peers do not keep each other's phantoms alive by passing
them back and forth, and a candidate expires on every host that was told of it; a real host
is still announced by every member that knows it, and is learned again within a round.
Books also carry nicknames: our own, and those we keep of the peers we name (a peer's own
word wins over what others say of it).
"""
from __future__ import annotations

import functools
import hmac
import logging
import math
import os
import socket
import time
from collections.abc import Set
from typing import Protocol

import trio

from .core.addr import AddrError, parse_hostport
from .limits import ConnectionCap, Summary
from .protocols import peer_book, peer_codec
from .protocols import peer_liveness as liveness
from .protocols.peer_frames import (ADDRESSES, CORE, KEEPALIVE_FRAME, KIND_NAMES, MAX_FRAME,
                                    MAX_HELLO, MAX_PROOF, FrameReader, ProtocolError, Sealer,
                                    SelfConnection, check_hello, decode_hello, encode_hello,
                                    frame, proof, session_keys, transcript)

log = logging.getLogger("ipamd.peers")

# Seconds between looks at who is reachable: at the moment the first reachable peer would
# fall silent too long, or at once when a peer may have become reachable; within these bounds.
WATCH = (0.05, 1.0)
CONNECT_TIMEOUT = 2.0
# A handshake we dial is two round trips with a live process, timed from before it even
# accepted. On a loaded machine (a hundred daemons on two cores) that took over 2 s, and the
# cut handshakes were redialled, again and again, by every peer at once: thousands a minute
# kept the machine loaded (make scale N=100). A dead or cut-off peer fails at the TCP connect
# instead (CONNECT_TIMEOUT), so failure detection does not wait on this. A connection we
# accepted is a stranger until it proves the secret: it keeps the short bound (rule 5), timed
# from the accept, which a loaded peer's handshake rarely exceeds (none in that run).
HANDSHAKE_TIMEOUT = 10.0
ACCEPTED_HANDSHAKE_TIMEOUT = 2.0
BACKOFF = (0.1, 5.0)     # first and longest wait between connection attempts
_FLUSH = -1              # queued for a sender: write what a keepalive left (never on the wire)
QUEUE = 1024             # messages waiting for one peer's connection; beyond, they are dropped
ADDRESS_BOOK_EVERY = 2.0
# Seconds between unchanged books, each to one peer in turn: at 100 peers a whole book is about
# 4.5 KB, so 75 B/s of an idle daemon's bytes.
BOOK_REFRESH_EVERY = 60.0


class CoreSide(Protocol):
    """What PeerNet is given of the core loop (daemon.CoreLoop is one)."""

    # -- read: who this peer is, and the membership as the core has it
    @property
    def me(self) -> str: ...

    @property
    def ranges(self) -> list[str]:
        """The universes, as text, sorted: peers must have the same."""

    def cluster(self) -> tuple[str, str]:
        """(cluster, base cluster); the cluster is "" until a joiner has joined."""

    def heard_from(self) -> Set[str]:
        """Peers the core has heard from (authenticated, and durable): members."""

    def members(self) -> Set[str]: ...

    def removed(self) -> Set[str]: ...

    # -- handed in
    async def receive(self, sender: str, msg) -> None: ...

    def set_reachable(self, peers: set[str], dialling: bool) -> None:
        """The peers reachable now, and whether a --peer address is still being dialled
        that has never answered (a request lacking space waits for it)."""

    async def identified(self, address: str, peer: str) -> None:
        """peer answered (with the secret) at address; this peer's own id if it was us."""

    async def join_cluster(self, cluster: str) -> None:
        """A joiner's first peer proved the secret: its cluster, durable before use."""


EXPECTED = (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
            OSError)


def _reason(e: BaseException) -> str | None:
    """Why a connection ended, if it is a way connections end (the peer closed, broke the
    protocol, timed out); None for anything else, which is a bug to log in full."""
    if isinstance(e, BaseExceptionGroup):
        reasons = [_reason(x) for x in e.exceptions]
        return None if None in reasons else "; ".join(reasons)
    return str(e) or type(e).__name__ if isinstance(e, EXPECTED) else None


_REFUSED = Summary("connection_refused")  # unauthenticated connections: floods are summed
_BOOK_FULL = Summary("address_book_full")
MAX_CANDIDATES = 256  # peer addresses learned from others and dialled (the requirements: 100 hosts)
# Seconds a candidate (an address learned from a book, never heard from with the secret) is
# kept: long enough for a host that is down for a while (a reboot, maintenance) to be found
# when it is back, short enough that made-up entries do not linger for days. A host down for
# longer is learned again from any member that still knows it, and dials us itself once back.
CANDIDATE_TTL = 3600.0


def _ended(what: str, e: Exception, **fields) -> None:
    reason = _reason(e)
    extra = " ".join(f"{k}={v}" for k, v in fields.items())
    if reason is None:  # a bug must cost one connection, never the daemon
        log.exception("event=%s_failed %s", what, extra)
    elif what == "connection_refused":
        _REFUSED.note(reason)  # anyone can connect: one line per interval, with a count
    else:
        log.warning("event=%s %s reason=%r", what, extra, reason)


class _Framed:
    """Length-prefixed frames on a stream (peer_frames.FrameReader), bounded in size."""

    def __init__(self, stream: trio.abc.Stream):
        self.stream, self.reader = stream, FrameReader()

    async def read(self, most: int = MAX_FRAME) -> bytes:
        while (got := self.reader.next_frame(most)) is None:
            data = await self.stream.receive_some(65536)
            if not data:
                raise ProtocolError("connection closed")
            self.reader.receive_data(data)
        return got

    async def write(self, payload: bytes) -> None:
        await self.stream.send_all(frame(payload))

    def write_now(self, data: bytes) -> int:
        """Bytes of data the socket took at once: a write without a task switch, for the
        keepalive ticker. 0 if it would block, the stream is no socket's, or the write failed
        (the peer hung up, say): the connection's sender then finds that out on its own
        write, and ends the connection as any failed send does; the ticker goes on."""
        sock = getattr(self.stream, "socket", None)
        if sock is None:
            return 0
        try:
            return os.write(sock.fileno(), data)
        except OSError:
            return 0


class _Session(Sealer):
    """One authenticated connection: its frames sealed and checked (peer_frames.Sealer)."""

    def __init__(self, framed: _Framed, send_key: bytes, recv_key: bytes, peer: str,
                 counts: dict | None = None):
        super().__init__(send_key, recv_key)
        self.framed, self.peer = framed, peer
        self.counts = counts if counts is not None else {}  # frame kind -> bytes sent
        self.vectors = peer_codec.Vectors()  # of the deltas on it (one way: ours or theirs)
        # Keepalives (PeerNet._keepalives): the interval last announced on the connection,
        # the wall time of its last frame, whether a send is under way (its frame may be
        # half written), and the part of a frame sent by send_now that the socket did not
        # take (written before anything else).
        self.every = liveness.INTERVAL_MIN
        self.sent_at = 0.0
        self.writing = False
        self.pending = b""

    async def send(self, kind: int, payload: bytes) -> None:
        data = frame(self.seal(kind, payload))
        self.pending += data  # behind what send_now left: the wire stays in counter order
        self.counts[kind] = self.counts.get(kind, 0) + len(data)
        await self.flush()

    async def flush(self) -> None:
        """Write what is pending (send_now's rest, or send's frame)."""
        self.writing = True
        try:
            while self.pending:
                data, self.pending = self.pending, b""
                await self.framed.stream.send_all(data)
        finally:
            self.writing = False

    def send_now(self, kind: int, payload: bytes) -> bool:
        """Seal and write a frame without waiting, if no send is under way (False if one
        is: the frame is not sent). What the socket does not take at once is left in
        `pending`, for the next send or flush; the frame's counter is taken either way."""
        if self.writing:
            return False
        data = frame(self.seal(kind, payload))
        if self.pending:  # behind what an earlier one left: in order, never interleaved
            self.pending += data
        else:
            self.pending = data[self.framed.write_now(data):]
        self.counts[kind] = self.counts.get(kind, 0) + len(data)
        return True

    async def receive(self) -> tuple[int, bytes]:
        return self.unseal(await self.framed.read())


class PeerNet:
    """Dials, accepts, authenticates; feeds the core what peers say and tells it who is
    reachable."""

    def __init__(self, core: CoreSide, secret: bytes, listen_port: int | None,
                 clock=trio.current_time, known: dict[str, str] | None = None,
                 save=lambda peer, address, at: None, cap: int = 1024, *,
                 outbox: trio.MemoryReceiveChannel | None = None,
                 candidates: dict[str, float] | None = None,
                 candidate_ttl: float = CANDIDATE_TTL, heard_from=lambda peer, at: None,
                 forget=lambda peers: None, wall=time.time, nickname: str | None = None,
                 nicknames: dict[str, str] | None = None,
                 save_nickname=lambda peer, nickname: None):
        self.core, self.secret, self.listen_port = core, secret, listen_port
        self.outbox = outbox  # (dst, message) from the core loop, after their commit
        self.clock, self.save = clock, save
        # Candidates' expiry runs on wall time (`wall`), kept in the database as it is
        # (heard_from, save), so that a restart does not give phantoms a new lease.
        self.wall, self.heard_from, self.forget = wall, heard_from, forget
        self.candidate_ttl = candidate_ttl
        # peer id -> "host:port" we dial; what the database kept is dialled again on start
        self.addresses: dict[str, str] = dict(known or {})
        # peer id -> when it was learned or last completed a handshake (wall time), for every
        # id the core has not heard from: candidates, until the core's `seen` has them
        self.learned: dict[str, float] = dict(candidates or {})
        self.proven: set[str] = set()              # completed a handshake with us, this run
        self.expired = 0                           # candidates forgotten since start
        self.dialing: set[str] = set()             # addresses with a dialer running
        self.out: dict[str, trio.MemorySendChannel] = {}  # peer id -> its send queue
        self.sessions: dict[str, _Session] = {}   # peer id -> our connection, once it is up
        self.retick = trio.Event()                # set: a connection for _keepalives to time
        # peer id -> when a frame last came on the connection it dialled to us
        self.heard: dict[str, float] = {}
        # peer id -> seconds of silence on that connection that mean it is gone (from the
        # keepalive interval it announced; peer_liveness.dead_after)
        self.dead_after: dict[str, float] = {}
        self.rewatch = trio.Event()                # set: look at who is reachable now
        self.wake: dict[str, trio.Event] = {}      # address -> cut its dialler's backoff short
        self.refused: dict[str, str] = {}          # address -> why we stopped dialling it
        self.nursery: trio.Nursery | None = None
        self.static: set[str] = set()              # --peer addresses: dialled for ever
        self.bytes_sent: dict[int, int] = {}       # frame kind -> bytes, for status
        self.unsendable = 0                        # messages that failed to encode (a bug)
        self.cap = ConnectionCap("peer", cap)      # inbound connections at once
        # What the core was last told (set_reachable), to tell it only of changes.
        self.told: tuple[set[str], bool | None] = (set(), None)
        self.nickname = nickname                   # ours, told in our address books
        self.nicknames: dict[str, str] = dict(nicknames or {})  # peer id -> its nickname
        self.save_nickname = save_nickname
        self.named_by_self: set[str] = set()       # peers whose nickname came from them
        # Per connected peer, the whole book (to=None) as it was when last sent to it, and
        # when: a book goes again only when it changed (or for a rare refresh).
        self.book_sent: dict[str, tuple[dict, float]] = {}

    @property
    def me(self) -> str:
        return self.core.me

    # -- the core's side -----------------------------------------------------------------------

    def send(self, dst: str, msg) -> None:
        q = self.out.get(dst)
        if q is None:
            return  # not connected: the core treats it as lost, as any message may be
        try:
            # Encoded by the connection's sender as it goes out: a delta's vectors go as
            # changes since the last one on that connection (peer_codec.Vectors).
            q.send_nowait((CORE, msg))
        except trio.WouldBlock:
            log.info("event=dropped peer=%s reason=queue_full", dst)

    def _encoded(self, session: _Session, msg) -> bytes | None:
        try:
            return peer_codec.encode(msg, session.vectors)
        except Exception as e:  # a bug in what the core made: lose this message, not the daemon
            self.unsendable += 1
            log.error("event=dropped peer=%s reason=encode_failed kind=%s error=%r",
                      session.peer, type(msg).__name__, str(e))
            return None

    def traffic(self) -> dict:
        """Bytes sent to peers since start, by frame kind (frames whole, headers and MACs)."""
        return {KIND_NAMES[k]: v for k, v in sorted(self.bytes_sent.items())}

    def reachable(self) -> set[str]:
        """Peers we can talk with both ways: our connection to it is up (we can send), and
        its connection to us has carried a frame lately (it can send; replies go that way).
        One way only would let a request go out whose answer could not come back."""
        now = self.clock()
        return {p for p in self.out if now - self.heard.get(p, -1e9) < self._silence(p)}

    def _silence(self, peer: str) -> float:
        return self.dead_after.get(peer) or liveness.dead_after(None)

    def _dialling(self) -> bool:
        """A --peer address whose peer is not reachable (yet): a request lacking space waits
        for it, up to its deadline, before refusing."""
        r = self.reachable()
        at = {a for p, a in self.addresses.items() if p in r}
        return any(a not in at and a not in self.refused for a in self.static)

    def _update_reachable(self) -> None:
        r, dialling = self.reachable(), self._dialling()
        was = self.told[0]
        if (r, dialling) == self.told:
            return
        for p in sorted(r - was):
            log.info("event=peer_reachable peer=%s", p)
        for p in sorted(was - r):
            log.warning("event=peer_unreachable peer=%s", p)
        self.told = (r, dialling)
        self.core.set_reachable(set(r), dialling)

    async def _drain(self) -> None:
        """The core loop's messages, each onto its peer's connection."""
        async for dst, msg in self.outbox:
            self.send(dst, msg)

    # -- running -------------------------------------------------------------------------------

    async def run(self, listen_host: str | None, peers: list[str],
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            bound = None
            if self.listen_port is not None:
                serve = functools.partial(trio.serve_tcp, self.cap.wrap(self._accepted),
                                          self.listen_port, host=listen_host)
                listeners = await nursery.start(serve)
                bound = listeners[0].socket.getsockname()[1]
                self.listen_port = bound
            self.static = set(peers)
            self._update_reachable()
            if self.outbox is not None:
                nursery.start_soon(self._drain)
            self.expire_candidates()  # what expired while we were down is not dialled at all
            for addr in sorted(set(peers) | set(self.addresses.values())):
                self.dial(addr)
            nursery.start_soon(self._watch)
            nursery.start_soon(self._expiry)
            nursery.start_soon(self._books)
            nursery.start_soon(self._keepalives)
            task_status.started(bound)

    def dial(self, addr: str) -> None:
        if addr in self.dialing or addr in self.refused or self.nursery is None:
            return
        self.dialing.add(addr)
        self.nursery.start_soon(self._dialer, addr)

    async def _watch(self) -> None:
        while True:
            self._update_reachable()
            self.rewatch = trio.Event()
            with trio.move_on_after(self.next_look()):
                await self.rewatch.wait()

    def next_look(self) -> float:
        """Seconds until a peer we call reachable could have been silent too long."""
        now = self.clock()
        due = min((self.heard.get(p, now) + self._silence(p) for p in self.told[0]),
                  default=now + WATCH[1])
        return min(max(due - now + 0.01, WATCH[0]), WATCH[1])

    # -- candidates ----------------------------------------------------------------------------

    def candidates(self) -> dict[str, float]:
        """Peer ids whose address we keep but the core has not heard from: id -> when learned
        or last heard from with the secret (wall time)."""
        seen = self.core.heard_from()
        for p in [p for p in self.learned if p in seen]:
            del self.learned[p]  # a member now (its row is 'alive'): never expires
        return dict(self.learned)

    def _connected(self) -> set[str]:
        now = self.clock()
        return set(self.out) | {p for p, t in self.heard.items() if now - t < self._silence(p)}

    def expire_candidates(self) -> list[str]:
        """Forget the candidates not heard from with the secret for candidate_ttl seconds,
        unless connected or a member (owning ring entries, say, while it is down). Returns
        their ids."""
        now = self.wall()
        due = [p for p, t in self.candidates().items() if now - t > self.candidate_ttl]
        if not due:
            return []
        keep = self.core.members() | self._connected()
        gone = sorted(p for p in due if p not in keep)
        for p in gone:
            del self.learned[p]
            self.proven.discard(p)
            self.nicknames.pop(p, None)
            addr = self.addresses.pop(p, None)
            if addr is not None and addr not in self.addresses.values() and addr in self.wake:
                self.wake[addr].set()  # its dialler sees no peer there any more, and stops
        if gone:
            self.forget(gone)
            self.expired += len(gone)
            log.warning("event=candidates_expired count=%d first=%s ttl=%g reason=%r",
                        len(gone), gone[0], self.candidate_ttl,
                        "learned from a peer, no handshake since, not a member")
        return gone

    async def _expiry(self) -> None:
        while True:
            await trio.sleep(min(max(self.candidate_ttl / 10, 0.1), 60.0))
            self.expire_candidates()

    def _proved(self, peer: str) -> None:
        """peer completed a handshake with us: it knows the secret. A candidate's clock
        starts again (it is not a phantom), and it may be named in our address books."""
        now = self.wall()
        self.proven.add(peer)
        if peer in self.learned:
            self.learned[peer] = now
        self.heard_from(peer, now)

    async def _dialer(self, addr: str) -> None:
        try:
            host, port = parse_hostport(addr)
        except AddrError as e:  # e.g. kept in the database by an older ipamd
            host, why = None, str(e)
        else:
            why = "no host"
        if host is None:
            log.warning("event=not_dialled address=%r reason=%r", addr, why)
            self.dialing.discard(addr)
            return
        wait = BACKOFF[0]
        # Learned addresses are dialled while some peer is known there: a peer that comes
        # back on another port replaces its old address.
        while addr not in self.refused and (addr in self.static
                                            or addr in self.addresses.values()):
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    stream = await trio.open_tcp_stream(host, port)
                self._unacked_timeout(stream)
            except (OSError, trio.TooSlowError, UnicodeError, ValueError) as e:
                # A name that cannot be encoded or resolved is one more failed dial, never the
                # end of the daemon.
                log.debug("event=connect_failed address=%s error=%r", addr, str(e))
            else:
                began = self.clock()
                try:
                    async with stream:
                        await self._outbound(stream, addr)
                except Exception as e:
                    _ended("connection_closed", e, address=addr)
                if self.clock() - began > BACKOFF[1]:
                    wait = BACKOFF[0]  # it worked for a while: retry soon
            self.wake[addr] = trio.Event()
            with trio.move_on_after(wait):
                await self.wake[addr].wait()
            wait = min(wait * 2, BACKOFF[1])
        self.dialing.discard(addr)
        self.wake.pop(addr, None)

    # -- handshake -----------------------------------------------------------------------------

    def _hello(self, nonce: bytes) -> bytes:
        cluster, base = self.core.cluster()
        return encode_hello(cluster, base, self.me, self.core.ranges, nonce,
                            self.listen_port or 0)

    def _check_hello(self, data: bytes) -> tuple[str, str, bytes, int]:
        hello = decode_hello(data)
        check_hello(hello, self.me, self.core.ranges, *self.core.cluster())
        return hello.cluster, hello.peer, hello.nonce, hello.port

    async def _handshake(self, stream, outbound: bool) -> tuple[_Session, str, int]:
        framed = _Framed(stream)
        mine = os.urandom(16)
        with trio.fail_after(HANDSHAKE_TIMEOUT if outbound else ACCEPTED_HANDSHAKE_TIMEOUT):
            hello = self._hello(mine)
            await framed.write(hello)
            heard = await framed.read(MAX_HELLO)
            cluster, peer, theirs, port = self._check_hello(heard)
            joining = not self.core.cluster()[0]
            if joining and not (outbound and cluster):
                raise ProtocolError("this peer has not joined a cluster yet")
            both = transcript(hello, heard, outbound)
            await framed.write(proof(self.secret, self.me, theirs, mine, both))
            if not hmac.compare_digest(await framed.read(MAX_PROOF),
                                       proof(self.secret, peer, mine, theirs, both)):
                raise ProtocolError(f"peer {peer} failed authentication (wrong cluster secret?)")
        if joining:  # only once the peer has proved it knows the secret
            await self.core.join_cluster(cluster)
        send_key, recv_key = session_keys(self.secret, self.me, peer, mine, theirs)
        return _Session(framed, send_key, recv_key, peer, self.bytes_sent), peer, port

    # -- connections ---------------------------------------------------------------------------

    async def _outbound(self, stream, addr: str) -> None:
        try:
            session, peer, _ = await self._handshake(stream, outbound=True)
        except SelfConnection as e:
            self.refused[addr] = str(e)
            await self.core.identified(addr, self.me)
            raise
        self._proved(peer)
        await self.core.identified(addr, peer)
        if peer in self.out:
            log.info("event=duplicate_connection peer=%s address=%s", peer, addr)
            return
        self._remember(peer, addr)
        send, recv = trio.open_memory_channel(QUEUE)
        self.out[peer] = send
        self.rewatch.set()
        log.info("event=connected peer=%s address=%s", peer, addr)
        try:
            async with trio.open_nursery() as n:
                n.start_soon(self._sender, session, recv)
                self._send_book(peer, self._book_entries(None))  # all of it, at once
                await self._reader(session, inbound=False)  # keepalives only, this way
        finally:
            del self.out[peer]
            self.book_sent.pop(peer, None)
            self._update_reachable()

    async def _accepted(self, stream: trio.SocketStream) -> None:
        try:
            async with stream:
                session, peer, port = await self._handshake(stream, outbound=False)
                self._proved(peer)
                host = stream.socket.getpeername()[0]
                addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                if port and self.addresses.get(peer) != addr:
                    self._remember(peer, addr)
                    self.dial(addr)
                if peer not in self.out and addr in self.wake:
                    self.wake[addr].set()  # it is up: dial back now, not after the backoff
                log.info("event=accepted peer=%s", peer)
                self._unacked_timeout(stream)
                await self._reader(session, inbound=True)
        except Exception as e:
            _ended("connection_refused", e)

    def _unacked_timeout(self, stream) -> None:
        """What we send (keepalives at least) must be acknowledged within twice the silence
        that means gone, or the kernel breaks the connection: a partition stalls TCP without
        closing it, and a fresh connection after the heal beats TCP's retransmission backoff."""
        ms = int(2000 * liveness.dead_after(liveness.interval(len(self.out) + 1)))
        try:
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, ms)
        except (AttributeError, OSError):  # not Linux: the receiving end's silence still tells
            pass

    def frame_heard(self, peer: str, kind: int, payload: bytes) -> None:
        """A frame came from peer on its connection to us: it is alive and the path works
        (the simulator's liveness model feeds this too, tests/sim/liveness.py)."""
        self.heard[peer] = self.clock()
        if kind == KEEPALIVE_FRAME:
            try:
                announced = liveness.decode(payload)
            except ValueError as e:
                raise ProtocolError(f"bad keepalive from {peer}: {e}") from None
            if announced is not None:
                self.dead_after[peer] = liveness.dead_after(announced)
        if peer not in self.told[0]:
            self.rewatch.set()  # it may be reachable now

    async def _reader(self, session: _Session, inbound: bool) -> None:
        peer = session.peer
        # On a connection it dialled, the peer sends a frame at least every interval it
        # announced: long silence means the peer or the path is gone (a partition stalls
        # TCP without closing it), so hang up (it redials). Nothing comes the other way.
        # One scope whose deadline each frame moves: a scope per frame (trio.fail_after)
        # was a seventh of an idle daemon's work at a hundred peers (py-spy).
        with trio.CancelScope() as silence:
            while True:
                if inbound:
                    silence.deadline = trio.current_time() + 2 * self._silence(peer)
                kind, payload = await session.receive()
                if inbound:
                    self.frame_heard(peer, kind, payload)
                if kind == CORE:
                    try:
                        msg = peer_codec.decode(payload, session.vectors)
                    except peer_codec.CodecError as e:
                        raise ProtocolError(f"bad message from {peer}: {e}") from None
                    silence.deadline = math.inf  # a core slow to take it is no silence
                    await self.core.receive(peer, msg)
                elif kind == ADDRESSES:
                    if peer in self.core.removed():
                        # Its word counts no more, but garbage still ends the connection.
                        peer_book.decode_book(payload)
                    else:
                        self._learn(payload, peer)
                elif kind != KEEPALIVE_FRAME:
                    raise ProtocolError(f"unknown frame kind {kind}")
        raise trio.TooSlowError(f"silent for over {2 * self._silence(peer):g}s")

    async def _sender(self, session: _Session, recv: trio.MemoryReceiveChannel) -> None:
        """Queued frames, in order. The first frame is a keepalive, at once, so the peer knows
        what silence to expect; the later ones are _keepalives'."""
        session.every = liveness.interval(len(self.out))
        await self._send(session, KEEPALIVE_FRAME, liveness.encode(session.every))
        self.sessions[session.peer] = session
        self.retick.set()  # its first keepalive may be due before the ticker's next wake
        try:
            while True:
                kind, payload = await recv.receive()
                if kind == _FLUSH:
                    await session.flush()
                    continue
                if kind == CORE:
                    payload = self._encoded(session, payload)
                if payload is not None:
                    await self._send(session, kind, payload)
        finally:
            if self.sessions.get(session.peer) is session:
                del self.sessions[session.peer]

    async def _send(self, session: _Session, kind: int, payload: bytes) -> None:
        await session.send(kind, payload)
        session.sent_at = self.wall()

    async def _keepalives(self) -> None:
        """A keepalive on each connection we dialled that was silent since before its grid
        point (peer_liveness.until_next: the next multiple of its interval, at least a tenth
        of one after its last frame). All that are due go in one wake-up, written at once
        (Session.send_now): a task switch and a timer per connection cost an idle daemon of
        a hundred peers more than the keepalives themselves (py-spy). A connection with a
        send under way is not silent, and is not interrupted: no keepalive there. (Before,
        each connection's sender waited with its own timer, and a send cancelled by it had
        taken its counter: the peer hung up on the next frame.)"""
        while True:
            now = self.wall()
            soonest = now + liveness.INTERVAL_MAX
            for peer, session in list(self.sessions.items()):
                # A wall clock stepped back leaves the last frame in the future: timed from
                # then, the connection would fall silent for as long as the step.
                session.sent_at = min(session.sent_at, now)
                due = session.sent_at + liveness.until_next(session.sent_at, session.every)
                if due <= now:
                    every = liveness.interval(len(self.out), session.every)
                    if session.send_now(KEEPALIVE_FRAME, liveness.encode(every)):
                        session.every, session.sent_at = every, now
                        if session.pending:  # the socket is full: the sender writes the rest
                            self._kick(peer)
                        due = now + liveness.until_next(now, every)
                    else:
                        due = now + session.every / 10
                soonest = min(soonest, due)
            self.retick = trio.Event()
            with trio.move_on_after(soonest - now):
                await self.retick.wait()

    def _kick(self, peer: str) -> None:
        """Have peer's sender write what send_now left; if its queue is full, it is busy and
        writes that before its next frame anyway."""
        q = self.out.get(peer)
        if q is not None:
            try:
                q.send_nowait((_FLUSH, b""))
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # busy, or ending: either way not the ticker's business

    async def _books(self) -> None:
        """Books to the peers whose last one is out of date; now and then, an unchanged one
        to the peer that has had it longest."""
        refreshed = self.clock()
        last: dict = {}
        while True:
            await trio.sleep(ADDRESS_BOOK_EVERY)
            now = self.clock()
            whole = self._book_entries(None)
            if whole == last:
                # Unchanged (the usual case): the same object, so the peers sent it already
                # are told apart by identity, not by comparing a hundred entries per peer.
                whole = last
            last = whole
            for peer in list(self.out):
                sent = self.book_sent.get(peer)
                if sent is None or sent[0] is whole:
                    continue
                if sent[0] == whole:  # the same book: keep this object, compared by identity
                    self.book_sent[peer] = (whole, sent[1])
                else:
                    self._send_book(peer, whole, full=False)
            if now - refreshed >= BOOK_REFRESH_EVERY and self.book_sent:
                refreshed = now
                self._send_book(min(self.book_sent, key=lambda p: self.book_sent[p][1]), whole)

    def _send_book(self, peer: str, whole: dict, full: bool = True) -> None:
        """Our book to peer, less its own entry: all of it, or (full=False) only the entries
        that changed since the last one it was sent (a book only ever adds to what its
        receiver knows, so the rest would tell it nothing). Noted as sent only if queued."""
        q = self.out.get(peer)
        if q is None:
            return
        last = {} if full else self.book_sent[peer][0]
        book = {p: e for p, e in whole.items() if p != peer and last.get(p) != e}
        try:
            q.send_nowait((ADDRESSES, peer_book.encode_book(book)))
        except trio.WouldBlock:
            return  # tried again next round
        self.book_sent[peer] = (whole, self.clock())

    def _book(self, to: str | None) -> dict[str, str]:
        """The addresses we tell `to` (None: the whole book) of: peers that proved the secret
        to us or are members, never mere candidates (see the module's doc)."""
        unproven = self.learned.keys() - self.proven
        if unproven:
            unproven -= self.core.members()
        return {p: a for p, a in self.addresses.items() if p != to and p not in unproven}

    def _book_entries(self, to: str | None) -> dict[str, peer_book.Entry]:
        """_book with the nicknames we know, and our own."""
        book = {p: peer_book.Entry(a, self.nicknames.get(p)) for p, a in self._book(to).items()}
        if self.nickname is not None:
            book[self.me] = peer_book.Entry(None, self.nickname)
        return book

    def _learn(self, payload: bytes, sender: str | None = None) -> None:
        good, bad = peer_book.decode_book(payload)
        if bad:  # dropped, each: one bad entry costs neither the others nor the connection
            log.warning("event=bad_address_book_entries count=%d first=%r", len(bad),
                        str(bad[0])[:80])
        now = self.wall()  # one book, one time learned: its entries expire together
        members = self.core.members()
        for peer, entry in good.items():
            if peer == self.me:
                continue
            if entry.address is not None and peer not in self.addresses:
                if len(self.addresses) < MAX_CANDIDATES:
                    self._remember(peer, entry.address, now)
                    self.dial(entry.address)
                else:
                    _BOOK_FULL.note(f"already {MAX_CANDIDATES} peer addresses known")
            # Nicknames are kept only for peers kept: as bounded as the addresses.
            if entry.nickname is not None and (peer == sender or peer in self.addresses
                                               or peer in members):
                self._name(peer, entry.nickname, peer == sender)

    def _name(self, peer: str, nickname: str, by_itself: bool) -> None:
        """A peer's nickname: its own word wins; others' word only fills a gap."""
        if by_itself:
            self.named_by_self.add(peer)
        elif peer in self.named_by_self or peer in self.nicknames:
            return
        if self.nicknames.get(peer) != nickname:
            self.nicknames[peer] = nickname
            self.save_nickname(peer, nickname)

    def _remember(self, peer: str, addr: str, now: float | None = None) -> None:
        if self.addresses.get(peer) != addr:
            now = self.wall() if now is None else now
            if peer not in self.addresses:
                self.learned.setdefault(peer, now)  # until the core has heard from it
            self.addresses[peer] = addr
            self.save(peer, addr, now)
