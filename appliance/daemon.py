"""The trio shell around the core: one task owns the allocator; connections hand it requests.

Requests are applied to the allocator as they arrive; what they change is committed in one
transaction per batch, and only then are their replies sent (never reply before commit).
"""
from __future__ import annotations

import errno
import fcntl
import functools
import itertools
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import apsw
import trio

from .core.addr import Cidr, cidr, parse_hostport, uncovered
from .core import messages as m
from .core.messages import error
from .core.peer import Ready
from .sweeper import Sweeper
from . import cni_ops, limits
from .unixsock import serve_unix
from .protocols import cni
from .protocols.hook import (MAX_LINE, CniRequest, HookError, encode_cni_reply, encode_reply,
                             parse_request)
from .store import Store, StoreError

log = logging.getLogger("ipamd")
DEFAULT_RANGE = cidr("10.32.0.0/12")  # Weave Net's default, so its users feel at home


@dataclass
class Config:
    data_dir: Path
    socket: Path
    universes: list[Cidr] | None
    subnet: Cidr | None
    name: str
    durability: str = "process"
    reuse_delay: float = 30.0
    gateways: frozenset = field(default_factory=frozenset)
    sweep_interval: float = 30.0
    docker_socket: Path | None = None
    peers: list[str] = field(default_factory=list)   # HOST:PORT to dial
    listen: str | None = None                        # HOST:PORT for peers to dial us
    secret: bytes | None = None                      # the cluster secret
    metrics: str | None = None                       # HOST:PORT for Prometheus
    init_peers: list[str] = field(default_factory=list)  # seeds: HOST:PORT of each
    quorum: int | None = None                        # the first hosts vote on the split
    candidate_ttl: float = 3600.0  # seconds a peer address learned, never heard from, is kept


class CommitFailed(Exception):
    """The batch holding this request's changes was not committed; nothing changed."""


class CoreBug(Exception):
    """The core raised where it should not: a bug. Memory is rebuilt from the database."""


class Refused(Exception):
    """Start-up cannot go on; the message says why."""


class _Batch:
    """Rows applied in memory that will be committed together, and what waits for them: the
    messages and replies of every Ready whose rows are in it, or that came after them."""
    __slots__ = ("rows", "after", "done", "failed")

    def __init__(self):
        self.rows: list = []
        self.after: list[Ready] = []
        self.done = trio.Event()
        self.failed: Exception | None = None  # a core bug while open: commit none of it


class _Waiter:
    __slots__ = ("event", "reply")

    def __init__(self):
        self.event = trio.Event()
        self.reply = None


