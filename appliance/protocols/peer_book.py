"""Address books, the payload of ADDRESSES frames, as pure code: where the peers a host knows
listen, and their nicknames.

A book is a msgpack map, peer id -> entry. An entry is "HOST:PORT" (as an ipamd before
nicknames sends it: no nickname known) or [ADDRESS, NICKNAME], ADDRESS being "HOST:PORT" or
"" (the sender's own entry: the receiver knows where it is). Decoding keeps each good entry
and names the bad ones, so one bad entry (an address that is not HOST:PORT, port 0, a
nickname that is not one) costs neither the others nor the connection; a payload that is no
book at all is a ProtocolError.
"""
from __future__ import annotations

from dataclasses import dataclass

import msgpack

from ..core.addr import AddrError, parse_hostport
from .peer_frames import ProtocolError

MAX_ENTRIES = 10000
MAX_ID = 64
MAX_ADDRESS = 300
MAX_NICKNAME = 64  # a host name (HOST_NAME_MAX) fits


def nickname_problem(text) -> str | None:
    """Why text cannot be a nickname, or None: 1 to MAX_NICKNAME printable characters, no
    spaces (it is shown in columns)."""
    if not isinstance(text, str) or not text:
        return "a nickname must be a non-empty string"
    if len(text) > MAX_NICKNAME:
        return f"a nickname is at most {MAX_NICKNAME} characters, this one has {len(text)}"
    if not text.isprintable() or any(c.isspace() for c in text):
        return "a nickname may not hold spaces or control characters"
    return None


@dataclass(frozen=True)
class Entry:
    address: str | None   # None: not told (the sender's own entry)
    nickname: str | None  # None: not told (an older ipamd, or not known to the sender)


def encode_book(entries: dict[str, Entry]) -> bytes:
    out = {}
    for peer, e in entries.items():
        out[peer] = e.address if e.nickname is None else [e.address or "", e.nickname]
    return msgpack.packb(out)


def _entry(value) -> Entry | None:
    address, nickname = value, None
    if isinstance(value, list):
        if len(value) != 2:
            return None
        address, nickname = value
        if nickname_problem(nickname):
            return None
        if address == "":
            return Entry(None, nickname)
    try:
        host, port = parse_hostport(address)
    except AddrError:
        return None
    if not host or not port or len(address) >= MAX_ADDRESS:  # port 0: nobody listens there
        return None
    return Entry(address, nickname)


def decode_book(payload: bytes) -> tuple[dict[str, Entry], list]:
    """(good entries, ids of the bad ones); ProtocolError when it is not a book."""
    try:
        book = msgpack.unpackb(payload, strict_map_key=True)
    except Exception as e:  # untrusted bytes
        raise ProtocolError(f"bad address book: {e}") from None
    if not isinstance(book, dict) or len(book) > MAX_ENTRIES:
        raise ProtocolError("bad address book")
    good, bad = {}, []
    for peer, value in book.items():
        entry = _entry(value)
        if entry is not None and isinstance(peer, str) and 0 < len(peer) <= MAX_ID \
                and peer.isprintable():
            good[peer] = entry
        else:
            bad.append(peer)
    return good, bad
