"""The hook socket as a hostile client sees it: a line client that knows the CNI replies'
trailing bytes, and generators of junk and mutated requests (appliance/protocols/hook.py)."""
from __future__ import annotations

import json
import random
import socket
import time

from appliance.core import messages as m
from appliance.protocols.hook import MAX_LINE, HookError, parse_request

from . import garble

KEEP = "keep/"  # handles of the fuzzer's valid allocations; no junk request ever names one
JUNK = "junk/"
OPS = ["allocate", "claim", "release", "lookup", "list", "status", "cni", "rmpeer"]


class HookClosed(Exception):
    pass


class LineClient:
    """Requests and replies on one hook connection; a CNI reply's `length` bytes are skipped."""

    def __init__(self, path, timeout: float):
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = bytearray()

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise HookClosed(str(e)) from None

    def reply(self) -> dict:
        """The next reply; HookClosed if the daemon hung up, TimeoutError after `timeout`."""
        deadline = time.monotonic() + self.timeout
        line = self._until(lambda: self.buf.find(b"\n"), deadline)
        obj = json.loads(line)
        if isinstance(obj, dict) and "length" in obj and "exit" in obj:
            n = obj["length"]
            self._until(lambda: n if len(self.buf) >= n else -1, deadline, keep_nl=True)
        return obj

    def _until(self, where, deadline: float, keep_nl: bool = False) -> bytes:
        while True:
            i = where()
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[:i if keep_nl else i + 1]
                return out
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply within {self.timeout}s")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except (ConnectionResetError, BrokenPipeError) as e:
                raise HookClosed(str(e)) from None
            if not data:
                raise HookClosed("connection closed")
            self.buf += data

    def call(self, request: dict) -> dict:
        self.send(json.dumps(request).encode() + b"\n")
        return self.reply()

    def close(self) -> None:
        self.sock.close()


# -- what to send --------------------------------------------------------------------------------

class Requests:
    """Valid-looking requests with junk handles, to be mutated."""

    def __init__(self, rng: random.Random, v4: str, v6: str, phantoms: list[str]):
        self.rng, self.v4, self.v6, self.phantoms = rng, v4, v6, phantoms
        self.n = 0

    def handle(self) -> str:
        self.n += 1
        return f"{JUNK}{self.rng.randrange(400)}" if self.rng.random() < 0.8 else \
            f"{JUNK}{self.n}"

    def address(self) -> str:
        base = self.v4.split("/")[0].rsplit(".", 1)[0]
        if self.rng.random() < 0.8:
            return f"{base}.{self.rng.randrange(256)}"
        return self.v6.split("/")[0] + format(self.rng.randrange(1, 2**16), "x")

    def anchor(self):
        r = self.rng.random()
        if r < 0.4:
            return None
        if r < 0.7:
            return {"netns": self.rng.choice(["/run/netns/fuzz-none", "/proc/self/ns/net",
                                              "/", "/dev/null"])}
        return {"pid": self.rng.choice([1, 2**22 + 7, 2**31 - 1]),
                "start_time": self.rng.randrange(1, 2**40)}

    def request(self) -> dict:
        rng = self.rng
        op = rng.choice(OPS)
        req: dict = {"op": op}
        if rng.random() < 0.5:
            req["v"] = 1
        if op in ("allocate", "claim", "release", "lookup"):
            req["handle"] = self.handle()
        if op == "allocate":
            subnet = rng.choice([None, self.v4, self.v6])
            if subnet:
                req["subnet"] = subnet
            if rng.random() < 0.2 and subnet == self.v4:
                base = self.v4.split("/")[0].rsplit(".", 1)[0]
                a, b = sorted(rng.randrange(256) for _ in range(2))
                req["range"] = [f"{base}.{a}", f"{base}.{b}"]
            if rng.random() < 0.1 and subnet == self.v4:
                req["gateway"] = self.address()
        if op == "claim":
            req["address"] = self.address()
        if op in ("allocate", "claim"):
            a = self.anchor()
            if a is not None:
                req["anchor"] = a
        if op == "release" and rng.random() < 0.3:
            req["address"] = self.address()
        if op == "rmpeer":
            req["peers"] = [rng.choice(self.phantoms) for _ in range(rng.randint(1, 2))]
            req["force"] = rng.random() < 0.5
        if op == "cni":
            req["env"] = {"CNI_COMMAND": rng.choice(["ADD", "DEL", "CHECK", "GC", "STATUS",
                                                     "VERSION", "NOPE"]),
                          "CNI_CONTAINERID": f"fz{rng.randrange(50)}",
                          "CNI_NETNS": "/run/netns/fuzz-none", "CNI_IFNAME": "eth0",
                          "CNI_PATH": "/opt/cni/bin"}
            conf = {"cniVersion": rng.choice(["1.0.0", "0.4.0", "1.1.0", "9"]),
                    "name": "fuzznet", "type": "ipamd",
                    "ipam": {"type": "ipamd", "ranges": [[{"subnet": self.v4}]]}}
            req["stdin"] = json.dumps(conf)
        return req