class CoreLoop:
    """Owns the peer (core/peer.py); group-commits what requests, peers and ticks change.

    Every event (a hook request, a peer's message, a tick) is applied to the peer at once
    (trio runs one task at a time, so the core has one user at a time) and gives a Ready:
    rows, then messages and replies. The first Ready of a batch with rows leads it: it yields
    once, so every task that is ready now can apply its event and join, then commits the batch
    in one transaction, and only then sends the batch's messages and replies (DESIGN rules 1
    and 2: nothing leaves before its commit). A Ready with no rows still waits for a batch
    under way: what it says may rest on rows not yet durable. The commit runs on the event
    loop: measured here, trio's thread hand-off costs several times the 35 us a WAL commit
    takes.
    """

    def __init__(self, store: Store, loaded, config: Config, clock=time.time):
        self.store, self.loaded, self.config, self.clock = store, loaded, config, clock
        self.peer = self._load()
        self._open = _Batch()
        self._waiters: dict[int, _Waiter] = {}
        self._refs = itertools.count()
        self.send = lambda dst, msg: None  # the peer transport replaces this
        self.metrics = None
        self.net = None  # the peer transport, when there is one
        self.conflicts = 0  # ring data refused as conflicting, since start
        self.reachable: set[str] = set()
        self.ever_reached: set[str] = set()
        self.dialling = False

    @property
    def allocator(self):
        return self.peer.allocator

    def _subnet(self):
        return self.config.subnet or self.loaded.universes[0]

    def _load(self):
        c = self.config
        return self.store.load_peer(self.loaded, self._subnet(), c.reuse_delay, c.gateways)

    async def identified(self, address: str, peer: str) -> None:
        """The transport learned who answers at address. A seed that knows the seeds by
        address only makes the split once it has every id (the core decides, and its rows
        carry the ids: one commit)."""
        try:
            ready = self._core(lambda: self.peer.identified(address, peer, self.clock()))
        except CoreBug:
            return
        split = [r.ids for r in ready.rows if isinstance(r, m.SeedIds)]
        await self._process(ready)
        if split:
            log.warning("event=seeds_split seeds=%s", ",".join(split[0]))

    async def submit(self, request) -> dict:
        """Apply a hook request; return its reply once what it changed is durable. An
        allocation that needs space from a peer waits for the grant (or the timeout)."""
        asked = []

        def event(ref):
            ready = self.peer.request(ref, request, self.clock())
            if all(r != ref for r, _ in ready.replies):
                asked.append(time.monotonic())  # it waits for a peer: a donation
            return ready

        reply = await self._reply_to(event)
        if asked and self.metrics is not None:
            self.metrics.donation.observe(time.monotonic() - asked[0])
        return reply

    async def _reply_to(self, event) -> dict:
        """Process event(ref), a Ready; wait for the reply to ref, sent after its commit."""
        ref = next(self._refs)
        w = self._waiters[ref] = _Waiter()
        try:
            await self._process(self._core(lambda: event(ref)))
            await w.event.wait()
        finally:
            self._waiters.pop(ref, None)
        if isinstance(w.reply, (CommitFailed, CoreBug)):
            raise w.reply
        return w.reply

    async def receive(self, sender: str, msg) -> None:
        try:
            ready = self._core(lambda: self.peer.receive(sender, msg, self.clock()))
        except CoreBug:
            return
        await self._process(ready)

    async def tick(self) -> None:
        try:
            ready = self._core(lambda: self.peer.tick(self.clock()))
        except CoreBug:
            return
        await self._process(ready)

    def _core(self, call) -> Ready:
        """Run one core call. An exception from it is a bug that may have left memory ahead of
        the database: nothing of the open batch is committed, and memory is rebuilt from the
        database (at once, or by the batch's leader), as after a failed commit."""
        try:
            return call()
        except Exception as e:
            log.exception("event=core_bug")
            bug = CoreBug(f"internal error ({type(e).__name__}: {e}); nothing was changed")
            if self._open.rows:
                self._open.failed = self._open.failed or bug
            else:
                self._rebuild(bug)
            raise bug from e

    def _rebuild(self, failed: Exception) -> None:
        """Memory from the database; requests waiting for peers' space fail (the peer
        that was waiting for it is gone)."""
        self._reload()
        for w in list(self._waiters.values()):
            if not w.event.is_set():
                w.reply = failed
                w.event.set()

    async def join_cluster(self, cluster: str) -> None:
        """A joiner's first peer told it the cluster's identity: durable before it is used."""
        self.store.set_cluster(cluster)
        self.loaded.cluster_id = cluster
        self.peer.cluster = self.peer.base_cluster = cluster
        log.warning("event=joined cluster=%s", cluster)

    def set_reachable(self, peers: set[str], dialling: bool | None = None) -> None:
        """From the transport: the peers reachable now, and whether it still dials peer
        addresses it has never reached (a request lacking space waits for those)."""
        self.reachable = set(peers)
        self.ever_reached |= self.reachable
        if dialling is not None:
            self.dialling = dialling
        self._tell_peer()

    def _tell_peer(self) -> None:
        """What the shell knows of the network, into the peer (a new one after a reload)."""
        self.peer.reachable = set(self.reachable)
        self.peer.ever_reached = set(self.ever_reached)
        self.peer.dialling = self.dialling

    def _reload(self) -> None:
        """The peer anew from the database, keeping what only the shell knows, and the
        request counter: a late answer to a request of the old peer must not match a new one."""
        old = self.peer
        self.peer = self._load()
        self.peer.next_req = old.next_req
        self._tell_peer()

    async def _process(self, ready: Ready) -> None:
        batch = self._open
        if ready.rows:
            leader = not batch.rows
            batch.rows.extend(ready.rows)
            batch.after.append(ready)
            if leader:
                await self._lead(batch)
        elif batch.rows:
            batch.after.append(ready)
        else:
            self._deliver(ready)

    async def _lead(self, batch: _Batch) -> None:
        # Shielded: a leader cancelled here (shutdown) must still commit or fail its followers.
        await trio.lowlevel.cancel_shielded_checkpoint()
        self._open = _Batch()
        failed = batch.failed
        if failed is None:
            try:
                self.store.commit(batch.rows)
            except apsw.Error as e:
                log.error("event=commit_failed error=%r rows=%d", str(e), len(batch.rows))
                failed = CommitFailed(f"the database refused the write ({e}); nothing was "
                                      "changed")
        if failed is not None:
            # Memory ran ahead of a transaction that did not happen: fail the batch, send none
            # of its messages, and rebuild memory from the database. Nothing was applied since
            # (no await above).
            for ready in batch.after:
                for ref, _ in ready.replies:
                    self._reply(ref, failed)
            self._rebuild(failed)
        else:
            for ready in batch.after:
                self._deliver(ready)
        batch.done.set()

    def _deliver(self, ready: Ready) -> None:
        for alarm in ready.alarms:
            log.warning("event=alarm message=%r", alarm)
            if "conflict" in alarm:
                self.conflicts += 1
                if self.metrics is not None:
                    self.metrics.conflicts.inc()
        for dst, msg in ready.messages:
            self.send(dst, msg)
        for ref, reply in ready.replies:
            self._reply(ref, reply)

    def _reply(self, ref, reply) -> None:
        w = self._waiters.get(ref)
        if w is not None and not w.event.is_set():
            w.reply = reply
            w.event.set()


