"""How often a peer connection must carry a frame, and how long its silence is tolerated, as
pure code (peer_net.py applies it; tests and the simulator's arithmetic read it).

Each daemon sends on the connection it dialled, and only there; a frame of any kind proves
it is alive, and a keepalive goes only when the connection was otherwise silent for the
interval. A keepalive's payload is that interval in milliseconds (2 bytes), so the receiver
knows how long a silence means the sender or the path is gone: SILENCES intervals, never
less than DEAD_AFTER_MIN.

The interval grows with the number of connections so that an idle daemon's keepalive bytes
stay near BUDGET bytes a second however large the cluster: on a full mesh, each peer must be
heard from at least once per interval, so cost = (peers - 1) x frame / interval, and
detection time = SILENCES x interval is the price of a flat cost. Up to 21 peers the interval
is INTERVAL_MIN (below BUDGET: 20 x 24 B / 0.5 s = 960 B/s), and detection stays within
DEAD_AFTER_MIN up to 28 peers; at 40 peers the interval is 39 x 24 B / BUDGET = 0.94 s
(detection within 2.8 s), at 100 peers 2.38 s (7.1 s). The rest of an idle daemon's 2 KB/s
goes to probes (core/peer.py) and the rare whole address book.

Keepalives go on a grid of wall time (until_next): an idle daemon wakes once an interval to
send all its keepalives, in one pass of one task (peer_net's _keepalives), not once per peer;
what costs CPU at idle is wake-ups, not bytes.
Daemons sharing one machine then all burst together; a phase per daemon was measured and not
kept (docs/design.md, "The grid has a price").

An interval never more than doubles from one keepalive to the next: the receiver holds the
sender to SILENCES times the last interval it announced, so a cluster that grows at once
(many joins) does not make its peers look dead for a moment.
"""
from __future__ import annotations

import struct

INTERVAL_MIN = 0.5      # seconds: small clusters keep the old keepalive rate
INTERVAL_MAX = 10.0
DEAD_AFTER_MIN = 2.0    # seconds of silence that mean gone, at least
SILENCES = 3            # intervals of silence that mean gone
BUDGET = 1000.0         # keepalive bytes a second an idle daemon aims at, whatever its peers
FRAME_BYTES = 24        # a keepalive on the wire: length 4, head 2, payload 2, tag 16
_PAYLOAD = struct.Struct(">H")


def interval(connections: int, last: float | None = None) -> float:
    """Seconds between keepalives on each of `connections` silent connections; at most twice
    `last` (the interval this connection announced last)."""
    want = min(max(connections * FRAME_BYTES / BUDGET, INTERVAL_MIN), INTERVAL_MAX)
    return want if last is None else min(want, 2 * last)


def until_next(wall: float, every: float) -> float:
    """Seconds from wall-clock time `wall` to the next multiple of `every`: keepalives go on a
    grid of wall time, so a daemon's keepalives to all its peers go in one wake-up, and, on
    hosts whose clocks agree, arrive at each peer together too (one wake-up there as well).
    Never less than a tenth of `every` (a timer that fires a hair early must not send two),
    never more than 1.1 x `every`, whatever the clock does."""
    wait = every - wall % every
    return wait if wait >= every / 10 else wait + every


def dead_after(announced: float | None) -> float:
    """Seconds of silence after which a peer that announced `announced` (None: not yet) is
    taken as gone."""
    return max(DEAD_AFTER_MIN, SILENCES * (announced or INTERVAL_MIN))


def encode(seconds: float) -> bytes:
    return _PAYLOAD.pack(min(int(round(seconds * 1000)), 0xFFFF))


def decode(payload: bytes) -> float | None:
    """The interval a keepalive announces; None for an empty payload. A payload that is
    neither is the peer's bug (ValueError); an interval out of bounds is clamped."""
    if not payload:
        return None
    if len(payload) != _PAYLOAD.size:
        raise ValueError(f"keepalive payload of {len(payload)} bytes")
    (ms,) = _PAYLOAD.unpack(payload)
    return min(max(ms / 1000, INTERVAL_MIN), INTERVAL_MAX)
