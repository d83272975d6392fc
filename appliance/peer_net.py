"""The peer protocol over TCP: authenticated, length-prefixed frames carrying core messages.

Each daemon dials every peer it knows of and sends only on the connection it dialled; it
receives on the connections others dialled to it. So a pair of peers has one connection each
way, and there is nothing to deduplicate.

A connection opens with a HELLO each way (magic, protocol version, cluster and base cluster,
peer id, ranges, a fresh nonce, the port it listens on), then a PROOF each way: HMAC-SHA256
under the cluster secret over the peer's id, both nonces and both hellos. A proof includes the
other side's fresh nonce, so an old one cannot be replayed. Every later frame is
version (1 byte) | counter (8) | kind (1) | payload | HMAC of all that under a key derived
from the secret and both nonces, and the counter must be exactly one more than the last: a
replayed, reordered or forged frame ends the connection. Core messages carry the cluster.
A wrong secret, another cluster, other ranges, another protocol version, garbage or an
oversized frame each closes the connection with a logged reason, and nothing in the core
changes.

Reachability, which the core needs for its decisions: a peer is reachable while our connection
to it is up and we have heard from it (any frame; keepalives go every KEEPALIVE seconds)
within DEAD_AFTER seconds. Unreachable is never removed: that is rmpeer's decision.

Peers tell each other where the peers they know listen (address books, ADDRESS_BOOK_EVERY
seconds). An id heard of that way is a candidate: dialled, but a member only once the core has
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
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
import struct
import time

import msgpack
import trio

from .protocols import peer_messages
from .core.addr import AddrError, parse_hostport
from .limits import ConnectionCap, Summary

log = logging.getLogger("ipamd.peers")

MAGIC = "ipamd-peer"
PROTOCOL = 3  # 2: SpaceRequest.gateway, SpaceDenied.code; 3: GatewayRelease(d)
MAX_FRAME = 16 << 20     # a full ring of many peers fits; a length beyond this is garbage
MAX_HELLO = 4096
KEEPALIVE = 0.5
DEAD_AFTER = 2.0
CONNECT_TIMEOUT = 2.0
BACKOFF = (0.1, 5.0)     # first and longest wait between connection attempts
QUEUE = 1024             # messages waiting for one peer's connection; beyond, they are dropped
ADDRESS_BOOK_EVERY = 2.0

HEAD = struct.Struct(">BQB")  # protocol version, counter, kind; then payload and MAC
CORE, KEEPALIVE_FRAME, ADDRESSES = 0, 1, 2
KIND_NAMES = {CORE: "messages", KEEPALIVE_FRAME: "keepalives", ADDRESSES: "addresses"}


class ProtocolError(Exception):
    """The other side broke the protocol; the message names how. The connection is closed."""


class SelfConnection(ProtocolError):
    """The address dialled is this peer's own."""


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


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"\0".join(parts), hashlib.sha256).digest()


class _Framed:
    """Length-prefixed frames on a stream, bounded in size."""

    def __init__(self, stream: trio.abc.Stream):
        self.stream, self.buf = stream, bytearray()

    async def read(self, most: int = MAX_FRAME) -> bytes:
        while True:
            if len(self.buf) >= 4:
                (n,) = struct.unpack(">I", self.buf[:4])
                if n > most:
                    raise ProtocolError(f"frame of {n} bytes exceeds the {most}-byte bound")
                if len(self.buf) >= 4 + n:
                    frame = bytes(self.buf[4:4 + n])
                    del self.buf[:4 + n]
                    return frame
            data = await self.stream.receive_some(65536)
            if not data:
                raise ProtocolError("connection closed")
            self.buf += data

    async def write(self, frame: bytes) -> None:
        await self.stream.send_all(struct.pack(">I", len(frame)) + frame)


