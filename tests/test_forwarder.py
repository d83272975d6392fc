"""The C forwarder (packaging/cni-forward.c) against odd daemons and odd input, built once with
AddressSanitizer and UBSan: whatever happens, one well-formed JSON document on stdout with one
of the CNI spec's codes, within its deadline, and never another daemon's socket."""
import json
import os
import socket
import subprocess

import pytest

from .conftest import need_tool
from .daemon_proc import ROOT
from .threads import Worker, join_all

SOURCE = ROOT / "packaging" / "cni-forward.c"
ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/c1",
       "CNI_IFNAME": "eth0", "CNI_PATH": "/x", "IPAMD_CNI_TIMEOUT": "1",
       "ASAN_OPTIONS": "detect_leaks=0", "UBSAN_OPTIONS": "halt_on_error=1"}


@pytest.fixture(scope="module")
def forwarder(tmp_path_factory):
    cc = need_tool("cc")
    out = tmp_path_factory.mktemp("fwd") / "ipamd-cni-asan"
    subprocess.run([cc, "-O1", "-g", "-fsanitize=address,undefined", "-Wall", "-Wextra",
                    "-Werror", "-o", str(out), str(SOURCE)], check=True, capture_output=True)
    return out


def run(forwarder, conf, env=None):
    stdin = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    r = subprocess.run([str(forwarder)], input=stdin, capture_output=True, timeout=30,
                       env={**ENV, **(env or {})})
    assert b"Sanitizer" not in r.stderr and b"runtime error" not in r.stderr, r.stderr
    return r.returncode, json.loads(r.stdout)  # exactly one JSON document, or this raises


def conf(sock, **ipam):
    return {"cniVersion": "1.1.0", "name": "n", "ipam": {"type": "ipamd", "socket": str(sock),
                                                         "ranges": [[{"subnet": "198.18.0.0/24"}]],
                                                         **ipam}}


class FakeDaemon:
    """A hook socket that answers each connection with `answer(request_bytes)` (or nothing)."""

    def __init__(self, path, answer):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.answer, self.requests = answer, []
        self.worker = Worker(target=self._serve)
        self.worker.start()

    def _serve(self):
        conn, _ = self.sock.accept()
        with conn:
            f = conn.makefile("rb")
            line = f.readline()
            self.requests.append(line)
            out = self.answer(line)
            if out is not None:
                conn.sendall(out)
            conn.recv(1)  # hold the connection until the forwarder hangs up

    def close(self):
        self.sock.close()
        join_all([self.worker])


def test_a_daemon_that_never_answers_is_error_11_within_the_deadline(forwarder, tmp_path):
    d = FakeDaemon(tmp_path / "s", lambda line: None)
    code, out = run(forwarder, conf(tmp_path / "s"))
    d.close()
    assert (code, out["code"], out["details"]) == (1, 11, f"{tmp_path / 's'}: timed out")
    assert json.loads(d.requests[0])["op"] == "cni"


def test_a_cut_off_reply_prints_only_the_error(forwarder, tmp_path):
    d = FakeDaemon(tmp_path / "s", lambda line: b'{"ok":true,"exit":0,"length":100}\n{"cniV')
    code, out = run(forwarder, conf(tmp_path / "s"))
    d.close()
    assert (code, out["code"]) == (1, 11), out
    assert out["msg"] in ("no answer from the ipamd daemon in time; try again later",
                          "the ipamd daemon went away mid-reply")


def test_a_refusal_of_the_request_itself_is_a_spec_code(forwarder, tmp_path):
    d = FakeDaemon(tmp_path / "s", lambda line: b'{"ok":false,"error":{"code":"bad_request",'
                                                b'"message":"no"}}\n')
    code, out = run(forwarder, conf(tmp_path / "s"))
    d.close()
    assert (code, out["code"], out["msg"]) == (1, 7, "ipamd refused the request")


@pytest.mark.parametrize("socket_value", ["/tmp/" + "x" * 120, "/tmp/a\\u0062", 5, ""])
def test_an_unusable_ipam_socket_is_refused_not_replaced(forwarder, tmp_path, socket_value):
    fallback = tmp_path / "default"
    d = FakeDaemon(fallback, lambda line: None)
    stdin = json.dumps(conf("PLACEHOLDER")).replace('"PLACEHOLDER"', json.dumps(socket_value)
                                                    if not isinstance(socket_value, str) or
                                                    "\\u" not in socket_value
                                                    else f'"{socket_value}"')
    code, out = run(forwarder, stdin.encode(), {"IPAMD_SOCKET": str(fallback)})
    assert (code, out["code"]) == (1, 7), out
    assert out["msg"] == "ipam.socket must be a plain string path shorter than 108 bytes"
    assert d.requests == []  # the default socket was never tried
    with socket.socket(socket.AF_UNIX) as poke:  # let the fake daemon finish
        poke.connect(str(fallback))
    d.close()


@pytest.mark.parametrize("size, text", [(70_000, "a"), (22_000, "é")])
def test_a_config_too_large_to_forward_is_code_7_not_a_crash(forwarder, tmp_path, size, text):
    c = conf(tmp_path / "nobody-listens")
    c["padding"] = text * size
    code, out = run(forwarder, c)
    assert (code, out["code"], out["msg"]) == (1, 7, "the network config is too large for ipamd")