def junk_payload(rng: random.Random, reqs: Requests) -> tuple[bytes, str]:
    """Bytes for the hook socket (maybe several lines, maybe none) and what kind they are."""
    r = rng.random()
    if r < 0.15:
        return garble.random_bytes(rng, 300), "random"
    if r < 0.45:
        return garble.mutate_bytes(rng, garble.dumps(reqs.request())), "bytes"
    if r < 0.8:
        obj = reqs.request()
        for _ in range(rng.randint(1, 3)):
            obj = garble.mutate_value(rng, obj)
        return garble.dumps(obj), "structure"
    if r < 0.85:
        obj = reqs.request()
        key = rng.choice(list(obj))
        text = garble.dumps(obj).decode("utf-8", "surrogatepass")
        old = json.dumps(obj[key])
        return text.replace(old, garble.nested_text(rng), 1).encode("utf-8", "surrogatepass"), \
            "nested"
    if r < 0.9:
        lines = [garble.dumps(reqs.request()) for _ in range(rng.randint(2, 6))]
        return b"\n".join(garble.mutate_bytes(rng, x) if rng.random() < 0.5 else x
                          for x in lines), "lines"
    if r < 0.95:
        obj = reqs.request()
        obj["op"] = rng.choice(["", "ALLOCATE", "allocate ", "alloc", "leave ", "rm-peer",
                                "__class__", "status\x00", 7, None, ["status"]])
        return garble.dumps(obj), "unknown_op"
    return b'{"op":"status","pad":"' + b"x" * (MAX_LINE + rng.randint(-40, 40)) + b'"}', \
        "oversize"


def lines_of(payload: bytes) -> list[bytes]:
    """The lines the daemon will parse, in order, as its reader splits them."""
    out = []
    for line in payload.split(b"\n"):
        if len(line) > MAX_LINE:
            out.append(line)  # the reader refuses it and hangs up
            break
        if line.strip():
            out.append(line)
    return out


def judge_locally(line: bytes, real_ids: set[str]):
    """Parse a line as the daemon will: ("send", request), ("skip", why) for a request that
    would change what it must not (leave the cluster, remove a real peer, touch a kept handle),
    or ("bug", exception) when the parser raises something other than HookError."""
    try:
        req = parse_request(line)
    except HookError as e:
        return "send", e
    except Exception as e:  # noqa: BLE001 - the finding itself
        return "bug", e
    if isinstance(req, m.Leave):
        return "skip", "leave"
    if isinstance(req, m.RemovePeer) and set(req.targets) & real_ids:
        return "skip", "rmpeer of a real daemon"
    if getattr(req, "handle", "").startswith(KEEP):
        return "skip", "a kept handle"
    return "send", req