class _Session:
    """One authenticated connection's frame keys and counters."""

    def __init__(self, framed: _Framed, send_key: bytes, recv_key: bytes, peer: str,
                 counts: dict | None = None):
        self.framed, self.send_key, self.recv_key, self.peer = framed, send_key, recv_key, peer
        self.sent = self.received = 0
        self.counts = counts if counts is not None else {}  # frame kind -> bytes sent

    async def send(self, kind: int, payload: bytes) -> None:
        self.sent += 1
        head = HEAD.pack(PROTOCOL, self.sent, kind)
        await self.framed.write(head + payload + _mac(self.send_key, head, payload))
        self.counts[kind] = self.counts.get(kind, 0) + 4 + len(head) + len(payload) + 32

    async def receive(self) -> tuple[int, bytes]:
        frame = await self.framed.read()
        if len(frame) < HEAD.size + 32:
            raise ProtocolError("frame too short to be authenticated")
        head, payload, mac = frame[:HEAD.size], frame[HEAD.size:-32], frame[-32:]
        if not hmac.compare_digest(mac, _mac(self.recv_key, head, payload)):
            raise ProtocolError("frame failed authentication (forged or corrupted)")
        version, counter, kind = HEAD.unpack(head)
        if version != PROTOCOL:  # authenticated, so a peer's bug, not noise on the wire
            raise ProtocolError(f"frame of protocol version {version}, expected {PROTOCOL}")
        if counter != self.received + 1:
            raise ProtocolError(f"frame {counter} out of sequence (expected "
                                f"{self.received + 1}): replayed or reordered")
        self.received = counter
        return kind, payload


