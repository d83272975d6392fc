"""Candidates: peer addresses heard from others. Bounded, expiring (time injected here; a real
daemon with a small --candidate-ttl below), never passed on in our own address books, never
members; and a real daemon fed bad and phantom address books by a fake peer that holds the
secret keeps serving, restarts cleanly, and rmpeer works."""
import ipaddress
import json
import socket
import sqlite3
import threading
import time

import msgpack
import pytest
import trio
import trio.testing

from appliance import peer_net
from appliance.core.addr import cidr
from appliance.core.messages import PeerSeen
from appliance.peer_net import PeerNet, _Framed, _Session
from appliance.protocols.peer_liveness import INTERVAL_MIN as KEEPALIVE
from appliance.protocols.peer_frames import ADDRESSES, KEEPALIVE_FRAME, ProtocolError
from appliance.store import Store

from .daemon_proc import wait_until
from .test_peer_auth import SECRET, FakeCore
from .test_peers import RANGE, SECRET as DAEMON_SECRET, joined, launch, status

TTL = 60.0


class CorePeer:
    """What PeerNet asks of the core's peer: who it has heard from, who is a member."""

    def __init__(self, me, cluster="c1"):
        self.me, self.cluster, self.base_cluster = me, cluster, cluster
        self.seen: set[str] = set()
        self.owners: set[str] = set()   # e.g. peers owning ring entries
        self.removed: dict[str, str] = {}

    def members(self):
        return ({self.me} | self.seen | self.owners) - set(self.removed)


class Core(FakeCore):
    def __init__(self, me="me"):
        super().__init__(me)
        self.peer = CorePeer(me)

    def heard_from(self):
        return self.peer.seen

    def members(self):
        return self.peer.members()

    def removed(self):
        return set(self.peer.removed)


def rows(store):
    return {p: (state, at) for p, state, at in store.conn.execute(
        "SELECT id, state, last_seen FROM peers WHERE id != ?", (store.me,))}


def open_store(path, now):
    store = Store(path / "ipamd.db")
    store.me = store.open([cidr("198.18.0.0/24")], "t").peer_id
    return store, store.candidates(now)


def make_net(store, candidates, wall, known=None):
    return PeerNet(Core(), SECRET, None, clock=lambda: 100.0, known=known,
                   save=store.save_peer_address, candidates=candidates, candidate_ttl=TTL,
                   heard_from=store.peer_heard, forget=store.forget_candidates,
                   wall=lambda: wall[0])


def book(**entries):
    return msgpack.packb(entries)


def test_a_candidate_not_heard_from_expires_after_the_ttl(tmp_path, caplog):
    wall = [1000.0]
    store, cands = open_store(tmp_path, wall[0])
    n = make_net(store, cands, wall)
    n._learn(book(p1="198.18.0.1:7000", p2="198.18.0.2:7000", owner="198.18.0.3:7000",
                  conn="198.18.0.4:7000", shook="198.18.0.5:7000", spoke="198.18.0.6:7000"))
    assert rows(store) == {p: ("candidate", 1000.0)
                           for p in ("p1", "p2", "owner", "conn", "shook", "spoke")}
    wall[0] = 1030.0
    # Told again, even at another address: no new lease (else a phantom announced for ever
    # would never go), and the address learned first stays.
    n._learn(book(p1="198.18.0.9:7000", late="198.18.0.7:7000"))
    assert n.addresses["p1"] == "198.18.0.1:7000" and rows(store)["p1"] == ("candidate", 1000.0)
    n._proved("shook")               # completed a handshake: it knows the secret
    n.core.peer.owners.add("owner")  # a member (it owns ring entries) while it is down
    n.out["conn"] = object()         # connected now
    wall[0] = 1000.0 + TTL           # not more than the TTL yet
    assert n.expire_candidates() == [] and n.expired == 0
    wall[0] = 1000.0 + TTL + 1
    caplog.set_level("WARNING", logger="ipamd.peers")
    assert n.expire_candidates() == ["p1", "p2", "spoke"]
    assert "event=candidates_expired count=3 first=p1 ttl=60" in caplog.text
    assert n.expired == 3 and set(n.addresses) == {"owner", "conn", "shook", "late"}
    assert set(rows(store)) == {"owner", "conn", "shook", "late"}
    assert rows(store)["shook"] == ("candidate", 1030.0)
    # One the core has heard from is a member: its row is 'alive' and it never expires.
    n.core.peer.seen.add("late")
    store.commit([PeerSeen("late")])
    del n.out["conn"]
    n.core.peer.owners.clear()
    wall[0] = 5000.0
    assert n.expire_candidates() == ["conn", "owner", "shook"]
    assert n.addresses == {"late": "198.18.0.7:7000"} and n.candidates() == {}
    assert rows(store) == {"late": ("alive", 1030.0)} and n.expired == 6
    store.close()


