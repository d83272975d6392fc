"""The trio shell around the core: one task owns the allocator; connections hand it requests.

Requests are applied to the allocator as they arrive; what they change is committed in one
transaction per batch, and only then are their replies sent (never reply before commit).
"""
from __future__ import annotations

import errno
import fcntl
import functools
import gc
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
from .core.peer import Ready
from .sweeper import Sweeper
from . import host_routes, limits
from .store import CHECKPOINT_PAGES, Store, StoreError

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
    allow_route_overlap: bool = False  # a new range may overlap this host's routes


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
    """A request's reply to come: set on `event` (submit), or handed to `then` (submit_then)."""
    __slots__ = ("ref", "event", "reply", "then", "asked", "done")

    def __init__(self, then=None):
        self.ref = None
        self.event = trio.Event() if then is None else None
        self.then = then
        self.reply = None
        self.asked: float | None = None  # when it went to wait for a peer's space
        self.done = False


class CoreLoop:
    """Owns the peer (core/peer.py); group-commits what requests, peers and ticks change.

    Every event (a hook request, a peer's message, a tick) is applied to the peer at once
    (trio runs one task at a time, so the core has one user at a time) and gives a Ready:
    rows, then messages and replies. The first Ready of a batch with rows leads it: it yields
    (twice, _lead says why), so every task that is ready now can apply its event and join,
    then commits the batch
    in one transaction, and only then sends the batch's messages and replies (DESIGN rules 1
    and 2: nothing leaves before its commit). A Ready with no rows still waits for a batch
    under way: what it says may rest on rows not yet durable. A caller that applies several
    events before it waits (the hook socket's hub) uses apply_nowait and lead instead, and
    yields (or not) itself. The commit runs on the event
    loop: measured here, trio's thread hand-off costs several times the 35 us a WAL commit
    takes.
    """

    def __init__(self, store: Store, loaded, config: Config, clock=time.time,
                 outbox: trio.MemorySendChannel | None = None):
        self.store, self.loaded, self.config, self.clock = store, loaded, config, clock
        self.outbox = outbox  # (dst, message) to peers, once committed: the transport drains it
        self.peer = self._load()
        self._open = _Batch()
        self._waiters: dict[int, _Waiter] = {}
        self._refs = itertools.count()
        self.metrics = None
        self.net = None  # the peer transport, when there is one
        self.conflicts = 0  # ring data refused as conflicting, since start
        self.reachable: set[str] = set()
        self.ever_reached: set[str] = set()
        self.dialling = False
        self.kicked = trio.Event()  # set by every event but ticks: the ticker goes fast again
        self.shared = False  # the last batch held more than one event
        self.checkpoints: _Checkpoints | None = None  # the WAL's, when run() runs them

    @property
    def allocator(self):
        return self.peer.allocator

    # -- what the peer transport reads (peer_net.CoreSide) ---------------------------------------

    @property
    def me(self) -> str:
        return self.loaded.peer_id

    @property
    def ranges(self) -> list[str]:
        """What the hello says: the ranges (and static space) the database was made with.
        Ranges added online are learned from the ring, by each host in its own time, so two
        hosts of one cluster may differ in those for a while and must still talk."""
        return sorted(map(str, self.loaded.founding))

    def cluster(self) -> tuple[str, str]:
        return self.peer.cluster, self.peer.base_cluster

    def heard_from(self) -> frozenset[str]:
        return frozenset(self.peer.seen)

    def members(self) -> frozenset[str]:
        return frozenset(self.peer.members())

    def removed(self) -> frozenset[str]:
        return frozenset(self.peer.removed)

    def _subnet(self):
        return self.config.subnet or self.loaded.universes[0]

    def _load(self):
        c = self.config
        return self.store.load_peer(self.loaded, self._subnet(), c.reuse_delay, c.gateways)

    async def identified(self, address: str, peer: str) -> None:
        """The transport learned who answers at address. A seed that knows the seeds by
        address only makes the split once it has every id (the core decides, and its rows
        carry the ids: one commit)."""
        self.kicked.set()
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
        w = _Waiter()
        try:
            led = await self._process(self._apply(request, w))
            if not (led and w.done):  # a leader has yielded already
                await w.event.wait()
        finally:
            self._waiters.pop(w.ref, None)
        if isinstance(w.reply, (CommitFailed, CoreBug)):
            raise w.reply
        return w.reply

    async def submit_then(self, request, then) -> bool:
        """As submit, but the reply (or the CommitFailed or CoreBug that submit would raise)
        is handed to then(reply) by whichever task has it: for a request that joins a batch
        another task leads, that leader, once it has committed. So the task that submitted
        need not wake to pass its reply on (a scheduler step per request, a tenth of the
        daemon's work on the hook path). then must neither raise nor wait. Returns once the
        request is applied (and committed, if this task led its batch; then the reply has
        been handed over): True if it yielded on the way. A CoreBug from the core itself is
        raised here, as submit does, and then is not called."""
        return await self._process(self._apply(request, _Waiter(then)))

    def apply_nowait(self, request, then) -> _Batch | None:
        """As submit_then, for a caller that cannot wait: the request is applied and joins
        the open batch. Returns that batch if this request opened it: the caller must then
        commit it with lead() before it next waits for anything (nothing is sent before)."""
        return self._join(self._apply(request, _Waiter(then)))

    async def lead(self, batch: _Batch) -> None:
        """Commit a batch apply_nowait opened, with what joined it, and send what waits for
        it. It does not yield first (as a task that submits does): its caller applied all
        that was ready already."""
        await self._lead(batch, gather=False)

    def _apply(self, request, w: _Waiter) -> Ready:
        """The core's Ready for a request, whose reply w waits for."""
        ref = w.ref = next(self._refs)
        self.kicked.set()
        self._waiters[ref] = w
        try:
            ready = self.peer.request(ref, request, self.clock())
        except Exception as e:
            self._waiters.pop(ref, None)
            raise self._bug(e) from e
        for r, _ in ready.replies:
            if r == ref:
                break
        else:  # no reply yet: it waits for a peer (a donation)
            w.asked = time.monotonic()
        return ready

    async def receive(self, sender: str, msg) -> None:
        self.kicked.set()
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
            raise self._bug(e) from e

    def _bug(self, e: Exception) -> CoreBug:
        log.exception("event=core_bug")
        bug = CoreBug(f"internal error ({type(e).__name__}: {e}); nothing was changed")
        if self._open.rows:
            self._open.failed = self._open.failed or bug
        else:
            self._rebuild(bug)
        return bug

    def _rebuild(self, failed: Exception) -> None:
        """Memory from the database; requests waiting for peers' space fail (the peer
        that was waiting for it is gone)."""
        self._reload()
        for ref in list(self._waiters):
            self._reply(ref, failed)

    async def join_cluster(self, cluster: str) -> None:
        """A joiner's first peer told it the cluster's identity: durable before it is used."""
        self.store.set_cluster(cluster)
        self.loaded.cluster_id = cluster
        self.peer.cluster = self.peer.base_cluster = cluster
        log.warning("event=joined cluster=%s", cluster)

    def set_reachable(self, peers: set[str], dialling: bool | None = None) -> None:
        """From the transport: the peers reachable now, and whether it still dials peer
        addresses it has never reached (a request lacking space waits for those)."""
        self.kicked.set()
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

    async def _process(self, ready: Ready) -> bool:
        """Deliver ready, after the commit of the batch it joins if one is open or it has rows;
        True if it led that batch (and so has yielded)."""
        opened = self._join(ready)
        if opened is None:
            return False
        await self._lead(opened)
        return True

    def _join(self, ready: Ready) -> _Batch | None:
        """ready joins the open batch if it has rows or one is open (else it is delivered
        now); returns the batch if ready opened it: its leader must commit it."""
        batch = self._open
        opened = bool(ready.rows) and not batch.rows
        batch.rows.extend(ready.rows)
        if batch.rows:
            batch.after.append(ready)
        else:
            self._deliver(ready)
        return batch if opened else None

    async def _lead(self, batch: _Batch, gather: bool = True) -> None:
        # gather: yield first, so every task that is ready now can apply its event and join.
        # Shielded: a leader cancelled here (shutdown) must still commit or fail its followers.
        # Twice while batches are shared: trio runs a pass's tasks in a random order, so
        # after one yield this task runs before half of those the same poll woke, whose
        # requests would then wait for a commit of their own. Measured under 8 clients: 5
        # requests a commit with one yield, 8 with two (a commit costs about what 6
        # requests' other work does). While each batch holds one event (one client), the
        # second yield would only add latency.
        if gather:
            await trio.lowlevel.cancel_shielded_checkpoint()
            if self.shared:
                await trio.lowlevel.cancel_shielded_checkpoint()
        if self.checkpoints is not None and self.checkpoints.must_wait():
            with trio.CancelScope(shield=True):
                await self.checkpoints.wait()  # the batch stays open: more may join it
        self.shared = len(batch.after) > 1
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
            if self.outbox is None:
                continue  # no transport: lost, as any message may be
            try:
                self.outbox.send_nowait((dst, msg))
            except trio.WouldBlock:
                log.info("event=dropped peer=%s reason=outbox_full", dst)
        for ref, reply in ready.replies:
            self._reply(ref, reply)

    def _reply(self, ref, reply) -> None:
        w = self._waiters.get(ref)
        if w is None or w.done:
            return
        w.reply, w.done = reply, True
        if w.asked is not None and self.metrics is not None and \
                not isinstance(reply, (CommitFailed, CoreBug)):
            self.metrics.donation.observe(time.monotonic() - w.asked)
        if w.then is None:
            w.event.set()
            return
        del self._waiters[ref]
        try:
            w.then(reply)
        except Exception:  # a bug there must not cost the other replies of the batch
            log.exception("event=reply_failed")


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
        # Ranges new to this database are checked against the host's routes (host_routes.py
        # says why only new ones).
        loaded = store.open(config.universes, config.name, mode=mode, bootstrap_meta=meta,
                            static=static, on_new=functools.partial(
                                host_routes.check_ranges, allow=config.allow_route_overlap))
        if loaded.note:
            log.warning("event=no_static_space reason=%r", loaded.note)
        _check_subnet(config.subnet, loaded.ranges + loaded.static)
        known = store.peer_addresses()
        known.pop(loaded.peer_id, None)
        networked = bool(config.peers or config.listen or config.init_peers or known)
        if known and len(config.secret or b"") < 16:
            log.warning("event=alone reason=%r", "the database knows peers, but there is no "
                        "cluster secret (--secret-file or IPAMD_SECRET) to reach them with")
            networked = False
        outbox, drained = trio.open_memory_channel(OUTBOX) if networked else (None, None)
        core = CoreLoop(store, loaded, config, outbox=outbox)  # refuses what it cannot load
        store.set_nickname(loaded.peer_id, config.name)  # a write: only once it loads
        core.sweeper = Sweeper(core, config.sweep_interval)
        checkpoints = core.checkpoints = _Checkpoints(store)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(checkpoints.run)
            await nursery.start(core.sweeper.run)
            nursery.start_soon(_ticker, core)
            listening = ""
            if networked:
                from .peer_net import PeerNet
                host, port = parse_hostport(config.listen) if config.listen else (None, None)
                nicknames = store.peer_nicknames()
                nicknames.pop(loaded.peer_id, None)
                net = core.net = PeerNet(
                    core, config.secret, port, known=known, save=store.save_peer_address,
                    cap=caps["peer"], outbox=drained, candidates=store.candidates(time.time()),
                    candidate_ttl=config.candidate_ttl, heard_from=store.peer_heard,
                    forget=store.forget_candidates, nickname=config.name,
                    nicknames=nicknames, save_nickname=store.set_nickname)
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
            from .hook_server import serve_hooks
            await nursery.start(functools.partial(serve_hooks, config.socket, core,
                                                  cap=caps["hook"]))
            if config.docker_socket is not None:
                from .docker_server import serve_docker
                await nursery.start(functools.partial(serve_docker, config.docker_socket, core,
                                                      cap=caps["docker"]))
            nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
            # What start-up made (modules, the allocations loaded) lives as long as the
            # daemon: out of the collector's full passes, which walk every object, holding
            # the event loop (measured: 85 ms at 36,000 allocations).
            gc.freeze()
            ranges = loaded.ranges
            static_text = f" static={','.join(map(str, loaded.static))}" if loaded.static else ""
            ready(f"ready peer={loaded.peer_id} name={config.name} socket={config.socket} "
                  f"db={store.path} ranges={','.join(map(str, ranges))}{static_text} "
                  f"allocations={len(core.allocator.by_addr)} durability={config.durability}"
                  f"{listening}")
    except (StoreError, host_routes.RangeOverlapsHost) as e:
        raise Refused(str(e)) from None
    finally:
        store.close()
        os.close(lock_fd)


