"""Prometheus metrics on --metrics HOST:PORT, in prometheus-client's text exposition.

Gauges are read from the core when scraped, so they are never stale; the donation latency
histogram and the conflict counter are fed as things happen.
"""
from __future__ import annotations

import logging

import h11
import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .core.spare import is_spare
from .http_serve import next_event, respond
from .limits import ConnectionCap

log = logging.getLogger("ipamd")


class Metrics:
    """A scrape takes the numbers on the event loop (from counts the core keeps: no scan of
    the allocations) and formats them in a thread: with thousands of subnets formatting is
    most of the cost, and hook requests must not wait behind it."""

    def __init__(self, core):
        self.core = core
        self.registry = CollectorRegistry()
        self.donation = Histogram(
            "ipamd_donation_seconds", "time from an allocate or claim that needed space from a "
            "peer to its reply", registry=self.registry,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
        self.conflicts = Counter("ipamd_ring_conflicts", "ring data refused as conflicting "
                                 "(same start and version, different content)",
                                 registry=self.registry)
        self.lock = trio.Lock()
        self.cached: tuple[float, bytes] | None = None

    async def snapshot(self) -> dict:
        """Plain numbers, read on the event loop: free space a few hundred subnets at a time,
        letting requests in between (a gauge read a moment later is as good)."""
        peer = self.core.peer
        a = peer.allocator
        # Cidr values, not text: formatting thousands of them is slow, and is left to the
        # thread (they are immutable).
        in_use = list(a.in_use.items())
        subnets = list({a.default_subnet} | {sub for _, sub in a.in_use})
        # The spare universes are where ranges are carved from, never handed out: not shown.
        universes = [u for u in a.rings if not is_spare(u)]
        owned = [(u, sum(max(0, min(hi, u.host_bounds()[1]) - max(lo, u.host_bounds()[0]))
                         for lo, hi in a._owned[u])) for u in universes]
        retired = [(u, u in a.retired) for u in universes if u not in a.static]
        others = len(peer.members() - {peer.me})
        reachable, pending = len(peer.reachable), len(peer.waiting)
        free = []
        for u in universes:
            mine = [sub for sub in subnets if sub.overlaps(u)]
            for i in range(0, len(mine), CHUNK):
                part = mine[i:i + CHUNK]
                spans = [(max(lo, u.start), min(hi, u.end))
                         for lo, hi in (sub.host_bounds() for sub in part)]
                counts = a.free_counts(u, spans, self.core.clock())
                free += [((u, sub), n) for sub, n in zip(part, counts)]
                await trio.sleep(0)
        cp = self.core.checkpoints
        return {"in_use": in_use, "free": free, "owned": owned, "retired": retired,
                "reachable": reachable, "wal": None if cp is None else cp.view(),
                "unreachable": others - reachable, "pending": pending, **_carved(a, in_use)}

    async def body(self) -> bytes:
        """The exposition, at most FRESH seconds old: a scraper asking back to back (or many
        at once) costs one snapshot and one formatting a second, not one each."""
        async with self.lock:
            now = trio.current_time()
            if self.cached is None or now - self.cached[0] >= FRESH:
                snap = await self.snapshot()
                self.cached = (now, await trio.to_thread.run_sync(self.render, snap))
            return self.cached[1]

    def render(self, snap: dict) -> bytes:
        """The exposition text of a snapshot: safe in a thread (it reads only snap, and
        prometheus-client's own metrics, which lock)."""
        return generate_latest(_Scrape(self, snap))


class _Scrape:
    def __init__(self, metrics: Metrics, snap: dict):
        self.metrics, self.snap = metrics, snap

    def collect(self):
        s = self.snap
        in_use = GaugeMetricFamily("ipamd_addresses_in_use", "addresses held",
                                   labels=["universe", "subnet"])
        for labels, n in _labelled(s["in_use"]):
            in_use.add_metric(labels, n)
        free = GaugeMetricFamily("ipamd_addresses_free", "addresses this peer could hand out "
                                 "now, in the space it owns, by universe and subnet (the "
                                 "default subnet and every subnet in use)",
                                 labels=["universe", "subnet"])
        for labels, n in _labelled(s["free"]):
            free.add_metric(labels, n)
        owned = GaugeMetricFamily("ipamd_addresses_owned", "addresses of the universe this "
                                  "peer owns", labels=["universe"])
        for u, n in s["owned"]:
            owned.add_metric([str(u)], n)
        retired = GaugeMetricFamily("ipamd_range_retired", "1 for a range retired online "
                                    "(`ipamd range retire`: no new allocations), else 0",
                                    labels=["universe"])
        for u, is_retired in s["retired"]:
            retired.add_metric([str(u)], int(is_retired))
        peers = GaugeMetricFamily("ipamd_peers", "peers known, by reachability",
                                  labels=["state"])
        peers.add_metric(["reachable"], s["reachable"])
        peers.add_metric(["unreachable"], s["unreachable"])
        pending = GaugeMetricFamily("ipamd_pending_requests",
                                    "requests waiting for space from a peer")
        pending.add_metric([], s["pending"])
        yield from (in_use, free, owned, retired, peers, pending)
        yield _gauge("ipamd_tenant_blocks", "blocks each tenant has (this host's view of the "
                     "ring)", "tenant", s["tenant_blocks"])
        yield _gauge("ipamd_tenant_addresses_in_use", "addresses this host holds in each "
                     "tenant's blocks", "tenant", s["tenant_in_use"])
        yield _gauge("ipamd_names_in_use", "names of each pool this host holds", "pool",
                     s["names_in_use"])
        leased = GaugeMetricFamily("ipamd_leased_blocks", "blocks leased whole to a handle "
                                   "(`ipamd lease-block`), cluster-wide as this host knows them")
        leased.add_metric([], s["leased_blocks"])
        yield leased
        if s["wal"] is not None:  # the daemon's checkpoints (daemon._Checkpoints)
            wal = s["wal"]
            yield GaugeMetricFamily("ipamd_wal_pages", "pages in the database's WAL after the "
                                    "last commit", value=wal["pages"])
            yield CounterMetricFamily("ipamd_wal_waits", "commits that waited for a checkpoint, "
                                      "the WAL being past its bound", value=wal["waits"])
            yield GaugeMetricFamily("ipamd_wal_pinned", "1 if the last checkpoint found a "
                                    "reader's open transaction keeping the WAL from being "
                                    "started over", value=int(wal["pinned"]))
        yield from self.metrics.registry.collect()


def _carved(a, in_use) -> dict:
    """Tenants, leased blocks and name pools as this host knows them: each tenant's blocks
    and the addresses this host holds there, the names it holds of each pool."""
    held: dict = {}
    for (u, _), n in in_use:
        held[u] = held.get(u, 0) + n
    return {"tenant_blocks": [(t, len(bs)) for t, bs in a.tenant_blocks.items()],
            "tenant_in_use": [(t, sum(held.get(b, 0) for b in bs))
                              for t, bs in a.tenant_blocks.items()],
            "names_in_use": [(a.carves[u].name, held.get(u, 0)) for u in a.pools],
            "leased_blocks": sum(len(bs) for bs in a.lease_blocks.values())}


def _gauge(name: str, help: str, label: str, items) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, help, labels=[label])
    for value, n in sorted(items):
        g.add_metric([value], n)
    return g