def _lock(data_dir: Path) -> int:
    fd = os.open(data_dir / "ipamd.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise Refused(f"another ipamd is already running on {data_dir}") from None
        raise
    return fd


async def _serve_connection(stream: trio.SocketStream, core: CoreLoop) -> None:
    buf = bytearray()
    async with stream:
        while True:
            nl = buf.find(b"\n")
            if nl < 0 or nl > MAX_LINE:
                if len(buf) > MAX_LINE:
                    # The rest of the line cannot be told apart from the next request: say why
                    # and hang up rather than guess.
                    err = HookError("too_large", f"request line exceeds {MAX_LINE} bytes")
                    await stream.send_all(encode_reply(err.reply()))
                    return
                data = None
                with trio.move_on_after(HOOK_IDLE):
                    try:
                        data = await stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        return
                if not data:  # closed, or idle too long: a slot for someone else
                    return
                buf += data
                continue
            line = bytes(buf[:nl])
            del buf[:nl + 1]
            if not line.strip():
                continue
            try:
                request = parse_request(line)
            except HookError as e:
                log.info("event=bad_request code=%s message=%r", e.code, e.message)
                out = encode_reply(e.reply())
            else:
                out = await _answer(core, request)
            try:
                await stream.send_all(out)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return


async def _answer(core: CoreLoop, request) -> bytes:
    try:
        if isinstance(request, CniRequest):
            return await _answer_cni(core, request)
        reply = await core.submit(request)
        if isinstance(request, m.Status) and reply["ok"]:
            reply["swept"] = core.sweeper.swept
            reply["conflicts"] = core.conflicts
            if core.net is not None:
                reply["peer_bytes_sent"] = core.net.traffic()
                reply["candidates"] = len(core.net.candidates())
                reply["candidates_expired"] = core.net.expired
        return encode_reply(reply)
    except (CommitFailed, CoreBug) as e:
        if isinstance(request, CniRequest):
            return encode_cni_reply(cni.error_result(cni.CniError(cni.IO_FAILURE, str(e))), 1)
        return encode_reply(error("internal", str(e)))


async def _answer_cni(core: CoreLoop, request: CniRequest) -> bytes:
    try:
        call = cni.parse_call(request.env, request.stdin)
        req = cni_ops.request_for(call)
    except cni.CniError as e:
        log.info("event=cni_refused code=%d msg=%r", e.code, e.msg)
        return encode_cni_reply(cni.error_result(e), 1)
    reply = await core.submit(req) if req is not None else None
    output, code = cni_ops.result(call, reply)
    log.info("event=cni command=%s handle=%r exit=%d", call.command, call.handle, code)
    return encode_cni_reply(output, code)


HOOK_IDLE = 300.0  # seconds a hook connection may sit idle before it is closed


async def serve_hooks(path: Path, core: CoreLoop, task_status=trio.TASK_STATUS_IGNORED,
                      cap: int = 512) -> None:
    await serve_unix(path, lambda stream: _serve_connection(stream, core), "hook", cap, 256,
                     task_status=task_status)


async def run(config: Config, ready=print) -> None:
    # Work handed to threads (a metrics scrape's formatting, the sweeper's checks) holds the
    # GIL for up to the switch interval at a time while the event loop waits: 5 ms by
    # default, more than a hook request takes. 0.5 ms keeps requests moving beside them.
    sys.setswitchinterval(SWITCH_INTERVAL)
    caps = limits.caps(limits.raise_nofile())
    # trio's accept loop logs a traceback every 100 ms while descriptors run out: one line
    # per interval says as much.
    logging.getLogger("trio.serve_listeners").addFilter(limits.RateLimitFilter())
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock_fd = _lock(config.data_dir)
    store = Store(config.data_dir / "ipamd.db", config.durability)
    try:
        if config.universes is None and not store.path.exists():
            config.universes = [DEFAULT_RANGE]
        if config.universes is not None:
            _check_subnet(config.subnet, config.universes)  # before anything is written
        if config.quorum:
            mode, meta = "quorum", {"quorum": str(config.quorum)}
        elif config.init_peers:
            mode, meta = "seeds", {"seed_addresses": ",".join(sorted(set(config.init_peers)))}
        else:
            mode, meta = ("join" if config.peers else "single"), {}
        # The default subnet outside the ranges is claim-only space in the ring: static
        # addresses there get one owner cluster-wide.
        static = uncovered(config.subnet, config.universes) \
            if config.subnet is not None and config.universes is not None else None
        loaded = store.open(config.universes, config.name, mode=mode, bootstrap_meta=meta,
                            static=static)
        if loaded.note:
            log.warning("event=no_static_space reason=%r", loaded.note)
        _check_subnet(config.subnet, loaded.universes)
        core = CoreLoop(store, loaded, config)
        core.sweeper = Sweeper(core, config.sweep_interval)
        async with trio.open_nursery() as nursery:
            await nursery.start(core.sweeper.run)
            nursery.start_soon(_ticker, core)
            listening = ""
            known = store.peer_addresses()
            known.pop(loaded.peer_id, None)
            if known and len(config.secret or b"") < 16:
                log.warning("event=alone reason=%r", "the database knows peers, but there is no "
                            "cluster secret (--secret-file or IPAMD_SECRET) to reach them with")
            elif config.peers or config.listen or config.init_peers or known:
                from .peer_net import PeerNet
                host, port = parse_hostport(config.listen) if config.listen else (None, None)
                net = core.net = PeerNet(
                    core, config.secret, port, known=known, save=store.save_peer_address,
                    cap=caps["peer"], candidates=store.candidates(time.time()),
                    candidate_ttl=config.candidate_ttl, heard_from=store.peer_heard,
                    forget=store.forget_candidates)
                seeds = (loaded.meta or {}).get("seed_addresses", "")
                dial = config.peers + [a for a in seeds.split(",") if a]
                bound = await nursery.start(net.run, host, sorted(set(dial)))
                listening = f" listen={host or '*'}:{bound}" if bound is not None else ""
            if config.metrics:
                from .metrics import Metrics, serve_metrics
                host, port = parse_hostport(config.metrics)
                core.metrics = Metrics(core)
                bound = await nursery.start(functools.partial(
                    serve_metrics, host, port, core.metrics, cap=caps["metrics"]))
                listening += f" metrics={host or '*'}:{bound}"
            await nursery.start(functools.partial(serve_hooks, config.socket, core,
                                                  cap=caps["hook"]))
            if config.docker_socket is not None:
                from .docker_server import serve_docker
                await nursery.start(functools.partial(serve_docker, config.docker_socket, core,
                                                      cap=caps["docker"]))
            nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
            ranges = [u for u in loaded.universes if u not in loaded.static]
            static_text = f" static={','.join(map(str, loaded.static))}" if loaded.static else ""
            ready(f"ready peer={loaded.peer_id} name={config.name} socket={config.socket} "
                  f"db={store.path} ranges={','.join(map(str, ranges))}{static_text} "
                  f"allocations={len(core.allocator.by_addr)} durability={config.durability}"
                  f"{listening}")
    except StoreError as e:
        raise Refused(str(e)) from None
    finally:
        store.close()
        os.close(lock_fd)


def _check_subnet(subnet: Cidr | None, universes: list[Cidr]) -> None:
    if subnet is not None and not any(subnet.overlaps(u) for u in universes):
        raise Refused(f"--subnet {subnet} overlaps no allocation range "
                      f"({', '.join(map(str, universes))})")


SWITCH_INTERVAL = 0.0005
TICK = 0.1  # seconds between core ticks: gossip rounds, request timeouts, free hints


async def _ticker(core: CoreLoop) -> None:
    while True:
        await trio.sleep(TICK)
        await core.tick()


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.warning("event=stopping signal=%s", signal.Signals(signum).name)
            scope.cancel()
            return
