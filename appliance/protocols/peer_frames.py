"""The peer connection's bytes, as pure code (no I/O): length-prefixed frames, the hello and
proof of the handshake, the keys they give, and authenticated frames after it.

A connection opens with a HELLO each way (magic, protocol version, cluster and base cluster,
peer id, ranges, a fresh nonce, the port it listens on), then a PROOF each way: HMAC-SHA256
under the cluster secret over the prover's id, both nonces and both hellos (the dialler's
first). A proof includes the other side's fresh nonce, so an old one cannot be replayed.
Every later frame is version (1 byte) | kind (1) | payload | tag: HMAC-SHA256, truncated to
16 bytes, under a key derived from the secret and both nonces, of the frame's counter (8
bytes), version, kind and payload. The counter is not sent: as TLS's sequence numbers, it is
implicit, each side counting the frames of the connection, so the receiver checks the tag with
the counter it expects (one more than the last) and a replayed, reordered, dropped or forged
frame fails it: a ProtocolError. peer_net.py moves these bytes over TCP; what is in a CORE
frame is peer_codec.py's, an ADDRESSES frame peer_book.py's.
"""
from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

import msgpack

MAGIC = "ipamd-peer"
# 2: SpaceRequest.gateway, SpaceDenied.code; 3: GatewayRelease(d); 4: Gossip.digest (probes
# carry a vector's digest, not the vector); 5: SpaceRequest.exact, carve markers as owners
# (up to 255 characters); 6: the frame counter implicit (not sent), the frame's tag HMAC-SHA256
# truncated to 16 bytes (a keepalive 24 bytes, not 48); 7: Gossip.answer (replies are not
# answered: conversations end); 8: a delta's vectors as changes since the last delta on the
# connection (peer_codec.Vectors), a probe's empty delta as nil
PROTOCOL = 8
MAX_FRAME = 16 << 20     # a full ring of many peers fits; a length beyond this is garbage
MAX_HELLO = 4096
MAX_PROOF = 64
LENGTH = struct.Struct(">I")
HEAD = struct.Struct(">BB")  # protocol version, kind; then payload and tag
COUNTER = struct.Struct(">Q")  # tagged, never sent
# 128 bits: RFC 2104 and 4868 allow HMAC-SHA256 truncated to half its length; the handshake's
# proofs and keys stay whole.
TAG_SIZE = 16
CORE, KEEPALIVE_FRAME, ADDRESSES = 0, 1, 2
KIND_NAMES = {CORE: "messages", KEEPALIVE_FRAME: "keepalives", ADDRESSES: "addresses"}


class ProtocolError(Exception):
    """The other side broke the protocol; the message names how. The connection is closed."""


class SelfConnection(ProtocolError):
    """The address dialled is this peer's own."""


def mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.digest(key, b"\0".join(parts), "sha256")  # one call into OpenSSL, per frame


def tag(key: bytes, counter: int, head: bytes, payload: bytes) -> bytes:
    """The tag of a frame: its implicit counter, head and payload under a session key."""
    return mac(key, COUNTER.pack(counter), head, payload)[:TAG_SIZE]


# -- frames --------------------------------------------------------------------------------------

def frame(payload: bytes) -> bytes:
    """payload with its length in front."""
    return LENGTH.pack(len(payload)) + payload


class FrameReader:
    """Length-prefixed frames out of a byte stream fed in pieces, bounded in size."""

    def __init__(self):
        self.buf = bytearray()

    def receive_data(self, data: bytes) -> None:
        self.buf += data

    def next_frame(self, most: int = MAX_FRAME) -> bytes | None:
        """The next whole frame, or None until more bytes come. A length over `most` is a
        ProtocolError before any of the frame is buffered."""
        if len(self.buf) < LENGTH.size:
            return None
        (n,) = LENGTH.unpack_from(self.buf)
        if n > most:
            raise ProtocolError(f"frame of {n} bytes exceeds the {most}-byte bound")
        if len(self.buf) < LENGTH.size + n:
            return None
        out = bytes(self.buf[LENGTH.size:LENGTH.size + n])
        del self.buf[:LENGTH.size + n]
        return out


