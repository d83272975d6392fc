"""The peer port as a hostile client sees it: the handshake done by hand (as peer_net.py does it,
with the same helpers, protocols/peer_frames.py), authenticated frames, and generators of
messages of every kind the codec knows (appliance/core/peer_messages.py), well formed or mutated.

The fuzzer that knows the secret is an insider that lies about everything except who it is:
the ids of the real daemons never appear in what it sends (as owners, writers, vector keys,
targets or removed peers), and it never tells a daemon that it was removed. The protocol
trusts a holder of the secret to speak only for itself, so those lies could break the
invariants by design; every other lie must not.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import select
import socket
import struct
import time

import msgpack

from appliance.protocols import peer_codec
from appliance.core.addr import AddrError, parse_cidr, parse_hostport
from appliance.protocols.peer_frames import (ADDRESSES, CORE, HEAD, KEEPALIVE_FRAME, MAGIC,
                                            MAX_FRAME, PROTOCOL, TAG_SIZE, mac, tag)

from . import garble

KINDS = list(peer_codec.KINDS)
FIELDS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in peer_codec.KINDS.items()}


class Closed(Exception):
    """The daemon closed the connection."""


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def read_frame(sock: socket.socket, timeout: float, most: int = MAX_FRAME) -> bytes:
    buf = _recv_exact(sock, 4, timeout)
    (n,) = struct.unpack(">I", buf)
    if n > most:
        raise Closed(f"frame of {n} bytes")
    return _recv_exact(sock, n, timeout)


def _recv_exact(sock: socket.socket, n: int, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    out = bytearray()
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"waited {timeout}s for {n} bytes, got {len(out)}")
        sock.settimeout(left)
        try:
            chunk = sock.recv(n - len(out))
        except (ConnectionResetError, BrokenPipeError) as e:
            raise Closed(str(e)) from None
        except socket.timeout:
            continue
        if not chunk:
            raise Closed("connection closed")
        out += chunk
    return bytes(out)


def hello(cluster: str, base: str, me: str, ranges: list[str], nonce: bytes,
          port: int = 0) -> bytes:
    return msgpack.packb([MAGIC, PROTOCOL, cluster, base, me, ranges, nonce, port])


class Session:
    """An authenticated connection to a daemon, dialled by us (so we may send core messages
    on it, as any peer that dials)."""

    def __init__(self, sock: socket.socket, me: str, peer: str, send_key: bytes,
                 recv_key: bytes):
        self.sock, self.me, self.peer = sock, me, peer
        self.send_key, self.recv_key = send_key, recv_key
        self.sent = 0
        self.sent_at = [time.monotonic()]
        self.history: list[tuple[float, str, bytes]] = []  # (when, what, payload) sent

    @classmethod
    def open(cls, address: tuple[str, int], secret: bytes, me: str, cluster: str,
             ranges: list[str], timeout: float = 5.0) -> Session:
        sock = socket.create_connection(address, timeout=timeout)
        try:
            mine = os.urandom(16)
            ours = hello(cluster, cluster, me, ranges, mine)
            sock.sendall(frame(ours))
            heard = read_frame(sock, timeout, 4096)
            fields = msgpack.unpackb(heard)
            peer, theirs = fields[4], fields[6]
            both = hashlib.sha256(ours + heard).digest()
            sock.sendall(frame(mac(secret, b"proof", me.encode(), theirs, mine, both)))
            proof = read_frame(sock, timeout, 64)
            if proof != mac(secret, b"proof", peer.encode(), mine, theirs, both):
                raise Closed(f"{peer} sent a wrong proof")
        except BaseException:
            sock.close()
            raise
        return cls(sock, me, peer, mac(secret, b"key", mine, theirs, me.encode()),
                   mac(secret, b"key", theirs, mine, peer.encode()))

    def sealed(self, kind: int, payload: bytes, counter: int | None = None,
               version: int = PROTOCOL) -> bytes:
        """One frame as the daemon expects it, or tagged with the counter given (not sent: a
        counter other than the next is a replayed, reordered or skipped frame) or of the
        version given."""
        if counter is None:
            self.sent += 1
            counter = self.sent
        head = HEAD.pack(version, kind)
        return frame(head + payload + tag(self.send_key, counter, head, payload))

    def send_raw(self, data: bytes, what: str = "", payload: bytes = b"") -> None:
        self.sent_at.append(time.monotonic())
        self.history.append((self.sent_at[-1], what, payload))
        self.sock.sendall(data)

    def story(self) -> bytes:
        """What this session sent, one JSON line per frame, for a finding's input file."""
        t0 = self.sent_at[0]
        return "".join(json.dumps({"t": round(t - t0, 3), "what": what, "payload": p.hex()})
                       + "\n" for t, what, p in self.history).encode()

    def alive(self) -> bool:
        """Drain what the daemon sent (keepalives); False once it has closed."""
        return drain(self.sock)

    def quiet_gap(self) -> float:
        """The longest time we sent nothing on this session: over the daemon's 4 s the
        daemon may hang up on us for silence, which is no fault of its own."""
        times = self.sent_at + [time.monotonic()]
        return max(b - a for a, b in zip(times, times[1:]))

    def close(self) -> None:
        self.sock.close()