def _check_subnet(subnet: Cidr | None, universes: list[Cidr]) -> None:
    if subnet is not None and not any(subnet.overlaps(u) for u in universes):
        raise Refused(f"--subnet {subnet} overlaps no allocation range "
                      f"({', '.join(map(str, universes))})")


SWITCH_INTERVAL = 0.0005
# Messages committed and not yet taken by the transport. It drains them as soon as the event
# loop lets it; a batch beyond this (a bug, or a stalled loop) loses the rest, as any message
# may be lost.
OUTBOX = 65536
TICK = 0.1  # seconds between core ticks: gossip rounds, request timeouts, free hints
IDLE_TICK = 0.5  # seconds between core ticks while the core is idle (Peer.idle)


class _Checkpoints:
    """Runs the store's WAL checkpoints (Store.checkpoint_elsewhere says why): the copy in a
    thread while commits go on, then what they added meanwhile on the event loop.

    Backpressure (DESIGN rule 10, every resource bounded): the WAL grows by what is committed
    while a copy runs. On a busy host the copy's thread gets little of the GIL and the CPU
    (measured: 53 MB of WAL under the 8-client hook load beside two busy processes, against
    16 MiB due), so once the WAL holds `hard` pages, a batch waits for the copy under way to
    end before it commits, up to `limit` seconds: requests arriving meanwhile join that batch,
    and the event loop, idle, leaves the thread the CPU. Not while a reader's open transaction
    holds the WAL (an sqlite shell left in one): no copy can start it over then, so waiting
    would only stall allocations; that is logged (once each time it is found so held), and the
    WAL grows until the reader ends."""

    def __init__(self, store: Store, pages: int = CHECKPOINT_PAGES,
                 hard: int = CHECKPOINT_PAGES * 3 // 2, limit: float = 1.0):
        self.store, self.due = store, trio.Event()
        self.hard, self.limit = hard, limit
        self.copying: trio.Event | None = None  # set once the copy under way has finished
        self.pinned = False  # the last checkpoint could not copy it all: a reader holds it
        self.waits = 0  # batches that waited (a test's and an operator's evidence)
        store.checkpoint_elsewhere(lambda: self.due.set(), pages)

    def view(self) -> dict:
        """For status: the WAL's pages, the batches that waited for a copy, a reader's hold."""
        return {"pages": self.store.wal_pages, "waits": self.waits, "pinned": self.pinned}

    def must_wait(self) -> bool:
        """Before a commit: is the WAL past `hard` with a copy under way? Asked first, so
        the batches that need not wait (nearly all) pay for no scope and no coroutine."""
        return self.copying is not None and not self.pinned and \
            self.store.wal_pages >= self.hard

    async def wait(self) -> None:
        """For the copy under way to end, at most `limit` seconds."""
        self.waits += 1
        with trio.move_on_after(self.limit):
            await self.copying.wait()

    async def run(self) -> None:
        while True:
            await self.due.wait()
            self.copying = trio.Event()
            try:
                try:
                    await trio.to_thread.run_sync(self.store.checkpoint_copy)
                except RuntimeError as e:  # no thread to be had (resources exhausted)
                    # On the loop, then: requests wait for it, but the WAL stays bounded and
                    # the daemon serves on (an exception here would end it).
                    log.warning("event=checkpoint_inline reason=%r", str(e))
                    self.store.checkpoint_copy()
                wal, copied = self.store.checkpoint_finish()
            except apsw.Error as e:  # the WAL only grows until the next one succeeds
                log.warning("event=checkpoint_failed error=%r", str(e))
            else:
                if copied < wal and not self.pinned:
                    log.warning("event=wal_pinned pages=%d copied=%d reason=%r", wal, copied,
                                "a reader's open transaction (an sqlite shell?) holds the WAL: "
                                "it grows until that transaction ends")
                self.pinned = copied < wal
            finally:
                self.copying.set()
                self.copying = None
            self.due = trio.Event()  # what commits said meanwhile, the finish has done


async def _ticker(core: CoreLoop) -> None:
    """A tick every TICK while the core has work; while it is idle, every IDLE_TICK unless an
    event (a request, a peer's message, reachability) comes first. At idle the wake-ups are
    what costs CPU, not the ticks' work."""
    while True:
        await trio.sleep(TICK)
        if core.peer.idle():
            with trio.move_on_after(IDLE_TICK - TICK):
                await core.kicked.wait()
        core.kicked = trio.Event()
        await core.tick()


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.warning("event=stopping signal=%s", signal.Signals(signum).name)
            scope.cancel()
            return