class PeerNet:
    """Dials, accepts, authenticates; feeds the core what peers say and tells it who is
    reachable."""

    def __init__(self, core, secret: bytes, listen_port: int | None, clock=trio.current_time,
                 known: dict[str, str] | None = None, save=lambda peer, address, at: None,
                 cap: int = 1024, *, candidates: dict[str, float] | None = None,
                 candidate_ttl: float = CANDIDATE_TTL, heard_from=lambda peer, at: None,
                 forget=lambda peers: None, wall=time.time):
        self.core, self.secret, self.listen_port = core, secret, listen_port
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
        # peer id -> when a frame last came on the connection it dialled to us
        self.heard: dict[str, float] = {}
        self.wake: dict[str, trio.Event] = {}      # address -> cut its dialler's backoff short
        self.refused: dict[str, str] = {}          # address -> why we stopped dialling it
        self.nursery: trio.Nursery | None = None
        self.static: set[str] = set()              # --peer addresses: dialled for ever
        self.bytes_sent: dict[int, int] = {}       # frame kind -> bytes, for status
        self.unsendable = 0                        # messages that failed to encode (a bug)
        self.cap = ConnectionCap("peer", cap)      # inbound connections at once
        core.send = self.send

    @property
    def me(self) -> str:
        return self.core.loaded.peer_id

    # -- the core's side -----------------------------------------------------------------------

    def send(self, dst: str, msg) -> None:
        q = self.out.get(dst)
        if q is None:
            return  # not connected: the core treats it as lost, as any message may be
        try:
            frame = peer_messages.encode(msg)
        except Exception as e:  # a bug in what the core made: lose this message, not the daemon
            self.unsendable += 1
            log.error("event=dropped peer=%s reason=encode_failed kind=%s error=%r", dst,
                      type(msg).__name__, str(e))
            return
        try:
            q.send_nowait((CORE, frame))
        except trio.WouldBlock:
            log.info("event=dropped peer=%s reason=queue_full", dst)

    def traffic(self) -> dict:
        """Bytes sent to peers since start, by frame kind (frames whole, headers and MACs)."""
        return {KIND_NAMES[k]: v for k, v in sorted(self.bytes_sent.items())}

    def reachable(self) -> set[str]:
        """Peers we can talk with both ways: our connection to it is up (we can send), and
        its connection to us has carried a frame lately (it can send; replies go that way).
        One way only would let a request go out whose answer could not come back."""
        now = self.clock()
        return {p for p in self.out if now - self.heard.get(p, -1e9) < DEAD_AFTER}

    def _dialling(self) -> bool:
        """A --peer address whose peer is not reachable (yet): a request lacking space waits
        for it, up to its deadline, before refusing."""
        r = self.reachable()
        at = {a for p, a in self.addresses.items() if p in r}
        return any(a not in at and a not in self.refused for a in self.static)

    def _update_reachable(self) -> None:
        r = self.reachable()
        dialling = self._dialling()
        if dialling != self.core.dialling:
            self.core.set_reachable(self.core.reachable, dialling)
        if r != self.core.reachable:
            gained, lost = r - self.core.reachable, self.core.reachable - r
            for p in sorted(gained):
                log.info("event=peer_reachable peer=%s", p)
            for p in sorted(lost):
                log.warning("event=peer_unreachable peer=%s", p)
            self.core.set_reachable(r)

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
            self.core.set_reachable(self.core.reachable, self._dialling())
            self.expire_candidates()  # what expired while we were down is not dialled at all
            for addr in sorted(set(peers) | set(self.addresses.values())):
                self.dial(addr)
            nursery.start_soon(self._watch)
            nursery.start_soon(self._expiry)
            task_status.started(bound)

    def dial(self, addr: str) -> None:
        if addr in self.dialing or addr in self.refused or self.nursery is None:
            return
        self.dialing.add(addr)
        self.nursery.start_soon(self._dialer, addr)

    async def _watch(self) -> None:
        while True:
            await trio.sleep(KEEPALIVE / 2)
            self._update_reachable()

    # -- candidates ----------------------------------------------------------------------------

    def candidates(self) -> dict[str, float]:
        """Peer ids whose address we keep but the core has not heard from: id -> when learned
        or last heard from with the secret (wall time)."""
        seen = self.core.peer.seen
        for p in [p for p in self.learned if p in seen]:
            del self.learned[p]  # a member now (its row is 'alive'): never expires
        return dict(self.learned)

    def _connected(self) -> set[str]:
        now = self.clock()
        return set(self.out) | {p for p, t in self.heard.items() if now - t < DEAD_AFTER}

    def expire_candidates(self) -> list[str]:
        """Forget the candidates not heard from with the secret for candidate_ttl seconds,
        unless connected or a member (owning ring entries, say, while it is down). Returns
        their ids."""
        now = self.wall()
        due = [p for p, t in self.candidates().items() if now - t > self.candidate_ttl]
        if not due:
            return []
        keep = self.core.peer.members() | self._connected()
        gone = sorted(p for p in due if p not in keep)
        for p in gone:
            del self.learned[p]
            self.proven.discard(p)
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
        loaded, peer = self.core.loaded, self.core.peer
        return msgpack.packb([MAGIC, PROTOCOL, peer.cluster, peer.base_cluster, loaded.peer_id,
                              sorted(map(str, loaded.universes)), nonce, self.listen_port or 0])

    def _check_hello(self, frame: bytes) -> tuple[str, str, bytes, int]:
        try:
            magic, version, *rest = msgpack.unpackb(frame)
        except Exception as e:  # untrusted bytes: anything the unpacker trips on
            raise ProtocolError(f"not an ipamd peer hello ({e})") from None
        if magic != MAGIC:
            raise ProtocolError("not an ipamd peer hello")
        if version != PROTOCOL:
            raise ProtocolError(f"peer speaks protocol version {version!r}, this ipamd "
                                f"speaks {PROTOCOL}")
        try:
            cluster, base, peer, ranges, nonce, port = rest
        except ValueError:
            raise ProtocolError("malformed hello") from None
        if not (isinstance(cluster, str) and isinstance(base, str) and isinstance(peer, str)
                and 0 < len(peer) <= 64 and isinstance(nonce, bytes) and len(nonce) == 16
                and isinstance(port, int) and 0 <= port < 65536 and isinstance(ranges, list)):
            raise ProtocolError("malformed hello")
        mine = sorted(map(str, self.core.loaded.universes))
        if ranges != mine:
            raise ProtocolError(f"peer {peer} has ranges {', '.join(map(str, ranges))}; this "
                                f"one {', '.join(mine)} (every host needs the same --iprange "
                                "and --subnet)")
        ours = self.core.peer
        # Voters of one quorum share the base identity until, and after, their decision.
        same = cluster == ours.cluster or (base and base == ours.base_cluster)
        if cluster and ours.cluster and not same:
            raise ProtocolError(f"peer {peer} belongs to cluster {cluster}, this one to "
                                f"{ours.cluster}")
        if peer == self.me:
            raise SelfConnection("that is this peer itself")
        return cluster, peer, nonce, port

    async def _handshake(self, stream, outbound: bool) -> tuple[_Session, str, int]:
        framed = _Framed(stream)
        mine = os.urandom(16)
        with trio.fail_after(CONNECT_TIMEOUT):
            hello = self._hello(mine)
            await framed.write(hello)
            heard = await framed.read(MAX_HELLO)
            cluster, peer, theirs, port = self._check_hello(heard)
            joining = not self.core.peer.cluster
            if joining and not (outbound and cluster):
                raise ProtocolError("this peer has not joined a cluster yet")
            # Each proof binds both hellos (the dialler's first), so neither side's identity,
            # cluster or ranges can be changed on the way, and both nonces, so no proof can
            # be replayed.
            both = hashlib.sha256(hello + heard if outbound else heard + hello).digest()
            await framed.write(_mac(self.secret, b"proof", self.me.encode(), theirs, mine, both))
            proof = await framed.read(64)
            if not hmac.compare_digest(proof, _mac(self.secret, b"proof", peer.encode(), mine,
                                                   theirs, both)):
                raise ProtocolError(f"peer {peer} failed authentication (wrong cluster secret?)")
        if joining:  # only once the peer has proved it knows the secret
            await self.core.join_cluster(cluster)
        send_key = _mac(self.secret, b"key", mine, theirs, self.me.encode())
        recv_key = _mac(self.secret, b"key", theirs, mine, peer.encode())
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
        log.info("event=connected peer=%s address=%s", peer, addr)
        try:
            async with trio.open_nursery() as n:
                n.start_soon(self._sender, session, recv)
                n.start_soon(self._book_sender, session)
                await self._reader(session, inbound=False)  # keepalives only, this way
        finally:
            del self.out[peer]
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
                async with trio.open_nursery() as n:
                    n.start_soon(self._keepalive, session)
                    await self._reader(session, inbound=True)
                    n.cancel_scope.cancel()
        except Exception as e:
            _ended("connection_refused", e)

    async def _reader(self, session: _Session, inbound: bool) -> None:
        while True:
            # Both ends send a frame at least every KEEPALIVE: silence means the path is
            # gone (a partition stalls TCP without closing it), so hang up and redial.
            with trio.fail_after(DEAD_AFTER * 2):
                kind, payload = await session.receive()
            if inbound:
                self.heard[session.peer] = self.clock()
            if kind == CORE:
                try:
                    msg = peer_messages.decode(payload)
                except peer_messages.CodecError as e:
                    raise ProtocolError(f"bad message from {session.peer}: {e}") from None
                await self.core.receive(session.peer, msg)
            elif kind == ADDRESSES:
                if session.peer not in self.core.peer.removed:  # its word counts no more
                    self._learn(payload)
            elif kind != KEEPALIVE_FRAME:
                raise ProtocolError(f"unknown frame kind {kind}")

    async def _sender(self, session: _Session, recv: trio.MemoryReceiveChannel) -> None:
        while True:
            with trio.move_on_after(KEEPALIVE):
                kind, payload = await recv.receive()
                await session.send(kind, payload)
                continue
            await session.send(KEEPALIVE_FRAME, b"")

    async def _keepalive(self, session: _Session) -> None:
        while True:
            await session.send(KEEPALIVE_FRAME, b"")
            await trio.sleep(KEEPALIVE)

    async def _book_sender(self, session: _Session) -> None:
        q = self.out[session.peer]
        while True:
            book = self._book(session.peer)
            try:
                q.send_nowait((ADDRESSES, msgpack.packb(book)))
            except trio.WouldBlock:
                pass
            await trio.sleep(ADDRESS_BOOK_EVERY)

    def _book(self, to: str) -> dict[str, str]:
        """The addresses we tell `to` of: peers that proved the secret to us or are members,
        never mere candidates (see the module's doc)."""
        unproven = self.learned.keys() - self.proven
        if unproven:
            unproven -= self.core.peer.members()
        return {p: a for p, a in self.addresses.items() if p != to and p not in unproven}

    def _learn(self, payload: bytes) -> None:
        try:
            book = msgpack.unpackb(payload, strict_map_key=True)
        except Exception as e:  # untrusted bytes
            raise ProtocolError(f"bad address book: {e}") from None
        if not isinstance(book, dict) or len(book) > 10000:
            raise ProtocolError("bad address book")
        good, bad = {}, []
        for peer, addr in book.items():
            try:
                host, port = parse_hostport(addr)
            except AddrError:
                host = None
            if isinstance(peer, str) and 0 < len(peer) <= 64 and peer.isprintable() and host \
                    and port and len(addr) < 300:  # port 0: nobody listens there
                good[peer] = addr
            else:
                bad.append(peer)
        if bad:  # dropped, each: one bad entry costs neither the others nor the connection
            log.warning("event=bad_address_book_entries count=%d first=%r", len(bad),
                        str(bad[0])[:80])
        now = self.wall()  # one book, one time learned: its entries expire together
        for peer, addr in good.items():
            if peer != self.me and peer not in self.addresses:
                if len(self.addresses) >= MAX_CANDIDATES:
                    _BOOK_FULL.note(f"already {MAX_CANDIDATES} peer addresses known")
                    continue
                self._remember(peer, addr, now)
                self.dial(addr)

    def _remember(self, peer: str, addr: str, now: float | None = None) -> None:
        if self.addresses.get(peer) != addr:
            now = self.wall() if now is None else now
            if peer not in self.addresses:
                self.learned.setdefault(peer, now)  # until the core has heard from it
            self.addresses[peer] = addr
            self.save(peer, addr, now)