def drain(sock: socket.socket) -> bool:
    """Read whatever is waiting without blocking; False if the other side closed."""
    while True:
        r, _, _ = select.select([sock], [], [], 0)
        if not r:
            return True
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError, OSError):
            return False
        if not data:
            return False


# -- what to say -----------------------------------------------------------------------------------

class Vocabulary:
    """Names and numbers for messages: never the real daemons' ids (see the module's doc)."""

    def __init__(self, rng: random.Random, real_ids: set[str], cluster: str,
                 universes: list[str]):
        self.rng = rng
        self.real = set(real_ids)
        self.cluster = cluster
        self.universes = universes
        self.phantoms = [f"ph{rng.getrandbits(40):010x}" for _ in range(12)]

    def name(self) -> str:
        r = self.rng.random()
        if r < 0.9:
            return self.rng.choice(self.phantoms)
        if r < 0.96:
            return self.rng.choice(["", "x" * 64, "x" * 65, "\x00", "é"])
        return f"ph{self.rng.getrandbits(40):010x}"

    def scrub(self, obj):
        """Replace every real id anywhere in obj by a phantom."""
        if isinstance(obj, str):
            return self.phantoms[0] if obj in self.real else obj
        if isinstance(obj, list):
            return [self.scrub(x) for x in obj]
        if isinstance(obj, dict):
            return {self.scrub(k): self.scrub(v) for k, v in obj.items()}
        return obj


def _big(n: int) -> bytes:
    return n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big")