def _labelled(items) -> list[tuple[list[str], int]]:
    """((universe or None, subnet), n) as sorted label values."""
    return sorted(([str(u) if u else "", str(sub)], n) for (u, sub), n in items)


FRESH = 1.0  # seconds a formatted scrape is served again
CHUNK = 250  # subnets whose free space is counted between two looks at other work
SCRAPE_TIMEOUT = 10.0  # a whole scrape, request to response: a slow client is hung up on


async def serve_metrics(host: str | None, port: int, metrics: Metrics,
                        task_status=trio.TASK_STATUS_IGNORED, cap: int = 16) -> None:
    async def scrape(stream):
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        event = await next_event(stream, conn)
        if not isinstance(event, h11.Request):
            return
        while not isinstance(await next_event(stream, conn), (h11.EndOfMessage,
                                                              h11.ConnectionClosed)):
            pass
        ok = event.method == b"GET" and event.target.split(b"?")[0] in (b"/metrics", b"/")
        if ok:
            body = await metrics.body()
        else:
            body = b"not found: try /metrics\n"
        await respond(stream, conn, 200 if ok else 404,
                      CONTENT_TYPE_LATEST.encode() if ok else b"text/plain", body, close=True)

    async def handler(stream):
        try:
            async with stream:
                with trio.fail_after(SCRAPE_TIMEOUT):
                    await scrape(stream)
        except (h11.RemoteProtocolError, h11.LocalProtocolError, trio.BrokenResourceError,
                trio.ClosedResourceError, trio.TooSlowError) as e:
            log.info("event=metrics_bad_request error=%r", str(e))
        except Exception:  # a bug must cost one scrape, never the daemon
            log.exception("event=metrics_failed")

    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(ConnectionCap("metrics", cap).wrap(handler), listeners)
