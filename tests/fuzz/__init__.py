"""Hostile-input soak (`make fuzz MINUTES=n`, `python -m tests.fuzz --minutes N [--seed S]`).

Two real daemons joined as peers on 127.0.0.1 (a /24 from 198.18.0.0/15 and an IPv6 /64, a
cluster secret, a Docker plugin socket each) are fed, in a random mix drawn from one seed:

- hook socket: random bytes; valid requests mutated (bit flips, truncation, duplication, huge
  numbers, deep nesting, wrong types, unknown ops, several lines, an over-long line); and,
  interleaved, valid allocate / claim / release / lookup traffic whose results are recorded;
- Docker plugin socket: garbage HTTP (random, mutated, huge headers and bodies, chunked, bad
  lengths, pipelined); IpamDriver calls with valid and mutated JSON bodies;
- peer port without the secret: random bytes, mutated and replayed hellos, wrong proofs,
  frames before a handshake, oversized lengths; each such connection must be closed by the
  daemon within a few seconds;
- peer port with the secret (the real handshake, then authenticated frames): core messages
  of every kind, well formed or mutated, address books good and bad, absurd numbers, and
  broken frames (bad tag, tagged with a replayed or skipped counter, wrong version, unknown
  kind, short, oversized). A frame the codec refuses must end the connection; one it accepts must not.
  See tests/fuzz/peer.py for the lies this insider never tells.

Checked during the run (every CHECK_EVERY seconds) and at the end: both daemons running,
answering `status` and still members in good standing; the Docker socket answering; every
allocation the fuzzer made and did not release still held exactly
(handle -> address, on the daemon that made it); no "Traceback" in either daemon's log. At
the end, also: both stop cleanly; read from their databases, no address is held twice across
the two, and `PRAGMA integrity_check` is ok; both restart on their databases and still hold
the same allocations. Inputs the local parsers (hook.parse_request, peer_codec.decode,
parse_hostport) fail on with an unexpected exception are findings too, with the input.

A seed replays the same stream of choices; what the daemons answer (and their timing) can
still steer it, so a finding is written down with its exact input.
"""
from __future__ import annotations

import collections
import hashlib
import json
import random
import re
import shutil
import socket
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from appliance.protocols import peer_liveness
from appliance.protocols.peer_frames import mac
from ..daemon_proc import Daemon, wait_until

from . import docker as dk
from . import garble
from . import hook as hk
from . import peer as pr

CHECK_EVERY = 2.0
HOOK_TIMEOUT = 20.0      # a reply later than this is a hang (peer waits are 2 s at most)
DOCKER_TIMEOUT = 20.0
CLOSE_WITHIN = 5.0       # a refused handshake must be closed by then (the daemon's bound: 2 s,
                         # ACCEPTED_HANDSHAKE_TIMEOUT)
AUTH_CLOSE_WITHIN = 3.0  # a refused frame at once: before the daemon's 4 s for a silent peer
WATCH_MOST = 40          # refused peer connections watched at once
MAX_KEPT = 60
# How often each kind of input is chosen.
MIX = {"hook_valid": 20, "hook_junk": 25, "docker": 20, "peer_noauth": 12, "peer_auth": 23}


LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ level=")


class FuzzFailure(AssertionError):
    pass


@dataclass
class Report:
    seed: int
    seconds: float
    workdir: Path
    counts: collections.Counter = field(default_factory=collections.Counter)
    findings: list[dict] = field(default_factory=list)
    kept: int = 0

    def summary(self) -> str:
        lines = [f"fuzz: seed={self.seed} ran {self.seconds:.0f}s, inputs:"]
        groups = collections.defaultdict(list)
        for k, v in sorted(self.counts.items()):
            groups[k.split(".")[0]].append(f"{k.split('.', 1)[-1]}={v}")
        for g, items in sorted(groups.items()):
            lines.append(f"  {g}: " + " ".join(items))
        lines.append(f"  allocations held by the fuzzer at the end: {self.kept}")
        if self.findings:
            lines.append(f"FINDINGS ({len(self.findings)}), inputs under {self.workdir}:")
            for f in self.findings:
                lines.append(f"  [{f['target']}] {f['what']}" +
                             (f" ({f['times']} times)" if f["times"] > 1 else "") +
                             (f"\n      input: {f['file']}" if f.get("file") else ""))
        else:
            lines.append("no findings")
        return "\n".join(lines)


