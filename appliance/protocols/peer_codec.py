"""Peer messages (core/peer_messages.py) to and from msgpack, checked field by field.

A message is [kind, field, ...] in the dataclass's field order. Addresses and other integers
that may not fit msgpack's 64 bits (IPv6) travel as big-endian bytes. Decoding trusts nothing:
every field is checked for its type and range, and anything else is a CodecError naming the
problem; the caller drops the frame (and the connection) and changes nothing.
"""
from __future__ import annotations

import dataclasses
import functools

import msgpack

from ..core import peer_messages as wire
from ..core.addr import AddrError, Cidr, exact_cidr
from ..core.spare import MAX_OWNER  # an entry's owner: a peer id, or a carve marker
from ..core.gossip import Delta
from ..core.ring import Entry

MAX_NAME = 64       # peer ids and cluster ids are short hex; names bound what a peer must hold
MAX_TEXT = 1024     # reasons
MAX_ITEMS = 1 << 20  # entries or vector items in one message; the frame bound comes first


class CodecError(ValueError):
    pass


KINDS = {cls.__name__: cls for cls in (
    wire.Gossip, wire.SpaceRequest, wire.SpaceGrant, wire.SpaceDenied, wire.Refuse,
    wire.Handover, wire.HandoverAck, wire.RemovePrepare, wire.RemoveAck, wire.RemoveNack,
    wire.RemoveAbort, wire.RemoveDone, wire.Prepare, wire.Promise, wire.Accept, wire.Accepted,
    wire.VoteNack, wire.Decided, wire.GatewayRelease, wire.GatewayReleased)}


# -- encoding ----------------------------------------------------------------------------------

def _big(n: int) -> bytes:
    return n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big")


EMPTY = Delta((), ())


class Vectors:
    """One connection's vectors, at each end: the vector and base of the last delta on it. A
    delta's two vectors (every peer's seq, so a hundred peers' worth in each message) go as
    what changed since: peers whose seq changed or is new, and peers dropped. A connection
    carries its frames whole and in order or ends (the frame counter is in every tag), so
    both ends stay in step, and a new connection starts again from nothing: its first delta
    carries its vectors whole. Without one (encode and decode of a single message) every
    delta carries them whole."""

    def __init__(self):
        self.vector: dict[str, int] = {}
        self.base: dict[str, int] = {}

    def pack(self, d: Delta) -> list | None:
        if d == EMPTY:
            return None  # a probe's: it leaves the connection's vectors as they were
        vector = _changes(self.vector, d.vector)
        # Replaced, never changed in place: encode keeps the old ones, to put back if it fails.
        self.vector = dict(d.vector)
        base = None
        if d.base is not None:  # a hello has none, and leaves the last one as it was
            base = _changes(self.base, d.base)
            self.base = dict(d.base)
        return [vector, [[str(u), _entry(e)] for u, e in d.entries], base]

    def unpack(self, v) -> Delta:
        if v is None:
            return EMPTY
        vec, entries, base = _list(v, "delta", 3)
        self.vector = _applied(self.vector, vec, "vector")
        if base is not None:
            self.base = _applied(self.base, base, "base")
        return Delta(tuple(self.vector.items()), _entries(entries),
                     None if base is None else tuple(self.base.items()))


def _changes(old: dict, new: tuple) -> list:
    """[(peer, seq) that differ from old or are new, peers of old not in new]."""
    changed = [(p, s) for p, s in new if old.get(p) != s]
    if len(new) - len(changed) == len(old):
        return [changed, []]  # every peer of old is still there: the usual case
    names = {p for p, _ in new}
    return [changed, [p for p in old if p not in names]]


def _applied(old: dict, v, what: str) -> dict:
    changed, dropped = _list(v, what, 2)
    out = dict(old)
    for p in _list(dropped, what):
        if type(p) is not str or out.pop(p, None) is None:
            raise CodecError(f"{what} drops {p!r}, a peer not in the last one")
    for p, s in _vector(changed, what):
        out[p] = s
    if len(out) > MAX_ITEMS:
        raise CodecError(f"{what} names more than {MAX_ITEMS} peers")
    return out


