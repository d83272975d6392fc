"""The hook protocol: one JSON object per line each way on the unix socket (DESIGN.md section 6).

    {"v":1,"op":"allocate","handle":"web-1"}
    {"ok":true,"handle":"web-1","address":"10.32.0.1/12",...}
    {"ok":false,"error":{"code":"exhausted","message":"..."}}

Everything a client sends is checked here; the core only ever sees well-formed requests.
HookConnection is the line framing, sans I/O (as h11 is for HTTP): the server feeds it the
bytes it reads and takes requests out, in order.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ..core import messages as m
from ..core.addr import BITS, AddrError, exact_cidr, parse_addr
from ..core.names import Pattern
from ..core.spare import check_name

VERSION = 1
MAX_LINE = 64 * 1024  # far above any real request; bounds what one client can make us buffer
MAX_HANDLE = 255
OPS = ("allocate", "claim", "release", "lookup", "list", "status", "cni", "leave", "rmpeer",
       "range_add", "range_retire", "tenant_create", "tenant_grow", "tenant_delete",
       "lease_block", "names_create", "lease_name", "claim_name")
MAX_BLOCKS = 1 << 20  # a tenant's block limit: far above any real one, and a bound


@dataclass(frozen=True)
class CniRequest:
    """A CNI plugin invocation forwarded as it came: its CNI_* env and its stdin.

    Strings carry bytes one to one (latin-1), so a forwarder needs no UTF-8 handling. The
    reply line is followed by `length` bytes for the plugin to print.
    """
    env: dict
    stdin: bytes


@dataclass(frozen=True)
class RangeAdd:
    """range_add as it came: the core's request, and whether this host's routes may overlap
    the range (the shell checks them before the request goes to the core, as a launch does
    for a new database's ranges)."""
    request: m.AddRange
    allow_route_overlap: bool = False


class HookError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message

    def reply(self) -> dict:
        return m.error(self.code, self.message)


def _bad(message: str) -> HookError:
    return HookError("bad_request", message)


def _field(obj: dict, name: str, kind: type, required: bool):
    if name not in obj:
        if required:
            raise _bad(f"missing field {name!r}")
        return None
    value = obj[name]
    if value is None and not required:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise _bad(f"field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _handle(obj: dict) -> str:
    h = _field(obj, "handle", str, True)
    if not h or len(h) > MAX_HANDLE or not h.isprintable():
        raise _bad(f"handle must be 1-{MAX_HANDLE} printable characters")
    return h


def _subnet(obj: dict):
    text = _field(obj, "subnet", str, False)
    if text is None:
        return None
    try:
        return exact_cidr(text, "subnet")
    except AddrError as e:
        raise _bad(str(e)) from None


def _range(obj: dict, required: bool = True):
    """The "range" of range_add and range_retire (or the block space a tenant's or a leased
    block comes from): a CIDR block, host bits zero."""
    text = _field(obj, "range", str, required)
    if text is None:
        return None
    try:
        return exact_cidr(text, "range")
    except AddrError as e:
        raise _bad(str(e)) from None


def _name(obj: dict, field: str, what: str, required: bool = True) -> str | None:
    """A tenant's or a pool's name, by the core's rule (spare.check_name)."""
    name = _field(obj, field, str, required)
    if name is not None and (why := check_name(what, name)):
        raise _bad(f"{field}: {why}")
    return name


def _block_shape(obj: dict, within) -> tuple[int, int]:
    """(family, prefix_len) of a tenant's or a leased block. family defaults to that of
    "range" when one is given, else 4."""
    family = _field(obj, "family", int, False)
    if family is None:
        family = within.family if within is not None else 4
    if family not in (4, 6):
        raise _bad(f"family must be 4 or 6, got {family}")
    if within is not None and within.family != family:
        raise _bad(f"range {within} is not IPv{family}")
    plen = _field(obj, "prefix_len", int, True)
    most = min(BITS[family], 64)  # the core's limit: an IPv6 block is at most a /64
    if not 1 <= plen <= most:
        raise _bad(f"prefix_len must be 1 to {most} for IPv{family}, got {plen}")
    return family, plen


def _flag(obj: dict, name: str) -> bool:
    """An optional true/false field, false when absent."""
    value = obj.get(name, False)
    if type(value) is not bool:
        raise _bad(f"{name} must be true or false")
    return value


def _anchor(obj: dict) -> str | None:
    """A liveness anchor: {"netns": PATH} or {"pid": N, "start_time": T}."""
    a = _field(obj, "anchor", dict, False)
    if a is None:
        return None
    if set(a) == {"netns"} and isinstance(a["netns"], str) and a["netns"].startswith("/") \
            and len(a["netns"]) <= 4096 and "\0" not in a["netns"]:
        return json.dumps(a, sort_keys=True)
    if set(a) <= {"pid", "start_time"} and "pid" in a \
            and all(type(v) is int and 0 < v < 2**63 for v in a.values()):
        return json.dumps(a, sort_keys=True)
    raise _bad('anchor must be {"netns": "/absolute/path"} or {"pid": N, "start_time": T}')


def _address(obj: dict, name: str, required: bool):
    text = _field(obj, name, str, required)
    if text is None:
        return None
    try:
        return parse_addr(text)
    except AddrError as e:
        raise _bad(f"{name}: {e}") from None


_DECODE = json.JSONDecoder().decode


def _loads(line: bytes):
    """json.loads(line), cheaper for the usual line (plain UTF-8). Anything the quick way
    refuses goes to json.loads, which gives its result or its exact error (a BOM, UTF-16 or
    -32, a surrogate: none of them parses as UTF-8 JSON, so the quick way never differs)."""
    try:
        return _DECODE(line.decode())
    except (ValueError, RecursionError):
        return json.loads(line)


# The usual line, as the CNI forwarder, the CLI and scripts write it: an op and a handle with
# no escapes, nothing else. Matched, it needs no JSON decoding and no look at optional fields;
# whatever the match lets through that the full parse would refuse (a handle not printable,
# too long, not UTF-8) goes to the full parse, for its error.
_PLAIN_LINE = re.compile(rb'\{(?:"v":1,)?"op":"(allocate|release|lookup)",'
                         rb'"handle":"([^"\\\x00-\x1f]{1,255})"\}')
_PLAIN_OPS = {b"allocate": m.Allocate, b"release": m.Release, b"lookup": m.Lookup}


def parse_request(line: bytes) -> m.Request:
    """One line (without its newline) -> a request; HookError names what is wrong."""
    if (plain := _PLAIN_LINE.fullmatch(line)) is not None:
        try:
            handle = plain[2].decode()
        except UnicodeDecodeError:
            return _parse_json(line)
        if len(handle) <= MAX_HANDLE and handle.isprintable():
            return _PLAIN_OPS[plain[1]](handle)
    return _parse_json(line)


def _parse_json(line: bytes) -> m.Request:
    if len(line) > MAX_LINE:
        raise HookError("too_large", f"request of {len(line)} bytes exceeds {MAX_LINE}")
    try:
        obj = _loads(line)
    except (UnicodeDecodeError, ValueError) as e:
        raise _bad(f"not JSON: {e}") from None
    except RecursionError:
        raise _bad("not JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise _bad(f"request must be a JSON object, got {type(obj).__name__}")
    v = obj.get("v", VERSION)
    if type(v) is not int or v != VERSION:
        raise HookError("bad_version", f"protocol version {v!r} is not supported (use {VERSION})")
    op = _field(obj, "op", str, True)
    if op == "allocate":
        return _allocate(obj)
    if op == "claim":
        family, address = _address(obj, "address", True)
        return m.Claim(_handle(obj), family, address, _subnet(obj), _anchor(obj),
                       _name(obj, "tenant", "tenant", False))
    if op == "release":
        return m.Release(_handle(obj), _address(obj, "address", False))
    if op == "lookup":
        return m.Lookup(_handle(obj))
    if op == "list":
        return m.List()
    if op == "status":
        return m.Status()
    if op == "leave":
        return m.Leave()
    if op == "rmpeer":
        peers = _field(obj, "peers", list, True)
        if not peers or len(peers) > 1000 or not all(
                isinstance(p, str) and 0 < len(p) <= 64 for p in peers):
            raise _bad("peers must be a list of 1 to 1000 peer ids")
        return m.RemovePeer(tuple(peers), _flag(obj, "force"))
    if op == "range_add":
        return RangeAdd(m.AddRange(_range(obj), _flag(obj, "blocks")),
                        _flag(obj, "allow_route_overlap"))
    if op == "range_retire":
        return m.RetireRange(_range(obj), retired=not _flag(obj, "undo"))
    if op in CARVE_OPS:
        return CARVE_OPS[op](obj)
    if op == "cni":
        env = _field(obj, "env", dict, True)
        if not all(isinstance(k, str) and k.startswith("CNI_") and isinstance(v, str)
                   for k, v in env.items()):
            raise _bad("env must map CNI_* names to strings")
        stdin = _field(obj, "stdin", str, True)
        try:
            return CniRequest({k: v.encode("latin-1").decode() for k, v in env.items()},
                              stdin.encode("latin-1"))
        except UnicodeError:
            raise _bad("env and stdin carry bytes as code points 0-255; env must be UTF-8") \
                from None
    raise HookError("unknown_op", f"unknown op {op!r} (known: {', '.join(OPS)})")


def _allocate(obj: dict) -> m.Allocate:
    if obj.keys() <= _PLAIN:  # the usual request: nothing but its handle to check
        return m.Allocate(_handle(obj))
    subnet = _subnet(obj)
    rng = _field(obj, "range", list, False)
    if rng is not None:
        if len(rng) != 2:
            raise _bad('range must be ["first", "last"]')
        first, last = (_address({"range": a}, "range", True) for a in rng)
        if subnet is None or first not in subnet or last not in subnet or first[1] > last[1]:
            raise _bad("range must be first <= last, both inside the request's subnet")
        rng = (first[1], last[1])
    gateway = _address(obj, "gateway", False)
    if gateway is not None:
        if subnet is None or gateway not in subnet:
            raise _bad("gateway must lie inside the request's subnet")
        gateway = gateway[1]
    return m.Allocate(_handle(obj), subnet, _anchor(obj), rng, gateway,
                      _name(obj, "tenant", "tenant", False))


_PLAIN = frozenset(("v", "op", "handle"))


def _tenant_create(obj: dict) -> m.TenantCreate:
    name, within = _name(obj, "tenant", "tenant"), _range(obj, False)
    family, plen = _block_shape(obj, within)
    most = _field(obj, "max_blocks", int, False)
    if most is None:
        most = 1
    if not 1 <= most <= MAX_BLOCKS:
        raise _bad(f"max_blocks must be 1 to {MAX_BLOCKS}, got {most}")
    return m.TenantCreate(name, plen, family, most, within)


def _lease_block(obj: dict) -> m.LeaseBlock:
    handle, within = _handle(obj), _range(obj, False)
    family, plen = _block_shape(obj, within)
    return m.LeaseBlock(handle, plen, family, within)


def _names_create(obj: dict) -> m.NamesCreate:
    pool, pattern = _name(obj, "pool", "pool"), _field(obj, "pattern", str, True)
    try:
        Pattern.parse(pattern)
    except ValueError as e:
        raise _bad(f"pattern: {e}") from None
    return m.NamesCreate(pool, pattern)


def _claim_name(obj: dict) -> m.ClaimName:
    handle, pool = _handle(obj), _name(obj, "pool", "pool")
    name = _field(obj, "name", str, True)
    if not name or len(name) > 255 or not name.isprintable():
        raise _bad("name must be 1-255 printable characters")
    return m.ClaimName(handle, pool, name, _anchor(obj))


# The ops that carve space (tenants, leased blocks, name pools) and take names.
CARVE_OPS = {
    "tenant_create": _tenant_create,
    "tenant_grow": lambda obj: m.TenantGrow(_name(obj, "tenant", "tenant"),
                                            _range(obj, False)),
    "tenant_delete": lambda obj: m.TenantDelete(_name(obj, "tenant", "tenant"),
                                                _flag(obj, "force")),
    "lease_block": _lease_block,
    "names_create": _names_create,
    "lease_name": lambda obj: m.LeaseName(_handle(obj), _name(obj, "pool", "pool"),
                                          _anchor(obj)),
    "claim_name": _claim_name,
}


NEED_DATA = "need_data"  # HookConnection.next_event: feed it more bytes
CLOSED = "closed"        # ... the connection is over: hang up


class HookConnection:
    """One connection's line framing. receive_data(bytes) (b"" once the client has closed);
    next_event() returns, in order, each request line parsed (a request, or the HookError to
    answer it with; the connection stays open), NEED_DATA, or CLOSED. A line longer than
    MAX_LINE gives HookError too_large and then CLOSED: the rest of that line cannot be told
    apart from the next request, so the server says why and hangs up rather than guess."""

    def __init__(self):
        self._buf = bytearray()
        self._eof = self._over = False
        self._back = None  # an event put back: next_event gives it first
        self.fed = 0  # receive_data calls: who waits to receive sees another fed it

    @property
    def idle(self) -> bool:
        """Nothing received is waiting to be read as an event (and no end)."""
        return not self._buf and self._back is None and not self._eof and not self._over

    def put_back(self, event) -> None:
        """An event taken by next_event and not handled: next_event gives it again."""
        self._back = event

    def receive_data(self, data: bytes) -> None:
        self.fed += 1
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_event(self):
        if self._back is not None:
            event, self._back = self._back, None
            return event
        while not self._over:
            nl = self._buf.find(b"\n")
            if nl < 0 or nl > MAX_LINE:
                if len(self._buf) > MAX_LINE:
                    self._over = True
                    self._buf.clear()
                    return HookError("too_large", f"request line exceeds {MAX_LINE} bytes")
                return CLOSED if self._eof else NEED_DATA
            line = bytes(self._buf[:nl])
            del self._buf[:nl + 1]
            if not line.strip():
                continue
            try:
                return parse_request(line)
            except HookError as e:
                return e
        return CLOSED


# Made once: json.dumps with any option builds a new encoder on every call, and so does
# JSONEncoder.encode (its C encoder); this C encoder is made once, with JSONEncoder's options
# but no cycle check (a reply is a tree), so a reply's text is what JSONEncoder gives.
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode
if json.encoder.c_make_encoder is not None:
    _C_ENCODE = json.encoder.c_make_encoder(
        None, _ENCODE.__self__.default, json.encoder.encode_basestring_ascii, None, ":", ",",
        False, False, True)

    def _encode(reply: dict) -> str:
        return "".join(_C_ENCODE(reply, 0))
else:  # no _json module: the pure-Python encoder
    _encode = _ENCODE


def encode_reply(reply: dict) -> bytes:
    return (_encode(reply) + "\n").encode()


def encode_cni_reply(output: bytes, exit_code: int) -> bytes:
    head = {"ok": True, "exit": exit_code, "length": len(output)}
    return (_encode(head) + "\n").encode() + output