class Messages:
    """Core messages as the codec's lists: [kind, field, ...].

    Ring entries are the one place where a well-formed message could make a daemon believe a
    lie about space (rule 3: only an entry's owner writes it, which the protocol takes on
    trust). So an entry this fuzzer sends for a real universe is never one a daemon would
    apply: at the universe's first address (where the founder's entry always is) at version
    1, or outside the universe, or ending before it starts. Space requests ask only in the
    upper half of a range, so that the fuzzer's asking (which the daemons grant, as they
    should) never starves the valid traffic in the lower half. The gateways a Handover or a
    RemoveAck says it kept reserved lie outside every range, as no space is handed with them.
    """

    def __init__(self, vocab: Vocabulary):
        self.v, self.rng = vocab, vocab.rng
        self.real = {}
        for text in vocab.universes:
            u, _ = parse_cidr(text)
            self.real[u] = (u.start, u.end)

    def cluster(self) -> str:
        r = self.rng.random()
        return self.v.cluster if r < 0.85 else (self.v.name() if r < 0.95 else "")

    def universe(self) -> str:
        r = self.rng.random()
        if r < 0.85:
            return self.rng.choice(self.v.universes)
        return self.rng.choice(["10.0.0.0/8", "198.18.0.0/25", "198.18.0.1/24", "::/0",
                                "0.0.0.0/0", "2001:db8::/65", "garbage", ""])

    def bounds(self, universe) -> tuple[int, int] | None:
        try:
            u, normalised = parse_cidr(universe)
        except (AddrError, TypeError):
            return None
        return None if normalised else self.real.get(u)

    def addr(self, universe: str, upper: bool = True) -> bytes:
        lo, hi = self.bounds(universe) or (0, 256)
        r = self.rng.random()
        if r < 0.7:
            return _big(self.rng.randrange((lo + hi) // 2 if upper else lo, hi))
        if r < 0.95:
            return _big(self.rng.choice([lo, hi, hi - 1, lo + 1, 0, 2**128 - 1, 2**136 - 1]))
        return self.rng.choice([b"", b"\x00" * 18, b"\xff" * 17, self.rng.randbytes(5)])

    def count(self) -> int:
        """A counter (request id, sequence number, ballot round): mostly within what the
        codec takes (0 to 2**63-1), now and then beyond it."""
        r = self.rng.random()
        if r < 0.6:
            return self.rng.randint(0, 50)
        if r < 0.96:
            return self.rng.choice([1, 2**31, 2**32, 2**53, 2**63 - 2, 2**63 - 1])
        return self.rng.choice([-1, 2**63, 2**64 - 1, -(2**63)])

    def vector(self) -> list:
        return [[self.v.name(), self.count()] for _ in range(self.rng.randint(0, 4))]

    def entry(self, universe: str) -> list:
        lo, hi = self.bounds(universe) or (0, 2**32)
        rng = self.rng
        r = rng.random()
        if r < 0.5:  # stale: the founder's entry is there at a version of at least 1
            start, end = lo, rng.choice([hi, lo + 1, rng.randrange(lo + 1, hi + 1)])
        elif r < 0.65:  # ends where it starts, or before
            start = rng.randrange(lo, hi)
            end = rng.choice([start, max(lo, start - 1), lo])
        elif r < 0.8:  # beyond the universe
            start = rng.randrange(lo, hi)
            end = hi + rng.choice([1, 2**32, 2**128])
        else:
            start, end = rng.choice([(hi, hi + 1), (max(lo - 1, 0), lo + 1), (0, 2**136 - 1)])
        version = 1 if r < 0.5 else rng.choice([1, 2, 3, 10, 2**32, 2**63 - 1])
        hint = rng.choice([0, 1, 16, 254, 2**63 - 1])
        if rng.random() < 0.05:  # beyond what the codec takes
            version, hint = rng.choice([(0, hint), (-1, hint), (version, 2**64 - 1)])
        return [_big(start) if rng.random() < 0.95 else self.addr(universe),
                _big(end) if rng.random() < 0.95 else self.addr(universe),
                self.v.name(), version, hint, self.v.name(), self.count()]

    def entries(self) -> list:
        out = []
        for _ in range(self.rng.choice([0, 0, 1, 2, 5])):
            u = self.universe()
            out.append([u, self.entry(u)])
        return out

    def delta(self) -> list:
        base = self.rng.choice([None, [], self.vector()])
        return [self.vector(), self.entries(), base]

    def ballot(self) -> list:
        return [self.count(), self.v.name()]

    def names(self) -> list:
        return [self.v.name() for _ in range(self.rng.randint(0, 3))]

    def field(self, name: str):
        rng = self.rng
        if name == "cluster":
            return self.cluster()
        if name == "req":
            return self.count()
        if name == "delta":
            return self.delta()
        if name == "code":
            return rng.choice(["exhausted", "not_owned", "in_use", "timeout", "x" * 33, ""])
        if name in ("reason", "removed_by"):
            return rng.choice(["", "because", "x" * 1025, garble.pick_str(rng)])
        if name in ("nack", "gateway"):
            return rng.random() < 0.3
        if name == "removed":
            return [[self.v.name(), self.v.name()] for _ in range(rng.randint(0, 2))]
        if name == "universe":
            return self.universe()
        if name in ("lo", "hi", "address"):
            return None if name == "address" and rng.random() < 0.3 else \
                self.addr(self.v.universes[0])
        if name in ("targets", "members", "value"):
            return self.names()
        if name == "vector":
            return self.vector()
        if name == "writes":
            return self.entries()
        if name == "reserved":
            return [[self.universe(), self.addr(self.v.universes[0]),
                     self.names() + rng.choice([[], ["kept"]])]
                    for _ in range(rng.randint(0, 2))]
        if name in ("ballot", "promised"):
            return self.ballot()
        if name == "accepted":
            return None if rng.random() < 0.5 else [self.ballot(), self.names()]
        return garble.random_mp(rng)

    def message(self) -> list:
        kind = self.rng.choice(KINDS)
        msg = [kind] + [self.field(f) for f in FIELDS[kind]]
        if kind == "SpaceRequest" and self.rng.random() < 0.6:
            # Bounds a donor would accept: inside the upper half of a universe, lo < hi.
            u = msg[3] = self.rng.choice(self.v.universes)
            lo, hi = self.bounds(u)
            mid = (lo + hi) // 2
            a = self.rng.randrange(mid, hi)
            b = self.rng.randint(a + 1, min(hi, a + self.rng.choice([1, 16, 256, 2**20])))
            msg[4], msg[5] = _big(a), _big(b)
            if msg[6] is not None:
                msg[6] = _big(self.rng.randrange(mid, hi))
        return msg

    def sane(self, msg):
        """What an insider honest about itself may say (see the module's doc and the class's):
        no real id anywhere, no "you were removed", no entry a daemon would apply, no space
        asked for in the lower half of a range."""
        msg = self.v.scrub(msg)
        if not (isinstance(msg, list) and msg and msg[0] in FIELDS
                and len(msg) == len(FIELDS[msg[0]]) + 1):
            return msg  # the codec refuses it whole
        fields = dict(zip(FIELDS[msg[0]], range(1, len(msg))))
        if msg[0] == "Refuse" and msg[1] == self.v.cluster:
            msg[3] = ""  # "you were removed, by X" is the cluster's word, not one peer's lie
        for name in ("delta", "writes"):
            if name in fields:
                v = msg[fields[name]]
                entries = v[1] if name == "delta" and isinstance(v, list) and len(v) == 3 \
                    else v
                if isinstance(entries, list):
                    for item in entries:
                        self._harmless(item)
        if "reserved" in fields and isinstance(msg[fields["reserved"]], list):
            # Gateways reserved "in the space handed over": none is handed, so any in a real
            # range would be a lie about another's space. Named outside every range instead.
            for item in msg[fields["reserved"]]:
                if isinstance(item, list) and item and self.bounds(item[0]) is not None:
                    item[0] = "10.0.0.0/8" if ":" not in str(item[0]) else "fd00::/8"
        if msg[0] == "SpaceRequest":
            b = self.bounds(msg[3])
            for i in (4, 5, 6):
                if b and isinstance(msg[i], bytes) and 1 <= len(msg[i]) <= 17:
                    lo, hi = b
                    value = int.from_bytes(msg[i], "big")
                    if lo <= value < (lo + hi) // 2:
                        msg[i] = _big((lo + hi) // 2 + value - lo)
        return msg

    def _harmless(self, item) -> None:
        """An entry a daemon could apply, moved to where it cannot be: the universe's start
        at version 1."""
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], list)
                and len(item[1]) == 7):
            return
        b = self.bounds(item[0])
        e = item[1]
        if b is None or not all(isinstance(x, bytes) and 1 <= len(x) <= 17 for x in e[:2]):
            return
        lo, hi = b
        start, end = (int.from_bytes(x, "big") for x in e[:2])
        if lo <= start < end <= hi:
            e[0], e[3] = _big(lo), 1