def test_expiry_survives_a_restart_and_comes_first(tmp_path):
    wall = [1000.0]
    store, cands = open_store(tmp_path, wall[0])
    n = make_net(store, cands, wall)
    n._learn(book(old="198.18.0.1:7000"))
    wall[0] = 1050.0
    n._learn(book(new="198.18.0.2:7000"))
    store.save_peer_address("legacy", "198.18.0.3:7000")  # kept by an ipamd without times
    store.close()
    # Back after a while: the times kept are the ones that count, not the restart's.
    wall[0] = 1000.0 + TTL + 1
    store, cands = open_store(tmp_path, wall[0])
    assert cands == {"old": 1000.0, "new": 1050.0, "legacy": wall[0]}
    n = make_net(store, cands, wall, known=store.peer_addresses())
    assert n.expire_candidates() == ["old"]
    assert set(n.addresses) == set(rows(store)) == {"new", "legacy"}
    store.close()


def test_address_books_carry_no_candidates(tmp_path):
    wall = [1000.0]
    store, cands = open_store(tmp_path, wall[0])
    store.commit([PeerSeen("kept")])
    store.save_peer_address("kept", "198.18.0.1:7000", 900.0)  # a member from before
    n = make_net(store, store.candidates(wall[0]), wall, known=store.peer_addresses())
    n._learn(book(phantom="198.18.0.2:7000", owner="198.18.0.3:7000", shook="198.18.0.4:7000"))
    n._proved("shook")
    n.core.peer.owners.add("owner")
    n._remember("dialled", "198.18.0.5:7000")  # as the dialler does for a peer it reached
    n._proved("dialled")
    assert n._book("x") == {"kept": "198.18.0.1:7000", "owner": "198.18.0.3:7000",
                            "shook": "198.18.0.4:7000", "dialled": "198.18.0.5:7000"}
    assert "shook" not in n._book("shook")
    store.close()


async def test_a_removed_peers_address_books_are_ignored():
    for sender, learned in (("friend", {"p": "198.18.0.1:7000"}), ("evil", {})):
        n = PeerNet(Core(), SECRET, None)
        n.core.peer.removed["evil"] = "me"
        left, right = trio.testing.memory_stream_pair()
        tx = _Session(_Framed(left), b"k1" * 16, b"k2" * 16, "me")
        rx = _Session(_Framed(right), b"k2" * 16, b"k1" * 16, sender)
        await tx.send(ADDRESSES, book(p="198.18.0.1:7000"))
        await left.aclose()
        with pytest.raises(ProtocolError, match="connection closed"):
            await n._reader(rx, inbound=False)
        assert n.addresses == learned


