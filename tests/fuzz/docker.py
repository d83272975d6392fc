"""Docker's plugin socket as a hostile client sees it: HTTP/1.1 by hand over the unix socket,
valid IpamDriver calls (appliance/protocols/docker_ipam.py), the same with mutated JSON bodies, and
garbage HTTP (appliance/docker_server.py)."""
from __future__ import annotations

import json
import random
import socket
import time

import h11

from . import garble

ENDPOINTS = ["/Plugin.Activate", "/IpamDriver.GetCapabilities",
             "/IpamDriver.GetDefaultAddressSpaces", "/IpamDriver.RequestPool",
             "/IpamDriver.ReleasePool", "/IpamDriver.RequestAddress",
             "/IpamDriver.ReleaseAddress"]
GATEWAY = {"RequestAddressType": "com.docker.network.gateway"}
MAC = "com.docker.network.endpoint.macaddress"


def request_bytes(path: str, body: bytes, method: str = "POST", extra: bytes = b"") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: plugin\r\n"
            f"Content-Type: application/vnd.docker.plugins.v1+json\r\n"
            f"Content-Length: {len(body)}\r\n").encode() + extra + b"\r\n" + body


def call(sock_path, req: bytes, timeout: float, hang_up: bool = False) -> tuple[int, object]:
    """Send bytes on a fresh connection and read one answer: (status, JSON body or raw
    bytes). hang_up: then close our side, so that the server, however little it made of
    them, answers or closes at once. ConnectionError when it closed without an answer,
    TimeoutError when it did neither within timeout."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(sock_path))
        try:
            s.sendall(req)
            if hang_up:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it refused the rest (too large): its answer may still be there to read
        return read_response(s, timeout)
    finally:
        s.close()


def read_response(s: socket.socket, timeout: float) -> tuple[int, object]:
    conn = h11.Connection(h11.CLIENT)
    # h11 wants to have sent a request before it reads a response: tell it one went out.
    conn.send(h11.Request(method="POST", target="/", headers=[("Host", "x"),
                                                              ("Content-Length", "0")]))
    conn.send(h11.EndOfMessage())
    deadline = time.monotonic() + timeout
    status, body = None, b""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            raise ConnectionError(f"not HTTP: {e}") from None
        if event is h11.NEED_DATA:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no whole answer")
            s.settimeout(left)
            try:
                data = s.recv(65536)
            except socket.timeout:
                raise TimeoutError("no whole answer") from None
            except ConnectionResetError:
                data = b""
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            break
    if status is None:
        raise ConnectionError("closed without an answer")
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


class Driver:
    """What a docker daemon would ask, with state: pools and addresses handed out."""

    def __init__(self, rng: random.Random, v4: str, v6: str):
        self.rng, self.v4, self.v6 = rng, v4, v6
        self.pools: list[str] = []
        self.addresses: list[tuple[str, str]] = []

    def mac(self) -> str:
        return "02:" + ":".join(f"{self.rng.randrange(256):02x}" for _ in range(5))

    def pool_id(self) -> str:
        if self.pools and self.rng.random() < 0.85:
            return self.rng.choice(self.pools)
        return self.rng.choice([f"ipamd:{self.v4}", f"ipamd:{self.v4}#abc@p1.1", "ipamd:x",
                                f"ipamd:{self.v6}", ""])

    def valid(self) -> tuple[str, dict]:
        rng = self.rng
        r = rng.random()
        if r < 0.05:
            return rng.choice(ENDPOINTS[:3]), {}
        if r < 0.25 or not self.pools:
            v6 = rng.random() < 0.3
            pool = rng.choice(["", self.v6 if v6 else self.v4])
            if not v6 and pool and rng.random() < 0.5:
                pool = self.v4.rsplit(".", 1)[0] + f".{rng.choice([0, 64, 128, 192])}/26"
            body = {"AddressSpace": "local", "Pool": pool, "SubPool": "", "Options": {},
                    "V6": v6}
            return "/IpamDriver.RequestPool", body
        if r < 0.6:
            options = rng.choice([GATEWAY, {MAC: self.mac()}, {}, {
                MAC: self.mac(), "com.docker.network.endpoint.name": "fz"}])
            return "/IpamDriver.RequestAddress", {"PoolID": self.pool_id(), "Address": "",
                                                  "Options": options}
        if r < 0.85 and self.addresses:
            pool, address = rng.choice(self.addresses)
            return "/IpamDriver.ReleaseAddress", {"PoolID": pool, "Address": address}
        return "/IpamDriver.ReleasePool", {"PoolID": self.pool_id()}

    def learn(self, path: str, body: dict, reply) -> None:
        if not isinstance(reply, dict) or "Error" in reply:
            return
        if path.endswith("RequestPool") and isinstance(reply.get("PoolID"), str):
            self.pools.append(reply["PoolID"])
            del self.pools[:-20]
        elif path.endswith("RequestAddress") and isinstance(reply.get("Address"), str):
            self.addresses.append((body.get("PoolID"), reply["Address"]))
            del self.addresses[:-40]
        elif path.endswith("ReleasePool") and body.get("PoolID") in self.pools:
            self.pools.remove(body["PoolID"])


def mutated(rng: random.Random, driver: Driver) -> tuple[str, bytes, str]:
    """(path, body, kind): a driver call whose JSON body is mutated."""
    path, body = driver.valid()
    r = rng.random()
    if r < 0.1:
        path = rng.choice(["/IpamDriver.Nope", "/", "/Plugin.Activate/..", path.lower(),
                           path + "?x=1", "//IpamDriver.RequestPool", "*"])
    if r < 0.5:
        for _ in range(rng.randint(1, 3)):
            body = garble.mutate_value(rng, body)
        return path, garble.dumps(body), "structure"
    if r < 0.8:
        return path, garble.mutate_bytes(rng, garble.dumps(body)), "bytes"
    if r < 0.9:
        return path, garble.nested_text(rng).encode(), "nested"
    return path, garble.dumps(garble.random_json(rng, 3)), "random_json"


def garbage(rng: random.Random, driver: Driver) -> tuple[bytes, str, bool]:
    """(bytes, kind, whole): garbage HTTP; whole when the server must answer it."""
    path, body = driver.valid()
    good = request_bytes(path, json.dumps(body).encode())
    r = rng.random()
    if r < 0.2:
        return garble.random_bytes(rng, 400), "random", False
    if r < 0.45:
        return garble.mutate_bytes(rng, good), "mutated_http", False
    if r < 0.55:
        return request_bytes(path, b"{}", method=rng.choice(["GET", "PUT", "DELETE", "BREW"])), \
            "method", True
    if r < 0.62:
        head = request_bytes(path, b"", extra=b"X-Pad: " + b"a" * 70000 + b"\r\n")
        return head, "huge_header", True
    if r < 0.67:
        big = b'{"Pool":"' + b"x" * ((1 << 20) + 10) + b'"}'
        return request_bytes(path, big), "huge_body", True
    if r < 0.75:
        chunked = (f"POST {path} HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n"
                   ).encode() + rng.choice([b"zz\r\n{}\r\n0\r\n\r\n", b"2\r\n{}\r\n0\r\n\r\n",
                                            b"ffffffffffffffff\r\n{}", b"-1\r\n\r\n"])
        return chunked, "chunked", False
    if r < 0.82:
        return good + good + request_bytes("/IpamDriver.GetCapabilities", b""), \
            "pipelined", True
    if r < 0.9:
        return good[:rng.randrange(1, len(good))], "partial", False
    return (f"POST {path} HTTP/1.1\r\nHost: p\r\nContent-Length: "
            f"{rng.choice(['-1', '99999999999999999999', 'x', '1, 2'])}\r\n\r\n{{}}").encode(), \
        "bad_length", False
