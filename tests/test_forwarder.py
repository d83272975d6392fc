"""Both CNI forwarders against odd daemons and odd input: the C one (packaging/cni-forward.c,
built once with AddressSanitizer and UBSan) and its Python twin, the executable's CNI mode
(appliance/cni_forward.py, `python -m appliance` with CNI_COMMAND set). Whatever happens, one
well-formed JSON document on stdout with one of the CNI spec's codes, within its deadline, and
never another daemon's socket; both send the same bytes and draw the same lines."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from .conftest import need_tool
from .daemon_proc import ROOT
from .threads import Worker, join_all

SOURCE = ROOT / "packaging" / "cni-forward.c"
ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/c1",
       "CNI_IFNAME": "eth0", "CNI_PATH": "/x", "IPAMD_CNI_TIMEOUT": "1",
       "ASAN_OPTIONS": "detect_leaks=0", "UBSAN_OPTIONS": "halt_on_error=1"}


@pytest.fixture(scope="module", params=["c", "python"])
def forwarder(request, tmp_path_factory):
    """The command that runs one forwarder."""
    if request.param == "python":
        return [sys.executable, "-m", "appliance"]  # CNI mode: CNI_COMMAND is set
    cc = need_tool("cc")
    out = tmp_path_factory.mktemp("fwd") / "ipamd-cni-asan"
    subprocess.run([cc, "-O1", "-g", "-fsanitize=address,undefined", "-Wall", "-Wextra",
                    "-Werror", "-o", str(out), str(SOURCE)], check=True, capture_output=True)
    return [str(out)]


def run_raw(forwarder, conf, env=None):
    stdin = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    r = subprocess.run(forwarder, input=stdin, capture_output=True, timeout=30, cwd=ROOT,
                       env={**ENV, **(env or {})})
    assert b"Sanitizer" not in r.stderr and b"runtime error" not in r.stderr, r.stderr
    assert b"Traceback" not in r.stderr, r.stderr.decode()
    return r.returncode, r.stdout


def run(forwarder, conf, env=None):
    code, out = run_raw(forwarder, conf, env)
    return code, json.loads(out)  # exactly one JSON document, or this raises


OK_EMPTY = b'{"ok":true,"exit":0,"length":2}\n{}'


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
            if isinstance(out, bytes):
                conn.sendall(out)
            for part in out if isinstance(out, list) else []:  # parts a moment apart
                time.sleep(0.2)
                conn.sendall(part)
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


# ipam.socket as it stands in the config: too long, escapes (even harmless ones), not a string,
# empty, a NUL byte (escaped, or raw: once cut there it would name another socket).
@pytest.mark.parametrize("socket_text", [b'"/tmp/' + b"x" * 120 + b'"', b'"/tmp/a\\u0062"', b"5",
                                         b'""', b"null", b'["/tmp/a"]', b'"/tmp/a\\u0000b"',
                                         b'"/tmp/a\0b"'])
def test_an_unusable_ipam_socket_is_refused_not_replaced(forwarder, tmp_path, socket_text):
    fallback = tmp_path / "default"
    d = FakeDaemon(fallback, lambda line: None)
    stdin = json.dumps(conf("PLACEHOLDER")).encode().replace(b'"PLACEHOLDER"', socket_text)
    code, out = run(forwarder, stdin, {"IPAMD_SOCKET": str(fallback)})
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


def padded_path(folder, length):
    """A path of exactly `length` bytes in folder."""
    head = f"{folder}/"
    if len(head) + 1 > length:
        pytest.skip(f"the temporary folder's path is too long: {head}")
    return head + "s" * (length - len(head))


def test_an_ipam_socket_of_107_bytes_is_used_and_108_refused(forwarder, tmp_path):
    longest = padded_path(tmp_path, 107)
    d = FakeDaemon(longest, lambda line: OK_EMPTY)
    assert run(forwarder, conf(longest)) == (0, {})
    d.close()
    code, out = run(forwarder, conf(longest + "s"))
    assert (code, out["code"]) == (1, 7), out


def test_a_default_socket_too_long_for_an_address_is_not_cut_short(forwarder, tmp_path):
    prefix = padded_path(tmp_path, 107)
    d = FakeDaemon(prefix, lambda line: None)  # what a cut-short path would name
    cfg = conf("x")
    del cfg["ipam"]["socket"]
    code, out = run(forwarder, cfg, {"IPAMD_SOCKET": prefix + "x"})
    assert (code, out["code"]) == (1, 11), out
    assert out["details"].endswith(": File name too long"), out
    assert d.requests == []
    with socket.socket(socket.AF_UNIX) as poke:
        poke.connect(prefix)
    d.close()


def test_the_size_bound_is_the_request_as_sent_newline_included(forwarder, tmp_path):
    """At most 64 KiB (the hook's line limit) counting the request's own escapes: a raw
    non-ASCII byte is sent as six. The base size is measured with a small config first."""
    def config(n_ascii, n_e):  # each "é" is two bytes of UTF-8, twelve as sent
        return json.dumps(conf(tmp_path / "s", padding="a" * n_ascii + "é" * n_e),
                          ensure_ascii=False).encode()

    def forward(stdin):
        d = FakeDaemon(tmp_path / "s", lambda line: OK_EMPTY if line else None)
        code, out = run(forwarder, stdin)
        if not d.requests:
            with socket.socket(socket.AF_UNIX) as poke:  # let the fake daemon finish
                poke.connect(str(tmp_path / "s"))
        d.close()
        (tmp_path / "s").unlink()
        return code, out, d.requests[0]

    base = len(forward(config(0, 0))[2])
    code, out, line = forward(config((65536 - base) % 12, (65536 - base) // 12))
    assert (code, out, len(line)) == (0, {}, 65536)
    code, out, line = forward(config((65537 - base) % 12, (65537 - base) // 12))
    assert (code, out["code"], out["msg"], out["details"], line) == (
        1, 7, "the network config is too large for ipamd",
        "request: 65537 bytes as sent, at most 65536", b"")


def test_the_request_carries_each_byte_as_one_escaped_code_point(forwarder, tmp_path):
    d = FakeDaemon(tmp_path / "s", lambda line: b'{"ok":true,"exit":0,"length":0}\n')
    # a string holding é (raw UTF-8), a tab, DEL, an escaped backslash and an escaped quote
    stdin = json.dumps(conf(tmp_path / "s")).encode()[:-1] + b', "x": "\xc3\xa9\t\x7f\\\\\\""}'
    code, out = run_raw(forwarder, stdin, {"CNI_ARGS": "IP=198.18.0.9;K=\u00e9"})
    d.close()
    assert (code, out) == (0, b"")
    line = d.requests[0]
    assert line.startswith(b'{"v":1,"op":"cni","env":{')
    assert line.endswith(rb', \"x\": \"\u00c3\u00a9\u0009\u007f\\\\\\\"\"}"}' + b"\n")
    request = json.loads(line)
    assert request["stdin"].encode("latin-1") == stdin
    assert request["env"] == {**{k: v for k, v in ENV.items() if k.startswith("CNI_")},
                              "CNI_ARGS": "IP=198.18.0.9;K=\u00c3\u00a9"}


def test_the_answer_is_printed_whole_with_the_daemons_exit_code(forwarder, tmp_path):
    body = json.dumps({"cniVersion": "1.1.0", "code": 3, "msg": "x" * 5000}).encode()
    d = FakeDaemon(tmp_path / "s", lambda line: [b'{"ok":true,"exit":3,"len',
                                                 b'gth":%d}\n' % len(body) + body[:100],
                                                 body[100:]])
    code, out = run_raw(forwarder, conf(tmp_path / "s"))
    d.close()
    assert (code, out) == (3, body)


def test_a_daemon_that_does_not_accept_is_error_11_within_the_deadline(forwarder, tmp_path):
    """A stalled daemon whose listen backlog is full: connect() waits, under the deadline."""
    with socket.socket(socket.AF_UNIX) as listener, socket.socket(socket.AF_UNIX) as queued:
        listener.bind(str(tmp_path / "s"))
        listener.listen(0)
        queued.connect(str(tmp_path / "s"))  # the backlog is now full
        start = time.monotonic()
        code, out = run(forwarder, conf(tmp_path / "s"))
        took = time.monotonic() - start
    assert (code, out["code"], out["details"]) == (1, 11, f"{tmp_path / 's'}: timed out"), out
    assert took < 10


@pytest.mark.parametrize("command, code", [("ADD", 11), ("STATUS", 50)])
def test_no_daemon_is_11_or_50_for_status(forwarder, tmp_path, command, code):
    got, out = run(forwarder, conf(tmp_path / "nobody"), {"CNI_COMMAND": command})
    assert (got, out["code"]) == (1, code), out
    assert out["details"] == f"{tmp_path / 'nobody'}: No such file or directory"