def core_payload(m: Messages) -> bytes:
    """A msgpack payload for a CORE frame: well formed, or mutated on purpose."""
    rng = m.rng
    r = rng.random()
    if r < 0.7:
        obj = m.message()
    elif r < 0.9:
        obj = m.message()
        for _ in range(rng.randint(1, 3)):
            obj = garble.mutate_mp(rng, obj)
    elif r < 0.93:
        return b"\x91" * rng.choice([100, 600, 5000]) + b"\xc0"  # nested arrays, deep
    elif r < 0.96:
        obj = garble.random_mp(rng, 3)
    else:
        obj = m.message()
        try:
            data = msgpack.packb(m.sane(obj), use_bin_type=True)
        except (ValueError, OverflowError, TypeError):
            data = b""
        return garble.mutate_bytes(rng, data)
    try:
        return msgpack.packb(m.sane(obj) if isinstance(obj, list) else obj, use_bin_type=True)
    except (ValueError, OverflowError, TypeError):
        return msgpack.packb([obj[0] if isinstance(obj, list) and obj else "Gossip"])


def predict_core(payload: bytes):
    """What the daemon's reader will do with this CORE payload: ("ok", message) when the codec
    accepts it (the connection stays), ("fatal", reason) when it refuses it (the connection
    ends), ("bug", exception) when the codec raises something it should not."""
    try:
        return "ok", peer_codec.decode(payload)
    except peer_codec.CodecError as e:
        return "fatal", str(e)
    except Exception as e:  # noqa: BLE001 - the finding itself
        return "bug", e