async def test_a_removed_peers_garbage_book_still_ends_the_connection():
    """Ignored unread, a bad book from a peer counted removed kept its connection open: the
    fuzzer saw one whose Handover, sent a moment later on a new connection, was read first."""
    n = PeerNet(Core(), SECRET, None)
    n.core.peer.removed["evil"] = "evil"
    left, right = trio.testing.memory_stream_pair()
    tx = _Session(_Framed(left), b"k1" * 16, b"k2" * 16, "me")
    rx = _Session(_Framed(right), b"k2" * 16, b"k1" * 16, "evil")
    await tx.send(ADDRESSES, b"\x81\xa1p\xa2\xd6\x00")  # {"p": a string not UTF-8}
    await left.aclose()  # ignored unread, the reader would end on this instead
    with pytest.raises(ProtocolError, match="^bad address book: 'utf-8' codec can't decode "
                       "byte 0xd6 in position 0: invalid continuation byte$"):
        await n._reader(rx, inbound=False)
    assert n.addresses == {}


async def test_an_expired_candidate_is_no_longer_dialled():
    refuser = closed_ports(1)
    addr = f"127.0.0.1:{refuser[0].getsockname()[1]}"
    wall = [1000.0]
    n = PeerNet(Core(), SECRET, None, candidate_ttl=TTL, wall=lambda: wall[0])
    async with trio.open_nursery() as nursery:
        await nursery.start(n.run, None, [])
        n._learn(book(phantom=addr))
        with trio.fail_after(10):
            while addr not in n.wake:  # dialled, refused, waiting to dial again
                await trio.sleep(0.01)
        assert n.dialing == {addr}
        wall[0] += TTL + 1
        assert n.expire_candidates() == ["phantom"]
        with trio.fail_after(10):
            while n.dialing:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    refuser[0].close()


# -- a real daemon, and a fake peer that holds the secret --------------------------------------