class Node:
    """One daemon and the fuzzer's clients of it."""

    def __init__(self, name: str, daemon: Daemon, docker_sock: Path):
        self.name, self.d, self.docker_sock = name, daemon, docker_sock
        self.port = 0
        self.id = ""
        self.hook: hk.LineClient | None = None
        self.session: pr.Session | None = None
        self.log_offset = 0

    def client(self) -> hk.LineClient:
        if self.hook is None:
            self.hook = hk.LineClient(self.d.socket, HOOK_TIMEOUT)
        return self.hook

    def drop_client(self) -> None:
        if self.hook is not None:
            self.hook.close()
            self.hook = None

    def log_path(self) -> Path:
        return self.d.dir / f"daemon-{self.d.starts}.log"


class Soak:
    def __init__(self, seed: int, seconds: float, workdir: Path, out=print):
        self.seed, self.seconds, self.dir, self.out = seed, seconds, Path(workdir), out
        self.report = Report(seed, seconds, self.dir)
        self.rng = {k: random.Random(f"{seed}/{k}") for k in
                    ("mix", "hook", "valid", "docker", "noauth", "auth")}
        r = random.Random(seed)
        self.v4 = f"198.{18 + r.randrange(2)}.{r.randrange(256)}.0/24"
        self.v6 = f"2001:db8:{r.randrange(1, 65536):x}::/64"
        self.secret = f"fuzz-{seed}-cluster-secret".encode()
        self.kept: dict[str, tuple[str, str]] = {}   # handle -> (node name, address)
        self.uncertain: set[str] = set()              # outcome unknown (a hang): not judged
        # refused peer connections: (socket, sent at, close within, what, input)
        self.watching: list[tuple[socket.socket, float, float, str, bytes]] = []
        self.next_keep = 0
        self.auth_failures = 0
        self.nodes: list[Node] = []

    # -- set-up ------------------------------------------------------------------------------------

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "secret").write_bytes(self.secret)
        a = self._node("a", [])
        b = self._node("b", ["--peer", f"127.0.0.1:{a.port}"])
        self.nodes = [a, b]
        wait_until("b to join a and each to reach the other", self._joined, timeout=60)
        st = self.status(a)
        self.cluster = st["cluster"]
        self.universes = sorted(u["range"] for u in st["universes"])
        self.real_ids = {n.id for n in self.nodes}
        vocab = pr.Vocabulary(self.rng["auth"], self.real_ids, self.cluster, self.universes)
        self.messages = pr.Messages(vocab)
        self.fuzz_ids = [f"fz{self.rng['auth'].getrandbits(40):010x}" for _ in range(48)]
        self.requests = hk.Requests(self.rng["hook"], self.v4, self.v6, vocab.phantoms)
        self.drivers = {n.name: dk.Driver(self.rng["docker"], self.v4, self.v6)
                        for n in self.nodes}
        self.out(f"fuzz: seed={self.seed} v4={self.v4} v6={self.v6} dir={self.dir} "
                 f"a={a.id}@{a.port} b={b.id}@{b.port}")

    def _flags(self, node_dir: Path, listen: str, extra: list[str]) -> list[str]:
        return ["--iprange", self.v4, "--iprange", self.v6, "--name", node_dir.name,
                "--listen", listen, "--secret-file", str(self.dir / "secret"),
                "--reuse-delay", "2", "--sweep-interval", "1",
                "--docker-plugin", str(node_dir / "docker.sock"), *extra]

    def _node(self, name: str, extra: list[str]) -> Node:
        d = self.dir / name
        d.mkdir()
        node = Node(name, Daemon(d, *self._flags(d, "127.0.0.1:0", extra)), d / "docker.sock")
        node.d.start()
        node.port = int(re.search(r"listen=\S+:(\d+)", node.d.ready_line).group(1))
        node.id = re.search(r"peer=(\S+)", node.d.ready_line).group(1)
        return node

    def _joined(self) -> bool:
        a, b = self.nodes
        sa, sb = self.status(a), self.status(b)
        # The same ring too: an entry the fuzzer sends at a range's start at version 1 is
        # stale only where the founder's entry already is.
        return sa["cluster"] == sb["cluster"] and b.id in sa["reachable"] and \
            a.id in sb["reachable"] and sa["ring_digest"] == sb["ring_digest"]

    def status(self, node: Node) -> dict:
        with hk_client(node) as c:
            r = c.call({"op": "status"})
        if not r.get("ok"):
            raise FuzzFailure(f"{node.name}: status refused: {r}")
        return r

    # -- findings ----------------------------------------------------------------------------------

    def finding(self, target: str, what: str, data: bytes | str | None = None,
                key: str | None = None) -> None:
        """Record a finding, with the input that caused it written to a file. The same finding
        again (same key: by default its text without numbers) is only counted."""
        key = key or re.sub(r"\d+", "N", f"{target} {what}")[:200]
        for f in self.report.findings:
            if f["key"] == key:
                f["times"] += 1
                return
        entry = {"target": target, "what": what[:1500], "key": key, "times": 1}
        if data is not None:
            d = self.dir / "findings"
            d.mkdir(exist_ok=True)
            path = d / f"{len(self.report.findings):03d}-{target}.bin"
            path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8",
                                                                              "surrogatepass"))
            entry["file"] = str(path)
        self.report.findings.append(entry)
        self.out(f"fuzz: FINDING [{target}] {what[:1500]} (seed {self.seed})")

    # -- the run -----------------------------------------------------------------------------------

    def run(self) -> Report:
        began = time.monotonic()
        deadline = self.ends = began + self.seconds
        next_check = began + CHECK_EVERY
        targets, weights = zip(*MIX.items())
        mix = self.rng["mix"]
        while time.monotonic() < deadline:
            target = mix.choices(targets, weights)[0]
            node = mix.choice(self.nodes)
            getattr(self, target)(node)
            self.report.counts[f"steps.{target}"] += 1
            self._watch()
            if time.monotonic() >= next_check:
                if not self.check(final=False):
                    break
                next_check = time.monotonic() + CHECK_EVERY
        self.report.seconds = time.monotonic() - began
        return self.report

    # -- hook: valid traffic -----------------------------------------------------------------------

    def hook_valid(self, node: Node) -> None:
        rng = self.rng["valid"]
        mine = [h for h, (n, _) in self.kept.items() if n == node.name]
        r = rng.random()
        if len(self.kept) >= MAX_KEPT or (mine and r < 0.2):
            if mine:
                self._release(node, rng.choice(mine))
        elif mine and r < 0.35:
            self._lookup(node, rng.choice(mine))
        elif self.kept and r < 0.4:
            # A kept handle is held on its own daemon only.
            handle = rng.choice(list(self.kept))
            if self.kept[handle][0] != node.name:
                reply = self._valid_call(node, {"op": "lookup", "handle": handle})
                if reply is not None and reply.get("ok"):
                    self.finding("hook", f"{handle} of {self.kept[handle][0]} is also held on "
                                 f"{node.name}: {reply}")
        elif r < 0.5:
            base = self.v4.split("/")[0].rsplit(".", 1)[0]
            self._take(node, {"op": "claim", "address": f"{base}.{rng.randrange(1, 255)}"})
        elif r < 0.97:
            req = {"op": "allocate"}
            if rng.random() < 0.3:
                req["subnet"] = self.v6
            elif rng.random() < 0.3:
                req["subnet"] = self.v4
            self._take(node, req)
        else:
            self._cleanup(node)

    def _valid_call(self, node: Node, request: dict, handle: str | None = None) -> dict | None:
        self.report.counts[f"hook_valid.{request['op']}"] += 1
        try:
            reply = node.client().call(request)
        except TimeoutError:
            self.finding("hook", f"{node.name} did not answer {request} within {HOOK_TIMEOUT}s")
            node.drop_client()
            if handle:
                self.uncertain.add(handle)
            return None
        except (hk.HookClosed, OSError) as e:
            self.finding("hook", f"{node.name} closed a valid connection at {request}: {e}")
            node.drop_client()
            if handle:
                self.uncertain.add(handle)
            return None
        if not reply.get("ok"):
            code = reply.get("error", {}).get("code")
            self.report.counts[f"hook_valid.refused_{code}"] += 1
            if code in ("internal", "bad_request", "unknown_op", "bad_version"):
                self.finding("hook", f"{node.name} refused a valid request {request}: {reply}")
        return reply

    def _take(self, node: Node, request: dict) -> None:
        handle = f"{hk.KEEP}{self.next_keep}"
        self.next_keep += 1
        reply = self._valid_call(node, dict(request, handle=handle), handle)
        if reply is not None and reply.get("ok"):
            self.kept[handle] = (node.name, reply["address"])

    def _release(self, node: Node, handle: str) -> None:
        reply = self._valid_call(node, {"op": "release", "handle": handle}, handle)
        if reply is None:
            return
        address = self.kept.pop(handle)[1]
        if not reply.get("ok"):
            self.uncertain.add(handle)
        elif address not in reply.get("released", []):
            self.finding("hook", f"release of {handle} on {node.name} freed "
                         f"{reply.get('released')}, not the {address} it held")

    def _lookup(self, node: Node, handle: str) -> None:
        reply = self._valid_call(node, {"op": "lookup", "handle": handle})
        if reply is None or handle in self.uncertain:
            return
        got = [a["address"] for a in reply.get("addresses", [])] if reply.get("ok") else []
        if got != [self.kept[handle][1]]:
            self.finding("hook", f"{handle} on {node.name} holds {got}, the fuzzer recorded "
                         f"{self.kept[handle][1]}: {reply}")
            self.kept.pop(handle)

    def _cleanup(self, node: Node) -> None:
        """Give back what junk requests, CNI and Docker calls took, so the range lasts."""
        reply = self._valid_call(node, {"op": "list"})
        if not reply or not reply.get("ok"):
            return
        for h in sorted({a["handle"] for a in reply["allocations"]}):
            if not h.startswith(hk.KEEP):
                self._valid_call(node, {"op": "release", "handle": h})

    # -- hook: junk --------------------------------------------------------------------------------

    def hook_junk(self, node: Node) -> None:
        rng = self.rng["hook"]
        payload, kind = hk.junk_payload(rng, self.requests)
        self.report.counts[f"hook_junk.{kind}"] += 1
        lines = hk.lines_of(payload)
        for line in lines:
            if len(line) > hk.MAX_LINE:
                break
            verdict, what = hk.judge_locally(line, self.real_ids)
            if verdict == "bug":
                self.finding("hook", f"parse_request raised {type(what).__name__}: {what}", line,
                             key=f"parse {type(what).__name__}: {what}")
            elif verdict == "skip":
                self.report.counts[f"hook_junk.skipped_{what.split()[0]}"] += 1
                return
        probe = f"probe/{rng.getrandbits(32):08x}"
        oversize = any(len(x) > hk.MAX_LINE for x in lines)
        try:
            c = hk.LineClient(node.d.socket, HOOK_TIMEOUT)
        except OSError as e:
            self.finding("hook", f"{node.name}: cannot connect to the hook socket: {e}")
            return
        try:
            if rng.random() < 0.15 and not oversize:  # and hang up without waiting
                c.send(payload)
                self.report.counts["hook_junk.abandoned"] += 1
                return
            c.send(payload + b"\n" + json.dumps({"op": "lookup", "handle": probe}).encode() +
                   b"\n")
            for _ in range(len(lines) + 2):
                reply = c.reply()
                if not isinstance(reply, dict) or "ok" not in reply:
                    self.finding("hook", f"{node.name} answered junk with {reply!r}", payload)
                    return
                code = reply.get("error", {}).get("code") if not reply["ok"] else "ok"
                self.report.counts[f"hook_junk.reply_{code}"] += 1
                if code == "internal":
                    self.finding("hook", f"{node.name} answered junk with {reply}", payload)
                if probe in json.dumps(reply):
                    return
            self.finding("hook", f"{node.name}: the probe after junk got no answer", payload)
        except TimeoutError:
            self.finding("hook", f"{node.name} hung on junk ({kind})", payload)
        except hk.HookClosed:
            if not oversize:
                self.finding("hook", f"{node.name} closed the connection on junk ({kind}) "
                             "that was not over-long", payload)
        except ValueError as e:
            self.finding("hook", f"{node.name} sent a reply that is not JSON: {e}", payload)
        finally:
            c.close()

    # -- Docker ------------------------------------------------------------------------------------

    def docker(self, node: Node) -> None:
        rng = self.rng["docker"]
        drv = self.drivers[node.name]
        r = rng.random()
        if r < 0.35:
            path, body = drv.valid()
            data, kind, whole = dk.request_bytes(path, json.dumps(body).encode()), "valid", True
        elif r < 0.7:
            path, raw, kind = dk.mutated(rng, drv)
            data, whole, body = dk.request_bytes(path, raw), True, None
        else:
            data, kind, whole = dk.garbage(rng, drv)
            path, body = "", None
        self.report.counts[f"docker.{kind}"] += 1
        try:
            status, reply = dk.call(node.docker_sock, data, DOCKER_TIMEOUT, hang_up=not whole)
        except TimeoutError:
            self.finding("docker", f"{node.name} neither answered nor hung up on {kind} "
                         f"within {DOCKER_TIMEOUT}s", data)
            return
        except (ConnectionError, OSError) as e:
            if kind == "valid":
                self.finding("docker", f"{node.name} dropped a valid call {path}: {e}", data)
            return
        self.report.counts[f"docker.status_{status}"] += 1
        if kind == "valid":
            drv.learn(path, body, reply)
            if status != 200 or not isinstance(reply, dict):
                self.finding("docker", f"{node.name}: {path} {body} -> {status} {reply!r}", data)
        if isinstance(reply, dict) and "internal" in str(reply.get("Error", "")):
            self.finding("docker", f"{node.name}: {kind} call answered {reply}", data)

    # -- peer port, without the secret -------------------------------------------------------------

    def peer_noauth(self, node: Node) -> None:
        rng = self.rng["noauth"]
        r = rng.random()
        mine = rng.randbytes(16)
        other = next(n for n in self.nodes if n is not node)
        good = pr.hello(self.cluster, self.cluster, f"fz{rng.getrandbits(32):08x}",
                        self.universes, mine)
        first, then = b"", ""
        if r < 0.15:
            first, kind = garble.random_bytes(rng, 300), "random"
        elif r < 0.25:
            first, kind = pr.frame(garble.random_bytes(rng, 100)), "random_frame"
        elif r < 0.3:
            first = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x10\x01", b"\x01\x00\x00\x00xx"])
            kind = "oversize"
        elif r < 0.55:
            fields = msgpack.unpackb(good)
            for _ in range(rng.randint(1, 3)):
                fields = garble.mutate_mp(rng, fields)
            try:
                first = pr.frame(msgpack.packb(fields))
            except (ValueError, OverflowError, TypeError):
                first = pr.frame(good[:-3])
            kind = "mutated_hello"
        elif r < 0.65:
            first, kind = pr.frame(garble.mutate_bytes(rng, good)), "hello_bytes"
        else:
            # A hello that passes (as a stranger, the other daemon or the daemon itself), then
            # what no holder of the secret would send.
            me = rng.choice([f"fz{rng.getrandbits(32):08x}", other.id, node.id])
            ours = pr.hello(self.cluster, self.cluster, me, self.universes, mine)
            first = pr.frame(ours)
            then = rng.choice(["wrong_secret", "random_proof", "silence", "frames", "long"])
            kind = f"hello_then_{then}"
        self.report.counts[f"peer_noauth.{kind}"] += 1
        try:
            s = socket.create_connection(("127.0.0.1", node.port), timeout=5)
        except OSError as e:
            self.finding("peer", f"{node.name}: cannot connect to the peer port: {e}")
            return
        try:
            s.sendall(first)
            if then and then != "silence":
                heard = pr.read_frame(s, 5, 4096)
                theirs = msgpack.unpackb(heard)[6]
                if then == "wrong_secret":
                    both = hashlib.sha256(ours + heard).digest()
                    s.sendall(pr.frame(mac(b"not-the-cluster-secret!", b"proof", me.encode(),
                                            theirs, mine, both)))
                elif then == "random_proof":
                    s.sendall(pr.frame(rng.randbytes(rng.choice([0, 31, 32, 33, 64]))))
                elif then == "frames":
                    s.sendall(b"".join(pr.frame(rng.randbytes(rng.choice([32, 80, 200])))
                                       for _ in range(rng.randint(1, 5))))
                else:
                    s.sendall(b"\x00\x00\x00\x41")  # a proof of 65 bytes: over the bound
        except (pr.Closed, TimeoutError, OSError, ValueError, IndexError, TypeError):
            pass  # the daemon hung up already, or said something we cannot read: both fine
        if self._watchable(CLOSE_WITHIN) and rng.random() < 0.7:
            self.watching.append((s, time.monotonic(), CLOSE_WITHIN,
                                  f"{node.name}: unauthenticated {kind}", first))
        else:
            s.close()

    def _watchable(self, within: float) -> bool:
        """Room to watch one more refused connection, and time to see it closed before the
        run ends (so that every watched one is judged)."""
        return len(self.watching) < WATCH_MOST and time.monotonic() + within < self.ends

    def _watch(self) -> None:
        """Judge the refused connections: each must be closed by the daemon within its time
        (an authenticated one at once, well before the daemon would hang up on a silent peer;
        a handshake within its 2 s bound)."""
        now = time.monotonic()
        keep = []
        for w in self.watching:
            s, since, within, what, data = w
            if not pr.drain(s):
                s.close()
                self.report.counts["peer.closed_by_daemon"] += 1
            elif now - since > within:
                self.finding("peer", f"{what}: the connection is still open after "
                             f"{now - since:.1f}s", data, key=f"open {what[:80]}")
                s.close()
            else:
                keep.append(w)
        self.watching = keep

    # -- peer port, with the secret ----------------------------------------------------------------

    def peer_auth(self, node: Node) -> None:
        rng = self.rng["auth"]
        s = node.session
        if s is not None and not s.alive():
            gap = s.quiet_gap()
            node.session = None
            s.close()
            if gap < 3.0:
                self.finding("peer", f"{node.name} closed an authenticated connection after "
                             f"frames its codec accepts (last: {s.history[-1][1]})",
                             s.story(), key=f"unexpected close {node.name}")
            else:
                self.report.counts["peer_auth.closed_for_silence"] += 1
            return
        if s is None:
            # Mostly ids seen before (a peer reconnecting), now and then a new one: every id
            # that speaks stays a member of the daemons' clusters for good.
            me = rng.choice(self.fuzz_ids) if rng.random() < 0.8 else \
                f"fz{rng.getrandbits(40):010x}"
            try:
                s = node.session = pr.Session.open(("127.0.0.1", node.port), self.secret, me,
                                                   self.cluster, self.universes)
            except (pr.Closed, TimeoutError, OSError, ValueError, IndexError, TypeError) as e:
                self.auth_failures += 1
                self.report.counts["peer_auth.handshake_failed"] += 1
                if self.auth_failures >= 5:
                    self.finding("peer", f"{node.name}: 5 handshakes with the secret failed "
                                 f"in a row: {e}")
                    self.auth_failures = 0
                return
            self.auth_failures = 0
            self.report.counts["peer_auth.sessions"] += 1
        r = rng.random()
        verdict, why, data, kind = "ok", None, b"", ""
        if r < 0.7:
            payload = pr.core_payload(self.messages)
            verdict, why = pr.predict_core(payload)
            data, kind = s.sealed(pr.CORE, payload), f"core_{verdict}"
            if verdict == "ok":
                kind = f"core_ok_{type(why).__name__}"
        elif r < 0.82:
            payload = pr.address_book(rng, self.messages.v, [1, 1, self.nodes[0].port,
                                                             self.nodes[1].port])
            verdict, why = pr.predict_book(payload)
            data, kind = s.sealed(pr.ADDRESSES, payload), f"book_{verdict}"
        elif r < 0.87:
            # Protocol 4: a keepalive says its interval in 2 bytes (an empty one is taken too);
            # any other payload is the sender's bug and ends the connection.
            payload = rng.choice([b"", rng.randbytes(2), rng.randbytes(rng.randint(1, 40))])
            try:
                peer_liveness.decode(payload)
                kind = "keepalive"
            except ValueError as e:
                verdict, why, kind = "fatal", e, "keepalive_bad_payload"
            data = s.sealed(pr.KEEPALIVE_FRAME, payload)
        else:
            payload = msgpack.packb(["Gossip"])
            verdict = "fatal"
            broken = rng.choice(["mac", "replay", "skip", "version", "kind", "short", "huge",
                                 "zero"])
            kind = f"broken_{broken}"
            if broken == "mac":
                good = bytearray(s.sealed(pr.KEEPALIVE_FRAME, b""))
                i = rng.randrange(4, len(good))
                good[i] ^= 1 << rng.randrange(8)
                data = bytes(good)
            elif broken == "replay":  # the counter is not sent: tagged with the last one's
                data = s.sealed(pr.KEEPALIVE_FRAME, b"", counter=s.sent)
            elif broken == "skip":
                data = s.sealed(pr.KEEPALIVE_FRAME, b"", counter=(s.sent + rng.choice(
                    [2, 2**32, 2**64 - 1])) % 2**64)
            elif broken == "version":
                data = s.sealed(pr.KEEPALIVE_FRAME, b"", version=rng.choice(
                    [v for v in (0, 1, 2, 3, 4, 5, 6, 7, 255) if v != pr.PROTOCOL]))
            elif broken == "kind":
                data = s.sealed(rng.randint(3, 255), payload)
            elif broken == "short":
                shortest = pr.HEAD.size + pr.TAG_SIZE  # an authenticated frame's least
                data = pr.frame(rng.randbytes(rng.randint(0, shortest - 1)))
            elif broken == "huge":
                data = rng.choice([b"\xff\xff\xff\xff", b"\x01\x00\x00\x01"])
            else:
                data = pr.frame(b"")
        self.report.counts[f"peer_auth.{kind}"] += 1
        if verdict == "bug":
            self.finding("peer", f"local decode of a {kind} payload raised "
                         f"{type(why).__name__}: {why}", payload,
                         key=f"decode {type(why).__name__}: {why}")
        try:
            s.send_raw(data, kind, payload)
        except OSError:
            node.session = None
            s.close()
            self.report.counts["peer_auth.send_failed"] += 1
            return
        if verdict == "ok":
            if rng.random() < 0.05:  # an honest goodbye now and then
                node.session = None
                s.close()
            return
        # Refused: the daemon must hang up on us.
        node.session = None
        if self._watchable(AUTH_CLOSE_WITHIN):
            self.watching.append((s.sock, time.monotonic(), AUTH_CLOSE_WITHIN,
                                  f"{node.name}: authenticated {kind} ({str(why)[:200]})",
                                  data))
        else:
            s.close()

    # -- invariants --------------------------------------------------------------------------------

    def _scan_logs(self) -> None:
        """Every traceback in the daemons' logs is a finding, named by its last line."""
        for n in self.nodes:
            path = n.log_path()
            try:
                with open(path, "rb") as f:
                    f.seek(n.log_offset)
                    text = f.read()
            except OSError:
                continue
            # Judge whole records only: the daemon may be half way through writing one.
            end = text.rfind(b"\n") + 1
            n.log_offset += end
            lines = text[:end].decode(errors="replace").splitlines()
            for i, line in enumerate(lines):
                if "Traceback (most recent call last)" not in line:
                    continue
                if i > 0 and "Traceback" in lines[i - 1]:
                    continue
                block = [line]
                for nxt in lines[i + 1:]:
                    if LOG_RECORD.match(nxt):
                        break
                    block.append(nxt)
                last = [x.strip(" |+-") for x in block if x.strip(" |+-")]
                summary = last[-1] if last else line
                record = next((lines[j] for j in range(i - 1, -1, -1)
                               if LOG_RECORD.match(lines[j])), "")
                self.finding("daemon", f"{n.name}: traceback in its log: {summary} "
                             f"(logged as {record[24:120]!r})",
                             "\n".join(block), key=f"traceback {summary}")

    def check(self, final: bool) -> bool:
        """The invariants that can be checked while the daemons run; False if one exited."""
        self._scan_logs()
        for n in self.nodes:
            code = n.d.proc.poll()
            if code is not None:
                self.finding("daemon", f"{n.name} exited with code {code}: "
                             f"{n.d.stderr()[-1500:]}")
                return False
        for n in self.nodes:
            try:
                st = self.status(n)
                self.report.counts["checks.status"] += 1
            except (FuzzFailure, OSError, TimeoutError, hk.HookClosed) as e:
                self.finding("daemon", f"{n.name} does not answer status: {e}")
            else:
                # Nothing the fuzzer may say makes a daemon leave, stale, removed or waiting.
                if st.get("standing") != "member":
                    self.finding("daemon", f"{n.name} is {st.get('standing')}: {st.get('note')}")
            try:
                status, caps = dk.call(n.docker_sock, dk.request_bytes(
                    "/IpamDriver.GetCapabilities", b""), DOCKER_TIMEOUT)
                if status != 200 or "RequiresMACAddress" not in caps:
                    self.finding("docker", f"{n.name}: GetCapabilities -> {status} {caps!r}")
            except (OSError, TimeoutError, ConnectionError) as e:
                self.finding("docker", f"{n.name}: the Docker socket does not answer: {e}")
        rng = self.rng["valid"]
        judged = [h for h in self.kept if h not in self.uncertain]
        for handle in (judged if final else rng.sample(judged, min(3, len(judged)))):
            node = next(n for n in self.nodes if n.name == self.kept[handle][0])
            self._lookup(node, handle)
        return True

    def finish(self) -> None:
        """End of the run: invariants on the live daemons, on their databases, and after a
        restart on those databases."""
        while self.watching and time.monotonic() < self.ends + 1:
            self._watch()  # none was started later than CLOSE_WITHIN before the end
            time.sleep(0.05)
        self._watch()
        for w in self.watching:
            w[0].close()
        self.watching = []
        for n in self.nodes:
            if n.session is not None:
                n.session.close()
                n.session = None
        if self.check(final=True):
            self._judge_kept(self._listed(), "listed")
        self._stop_all("")
        self._judge_kept(self._databases(), "in the databases")
        # Restart on the databases (same ports, so b still finds a), then judge again.
        a, b = self.nodes
        for n in self.nodes:
            n.d.flags = self._flags(n.d.dir, f"127.0.0.1:{n.port}",
                                    ["--peer", f"127.0.0.1:{a.port}"] if n is b else [])
            n.log_offset = 0
            try:
                n.d.start()
            except RuntimeError as e:
                self.finding("daemon", f"{n.name} does not restart on its database: {e}")
                return
        if self.check(final=False):
            self._judge_kept(self._listed(), "listed after a restart")
        self._stop_all(" after the restart")
        self._judge_kept(self._databases(), "in the databases after the restart")
        self.report.kept = len(self.kept)

    def _stop_all(self, when: str) -> None:
        for n in self.nodes:
            n.drop_client()
            code = n.d.stop()
            if code != 0:
                self.finding("daemon", f"{n.name} exited with code {code} on SIGTERM{when}")
        self._scan_logs()

    def _listed(self) -> dict[str, tuple[str, str]]:
        """address -> (node, handle), from `list` on both daemons (for the kept handles: the
        databases, read once both have stopped, judge addresses held twice)."""
        out: dict[str, tuple[str, str]] = {}
        for n in self.nodes:
            with hk_client(n) as c:
                reply = c.call({"op": "list"})
            for a in reply.get("allocations", []):
                if a["handle"].startswith(hk.KEEP):
                    out[a["address"].split("/")[0]] = (n.name, a["handle"])
        return out

    def _databases(self) -> dict[str, tuple[str, str]]:
        """address -> (node, handle) from both databases, read-only; integrity_check on each,
        and an address held by both is a finding."""
        out: dict[str, tuple[str, str]] = {}
        for n in self.nodes:
            db = sqlite3.connect(f"file:{n.d.db}?mode=ro", uri=True)
            try:
                result = [r[0] for r in db.execute("PRAGMA integrity_check")]
                if result != ["ok"]:
                    self.finding("daemon", f"{n.name}: integrity_check says {result[:5]}")
                rows = db.execute("SELECT address, handle FROM allocations").fetchall()
            finally:
                db.close()
            self.report.counts[f"end.{n.name}_held"] = len(rows)
            for address, handle in rows:
                if address in out:
                    self.finding("daemon", f"{address} is held twice across the databases: "
                                 f"by {out[address]} and by {(n.name, handle)}")
                out[address] = (n.name, handle)
        return out

    def _judge_kept(self, held: dict[str, tuple[str, str]], where: str) -> None:
        by_handle: dict[str, list] = collections.defaultdict(list)
        for address, (node, handle) in held.items():
            if handle.startswith(hk.KEEP):
                by_handle[handle].append((node, address))
        for handle, (node, address) in self.kept.items():
            if handle in self.uncertain:
                continue
            got = by_handle.pop(handle, [])
            if got != [(node, address.split("/")[0])]:
                self.finding("daemon", f"{handle} should be held by {node} as {address}; "
                             f"{where}: {got}")
        for handle, got in by_handle.items():
            if handle not in self.uncertain:
                self.finding("daemon", f"{handle} was released (or never taken), yet {where} "
                             f"it is held: {got}")

    def close(self) -> None:
        for n in self.nodes:
            n.drop_client()
            if n.session is not None:
                n.session.close()
            if n.d.proc is not None and n.d.proc.poll() is None:
                n.d.kill()
        for w in self.watching:
            w[0].close()


class hk_client:
    """A short-lived hook connection (status, list) apart from the fuzzer's own."""

    def __init__(self, node: Node):
        self.c = hk.LineClient(node.d.socket, HOOK_TIMEOUT)

    def __enter__(self) -> hk.LineClient:
        return self.c

    def __exit__(self, *exc) -> None:
        self.c.close()


def soak(seconds: float, seed: int | None = None, workdir: Path | None = None,
         keep: bool = False, out=print) -> Report:
    """Run the soak; return its report (report.findings empty when all held). The work
    directory (daemon logs, databases, inputs of findings) is removed unless there are
    findings or keep is set."""
    seed = random.randrange(2**32) if seed is None else seed
    out(f"fuzz: seed={seed} (replay: python -m tests.fuzz --seed {seed} "
        f"--seconds {seconds:g})")
    workdir = Path(workdir or tempfile.mkdtemp(prefix=f"ipamd-fuzz-{seed}-"))
    s = Soak(seed, seconds, workdir, out)
    try:
        s.start()
        s.run()
        s.finish()
    except Exception as e:
        s.finding("fuzzer", f"the run stopped: {type(e).__name__}: {e}")
        raise
    finally:
        s.close()
        if s.report.findings or keep:
            out(f"fuzz: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return s.report
