"""Group commit on the hook socket, with a real daemon: a batch's replies go out only once its
transaction is committed, however many connections share it, and whoever hands them out.

The commit is held back by a write lock taken from another connection: no reply that rests on
the batch may arrive meanwhile. Then the daemon is SIGKILLed the moment the replies are in,
and after a restart the database holds exactly what they acknowledged. A request refused in
the same batch (a bad line, a claim of a held address) gets its own error and changes nothing
of the others'.
"""
import json
import select
import socket

import apsw

from .daemon_proc import Daemon

ROUNDS = 5
LOCK_WINDOW = 1.0  # seconds: a reply sent before its commit would arrive in milliseconds


def _connect(path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(path))
    return s


def _read_line(s: socket.socket, timeout: float = 30.0) -> bytes:
    s.settimeout(timeout)
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        assert chunk, f"connection closed after {buf!r}"
        buf += chunk
    return buf


def _allocations(db) -> dict[str, str]:
    c = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return dict(c.execute("SELECT handle, address FROM allocations").fetchall())
    finally:
        c.close()


def test_a_batch_is_acknowledged_only_once_committed_and_survives_sigkill(tmp_path):
    d = Daemon(tmp_path, "--iprange", "10.77.0.0/16")
    d.start()
    held = d.call({"op": "allocate", "handle": "held"})["address"].split("/")[0]
    acked = {"held": held}
    for rnd in range(ROUNDS):
        lock = apsw.Connection(str(d.db))
        lock.set_busy_timeout(5000)
        lock.execute("BEGIN IMMEDIATE")  # the daemon's next commit waits for this lock
        socks = [_connect(d.socket) for _ in range(8)]
        lines = [b'{"op":"allocate","handle":"r%d-%d"}\n' % (rnd, i) for i in range(6)]
        lines.append(b'{"op":"allocate","handle":""}\n')  # refused by the parser
        lines.append(b'{"op":"claim","handle":"thief-%d","address":"%s"}\n'
                     % (rnd, held.encode()))  # refused by the core
        for s, line in zip(socks, lines):
            s.sendall(line)
        for s in socks[::2]:
            s.shutdown(socket.SHUT_WR)  # a client that hangs up still gets its reply
        # While the lock holds, no allocation can be committed, so none may be acknowledged.
        ready, _, _ = select.select(socks[:6], [], [], LOCK_WINDOW)
        assert ready == [], f"round {rnd}: a reply came before its commit could happen"
        lock.execute("ROLLBACK")
        lock.close()
        replies = [json.loads(_read_line(s)) for s in socks]
        d.kill()  # at once: every acknowledged allocation must be on disk already
        for s in socks:
            s.close()
        for i, r in enumerate(replies[:6]):
            assert r["ok"] and r["handle"] == f"r{rnd}-{i}", r
            acked[r["handle"]] = r["address"].split("/")[0]
        assert replies[6] == {"ok": False, "error": {
            "code": "bad_request", "message": "handle must be 1-255 printable characters"}}
        assert replies[7] == {"ok": False, "error": {
            "code": "in_use", "message": f"{held} is held by handle 'held'"}}
        assert len(set(acked.values())) == len(acked)  # no address given twice
        d.start()
        assert _allocations(d.db) == acked, f"round {rnd}"
    d.stop()


def test_a_reply_larger_than_the_socket_takes_goes_out_whole_and_in_order(tmp_path):
    d = Daemon(tmp_path, "--iprange", "10.78.0.0/16")
    d.start()
    s = _connect(d.socket)
    f = s.makefile("rb")
    n = 3000
    s.sendall(b"".join(b'{"op":"allocate","handle":"big-%d"}\n' % i for i in range(n)))
    assert all(json.loads(f.readline())["ok"] for _ in range(n))
    # The list (some 300 KB) and a request after it, sent together, before reading anything:
    # the daemon must not read the second before the first's reply is out whole.
    s.sendall(b'{"op":"list"}\n{"op":"lookup","handle":"big-7"}\n')
    listed = json.loads(f.readline())
    assert len(listed["allocations"]) == n
    assert sorted(a["handle"] for a in listed["allocations"]) == \
        sorted(f"big-{i}" for i in range(n))
    assert json.loads(f.readline())["handle"] == "big-7"
    s.close()
    d.stop()


def test_a_client_that_hangs_up_after_its_request_still_gets_the_reply(tmp_path):
    # Each request joins a batch another connection may lead; its own connection sees the
    # hang-up before that batch is committed, and must still send the reply before closing.
    d = Daemon(tmp_path, "--iprange", "10.79.0.0/16")
    d.start()
    for rnd in range(30):
        socks = [_connect(d.socket) for _ in range(8)]
        for i, s in enumerate(socks):
            s.sendall(b'{"op":"allocate","handle":"h%d-%d"}\n' % (rnd, i))
        for s in socks:
            s.shutdown(socket.SHUT_WR)
        for i, s in enumerate(socks):
            assert json.loads(_read_line(s))["handle"] == f"h{rnd}-{i}", f"round {rnd}"
            s.close()
    assert len(_allocations(d.db)) == 30 * 8
    d.stop()