def address_book(rng: random.Random, vocab: Vocabulary, ports: list[int]):
    """A payload for an ADDRESSES frame. Entries that would be dialled name 127.0.0.1 only."""
    r = rng.random()
    if r < 0.1:
        return garble.random_bytes(rng, 60)
    if r < 0.2:
        return msgpack.packb(garble.random_mp(rng, 2))
    book = {}
    for _ in range(rng.choice([0, 1, 3, 8, 40])):
        name = vocab.name() if rng.random() < 0.7 else garble.pick_str(rng)[:80]
        a = rng.random()
        if a < 0.4:
            addr = f"127.0.0.1:{rng.choice(ports)}"
        elif a < 0.8:
            addr = garble.pick_str(rng)
        else:
            addr = garble.random_mp(rng, 0)
        book[name] = addr
    book = vocab.scrub(book)
    for name, addr in list(book.items()):
        try:
            host, _ = parse_hostport(addr)
        except (AddrError, ValueError):
            continue
        if host != "127.0.0.1":  # a name or another address: the daemon would dial it
            book[name] = "127.0.0.1:1"
    if rng.random() < 0.05:
        book = {f"{vocab.phantoms[0]}{i}": "127.0.0.1:1" for i in range(rng.choice([300, 10001]))}
    return msgpack.packb(book, use_bin_type=False)


def predict_book(payload: bytes):
    """As predict_core, for an ADDRESSES frame (peer_net.PeerNet._learn)."""
    try:
        book = msgpack.unpackb(payload, strict_map_key=True)
    except Exception as e:  # noqa: BLE001 - the daemon refuses it the same way
        return "fatal", f"bad address book: {e}"
    if not isinstance(book, dict) or len(book) > 10000:
        return "fatal", "bad address book"
    for addr in book.values():
        try:
            parse_hostport(addr)
        except AddrError:
            pass
        except Exception as e:  # noqa: BLE001 - the finding itself
            return "bug", e
    return "ok", None