def _enc(v, vectors: Vectors):
    if isinstance(v, Delta):
        return vectors.pack(v)
    if isinstance(v, Cidr):
        return str(v)
    if isinstance(v, Entry):
        return _entry(v)
    if isinstance(v, tuple):
        return [_enc(x, vectors) for x in v]
    return v


def _entry(e: Entry) -> list:
    return [_big(e.start), _big(e.end), e.owner, e.version, e.free_hint, e.stamp[0], e.stamp[1]]


def encode(msg, vectors: Vectors | None = None) -> bytes:
    """A message's bytes; its deltas' vectors as changes since the last on `vectors`' connection
    (whole without one)."""
    vectors = vectors if vectors is not None else Vectors()
    kept = (vectors.vector, vectors.base)  # replaced, never changed in place: kept as they were
    try:
        return _encode(msg, vectors)
    except BaseException:
        vectors.vector, vectors.base = kept  # nothing was sent: the peer has the old ones
        raise


def _encode(msg, vectors: Vectors) -> bytes:
    fields = [_enc(getattr(msg, f.name), vectors) for f in dataclasses.fields(msg)]
    if isinstance(msg, wire.SpaceRequest):
        fields[3], fields[4] = _big(msg.lo), _big(msg.hi)
        fields[5] = None if msg.address is None else _big(msg.address)
    elif isinstance(msg, (wire.GatewayRelease, wire.GatewayReleased)):
        fields[2] = _big(msg.address)
    if isinstance(msg, (wire.Handover, wire.RemoveAck)):
        fields[-1] = [[str(u), _big(a), list(names)] for u, a, names in msg.reserved]
    return msgpack.packb([type(msg).__name__, *fields], use_bin_type=True)


# -- decoding ----------------------------------------------------------------------------------

def _text(v, what: str, most: int = MAX_NAME, empty: bool = False) -> str:
    if not isinstance(v, str) or len(v) > most or (not v and not empty):
        raise CodecError(f"{what} must be a string of 1 to {most} characters")
    return v


