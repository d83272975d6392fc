"""CNI mode of the ipamd executable: hand the runtime's env and stdin to the daemon, print its
answer. No logic of its own beyond finding the socket and saying when the daemon is not there.

The twin of dist/ipamd-cni (packaging/cni-forward.c), which does the same without Python's
start-up cost; the two behave alike, byte for byte where it shows (tests/test_forwarder.py runs
both against the same fake daemons):
- the request is the C one's bytes: env and stdin carried one byte per code point, every byte
  outside printable ASCII escaped as \\u00XX (six bytes), no spaces;
- ipam.socket is found by the C one's scan of the raw config (the first `ipam`, its first
  `socket`); one that is not a plain string (escapes), empty, holds a NUL byte or does not fit a
  unix socket address (107 bytes) is CNI code 7, never a fall-back to the default socket;
- a request over MAX_REQUEST bytes as sent, newline included, is code 7 "too large";
- connecting, sending and the whole answer have one deadline (20 s, $IPAMD_CNI_TIMEOUT
  seconds if set), then code 11;
- the answer is read whole before anything is printed, so stdout holds one JSON document (or
  the daemon's output, whole); a refusal of the request itself (ok:false) is code 7.
"""
import errno
import json
import math
import os
import re
import socket
import struct
import sys
import time

from .paths import default_socket

MAX_STDIN = 1 << 20
MAX_REQUEST = 64 * 1024  # appliance/protocols/hook.py MAX_LINE (not imported: start-up cost)
REPLY_TIMEOUT = 20.0     # seconds; an ADD may wait 2 s for peers, this is far above
MAX_TIMEOUT = 2e6        # seconds (~23 days), as the C one caps it
SUN_PATH = 108           # sizeof(struct sockaddr_un.sun_path): 107 bytes and the NUL

# --- the request: each byte one code point, escaped as the C forwarder's put_json does --------
_ESC = [b"\\" + bytes([c]) if c in b'"\\' else
        b"\\u%04x" % c if c < 0x20 or c >= 0x7f else bytes([c]) for c in range(256)]


def _json_bytes(data: bytes) -> bytes:
    return b'"' + b"".join([_ESC[c] for c in data]) + b'"'


def request_bytes(env: dict, stdin: bytes) -> bytes:
    """The request line as sent, newline included (env: CNI_* names to values, as bytes)."""
    pairs = b",".join(_json_bytes(k) + b":" + _json_bytes(v) for k, v in env.items())
    return (b'{"v":1,"op":"cni","env":{' + pairs + b'},"stdin":' + _json_bytes(stdin) +
            b"}\n")


# --- just enough JSON reading to find ipam.socket: the C forwarder's scan, ported ------------
_WS = re.compile(rb"[ \t\n\r]*")
_STR_REST = re.compile(rb'(?:[^"\\]|\\.)*"', re.S)   # after the opening quote
_SCALAR = re.compile(rb"[-+0-9.eEtruefalsn\x00]*")    # the C one's strchr() matches NUL too


def _ws(s: bytes, p: int) -> int:
    return _WS.match(s, p).end()


def _skip_str(s: bytes, p: int):
    m = _STR_REST.match(s, p + 1)
    return m.end() if m else None


def _skip_value(s: bytes, p: int, depth: int):
    p = _ws(s, p)
    if p >= len(s) or depth > 64:
        return None
    c = s[p]
    if c == 0x22:
        return _skip_str(s, p)
    if c in b"{[":
        close = 0x7d if c == 0x7b else 0x5d
        p = _ws(s, p + 1)
        if p < len(s) and s[p] == close:
            return p + 1
        while True:
            if close == 0x7d:
                if p >= len(s) or s[p] != 0x22 or (p := _skip_str(s, p)) is None:
                    return None
                p = _ws(s, p)
                if p >= len(s) or s[p] != 0x3a:
                    return None
                p += 1
            if (p := _skip_value(s, p, depth + 1)) is None:
                return None
            p = _ws(s, p)
            if p < len(s) and s[p] == 0x2c:
                p = _ws(s, p + 1)
                continue
            return p + 1 if p < len(s) and s[p] == close else None
    return _SCALAR.match(s, p).end()


def _member(s: bytes, p: int, key: bytes):
    """In the object at p, where the value of key (a plain key, no escapes) starts, or None."""
    p = _ws(s, p)
    if p >= len(s) or s[p] != 0x7b:
        return None
    p = _ws(s, p + 1)
    while p < len(s) and s[p] == 0x22:
        after = _skip_str(s, p)
        if after is None:
            return None
        match = s[p + 1:after - 1] == key
        p = _ws(s, after)
        if p >= len(s) or s[p] != 0x3a:
            return None
        p = _ws(s, p + 1)
        if match:
            return p
        if (p := _skip_value(s, p, 1)) is None:
            return None
        p = _ws(s, p)
        if p < len(s) and s[p] == 0x2c:
            p = _ws(s, p + 1)
    return None


class UnusableSocket(Exception):
    """ipam.socket is given but cannot be used as it is; no other socket is tried instead."""