def closed_ports(n):
    """Sockets bound on loopback and not listening: a dial there is refused at once, and no
    one else can listen there while they are open."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    return socks


class FakePeer:
    """A peer that holds the secret: it connects to a daemon with the real handshake
    (PeerNet._handshake) and frames (_Session), keeps the connection alive with keepalives,
    and sends what the test tells it to. It listens nowhere (port 0 in its hello), so the
    daemon never dials it back. `closed` says why the daemon hung up, once it has."""

    def __init__(self, daemon, peer_id="fake-peer"):
        core = FakeCore(peer_id, status(daemon)["cluster"])
        core.loaded.universes = [cidr(RANGE)]
        self.net = PeerNet(core, DAEMON_SECRET.encode(), None)
        self.port = daemon.port
        self.closed = self.error = self.peer = None

    def __enter__(self):
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._thread, daemon=True)
        self.thread.start()
        assert self.ready.wait(30), "the fake peer did not connect"
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc):
        try:
            trio.from_thread.run_sync(self.cancel.cancel, trio_token=self.token)
        except trio.RunFinishedError:
            pass
        self.thread.join(30)

    def _thread(self):
        try:
            trio.run(self._main)
        except BaseException as e:  # noqa: B036 (reported to the test)
            self.error = e
            self.ready.set()

    async def _main(self):
        self.token, self.lock = trio.lowlevel.current_trio_token(), trio.Lock()
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        async with stream:
            self.session, self.peer, _ = await self.net._handshake(stream, outbound=True)
            async with trio.open_nursery() as n:
                self.cancel = n.cancel_scope
                n.start_soon(self._keepalive)
                self.ready.set()
                try:
                    while True:
                        await self.session.receive()  # nothing comes: this ends when the daemon hangs up
                except (ProtocolError, trio.BrokenResourceError, OSError) as e:
                    self.closed = str(e) or type(e).__name__
                n.cancel_scope.cancel()

    async def _send(self, kind, payload):
        async with self.lock:  # one writer at a time: counters go out in order
            await self.session.send(kind, payload)

    async def _keepalive(self):
        while True:
            try:
                await self._send(KEEPALIVE_FRAME, b"")
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            await trio.sleep(KEEPALIVE)

    def send(self, kind, payload):
        trio.from_thread.run(self._send, kind, payload, trio_token=self.token)

    def book(self, entries):
        self.send(ADDRESSES, msgpack.packb(entries))


def db_peers(d):
    with sqlite3.connect(f"file:{d.db}?mode=ro", uri=True, timeout=10) as c:
        return {p: (state, addresses) for p, state, addresses in
                c.execute("SELECT id, state, addresses FROM peers")}


def candidate_rows(d):
    return sorted(p for p, (state, _) in db_peers(d).items() if state == "candidate")


def restart(d):
    assert d.stop() == 0, d.stderr()
    d.start()
    d.port = int(d.ready_line.split("listen=")[1].split()[0].rsplit(":", 1)[1])
    d.addr = f"127.0.0.1:{d.port}"
    return d


def clean_log(d):
    text = d.stderr()
    assert "Traceback" not in text and "level=ERROR" not in text, text
    return text


BAD = {
    "bad-dots": "a..b:6786",
    "bad-label": "a" * 64 + ".example:6786",
    "bad-port0": "127.0.0.1:0",
    "bad-port70000": "127.0.0.1:70000",
    "bad-noport": "127.0.0.1",
    "bad-int": 6786,
    "bad-none": None,
    "bad-bytes": b"127.0.0.1:6786",
    "bad-map": {"host": "127.0.0.1", "port": 6786},
    "bad-huge-list": ["127.0.0.1:6786"] * 100_000,
    "bad-long": "a." * 150 + "example:6786",
    "": "127.0.0.1:6786",
    "x" * 65: "127.0.0.1:6786",
    "bad\nid": "127.0.0.1:6786",
}


def test_a_fake_peer_with_the_secret_sends_bad_and_phantom_books(tmp_path):
    """The daemon keeps serving, keeps at most MAX_CANDIDATES addresses, counts no phantom as
    a member nor passes any on, restarts cleanly on its database, and rmpeer of a dead real
    peer answers as without the phantoms."""
    (a, b, c), (ia, ib, ic) = joined(tmp_path, ["a", "b", "c"])
    for d in (a, c):
        assert d.call({"op": "allocate", "handle": f"{d.dir.name}-1"})["ok"]
    wait_until("one ring", lambda: len({status(d)["ring_digest"] for d in (a, b, c)}) == 1)
    wait_until("a to hold b and c as members", lambda: [db_peers(a).get(p, ("",))[0]
                                                        for p in (ib, ic)] == ["alive"] * 2)
    before = db_peers(a)
    assert status(a)["candidates"] == 0
    refusers = closed_ports(8)
    ports = [s.getsockname()[1] for s in refusers]

    # Bad entries: each dropped with one line between them; the connection stays.
    # Books that are not books at all: the peer is broken, and is hung up on.
    broken = [msgpack.packb(["good-2", "127.0.0.1:1"]), msgpack.packb({7: "127.0.0.1:1"}),
              msgpack.packb({f"p{i}": "127.0.0.1:1" for i in range(10_001)}), b"\xc1\xc1"]
    with FakePeer(a) as fake:
        assert fake.peer == ia
        fake.book({**BAD, "good-1": f"127.0.0.1:{ports[0]}"})
        wait_until("a to drop the bad entries", lambda: "event=bad_address_book_entries "
                   f"count={len(BAD)} " in a.stderr())
        wait_until("a to learn the good one", lambda: status(a)["candidates"] == 1)
        assert fake.closed is None
        fake.send(ADDRESSES, broken.pop(0))
        wait_until("a to hang up on a broken book", lambda: fake.closed)
    for payload in broken:
        with FakePeer(a) as fake:
            fake.send(ADDRESSES, payload)
            wait_until("a to hang up on a broken book", lambda: fake.closed)
    wait_until("a to log why", lambda: "reason='bad address book" in a.stderr())
    assert status(a)["candidates"] == 1

    # A thousand phantoms, and two entries for peers a knows (itself, b) at other addresses.
    phantoms = {f"phantom-{i:04}": f"127.0.0.1:{ports[i % len(ports)]}" for i in range(1000)}
    with FakePeer(a) as fake:
        fake.book({ia: "127.0.0.1:1", ib: "127.0.0.1:1", **phantoms})
        keep = peer_net.MAX_CANDIDATES - 3  # b's, c's and good-1's addresses came first
        wait_until("a to keep what fits", lambda: status(a)["candidates"] == keep + 1)
        books = [status(a)["peer_bytes_sent"]["addresses"]]
        for _ in range(2):
            books.append(wait_until("a to send its next address book", lambda: (
                lambda x: x if x > books[-1] else None)(status(a)["peer_bytes_sent"]["addresses"])))
        assert fake.closed is None
    # No phantom travels on: a's books to b and c name only peers heard from (a few dozen
    # bytes each; a book naming the phantoms would be kilobytes).
    assert books[2] - books[1] < 400, books

    def check(d):
        s = status(d)
        assert s["candidates"] == keep + 1 and set(s["members"]) == {ia, ib, ic}, s
        peers = db_peers(d)
        assert len(peers) == peer_net.MAX_CANDIDATES + 1  # and a itself
        assert sorted(p for p in peers if p.startswith("phantom-")) == sorted(phantoms)[:keep]
        assert candidate_rows(d) == sorted(["good-1", *sorted(phantoms)[:keep]])
        assert peers[ib] == before[ib] and peers[ic] == before[ic]  # not moved by the book
        out = d.cli("peers")
        assert out.returncode == 0 and "phantom" not in out.stdout, out
        assert d.call({"op": "allocate", "handle": f"a-{d.starts}"})["ok"]
        clean_log(d)

    check(a)
    assert status(b)["candidates"] == status(c)["candidates"] == 0
    assert not any(p.startswith("phantom-") for d in (b, c) for p in db_peers(d))

    restart(a)
    check(a)
    wait_until("a to reach b and c again", lambda: set(status(a)["reachable"]) == {ib, ic})

    # A phantom is nobody to remove; a dead real peer is removed as if there were none.
    r = a.call({"op": "rmpeer", "peers": ["phantom-0000"]})
    assert r == {"ok": False, "error": {"code": "not_found", "message":
                                        f"no peer phantom-0000 is known to {ia}"}}, r
    with sqlite3.connect(f"file:{a.db}?mode=ro", uri=True) as conn:
        owned = [ipaddress.summarize_address_range(ipaddress.ip_address(lo),
                                                   ipaddress.ip_address(hi))
                 for lo, hi in conn.execute("SELECT start, last FROM ring WHERE owner = ?",
                                            (ic,))]
    assert owned
    c.kill()
    wait_until("a to see c gone", lambda: ic not in status(a)["reachable"])
    out = a.cli("rmpeer", ic, "--json")
    assert out.returncode == 0, out
    r = json.loads(out.stdout)
    assert r == {"ok": True, "removed": [ic], "by": ia, "reclaimed": r["reclaimed"]}, r
    assert list(ipaddress.collapse_addresses(ipaddress.ip_network(x) for x in r["reclaimed"])) \
        == list(ipaddress.collapse_addresses(n for nets in owned for n in nets)), r
    assert set(status(a)["members"]) == {ia, ib} and status(a)["candidates"] == keep + 1
    assert a.call({"op": "allocate", "handle": "a-last"})["ok"]
    clean_log(a)
    for s in refusers:
        s.close()


def test_candidates_expire_in_a_real_daemon_and_across_a_restart(tmp_path):
    a = launch(tmp_path, "a", "--candidate-ttl", "2")
    refusers = closed_ports(2)
    addrs = [f"127.0.0.1:{s.getsockname()[1]}" for s in refusers]
    t0 = time.time()
    with FakePeer(a) as fake:
        fake.book({f"phantom-{i}": addrs[i % 2] for i in range(5)})
        wait_until("the phantoms to expire", lambda: status(a)["candidates_expired"] == 5, 30)
        gone = time.time()
        assert fake.closed is None
    assert gone - t0 >= 2.0  # not before the TTL
    s = status(a)
    assert s["candidates"] == 0 and candidate_rows(a) == [] and set(s["members"]) == {s["peer"]}
    assert "event=candidates_expired count=5 first=phantom-0 ttl=2 " in clean_log(a)

    # The time learned is kept: phantoms learned under a long TTL, the daemon down for longer
    # than a short one, are gone at start, before anything dials them.
    a.flags[a.flags.index("--candidate-ttl") + 1] = "3600"
    restart(a)
    with FakePeer(a) as fake:
        fake.book({f"phantom-{i}": addrs[i % 2] for i in range(5, 8)})
        wait_until("a to learn them", lambda: status(a)["candidates"] == 3)
    assert candidate_rows(a) == ["phantom-5", "phantom-6", "phantom-7"]
    with sqlite3.connect(f"file:{a.db}?mode=ro", uri=True) as conn:
        learned = max(t for (t,) in conn.execute(
            "SELECT last_seen FROM peers WHERE state = 'candidate'"))
    assert t0 <= learned <= time.time()
    assert a.stop() == 0
    wait_until("the clock to pass the short TTL", lambda: time.time() > learned + 2, 10)
    a.flags[a.flags.index("--candidate-ttl") + 1] = "2"
    a.start()
    s = status(a)  # the first answer after the ready line
    assert s["candidates"] == 0 and s["candidates_expired"] == 3, s
    assert candidate_rows(a) == []
    assert "event=candidates_expired count=3 first=phantom-5 ttl=2 " in clean_log(a)
    assert a.call({"op": "allocate", "handle": "x"})["ok"]
    for s in refusers:
        s.close()


def test_candidate_ttl_is_a_launch_option(tmp_path):
    from appliance.cli import build_parser
    p = build_parser()
    assert p.parse_args(["launch"]).candidate_ttl == 3600.0
    assert p.parse_args(["launch", "--candidate-ttl", "90"]).candidate_ttl == 90.0
    for bad in ("0", "0.5", "-1", "soon"):
        with pytest.raises(SystemExit):
            p.parse_args(["launch", "--candidate-ttl", bad])


def test_a_peer_sending_bad_nicknames_changes_nothing_else(tmp_path):
    """Nicknames (--name) reach every host; a holder of the secret who sends bad ones, or
    lies about another peer's, loses those entries only and the daemon's word stays."""
    (a, b), (ia, ib) = joined(tmp_path, ["a", "b"])
    names = {ia: "a", ib: "b"}
    for d in (a, b):
        wait_until("every nickname known", lambda d=d: status(d)["nicknames"] == names)
    refuser = closed_ports(1)
    addr = f"127.0.0.1:{refuser[0].getsockname()[1]}"
    with FakePeer(a) as fake:
        fake.book({ib: [b.addr, "liar"], "fake-peer": ["", "bad\x1bname"],
                   "good-1": [addr, "x" * 65], "good-2": [addr, "host-good"],
                   "good-3": addr})
        wait_until("a to drop the bad entries",
                   lambda: "event=bad_address_book_entries count=2 " in a.stderr())
        wait_until("a to keep the good ones", lambda: status(a)["candidates"] == 2)
        assert fake.closed is None
    with sqlite3.connect(f"file:{a.db}?mode=ro", uri=True, timeout=10) as c:
        rows = dict(c.execute("SELECT id, nickname FROM peers"))
    assert rows == {ia: "a", ib: "b", "good-2": "host-good", "good-3": ""}, rows
    for d in (a, b):
        assert status(d)["nicknames"] == names
        assert d.call({"op": "allocate", "handle": f"{d.dir.name}-1"})["ok"]
        clean_log(d)
    refuser[0].close()