def _int(v, what: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise CodecError(f"{what} must be an integer in [{lo}, {hi}]")
    return v


def _addr(v, what: str) -> int:
    if not isinstance(v, bytes) or not 1 <= len(v) <= 17:
        raise CodecError(f"{what} must be 1 to 17 bytes")
    return int.from_bytes(v, "big")


def _list(v, what: str, n: int | None = None) -> list:
    if not isinstance(v, list) or (n is not None and len(v) != n) or len(v) > MAX_ITEMS:
        raise CodecError(f"{what} must be a list" + (f" of {n}" if n is not None else ""))
    return v


def _cidr(v) -> Cidr:
    if not isinstance(v, str):
        raise CodecError(f"universe: CIDR must be a string, got {type(v).__name__}")
    return _cidr_text(v)


@functools.lru_cache(maxsize=1024)
def _cidr_text(v: str) -> Cidr:
    # Every entry of a delta names its universe, and a cluster has few: parsing the same few
    # strings with ipaddress was a sixth of a busy daemon's time (py-spy, 100 daemons filling).
    # Bounded, so a peer sending ever new strings costs a parse each, never memory; a refusal
    # is raised, never cached.
    try:
        return exact_cidr(v, "universe")
    except AddrError as e:
        raise CodecError(str(e)) from None


def _vector(v, what: str) -> tuple[tuple[str, int], ...]:
    # The checks of _list, _text and _int, inline: every delta carries two vectors of every
    # peer, so this loop runs a hundred times per message in a hundred-host cluster.
    out = []
    for item in _list(v, what):
        if type(item) is not list or len(item) != 2:
            raise CodecError(f"{what} must be a list of 2")
        p, s = item
        if type(p) is not str or not 0 < len(p) <= MAX_NAME:
            raise CodecError(f"{what} must be a string of 1 to {MAX_NAME} characters")
        if type(s) is not int or not 0 <= s <= 2**63 - 1:
            raise CodecError(f"{what} must be an integer in [0, {2**63 - 1}]")
        out.append((p, s))
    if len({p for p, _ in out}) != len(out):
        raise CodecError(f"{what} names a peer twice")
    return tuple(out)


def _entries(v) -> tuple:
    out = []
    for item in _list(v, "entries"):
        u, e = _list(item, "entry", 2)
        s, end, owner, version, hint, sp, sq = _list(e, "entry", 7)
        out.append((_cidr(u), Entry(_addr(s, "start"), _addr(end, "end"),
                                    _text(owner, "owner", MAX_OWNER),
                                    _int(version, "version", 1), _int(hint, "free hint"),
                                    (_text(sp, "stamp", empty=True), _int(sq, "stamp")))))
    return tuple(out)


def _names(v, what: str) -> tuple[str, ...]:
    return tuple(_text(x, what) for x in _list(v, what))


def _ballot(v) -> tuple[int, str]:
    r, p = _list(v, "ballot", 2)
    return (_int(r, "ballot round"), _text(p, "ballot proposer"))


def decode(data: bytes, vectors: Vectors | None = None):
    """The message in data; its deltas' vectors applied as changes to those last read on
    `vectors`' connection (whole without one). CodecError: the connection must end, as its
    vectors may be half changed."""
    vectors = vectors if vectors is not None else Vectors()
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # untrusted bytes: whatever the unpacker trips on is a refusal
        raise CodecError(f"not a msgpack message: {e}") from None
    items = _list(obj, "message")
    if not items or not isinstance(items[0], str) or items[0] not in KINDS:
        raise CodecError(f"unknown message kind {items[0] if items else None!r}")
    cls = KINDS[items[0]]
    names = [f.name for f in dataclasses.fields(cls)]
    if len(items) - 1 != len(names):
        raise CodecError(f"{cls.__name__} needs {len(names)} fields, got {len(items) - 1}")
    raw = dict(zip(names, items[1:]))
    return cls(**{name: _field(cls, name, v, vectors) for name, v in raw.items()})


def _field(cls, name: str, v, vectors: Vectors):
    if name == "cluster":
        return _text(v, "cluster")
    if name in ("req",):
        return _int(v, name)
    if name == "delta":
        return vectors.unpack(v)
    if name == "code":
        return _text(v, name, 32)
    if name in ("reason", "removed_by"):
        return _text(v, name, MAX_TEXT, empty=True)
    if name == "digest":
        if not isinstance(v, bytes) or len(v) > 64:
            raise CodecError("digest must be at most 64 bytes")
        return v
    if name in ("nack", "gateway", "exact", "answer"):
        if not isinstance(v, bool):
            raise CodecError(f"{name} must be a boolean")
        return v
    if name == "removed":
        return tuple((_text(a, "removed"), _text(b, "removed"))
                     for a, b in (_list(x, "removed", 2) for x in _list(v, "removed")))
    if name == "universe":
        return _cidr(v)
    if name in ("lo", "hi"):
        return _addr(v, name)
    if name == "address":
        if v is None and cls is not wire.SpaceRequest:
            raise CodecError(f"{cls.__name__}.address must be an address")
        return None if v is None else _addr(v, name)
    if name in ("targets", "members", "value"):
        return _names(v, name)
    if name == "reserved":
        return tuple((_cidr(u), _addr(a, name), _names(names, name))
                     for u, a, names in (_list(x, name, 3) for x in _list(v, name)))
    if name == "vector":
        return _vector(v, "vector")
    if name == "writes":
        return _entries(v)
    if name in ("ballot", "promised"):
        return _ballot(v)
    if name == "accepted":
        if v is None:
            return None
        b, value = _list(v, "accepted", 2)
        return (_ballot(b), _names(value, "accepted value"))
    raise CodecError(f"{cls.__name__}.{name} is not a field this ipamd can read")