def config_socket(stdin: bytes) -> bytes | None:
    """ipam.socket of the network config as bytes, or None when it names none."""
    ipam = _member(stdin, 0, b"ipam")
    v = _member(stdin, ipam, b"socket") if ipam is not None else None
    if v is None:
        return None
    end = stdin.find(b'"', v + 1) if v < len(stdin) and stdin[v] == 0x22 else -1
    raw = stdin[v + 1:end] if end > 0 else b""
    if not raw or b"\\" in raw or b"\0" in raw or len(raw) >= SUN_PATH:
        raise UnusableSocket()
    return raw


def socket_path(stdin: bytes) -> bytes:
    """ipam.socket from the network config, else $IPAMD_SOCKET, else the default."""
    given = config_socket(stdin)
    return given if given is not None else os.fsencode(default_socket())


def reply_timeout(text: str | None) -> float:
    """$IPAMD_CNI_TIMEOUT as the C one reads it (atof: a leading number, else the default)."""
    m = re.match(r"\s*[-+]?(?:inf(?:inity)?|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)",
                 text or "", re.I)
    secs = float(m.group()) if m else 0.0
    if not secs > 0:  # nan too
        return REPLY_TIMEOUT
    return min(secs, MAX_TIMEOUT) if math.isfinite(secs) else MAX_TIMEOUT


def _fail(code: int, msg: str, path: bytes, why: str) -> int:
    details = f"{path.decode('latin-1')}: {why}"
    out = {"cniVersion": "1.1.0", "code": code, "msg": msg, "details": details}
    sys.stdout.write(json.dumps(out, indent=4))
    sys.stdout.flush()
    return 1


class _TimedOut(Exception):
    pass


def _recv_by(s: socket.socket, deadline: float) -> bytes:
    """One read, waiting at most until deadline: b"" when closed; _TimedOut; OSError."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise _TimedOut()
    s.settimeout(left)
    try:
        return s.recv(65536)
    except TimeoutError:
        raise _TimedOut() from None


def _send_by(s: socket.socket, deadline: float) -> None:
    """connect() and send() on s give up (EAGAIN) at deadline, at the latest: a blocking socket
    with SO_SNDTIMEO, as the C one does. (Python's own timeouts make the socket non-blocking, and
    a non-blocking connect() to a listener whose backlog is full fails at once instead of
    waiting its turn.)"""
    left = max(deadline - time.monotonic(), 0.001)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                 struct.pack("ll", int(left), int(left % 1 * 1e6)))


def _why(e: OSError) -> str:
    if isinstance(e, TimeoutError) or e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
        return "timed out"
    return e.strerror or str(e)


def _read_until(s: socket.socket, reply: bytearray, deadline: float, done) -> None:
    """Append what the daemon sends to reply until done(); OSError if it closes first."""
    while not done():
        data = _recv_by(s, deadline)
        if not data:
            raise OSError()
        reply += data


def main() -> int:
    stdin = sys.stdin.buffer.read(MAX_STDIN + 1) if sys.stdin else b""  # fd 0 closed: none
    status = os.environ.get("CNI_COMMAND") == "STATUS"
    try:
        path = socket_path(stdin)
    except UnusableSocket:
        return _fail(7, "ipam.socket must be a plain string path shorter than 108 bytes",
                     b"ipam.socket", "not used: no other socket is tried in its place")
    env = {k: v for k, v in os.environb.items() if k.startswith(b"CNI_")}
    request = request_bytes(env, stdin)
    if len(request) > MAX_REQUEST:
        return _fail(7, "the network config is too large for ipamd", b"request",
                     f"{len(request)} bytes as sent, at most {MAX_REQUEST}")

    deadline = time.monotonic() + reply_timeout(os.environ.get("IPAMD_CNI_TIMEOUT"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            if len(path) >= SUN_PATH:  # connect() would refuse it; say so as the C one does
                raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
            _send_by(s, deadline)
            s.connect(path)
            _send_by(s, deadline)
            s.sendall(request)
        except OSError as e:
            if status:
                return _fail(50, "the ipamd daemon is not available", path, _why(e))
            return _fail(11, "cannot reach the ipamd daemon; try again later", path, _why(e))

        reply = bytearray()
        try:
            _read_until(s, reply, deadline, lambda: b"\n" in reply)
        except _TimedOut:
            return _fail(11, "no answer from the ipamd daemon in time; try again later", path,
                         "timed out")
        except OSError:
            return _fail(11, "the ipamd daemon closed the connection", path, "no reply")
        nl = reply.find(b"\n")
        line = bytes(reply[:nl])
        try:
            head = json.loads(line)
        except (ValueError, RecursionError):
            head = None
        if not (isinstance(head, dict) and head.get("ok") is True and
                type(head.get("exit")) is int and type(head.get("length")) is int and
                head["length"] >= 0):
            return _fail(7, "ipamd refused the request", path, line.decode("latin-1"))
        want = head["length"]
        del reply[:nl + 1]
        try:  # the whole output first: never half a document
            _read_until(s, reply, deadline, lambda: len(reply) >= want)
        except _TimedOut:
            return _fail(11, "no answer from the ipamd daemon in time; try again later", path,
                         "timed out mid-reply")
        except OSError:
            return _fail(11, "the ipamd daemon went away mid-reply", path, "short read")
    sys.stdout.buffer.write(reply[:want])
    sys.stdout.flush()
    return head["exit"]