class Sealer:
    """One authenticated connection's keys and counters: seal() the frames we send, unseal()
    those we receive."""

    def __init__(self, send_key: bytes, recv_key: bytes):
        self.send_key, self.recv_key = send_key, recv_key
        self.sent = self.received = 0

    def seal(self, kind: int, payload: bytes) -> bytes:
        self.sent += 1
        head = HEAD.pack(PROTOCOL, kind)
        return head + payload + tag(self.send_key, self.sent, head, payload)

    def unseal(self, data: bytes) -> tuple[int, bytes]:
        if len(data) < HEAD.size + TAG_SIZE:
            raise ProtocolError("frame too short to be authenticated")
        head, payload, got = data[:HEAD.size], data[HEAD.size:-TAG_SIZE], data[-TAG_SIZE:]
        # Tagged with the counter we expect: a frame sent under any other fails here.
        if not hmac.compare_digest(got, tag(self.recv_key, self.received + 1, head, payload)):
            raise ProtocolError("frame failed authentication (forged, corrupted, replayed or "
                                "out of order)")
        version, kind = HEAD.unpack(head)
        if version != PROTOCOL:  # authenticated, so a peer's bug, not noise on the wire
            raise ProtocolError(f"frame of protocol version {version}, expected {PROTOCOL}")
        self.received += 1
        return kind, payload


# -- the handshake -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hello:
    cluster: str
    base: str
    peer: str
    ranges: list
    nonce: bytes
    port: int


def encode_hello(cluster: str, base: str, me: str, ranges: list[str], nonce: bytes,
                 port: int) -> bytes:
    return msgpack.packb([MAGIC, PROTOCOL, cluster, base, me, ranges, nonce, port])


def decode_hello(data: bytes) -> Hello:
    """A hello's fields, each of its type; ProtocolError for anything else."""
    try:
        magic, version, *rest = msgpack.unpackb(data)
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
    return Hello(cluster, base, peer, ranges, nonce, port)


def check_hello(hello: Hello, me: str, ranges: list[str], cluster: str, base: str) -> None:
    """Refuse a peer of other ranges, of another cluster, or this peer itself."""
    if hello.ranges != ranges:
        raise ProtocolError(f"peer {hello.peer} has ranges {', '.join(map(str, hello.ranges))}; "
                            f"this one {', '.join(ranges)} (every host needs the same "
                            "--iprange and --subnet)")
    # Voters of one quorum share the base identity until, and after, their decision.
    same = hello.cluster == cluster or (hello.base and hello.base == base)
    if hello.cluster and cluster and not same:
        raise ProtocolError(f"peer {hello.peer} belongs to cluster {hello.cluster}, this one "
                            f"to {cluster}")
    if hello.peer == me:
        raise SelfConnection("that is this peer itself")


def transcript(mine: bytes, theirs: bytes, outbound: bool) -> bytes:
    """Both hellos, the dialler's first: what each proof binds, so neither side's identity,
    cluster or ranges can be changed on the way."""
    return hashlib.sha256(mine + theirs if outbound else theirs + mine).digest()


def proof(secret: bytes, prover: str, verifier_nonce: bytes, prover_nonce: bytes,
          both: bytes) -> bytes:
    """prover knows the secret: bound to the verifier's fresh nonce, so never replayable."""
    return mac(secret, b"proof", prover.encode(), verifier_nonce, prover_nonce, both)


def session_keys(secret: bytes, me: str, peer: str, mine: bytes,
                 theirs: bytes) -> tuple[bytes, bytes]:
    """(send key, receive key) of a connection, from the secret and both nonces."""
    return (mac(secret, b"key", mine, theirs, me.encode()),
            mac(secret, b"key", theirs, mine, peer.encode()))
