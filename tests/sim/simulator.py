"""N peers in one process on a seeded scheduler, with faults, checking the invariants.

Faults: message drop, duplicate, reorder and delay; partitions (isolate one, majority split,
one-way, bridge); crashes at named points (before commit, after commit, after send) followed by
restarts from what was committed. Every run prints its seed; the same seed replays exactly.

Universes: a seed of up to 20 peers draws its ranges: the IPv4 /22 (two thirds of the seeds),
one IPv6 range of a prefix from /32 to /128 (a /32 counts 2^96 addresses: counts past 2^64 go
through the codec; a /128 has one address; some sit at the very top of the address space, so
that an end is 2^128), or both. Entrance requests use them all: a CNI ADD is one TakeSets with
a range set per family (or per half or quarter of the one range), alternatives, gateways,
rangeStart-rangeEnd windows and requested addresses; CNI STATUS, GC and the sweeper likewise.

Ranges online (issue #14): every database has the spare universes 0.0.0.0/0 and ::/0 (as the
store makes them now), and among the client operations (3%, on a random peer in any standing,
partitioned or not) the operator adds a range, or retires or resumes one. The candidates are a
small pool per seed that overlap on purpose: an IPv4 /24, its /25s and two /26s, the /20
holding it, an IPv6 /64, its /65s and a /120 inside, the seed's own universes and the prefix
two shorter holding each; so concurrent and partitioned adds of overlapping ranges happen. A
quarter of the allocations and claims go to a range added online, once there is one.

Tenants, blocks and names (issue #14, tests/sim/carves.py): in 70% of those seeds, 5% of the
client operations (on a random peer in any standing, partitioned or not) add block space
(an IPv4 /24, its /25 or the /23 holding it, an IPv6 /60 or its /61: overlapping on purpose),
create, grow and delete (with and without force) a few tenants (IPv4 /26 to /29 blocks, an
IPv6 /62 or /64 one; limits 1 to 3; now and then other parameters, refused "exists"),
allocate and claim for them (the gateway sometimes, refused; some claims without the tenant,
refused), lease blocks and release them, create two name pools ("n-{0..15}" and
"web-{000..999}") and lease and claim names. Tenant addresses and names are released like
any address (the usual releases, GC, the sweeper).

Standings: a peer may be waiting (seeds and quorum bootstrap), member, left (the simulated
operator drains it with GC, waits out its quarantine and asks it to leave), stale (restarted
from an older copy of its database: the first peer it hears from knows more of its writes, and
it must stop at once), or removed (an rmpeer named it while it was down, and it came back, and
must stop at once on hearing a peer that knows). "First": such a peer hears one peer before
any other event reaches it; the core detects these standings only when it hears from a peer,
and what it does before that (serve requests from the old copy) is outside what it claims.
Peers in every standing keep getting client requests: takes (Allocate, Claim, TakeSets,
CanServe, Leave, RemovePeer) must be refused at once with the standing as the code and write
nothing; releases (Release, ReleaseIf, GC's ReleaseUnlisted) must pass (a Release of a handle
holding leased blocks frees its addresses and is refused for the blocks). A left, stale or
removed peer never writes an allocation or a ring entry of its own again ("gate"). The
database of a stale or removed peer no longer counts (its allocations are void: the host must
start afresh), so I1, I3 and I4 leave it out; after a while (PATIENCE requests), and at the
heal, the operator stops the peers that left and starts stale and removed ones afresh under
new ids. After the heal every peer is a member again. Core bugs found this way and not fixed
yet are tolerated where they show (KNOWN_BUGS; `--strict` tolerates none).

Invariants (DESIGN.md section 7) checked as it runs and at the end:
I1 no address held by two handles at once; I2 no acknowledged allocation lost; I3 no two peers
own overlapping space, and no (start, version) has two contents (a ring conflict is a violation);
I4 every allocation lies in space its host owns; I5 after healing every range has a live owner
(none is left with a peer that left); I6 after healing all rings are equal; I7 a peer's seq and
vector only grow, restarts included (but for a restore from an old copy, the fault itself);
I9 no quarantined address is handed out or given away: the simulator keeps, per peer, every
address that peer freed and when (from the rows it committed), and checks every Ready before it
is committed: an allocate reply must not hand out an address the same peer freed less than
REUSE_DELAY ago, and no ring transfer the peer writes (a grant, a give-back, a handover) may
move space holding such an address. (A claim may take a quarantined address on purpose.)
I10 no address in two universes: any two universes carved from spare space (ranges, static
space, block space, tenants' keys, name pools) known anywhere (live peers, and crashed ones'
disks) are equal or disjoint, each of one kind everywhere, and every carve marker in a live
peer's spare and block space rings lies in a universe that peer has, of the marker's kind;
what is carved from block space nests in it (I13), keys and pools lie in the registry;
I11 every acknowledged range add (ok, not "already"), unless lost with every disk that held
it, is a range of every live member after the heal, and liveness allocates in it (in a range
retired when the rings converge, the allocate must be refused "retired"); I12 no allocate
hands out an address of a range its peer knows is retired when it answers (claims may).
I13 no two blocks overlap: a block (a tenant's or a leased one) acknowledged overlaps no other
acknowledged and not given back (deleted, released, or lost with every disk that held it); in
every live peer's view blocks and leased blocks are disjoint, each inside its block space.
I14 every address where its request says: what a peer answers (before it commits) and what
it holds: a tenant's address in one of that tenant's blocks and never its gateway (the
block's first host address), a name in its pool, any other address in a range or static
space, never in a block, a leased block, block space or a key.
I15 every acknowledged tenant create, block (create, grow), block lease and pool create,
unless deleted or released since or lost with every disk that held it, is there on every
live member after the heal (like I11); a tenant deleted and not created again has neither
key nor block. Names: I1 (no address held twice) and I2 (no acknowledged allocation lost)
count names as the addresses they are; I9 covers name leases as allocates.
I16 no tenant has more blocks than its limit: acknowledged ones, and in every live peer's
view (which holds because only the key's owner adds blocks, partitioned or not).
I3 covers spare rings too (a marker is no peer: no two peers own one spare address), I4 and
I6 every universe a peer has, and I5 spare space as well: after the heal its every address
has a live owner or is carved (a marker), since the next range added there must ask its owner.
Free space as the allocator counts it is checked against a scan of its own tables (never an
enumeration of the range: a /32 IPv6 range is never walked).
A restart may lose the peer's whole database: it comes back under a new id, and its old id
stays dead until some peer runs rmpeer on it (during the run, from any peer at any time, so
concurrent and partitioned removals happen; after the heal, until it succeeds: I5 needs it).
Bootstrap is by a founder, by seeds (known by address: each learns the ids through
Peer.identified, as the daemon does), or by a quorum vote, under the same faults.
"""
from __future__ import annotations

import dataclasses
import heapq
import random
from collections import Counter
from dataclasses import dataclass, field

from appliance.protocols import peer_codec
from appliance.core import messages as m
from appliance.core.addr import Cidr, cidr, format_addr, parse_addr
from appliance.core.bootstrap import decided_cluster
from appliance.core.durable import Durable
from appliance.core.peer import Peer, Ready
from appliance.core.ring import Entry, Ring
from appliance.core.spare import SPARE, is_marker, is_spare, parse_marker

from .carves import CARVE_SHARE, Carving

UNIVERSE = cidr("10.0.0.0/22")     # small enough that peers run short and ask each other
BIG_UNIVERSE = cidr("10.0.0.0/16")  # for 100 peers
TICK = 0.1
REUSE_DELAY = 5.0  # every peer's quarantine (--reuse-delay), seconds of simulated time
CRASH_POINTS = ("before_commit", "after_commit", "after_send")
NOT_MEMBER = ("left", "stale", "removed")  # standings that never take again
# Requests a peer in another standing gets before the operator stops it (left) or starts it
# afresh under a new id (stale, removed).
PATIENCE = 25
RANGE_SHARE = 0.03  # of client operations: a range added, retired or resumed (issue #14)
ADDED_SHARE = 0.25  # of allocations and claims, once ranges were added: in one of those
# Core bugs the checks know of and tolerate, until they are fixed (`python -m tests.sim
# --strict` tolerates none; tests/test_sim.py holds a strict reproduction of each):
# "left_peer_silent": a peer that left never gossips and answers nothing. It sends each
# Handover not acknowledged again every second while it runs (after a restart too), and the
# simulated operator stops it once `status` shows none waiting (or after 4 * PATIENCE requests,
# or at the heal after 5 s more: `unfinished`). What is still lost: a Handover not acknowledged
# when the operator gives up (sent to a peer that left, is stale or was removed, which ignores
# it, or never got through); an acknowledged one whose receiver loses its database (wiped, or
# restored from an older copy) before passing it on; and any other write of the leaver's that
# had not spread when it left (a grant lost on the way, say, while the gossip that would have
# repaired it needs the leaver's answers). Then the leaver's space stays its own in every ring
# until an rmpeer of it once it is stopped (what the simulated operator then does).
# "given_to_non_member": space handed over (a leave) or granted (a SpaceGrant) to a peer that
# has left, is stale or was removed: it ignores the message and answers nothing, and the giver
# takes it as done (a leave even picks peers it knows have left); the space stays with that id
# until an rmpeer of it.
# "rmpeer_claims_unknown_space": rmpeer gives its runner every part of a range that no entry
# it (or a promiser) holds covers, as space "only dead peers knew the owner of"; run among
# peers that never heard the ring (joiners cut off from the founder, whom none of them knows)
# it claims space a live peer owns: two owners (I3). The simulated operator runs rmpeer only
# on peers whose rings cover every range.
KNOWN_BUGS = {"left_peer_silent", "given_to_non_member", "rmpeer_claims_unknown_space"}
# What the gate must refuse outside good standing, and what it must let pass (fixed here, so
# that a test that plants a wrong gate in messages.TAKES does not change the checker's mind).
TAKES = (*m.TAKES, m.CanServe)
RELEASES = (m.Release, m.ReleaseIf, m.ReleaseUnlisted)


class Violation(AssertionError):
    pass


class Acked(dict):
    """(peer, handle) -> address acknowledged, indexed by address too: checking each answer
    against every acknowledged address was quadratic, the most of a thousand-peer run."""

    def __init__(self):
        super().__init__()
        self._by_address: dict[str, set[tuple[str, str]]] = {}

    def holders(self, address: str) -> set[tuple[str, str]]:
        return self._by_address.get(address, set())

    def __setitem__(self, key, address) -> None:
        if key in self:
            del self[key]
        super().__setitem__(key, address)
        self._by_address.setdefault(address, set()).add(key)

    def __delitem__(self, key) -> None:
        address = super().pop(key)
        keys = self._by_address[address]
        keys.discard(key)
        if not keys:
            del self._by_address[address]

    def pop(self, key, *default):
        if key not in self:
            if default:
                return default[0]
            raise KeyError(key)
        address = self[key]
        del self[key]
        return address

    def drop_peer(self, p: str) -> None:
        for key in [k for k in self if k[0] == p]:
            del self[key]


def random_v6(rng: random.Random) -> Cidr:
    """An IPv6 range from /32 to /128: tiny ones (a /128 is one address), small ones where
    peers run short, huge ones (2^64 addresses and more); a fifth at the top of the address
    space, where the range's end is 2^128."""
    x = rng.random()
    if x < 0.25:
        prefix = rng.choice((126, 127, 128))
    elif x < 0.5:
        prefix = rng.randint(116, 125)
    elif x < 0.6:
        prefix = 32
    else:
        prefix = rng.randint(33, 115)
    bits = 128 - prefix
    if rng.random() < 0.2:
        start = (1 << 128) - (1 << bits)
    else:
        start = (0xFD << 120) | (rng.getrandbits(120 - bits) << bits)
    return Cidr(6, start, prefix)


def draw_universes(rng: random.Random) -> list[Cidr]:
    """IPv4 only (two thirds), IPv6 only, or both (either one the default subnet)."""
    x = rng.random()
    if x < 2 / 3:
        return [UNIVERSE]
    v6 = random_v6(rng)
    if x < 0.85:
        return [v6]
    return [UNIVERSE, v6] if rng.random() < 0.5 else [v6, UNIVERSE]


def address_of(seed: str) -> str:
    """Where a seed listens, as --init-peers names it."""
    return f"addr-{seed}"


def split(u: Cidr, parts: int) -> tuple[Cidr, ...]:
    """u cut into `parts` (a power of two) equal subnets, or fewer if it is too small."""
    while parts > 1 and u.prefix + parts.bit_length() - 1 > u.bits:
        parts //= 2
    extra = parts.bit_length() - 1
    size = u.size // parts
    return tuple(Cidr(u.family, u.start + i * size, u.prefix + extra) for i in range(parts))


def host_range(s: Cidr) -> tuple[int, int]:
    """[first, last] of what may be handed out in subnet s."""
    lo, hi = s.host_bounds()
    return lo, hi - 1


def range_candidates(rng: random.Random, universes: list[Cidr]) -> list[Cidr]:
    """What the simulated operator may add as ranges: an IPv4 /24, both /25s and two /26s in
    it, and the /20 holding it; an IPv6 /64, its /65s and a /120 in the first; the seed's
    universes themselves, and the prefix two shorter holding each. They overlap on purpose:
    concurrent and partitioned adds of overlapping ranges happen, and all but one must fail."""
    b = Cidr(4, (10 << 24) | (rng.randrange(64, 250) << 16) | (rng.randrange(256) << 8), 24)
    v6 = Cidr(6, (0xFD66 << 112) | (rng.getrandbits(48) << 64), 64)
    out = [b, *split(b, 2), *split(b, 4)[1:3], Cidr(4, b.start >> 12 << 12, 20),
           v6, *split(v6, 2), Cidr(6, v6.start | 0x1200, 120)]
    for u in universes:
        out.append(u)
        if u.prefix > 2:
            wide = u.bits - u.prefix + 2
            out.append(Cidr(u.family, u.start >> wide << wide, u.prefix - 2))
    return out


def copy_durable(d: Durable) -> Durable:
    """A copy of a database (an operator's backup): rows are frozen, containers are copied."""
    return dataclasses.replace(d, **{f.name: type(v)(v) for f in dataclasses.fields(d)
                                     if isinstance(v := getattr(d, f.name), (dict, set, list))})


@dataclass
class Faults:
    drop: float = 0.0
    dup: float = 0.0
    delay: float = 0.0        # chance a message is held back for a while
    crash: float = 0.0        # chance, per handled event, that the peer crashes there
    partition: float = 0.0    # chance per step that the network changes shape
    wipe: float = 0.0         # chance that a restart finds the database gone
    rmpeer: float = 0.0       # chance that a client operation is an rmpeer of a dead peer
    leave: float = 0.0        # chance that a client operation starts draining a peer to leave
    stale: float = 0.0        # chance that a restart finds an older copy of the database
    condemn: float = 0.0      # chance that a client operation is an rmpeer of a peer that is
    #                           only down (it comes back, and must learn it was removed)

    @classmethod
    def random(cls, rng: random.Random, peers: int = 5) -> Faults:
        # Crashes are drawn per event a peer handles; more peers handle more events.
        return cls(drop=rng.random() * 0.3, dup=rng.random() * 0.2, delay=rng.random() * 0.3,
                   crash=rng.random() * 0.05 / peers, partition=rng.random() * 0.01,
                   wipe=rng.random() * 0.3, rmpeer=rng.random() * 0.1)

    def draw_standings(self, rng: random.Random) -> None:
        """The faults that put peers in other standings (drawn after the rest, so that a
        seed's other draws do not depend on them). Three seeds in ten have none."""
        if rng.random() < 0.7:
            self.leave = rng.random() * 0.004
            self.stale = rng.random() * 0.5
            self.condemn = rng.random() * 0.05


@dataclass
class Stats:
    ops: int = 0
    acked: int = 0
    refused: Counter = field(default_factory=Counter)
    faults: Counter = field(default_factory=Counter)
    messages: int = 0
    rounds_to_converge: int = 0
    ring_entries: int = 0
    segments: int = 0
    removals: int = 0
    gate: Counter = field(default_factory=Counter)  # "standing request-kind" on non-members
    universes: str = ""
    # Range adds and retires answered ok ("added", "already", "retired", "resumed") and
    # refused ("AddRange overlap", ...).
    ranges: Counter = field(default_factory=Counter)
    # Tenant, block and name operations: "TenantCreate ok", "LeaseName exhausted", ...
    carves: Counter = field(default_factory=Counter)


class Sim:
    def violation(self, name: str, text: str) -> Violation:
        """A violation of invariant `name` (I13, ...) in this seed."""
        return Violation(f"{name} seed={self.seed}: {text}")

    def __init__(self, seed: int, n: int, faults: Faults, broken: str | None = None,
                 bootstrap: str = "founder", universes: list[Cidr] | None = None,
                 variety: bool = False, spare: bool = True):
        self.seed, self.rng, self.faults = seed, random.Random(seed), faults
        # The spare universes every database made since schema 5 has (spare.py); without
        # them, a cluster made before: its ranges are fixed.
        self.spare = SPARE if spare else ()
        self.broken = broken  # a known-wrong behaviour to plant, for the checker's own tests
        self.now = 1000.0
        self.names = [f"p{i}" for i in range(n)]
        self.universes = list(universes or [BIG_UNIVERSE if n > 20 else UNIVERSE])
        self.u = self.universes[0]  # the default subnet
        # Ranges added online (issue #14): what the operator may try to add (its own random
        # stream, so that the rest of a seed's draws stay as they were), every range some peer
        # committed (AddUniverse rows), and those whose add was acknowledged, with the adder.
        self.range_pool = range_candidates(random.Random(f"ranges {seed}"), self.universes)
        self.added: set[Cidr] = set()
        self.acked_ranges: dict[Cidr, str] = {}
        self.marks_checked: dict[tuple[str, Cidr], tuple[int, int]] = {}
        self.down_peers: dict[str, Peer] = {}  # crashed peers as loaded from their disks
        self.codec = n <= 20
        # Entrance requests with alternatives, windows and requested addresses, more requests
        # to peers in other standings, counts checked over windows too: for drawn seeds of up
        # to 20 peers (a Sim made directly, as the benchmarks do, and the 100-peer seeds run
        # as they always have).
        self.variety = variety
        self.cluster = "sim"
        self.bootstrap = bootstrap
        self.claim_share = 0.10  # of client operations: claims of random addresses
        self.entrance_share = 0.15  # of client operations: what CNI, GC and the sweeper send
        self.subnets = split(self.u, 2)
        # None: releases are 35% of operations, so the universe fills up and stays nearly full
        # (the hardest case). A fraction: release whenever that much of it is in use (churn at
        # a steady level, for measuring the ring's size over time).
        self.fill: float | None = None
        self.durable: dict[str, Durable] = {}
        self.live: dict[str, Peer] = {}
        for p in self.names:
            if bootstrap == "seeds":  # known by address: ids learned as each is reached
                boot = {"mode": "seeds", "seed_addresses": tuple(map(address_of, self.names))}
            elif bootstrap == "quorum":
                boot = {"mode": "quorum", "quorum": n}
            else:
                boot = {"mode": "single" if p == self.names[0] else "join"}
            self.durable[p] = self.new_durable(p, self.cluster, **boot)
            self.live[p] = self.durable[p].load(self.u, REUSE_DELAY)
        for p in self.names:  # every seed reaches every other at the start
            for q in self.names:
                self.durable[p].apply(self.live[p].identified(address_of(q), q, self.now).rows)
        self.blocked: set[tuple[str, str]] = set()  # (from, to) pairs the network drops
        self.queue: list[tuple[float, int, str, str, object]] = []  # a heap by delivery time
        self.due: list[tuple[float, int, str, str, object]] = []    # delivered in any order
        self.views_of_down: dict[str, dict[Cidr, list[tuple[int, int]]]] = {}
        self.msg_seq = 0
        self.acked = Acked()  # (peer, handle) -> address
        self.pending: dict[int, tuple[str, object]] = {}
        self.handles = 0
        self.stats = Stats(universes=" ".join(map(str, self.universes)))
        self.max_clock = {p: (0, {}) for p in self.names}
        self.gone: list[str] = []  # ids whose database was lost: dead for good
        # I9: per peer, address -> when that peer freed it (committed FreeAddress rows); an
        # address is quarantined there until freed_at + REUSE_DELAY.
        self.freed: dict[str, dict[str, float]] = {p: {} for p in self.names}
        self.wipes = 0
        # Standings. standing: each live peer's standing after its last event (the gate check
        # judges each Ready by the standing the peer had before it).
        self.standing: dict[str, str] = {p: peer.standing for p, peer in self.live.items()}
        self.draining: dict[str, float] = {}  # peer -> when to ask it to leave
        self.leave_tries: Counter = Counter()
        self.leave_answers: dict[str, str] = {}
        self.handed_to: dict[str, set[str]] = {}  # peer that left -> who acknowledged its space
        self.lost_disks: set[str] = set()  # peers whose database was wiped or restored
        self.departed: list[str] = []  # peers that left, stopped at the heal
        # Peers that left and were stopped with a Handover not acknowledged (the operator gave
        # up waiting for `status`'s handing_over to empty): their space may stay theirs.
        self.unfinished: set[str] = set()
        self.snapshots: dict[str, Durable] = {}  # an older copy of some peers' databases
        # Peers whose database no longer counts: restarted from an old copy (stale), or removed
        # by rmpeer while down. Their allocations are void; their space is others'.
        self.void: set[str] = set()
        self.condemned: dict[str, object] = {}  # down peer -> the rmpeer naming it, under way
        self.requests = 0
        self.last_reply: dict = {}
        self.patience: Counter = Counter()  # requests each peer in another standing got
        self.known_bugs = set(KNOWN_BUGS)
        # Tenants, blocks and name pools (issue #14): in some of the seeds that add ranges.
        self.carving = Carving(self, seed)
        self.stats.carves = self.carving.stats
        self._update_reachability()

    # -- the network ---------------------------------------------------------------------------

    @classmethod
    def for_seed(cls, seed: int, peers: int | None = None, broken: str | None = None) -> Sim:
        """Everything about a run drawn from its seed: size, fault rates, bootstrap, ranges."""
        rng = random.Random(seed)
        n = peers or rng.randint(3, 7)
        faults = Faults.random(rng, n)
        bootstrap = rng.choice(["founder", "seeds", "quorum"])
        universes = None
        if n <= 20:
            universes = draw_universes(rng)
            faults.draw_standings(rng)
        return cls(seed, n, faults, broken, bootstrap, universes, variety=n <= 20)

    def _update_reachability(self) -> None:
        for p, peer in self.live.items():
            peer.reachable = {q for q in self.live if q != p and (p, q) not in self.blocked
                              and (q, p) not in self.blocked}

    def _wire(self, msg):
        if self.codec:
            # Through the real codec, as on the wire: a message it cannot carry is a bug here
            # too. (Not at 100 peers: there it would cost most of the run's time.)
            return peer_codec.decode(peer_codec.encode(msg))
        return msg

    def _send(self, src: str, dst: str, msg) -> None:
        self.stats.messages += 1
        msg = self._wire(msg)
        f = self.faults
        if (src, dst) in self.blocked or self.rng.random() < f.drop:
            self.stats.faults["drop"] += 1
            return
        copies = 2 if self.rng.random() < f.dup else 1
        if copies == 2:
            self.stats.faults["duplicate"] += 1
        for _ in range(copies):
            delay = TICK * self.rng.random()
            if self.rng.random() < f.delay:
                delay += self.rng.random() * 3.0
                self.stats.faults["delay"] += 1
            self.msg_seq += 1
            heapq.heappush(self.queue, (self.now + delay, self.msg_seq, src, dst, msg))

    def _reshape(self) -> None:
        """A new partition shape (or none)."""
        live = sorted(self.names)
        shape = self.rng.choice(["heal", "isolate", "split", "one_way", "bridge"])
        self.blocked = set()
        self.stats.faults[f"partition_{shape}"] += 1
        if shape == "isolate":
            lone = self.rng.choice(live)
            self.blocked = {(a, b) for a in live for b in live if (a == lone) != (b == lone)}
        elif shape == "split":
            side = set(self.rng.sample(live, len(live) // 2))
            self.blocked = {(a, b) for a in live for b in live if (a in side) != (b in side)}
        elif shape == "one_way":
            a, b = self.rng.sample(live, 2)
            self.blocked = {(a, b)}
        elif shape == "bridge" and len(live) >= 3:
            left = set(self.rng.sample(live, len(live) // 2))
            bridge = self.rng.choice(sorted(left))
            self.blocked = {(a, b) for a in live for b in live if (a in left) != (b in left)
                            and bridge not in (a, b)}
        self._update_reachability()

    # -- peers ---------------------------------------------------------------------------------

    def new_durable(self, me: str, cluster: str, **boot) -> Durable:
        """A new database, as the store makes one: the spare universes too (if the cluster's
        databases have them)."""
        return Durable.new(me, cluster, [*self.universes, *self.spare], spare=self.spare,
                           **boot)

    def _handle(self, p: str, ready: Ready) -> None:
        """What a shell does with a Ready: commit, then send, then reply; maybe crash on the way."""
        for alarm in ready.alarms:
            if "conflict" in alarm:
                raise Violation(f"I3 seed={self.seed}: {p}: {alarm}")
        self._check_gate_rows(p, ready)
        self._check_quarantine(p, ready)
        self._check_retired(p, ready)
        if self.carving.on:
            self.carving.check_ready(p, ready)
        point = self.rng.choice(CRASH_POINTS) if self.rng.random() < self.faults.crash else None
        if self.broken == "send_before_commit":
            for dst, msg in ready.messages:
                self._send(p, dst, msg)
            if point is not None:
                return self._crash(p, point)
            self._commit(p, ready.rows)
        else:
            if point == "before_commit":
                return self._crash(p, point)
            self._commit(p, ready.rows)
            if point == "after_commit":
                return self._crash(p, point)
            for dst, msg in ready.messages:
                self._send(p, dst, msg)
        if point == "after_send":
            return self._crash(p, point)
        if p in self.live:
            self.standing[p] = self.live[p].standing
        for ref, reply in ready.replies:
            self._client_reply(p, ref, reply)
        self._check_clock(p)

    def _check_gate_rows(self, p: str, ready: Ready) -> None:
        """A peer that is not a member never hands out an address again, and one that left,
        is stale or was removed never writes a ring entry of its own (it would move space
        it may not own)."""
        before = self.standing.get(p, "member")
        if before == "member":
            return
        for r in ready.rows:
            if isinstance(r, m.PutAllocation) or before in NOT_MEMBER and \
                    isinstance(r, m.RingWrite) and r.stamp_peer == p:
                raise Violation(f"gate seed={self.seed}: {p}, {before}, wrote {r}")

    def _commit(self, p: str, rows: list) -> None:
        self.durable[p].apply(rows)
        freed = self.freed[p]
        for r in rows:
            if isinstance(r, m.FreeAddress) and r.universe is not None:
                freed[r.address] = r.freed_at
            elif isinstance(r, (m.PutAllocation, m.ForgetFreed, m.Reserve)):
                # Taken again (a claim), gone with its space, or reserved (a gateway: it
                # travels reserved, and is quarantined again when its last holder lets go).
                freed.pop(r.address, None)
            elif isinstance(r, m.AddUniverse) and r.kind == "range":
                self.added.add(cidr(r.cidr))  # not block space, blocks, keys or pools

    def _check_quarantine(self, p: str, ready: Ready) -> None:
        """I9, on what p is about to commit and say."""
        freed = self.freed[p]
        if not freed:
            return
        for a in [a for a, t in freed.items() if t + REUSE_DELAY <= self.now]:
            del freed[a]  # quarantine over
        if not freed:
            return
        for req, address in self._handed_out(ready):
            if address in freed:
                raise Violation(f"I9 seed={self.seed}: {p} handed out {address} to "
                                f"{req.handle} {self.now - freed[address]:.2f}s after "
                                f"freeing it (quarantine {REUSE_DELAY:g}s)")
        # Spare space holds no address (the ranges carved from it are universes of their own).
        given = [r for r in ready.rows if isinstance(r, m.RingWrite) and r.stamp_peer == p
                 and r.owner != p and not is_spare(cidr(r.universe))]
        if not given:
            return
        quarantined = sorted((parse_addr(a), a) for a in freed)
        spans = {}
        for r in given:
            u = cidr(r.universe)
            if u not in spans:
                spans[u] = {e.start: (lo, hi)
                            for e, lo, hi in self.live[p].replica.rings[u].spans()}
            lo, hi = spans[u][parse_addr(r.start)[1]]
            for (fam, value), address in quarantined:
                if fam == u.family and lo <= value < hi:
                    raise Violation(f"I9 seed={self.seed}: {p} gave {r.owner} "
                                    f"{format_addr(fam, lo)}-{format_addr(fam, hi - 1)}, holding "
                                    f"{address}, {self.now - freed[address]:.2f}s after freeing it "
                                    f"(quarantine {REUSE_DELAY:g}s)")

    def _handed_out(self, ready: Ready):
        """(request, address) for each address an allocate answered in ready hands out:
        requested addresses of a CNI ADD (claims) left out."""
        for ref, reply in ready.replies:
            got = self.pending.get(ref)
            if got is None or not reply["ok"] or \
                    not isinstance(got[1], (m.Allocate, m.TakeSets, m.LeaseName)):
                continue
            req = got[1]
            for i, text in enumerate(reply.get("addresses", [reply.get("address")])):
                address = text.split("/")[0]
                if isinstance(req, m.TakeSets) and any(
                        isinstance(c, m.Claim) and format_addr(c.family, c.address) == address
                        for c in req.sets[i]):
                    continue  # a requested address (a claim may take a quarantined one)
                yield req, address

    def _check_retired(self, p: str, ready: Ready) -> None:
        """I12: no allocate hands out an address of a range p knows is retired when it
        answers (its allocator's view as the Ready is made; claims may take one)."""
        peer = self.live.get(p)
        if peer is None or not peer.allocator.retired:
            return
        for req, address in self._handed_out(ready):
            u = peer.allocator.universe_of(parse_addr(address))
            if u in peer.allocator.retired:
                raise Violation(f"I12 seed={self.seed}: {p} handed out {address} to "
                                f"{req.handle} from range {u}, which it knows is retired")

    def _crash(self, p: str, point: str) -> None:
        self.stats.faults[f"crash_{point}"] += 1
        del self.live[p]
        # Requests in flight there are in doubt. An rmpeer among them may have removed its
        # targets (its commit came first): they count as removed from now on.
        doubt = {k for k, v in self.pending.items() if v[0] == p}
        for k in sorted(doubt, key=str):
            self.carving.in_doubt(self.pending[k][1])
        for t, ref in list(self.condemned.items()):
            if ref in doubt:
                self._void(t)
        self.pending = {k: v for k, v in self.pending.items() if v[0] != p}
        self.standing.pop(p, None)
        self._update_reachability()

    def _restartable(self, p: str) -> bool:
        if p in self.condemned:
            return False  # named by an rmpeer under way: an operator would not start it now
        if p not in self.void:
            return True
        d = self.durable[p]
        # Stopped for good already (stale, removed): it says so at once. Else it must hear
        # from a peer that knows it was removed.
        return d.standing is not None and d.standing.state in NOT_MEMBER or \
            bool(self._knowers_of_removal(p))

    def _votes_over(self) -> bool:
        """Is the quorum vote decided on every peer's disk? Until then no voter may lose its
        state (a wipe, or a fresh start): the undecided could only learn the outcome from
        a voter that has it."""
        return all(self.durable[q].vote is None or self.durable[q].vote.decided
                   for q in self.names)

    def _keepers(self, besides: set[str]) -> list[str]:
        """Peers other than `besides` whose disk holds the ring and counts: not void, not
        gone from the cluster. A fault that would leave none is the end of the cluster, not
        one it can survive (wipes, stale restores, removals and leaves all wait for one).
        The spare rings too: a peer that has only space granted to it (entries written again
        under its own stamp) may have none of them, and a cluster that lost every copy of a
        spare ring has no spare space left (no rmpeer reclaims an empty spare ring: that is
        what a cluster made before spare space has), so it can never add a range again."""
        return [q for q in self.names if q not in besides and q not in self.void
                and q not in self.condemned and q not in self.draining
                and self.durable[q].ring and (self.durable[q].standing is None
                                              or self.durable[q].standing.state
                                              not in NOT_MEMBER)
                and {str(u) for u in self.spare} <= {r.universe
                                                     for r in self.durable[q].ring.values()}]

    def _knowers_of_removal(self, p: str) -> list[str]:
        return [q for q in sorted(self.live) if p in self.live[q].removed
                and self.live[q].standing == "member" and q not in self.void]

    def _restart(self, p: str) -> None:
        self.stats.faults["restart"] += 1
        self.views_of_down.pop(p, None)
        self.down_peers.pop(p, None)
        if p in self.void:
            return self._come_back_removed(p)
        # A wipe that would leave no copy of the ring anywhere is the end of the cluster, not a
        # fault it can survive: only wipe while another peer's disk holds the ring.
        # And a voter that forgets its vote may let a second majority form: quorum mode is
        # safe only while at most the configured number of peers vote, so wipes wait until
        # the vote is over everywhere.
        if self.rng.random() < self.faults.wipe and self._keepers({p}) and self._votes_over():
            return self._wiped(p)
        if self.faults.stale and p in self.snapshots and \
                self.rng.random() < self.faults.stale and self._restore_stale(p):
            return
        d = self.durable[p]
        if self.broken == "reuse_seq":  # as if the write counter were never made durable
            d.clock = m.ClockWrite(0, tuple((k, v) for k, v in d.clock.vector if k != p))
        self._load(p)
        self._check_clock(p)

    def _load(self, p: str) -> Peer:
        peer = self.live[p] = self.durable[p].load(self.u, REUSE_DELAY)
        self.standing[p] = peer.standing
        self._update_reachability()
        self._identify(p)
        return self.live.get(p, peer)

    def _identify(self, p: str) -> None:
        """A seed that knows the seeds only by address (a crash before its split was
        committed) learns the id of each one it reaches, as the transport tells it."""
        peer = self.live.get(p)
        if peer is None or peer.boot.pending is None:
            return
        for address, q in sorted(peer.boot.pending.items()):
            seed = address.removeprefix("addr-")
            if q is None and (seed == p or seed in peer.reachable):
                self._handle(p, peer.identified(address, seed, self.now))
                if self.live.get(p) is not peer:
                    return  # crashed on the way

    def _first_contact(self, q: str, p: str) -> None:
        """p hears from q before anything else happens to it: q's hello, through the codec."""
        sender = self.live[q]
        msg = self._wire(sender._gossip_msg(sender.replica.hello()))
        self.stats.messages += 1
        self._handle(p, self.live[p].receive(q, msg, self.now))

    def _restore_stale(self, p: str) -> bool:
        """p comes back from an older copy of its database, which its peers can tell: one of
        them holds a write of p's that the copy lacks. The first peer it hears from is one of
        those, and p must stop at once (standing stale). Its allocations are void from now
        on (I1, I3, I4 leave them out); it is started afresh at the heal, or when it is next
        restarted."""
        snap, cur = self.snapshots[p], self.durable[p]
        if snap.vote != cur.vote or cur.standing is not None and \
                cur.standing.state in NOT_MEMBER:
            return False  # an older vote could vote twice: not a fault quorum mode survives
        # Those it listens to: the copy's promises (an rmpeer of q under way then) and
        # removals make it ignore q, and it would then run on the old copy until it hears
        # another (a window the design leaves open; see the README's stale standing).
        deaf = set(snap.removals)
        knowers = [q for q in sorted(self.live) if q not in self.void and q not in deaf
                   and self.live[q].standing == "member"
                   and self.live[q].replica.vector.get(p, 0) > snap.clock.seq]
        if not knowers or not self._keepers({p}):
            return False
        self.stats.faults["restore_stale"] += 1
        self.lost_disks.add(p)
        self.durable[p] = copy_durable(snap)
        self._void(p)
        self.freed[p] = {r.address: r.freed_at for r in snap.freed.values()}
        self.max_clock[p] = (snap.clock.seq, dict(snap.clock.vector))  # the fault itself
        self._load(p)
        q = self.rng.choice(knowers)
        self._first_contact(q, p)
        peer = self.live.get(p)
        if peer is not None and peer.standing != "stale":
            raise Violation(f"stale seed={self.seed}: {p} restarted from a copy at seq "
                            f"{snap.clock.seq}, heard {q}, which knows its writes up to "
                            f"{self.live[q].replica.vector.get(p, 0)}, and is still "
                            f"{peer.standing}")
        return True

    def _come_back_removed(self, p: str) -> None:
        """A peer whose database no longer counts starts again from it: stale or removed,
        it says so; removed while down, it learns it from the first peer it hears from."""
        peer = self._load(p)
        if peer.standing in NOT_MEMBER:
            return
        knowers = self._knowers_of_removal(p)
        q = self.rng.choice(knowers)
        self._first_contact(q, p)
        peer = self.live.get(p)
        if peer is not None and peer.standing not in ("removed", "left"):
            raise Violation(f"removed seed={self.seed}: {p} came back after {q}'s "
                            f"{self.live[q].removed[p]} removed it, heard {q}, and is still "
                            f"{peer.standing}")
        self.stats.faults["came_back_removed"] += 1

    def _void(self, p: str) -> None:
        """p's database no longer counts: what its clients were told goes with it."""
        self.void.add(p)
        self.condemned.pop(p, None)
        self.draining.pop(p, None)
        self.acked.drop_peer(p)
        self._ranges_lost("void")
        self.carving.lost("void")

    def _ranges_lost(self, why: str) -> None:
        """An acknowledged range add that no database which counts holds any more went with
        the disks that held it (the fault itself, as for an allocation: I11 forgets it)."""
        for c in sorted(self.acked_ranges):
            if not any(c in self.durable[q].universes for q in self.names
                       if q not in self.void):
                del self.acked_ranges[c]
                self.stats.faults[f"range_lost_{why}"] += 1

    def _wiped(self, p: str) -> None:
        """The database is gone: the host comes back as a newcomer with a new id (rule 3)."""
        self.stats.faults["wipe"] += 1
        self.lost_disks.add(p)
        self.gone.append(p)
        self.names.remove(p)
        self.live.pop(p, None)
        for d in (self.standing, self.draining, self.snapshots, self.condemned):
            d.pop(p, None)
        self.void.discard(p)
        self.wipes += 1
        new = f"{p.split('w')[0]}w{self.wipes}"
        self.names.append(new)
        # What its clients were told went with the disk: that loss is the fault itself.
        self.acked.drop_peer(p)
        # It joins as a newcomer (--peer), whatever its first flags were: with --quorum it
        # would be one voter more than the vote was sized for, and newcomers cut off from the
        # decided peers could then form a second majority (README: at most N hosts vote).
        # It learns the cluster's identity from the peer it joins through (a quorum's
        # decided cluster has its own).
        votes = [d.vote.decided for d in self.durable.values() if d.vote and d.vote.decided]
        cluster = decided_cluster(self.cluster, votes[0]) if votes else self.cluster
        self.durable[new] = self.new_durable(new, cluster)
        self._ranges_lost("wipe")
        self.carving.lost("wipe")
        self.max_clock[new] = (0, {})
        self.freed[new] = {}
        self._load(new)

    def _depart(self, p: str) -> None:
        """A peer that left is stopped: its work is done, or the operator stopped waiting for
        its handing_over to empty."""
        self.stats.faults["departed"] += 1
        peer = self.live.get(p)
        if peer is None or peer.removals.handing_over():
            self.unfinished.add(p)  # (a peer down: what it still waited for is unknown)
        # Whoever its leave's writes (its last stamp) gave space to, acknowledged or not.
        d = self.durable[p]
        self.handed_to.setdefault(p, set()).update(
            r.owner for r in d.ring.values()
            if (r.stamp_peer, r.stamp_seq) == (p, d.clock.seq) and r.owner != p)
        self.names.remove(p)
        self.live.pop(p, None)
        self.standing.pop(p, None)
        self.departed.append(p)
        self.acked.drop_peer(p)
        if "left_peer_silent" in self.known_bugs:  # its add, not gossiped before it left
            self._ranges_lost("known_bug_left_peer_silent")
            self.carving.lost("known_bug_left_peer_silent")

    def _check_clock(self, p: str) -> None:
        peer = self.live.get(p)
        if peer is None:
            return
        seq, vector = peer.replica.seq, peer.replica.vector
        old_seq, old_vector = self.max_clock[p]
        if seq < old_seq or any(vector.get(k, 0) < v for k, v in old_vector.items()):
            raise Violation(f"I7 seed={self.seed}: {p} went back from seq {old_seq} to {seq}")
        self.max_clock[p] = (seq, dict(vector))

    # -- clients -------------------------------------------------------------------------------

    def _client_op(self) -> None:
        p = self.rng.choice(sorted(self.live))
        peer = self.live[p]
        if self.patience[p] >= PATIENCE and peer.standing in NOT_MEMBER and (
                peer.standing == "left" and (not peer.removals.handing_over()
                                             or self.patience[p] >= 4 * PATIENCE)
                or peer.standing != "left" and self._votes_over()):
            # The operator has noticed: a peer that left is stopped, a stale or removed one
            # starts afresh (a new id).
            self.stats.ops += 1
            return self._depart(p) if peer.standing == "left" else self._wiped(p)
        void = p in self.void
        # A void peer's clients are forgotten, but it still holds addresses a sweeper or a DEL
        # may free: those are what is released there.
        mine = sorted(peer.allocator.by_handle) if void else \
            [h for (q, h) in self.acked if q == p]
        r = self.rng.random()
        self.stats.ops += 1
        if self.faults.stale and self.rng.random() < 0.03:
            self._snapshot()
        if self.faults.leave and self.rng.random() < self.faults.leave and self._start_leave():
            return
        dead = [g for g in self.gone if g in peer.members()]
        if dead and self.rng.random() < self.faults.rmpeer:
            k = self.rng.randint(1, len(dead))
            req = m.RemovePeer(tuple(self.rng.sample(dead, k)))
            if not self._may_run_rmpeer(peer):
                return
            return self._submit(p, req, self.stats.ops)
        if self.faults.condemn and self.rng.random() < self.faults.condemn and \
                self._condemn(p):
            return
        if p in self.draining:
            return self._submit(p, m.ReleaseUnlisted("", frozenset()))  # keep it empty
        if self.variety and self.rng.random() < RANGE_SHARE:
            return self._submit(p, self._range_request())
        if self.carving.on and self.rng.random() < CARVE_SHARE:
            return self._submit(*self.carving.request(p))
        release = 0.35 if self.fill is None else 0.0
        member = peer.standing == "member"
        # Peers in other standings get more of the entrances' requests (each must be refused
        # or pass as its kind does).
        entrance = self.rng.random() < (0.5 if self.variety and not member
                                        else self.entrance_share)
        if mine and (r < release if self.fill is None else
                     len(self.acked) >= self.fill * self.u.size):
            handle = self.rng.choice(sorted(mine)).split("/")[0]
            req = m.Release(handle)
            if entrance:
                req = self._entrance_release(p, handle, mine)
            elif self.variety and self.rng.random() < 0.2:
                held = sorted((h.family, h.address) for h in
                              peer.allocator.by_handle.get(handle, {}).values())
                if len(held) > 1:  # one of a dual-stack (or multi-set) handle's addresses
                    req = m.Release(handle, self.rng.choice(held))
        elif self.variety and not member and self.rng.random() < 0.3:
            # Releases pass in every standing, even of what the peer does not hold.
            self.handles += 1
            req = self.rng.choice([m.Release(f"h{self.handles}"),
                                   m.ReleaseUnlisted("h", frozenset()),
                                   m.ReleaseIf(f"h{self.handles}", ((self.u.family,
                                                                    self.u.start, 1.0),))])
        elif entrance:
            req = self._entrance_take()
        elif r < release + self.claim_share:
            self.handles += 1
            handle = f"h{self.handles}"
            u = self._pick_universe()
            req = m.Claim(handle, u.family, self._claim_address(u))
        else:
            self.handles += 1
            handle = f"h{self.handles}"
            u = self._pick_universe()
            req = m.Allocate(handle) if u == self.u else m.Allocate(handle, u)
        self._submit(p, req, self.stats.ops)

    def _submit(self, p: str, req, ref=None) -> None:
        """One client request to p, through the gate checks."""
        if ref is None:
            self.requests += 1
            ref = ("req", self.requests)
        peer = self.live[p]
        standing = peer.standing
        self.pending[ref] = (p, req)
        # From the moment a release is sent it may take effect: stop counting its addresses.
        for key in self._releasing(p, req):
            self.acked.pop(key, None)
        ready = peer.request(ref, req, self.now)
        if isinstance(req, m.CanServe) and ready.rows:
            raise Violation(f"gate seed={self.seed}: CanServe on {p} wrote {ready.rows[:3]}")
        if standing != "member":
            self._check_gate(p, standing, req, ref, ready)
        self._handle(p, ready)

    def _check_gate(self, p: str, standing: str, req, ref, ready: Ready) -> None:
        """A peer that is not a member refuses every take at once, naming its standing, and
        lets every release pass."""
        reply = next((r for x, r in ready.replies if x == ref), None)
        kind = type(req).__name__
        self.stats.gate[f"{standing} {kind}"] += 1
        self.patience[p] += 1
        if isinstance(req, TAKES):
            if reply is None or reply["ok"] or reply["error"]["code"] != standing or \
                    any(isinstance(r, (m.PutAllocation, m.RingWrite)) for r in ready.rows):
                raise Violation(f"gate seed={self.seed}: {kind} on {p}, {standing}, answered "
                                f"{reply} and wrote {ready.rows[:3]} (the refusal must name "
                                f"the standing)")
        elif isinstance(req, m.Release) and req.address is None and \
                req.handle in self.live[p].allocator.lease_blocks:
            # Its addresses are released, but giving its blocks back moves space: refused.
            if reply is None or reply["ok"] or reply["error"]["code"] != standing or \
                    any(isinstance(r, m.RingWrite) for r in ready.rows):
                raise Violation(f"gate seed={self.seed}: {kind} of leased blocks on {p}, "
                                f"{standing}, answered {reply} and wrote {ready.rows[:3]}")
        elif isinstance(req, RELEASES):
            held = isinstance(req, m.Release) and req.address is None and \
                req.handle in self.live[p].allocator.by_handle
            if reply is None or not reply["ok"] or held and not reply["released"]:
                raise Violation(f"gate seed={self.seed}: {kind} on {p}, {standing}, answered "
                                f"{reply}: releases pass in every standing")

    def _range_request(self):
        """The operator's `ipamd range add|retire|unretire` on a random peer (in any
        standing, partitioned or not): mostly an add from the seed's overlapping candidates,
        else a retire or resume, mostly of a range some peer has."""
        if self.rng.random() < 0.3:
            pool = sorted(self.added) if self.added and self.rng.random() < 0.8 else \
                self.range_pool
            return m.RetireRange(self.rng.choice(pool), self.rng.random() < 0.5)
        return m.AddRange(self.rng.choice(self.range_pool))

    def _pick_universe(self) -> Cidr:
        if self.added and self.rng.random() < ADDED_SHARE:
            return self.rng.choice(sorted(self.added))
        return self.u if len(self.universes) == 1 else self.rng.choice(self.universes)

    def _claim_address(self, s: Cidr) -> int:
        """An address of subnet s to claim: anywhere in a small one; in a huge one mostly
        next to an address some client holds (else a claim would never meet anyone), or at
        the very top."""
        lo, hi = s.host_bounds()
        n = hi - lo
        if s.family == 4 or n <= 4096:
            return lo + self.rng.randrange(n)
        x = self.rng.random()
        if x < 0.5 and self.acked:
            fam, v = parse_addr(self.rng.choice(list(self.acked.values())))
            if fam == s.family and lo <= v < hi:
                return min(hi - 1, max(lo, v + self.rng.randint(-8, 8)))
        if x < 0.65:
            return hi - 1 - self.rng.randrange(16)
        return lo + self.rng.randrange(n)

    # What the entrances send (DESIGN rule 9): CNI ADD as one TakeSets (a range set per family,
    # or per part of the one range, with alternatives, a gateway, windows, requested
    # addresses), CNI STATUS, GC with a valid list, the sweeper's ReleaseIf.

    def _entrance_take(self):
        self.handles += 1
        handle = f"h{self.handles}"
        if len(self.universes) > 1:
            # Dual stack: one set per family, each with its range's halves as alternatives.
            sets = [split(u, 2) for u in self.universes]
            if self.rng.random() < 0.5:
                sets = [s[::-1] for s in sets]
        elif self.variety and self.rng.random() < 0.5 and len(split(self.u, 4)) == 4:
            q = split(self.u, 4)  # two sets, each of two ranges
            sets = [q[:2], q[2:]]
        else:
            sets = [(s,) for s in split(self.u, 2)]
        if self.rng.random() < 0.2:
            return m.CanServe(tuple(tuple((s, *host_range(s)) for s in alts) for alts in sets))
        return m.TakeSets(handle, tuple(
            tuple(self._take_alternative(handle, s, i == j == 0) for j, s in enumerate(alts))
            for i, alts in enumerate(sets)))

    def _take_alternative(self, handle: str, s: Cidr, gateway: bool):
        first, last = host_range(s)
        gw = first if gateway and last - first >= 3 else None
        if not self.variety:
            return m.Allocate(handle, s, None, None, gw)
        x = self.rng.random()
        if x < 0.1:
            return m.Claim(handle, s.family, self._claim_address(s), s)  # runtimeConfig.ips
        window = None
        if x < 0.25 and last > first:  # rangeStart-rangeEnd
            a = first + self.rng.randrange(last - first + 1)
            window = (a, min(last, a + self.rng.randrange(64)))
        return m.Allocate(handle, s, None, window, gw)

    def _entrance_release(self, p: str, handle: str, mine: list[str]):
        if self.rng.random() < 0.5:
            # The sweeper: what it judged dead, sometimes judged on an older allocation (a
            # wrong time), which must then be left alone.
            held = self.live[p].allocator.by_handle.get(handle, {}).values()
            stale = self.rng.random() < 0.3
            return m.ReleaseIf(handle, tuple((h.family, h.address,
                                              h.allocated_at - (1.0 if stale else 0.0))
                                             for h in held))
        # GC: keep some of p's handles that share a prefix, release the rest.
        prefix = handle[:2]
        mine = sorted({h.split("/")[0] for h in mine})
        keep = frozenset(h for h in mine if h.startswith(prefix) and self.rng.random() < 0.5
                         and h != handle)
        return m.ReleaseUnlisted(prefix, keep)

    def _releasing(self, p: str, req) -> list[tuple[str, str]]:
        """The acknowledged (peer, key) pairs a release request may free."""
        if isinstance(req, m.Release):
            if req.address is not None:
                text = format_addr(*req.address)
                return [k for k, v in self.acked.items() if k[0] == p and v == text]
            handles = {req.handle}
        elif isinstance(req, m.ReleaseUnlisted):
            handles = {h.split("/")[0] for (q, h) in self.acked if q == p
                       and h.startswith(req.prefix) and h.split("/")[0] not in req.keep}
        elif isinstance(req, m.TenantDelete) and req.force:
            return self.carving.releasing(p, req)
        elif isinstance(req, m.ReleaseIf):
            held = self.live[p].allocator.by_addr
            dead = {format_addr(f, a) for f, a, t in req.allocations
                    if (f, a) in held and held[(f, a)].allocated_at == t}
            return [k for k, v in self.acked.items() if k[0] == p and v in dead]
        else:
            return []
        return [k for k in self.acked if k[0] == p and k[1].split("/")[0] in handles]

    def _client_reply(self, p: str, ref, reply: dict) -> None:
        got = self.pending.pop(ref, None)
        if got is None:
            return
        _, req = got
        self.last_reply = reply
        if isinstance(req, m.RemovePeer):
            for t in req.targets:
                if self.condemned.get(t) == ref:
                    if reply["ok"]:
                        self._void(t)  # removed while down: it must learn so when it is back
                    else:
                        del self.condemned[t]
        if isinstance(req, m.Leave):
            self._left(p, reply)
        if self.carving.on:
            self.carving.reply(p, req, reply)
        if not reply["ok"]:
            self.stats.refused[reply["error"]["code"]] += 1
            if isinstance(req, (m.AddRange, m.RetireRange)):
                self.stats.ranges[f"{type(req).__name__} {reply['error']['code']}"] += 1
            return
        if isinstance(req, m.RemovePeer):
            self.stats.removals += 1
            return
        self.stats.acked += 1
        if isinstance(req, m.AddRange):
            self.stats.ranges["already" if reply.get("already") else "added"] += 1
            if not reply.get("already"):
                self.acked_ranges[req.cidr] = p
        elif isinstance(req, m.RetireRange):
            self.stats.ranges["retired" if req.retired else "resumed"] += 1
        if isinstance(req, (m.Allocate, m.Claim, m.TakeSets, m.LeaseName, m.ClaimName)):
            got = reply["addresses"] if isinstance(req, m.TakeSets) else [reply["address"]]
            for i, text in enumerate(got):
                address = text.split("/")[0]
                key = req.handle if i == 0 else f"{req.handle}/{i}"
                for q, h in self.acked.holders(address) - {(p, key)}:
                    raise Violation(f"I1 seed={self.seed}: {address} acknowledged to {p}/"
                                    f"{key} while {q}/{h} holds it")
                self.acked[(p, key)] = address
        if isinstance(req, m.ReleaseIf) and any(
                (f, a) in self.live[p].allocator.by_addr for f, a, _ in req.allocations
                if format_addr(f, a) in reply["released"]):
            raise Violation(f"gate seed={self.seed}: {p} still holds what ReleaseIf released")

    # -- standings -----------------------------------------------------------------------------

    def _snapshot(self) -> None:
        """An operator's copy of some member's database (the older one is kept half the
        time): what a stale restart comes back from."""
        members = [q for q in sorted(self.live) if self.live[q].standing == "member"
                   and q not in self.void]
        if members:
            q = self.rng.choice(members)
            if q not in self.snapshots or self.rng.random() < 0.5:
                self.snapshots[q] = copy_durable(self.durable[q])

    def _start_leave(self) -> bool:
        """The operator empties a member (GC of every handle), waits out the quarantine of
        what it freed, then asks it to leave. At least two members stay."""
        members = [q for q in sorted(self.live) if self.live[q].standing == "member"
                   and q not in self.draining and q not in self.void]
        if len(members) < 3:
            return False
        p = self.rng.choice(members)
        if not self._keepers({p}):
            return False
        self.draining[p] = self.now + REUSE_DELAY + 0.5
        self.stats.faults["leave_started"] += 1
        self._submit(p, m.ReleaseUnlisted("", frozenset()))
        return True

    def _leave_due(self) -> None:
        for p, when in sorted(self.draining.items()):
            if self.now >= when and p in self.live:
                del self.draining[p]
                if self.live[p].standing == "member" and self._keepers({p}):
                    self.leave_answers[p] = "nothing (in doubt)"
                    self._submit(p, m.Leave())

    def _left(self, p: str, reply: dict) -> None:
        """The answer to a leave: done (or handed over without every acknowledgement), or
        refused for now (still holds or quarantines addresses: drained again; nobody to hand
        over to). Three tries."""
        self.leave_answers[p] = "ok" if reply["ok"] else reply["error"]["code"]
        if reply["ok"]:
            self.handed_to[p] = set(reply["handed"])
        peer = self.live.get(p)
        if peer is not None and peer.standing == "left":
            self.stats.faults["left"] += 1
        elif not reply["ok"] and reply["error"]["code"] in ("busy", "unreachable") and \
                peer is not None and peer.standing == "member" and self.leave_tries[p] < 3:
            self.leave_tries[p] += 1
            self.draining[p] = self.now + REUSE_DELAY + 0.5

    def _may_run_rmpeer(self, peer: Peer) -> bool:
        """Not on a peer whose rings leave some space uncovered (rmpeer_claims_unknown_space)."""
        if "rmpeer_claims_unknown_space" not in self.known_bugs:
            return True
        for u, ring in peer.replica.rings.items():
            at = u.start
            for _, lo, hi in ring.spans():
                if lo != at:
                    return False
                at = hi
            if at != u.end:
                return False
        return True

    def _condemn(self, p: str) -> bool:
        """rmpeer, run on p, of a peer that is only down: the operator took it for dead. It
        is not started while the removal runs; once removed, its database is void and it
        must learn it is removed from the first peer it hears."""
        members = p not in self.void and self._may_run_rmpeer(self.live[p]) and \
            self.live[p].members()
        down = [q for q in self.names if q not in self.live and q not in self.void
                and q not in self.condemned and members and q in members
                and (self.durable[q].vote is None or self.durable[q].vote.decided)
                and (self.durable[q].standing is None
                     or self.durable[q].standing.state == "member")]
        if not down:
            return False
        q = self.rng.choice(down)
        if not self._keepers({q}):
            return False
        self.stats.faults["rmpeer_of_a_down_peer"] += 1
        req = m.RemovePeer((q,))
        self.condemned[q] = self.stats.ops
        self._submit(p, req, self.stats.ops)
        return True

    # -- invariants ----------------------------------------------------------------------------

    def owned_views(self) -> dict[str, dict[Cidr, list[tuple[int, int]]]]:
        """What each peer believes it owns: live ones from memory, crashed ones from disk.
        Void peers (stale, removed) are left out: their copy no longer counts."""
        views = {}
        for p in self.names:
            if p in self.void:
                continue
            peer = self.live.get(p)
            if peer is not None:
                views[p] = {u: r.owned_by(p) for u, r in peer.replica.rings.items()}
            else:  # a crashed peer's disk does not change until it restarts
                if p not in self.views_of_down:
                    down = self._down_peer(p)
                    self.views_of_down[p] = {u: r.owned_by(p)
                                             for u, r in down.replica.rings.items()}
                views[p] = self.views_of_down[p]
        return views

    def _down_peer(self, p: str) -> Peer:
        """A crashed peer as its disk would load it (which does not change until it
        restarts)."""
        if p not in self.down_peers:
            self.down_peers[p] = self.durable[p].load(self.u, REUSE_DELAY)
        return self.down_peers[p]

    def check(self) -> None:
        views = self.owned_views()
        # Every universe: the ranges, those added online, and spare space (whose carved
        # spans are owned by a marker, never a peer).
        for u in sorted({u for v in views.values() for u in v}):
            spans = sorted((lo, hi, p) for p, v in views.items() for lo, hi in v.get(u, ()))
            for (alo, ahi, a), (blo, bhi, b) in zip(spans, spans[1:]):
                if blo < ahi:
                    raise Violation(f"I3 seed={self.seed}: {a} and {b} both own "
                                    f"{format_addr(u.family, blo)}")
        holders: dict[str, str] = {}
        for p in self.names:
            if p in self.void:
                continue
            d = self.durable[p]
            for address, row in d.allocations.items():
                if address in holders:
                    raise Violation(f"I1 seed={self.seed}: {address} held by {holders[address]} "
                                    f"and {p}/{row.handle}")
                holders[address] = f"{p}/{row.handle}"
            peer = self.live.get(p)
            if peer is not None:
                for h in peer.allocator.by_addr.values():
                    if not any(lo <= h.address < hi for lo, hi in views[p].get(h.universe, ())):
                        raise Violation(f"I4 seed={self.seed}: {p} holds {h.text} outside "
                                        "its space")
        self._check_universes()
        if self.carving.on:
            self.carving.check()
        if self.stats.ops % 50 == 0:
            self._check_counts()
        for (p, handle), address in self.acked.items():
            row = self.durable[p].allocations.get(address)
            if row is None or row.handle != handle.split("/")[0]:
                raise Violation(f"I2 seed={self.seed}: acknowledged {p}/{handle} -> {address} "
                                "is not in its database")

    def _check_universes(self) -> None:
        """I10: no address in two universes. The universes carved from spare space (ranges,
        static, block space, tenants' keys, name pools) every peer knows (a crashed one: those
        on its disk) are, any two of them, equal or disjoint, and each is of one kind
        everywhere; each carve marker in a live peer's spare and block space rings lies in the
        universe it names, which that peer knows, of the marker's kind. What is carved from
        block space (blocks, leased blocks) nests in it: carves.Carving.check_view (I13)."""
        kinds: dict[Cidr, tuple[str, str]] = {}  # universe -> (kind, a peer that knows it)
        for p in self.names:
            peer = self.live.get(p)
            if peer is not None:
                self._check_markers(p, peer)
            elif p in self.void:
                continue
            else:
                peer = self._down_peer(p)
            a = peer.allocator
            known = [(u, k) for u in a.universes()
                     if (k := a.kind(u)) not in ("block", "lease", "dissolved")]
            for u, kind in known:
                seen = kinds.setdefault(u, (kind, p))
                if seen[0] != kind:
                    raise Violation(f"I10 seed={self.seed}: {u} is {seen[0]} on {seen[1]} and "
                                    f"{kind} on {p}")
        reach: dict[int, Cidr] = {}  # family -> the universe reaching furthest so far
        for u in sorted(kinds):  # by family, then start (the wider first)
            v = reach.get(u.family)
            if v is not None and u.start < v.end:
                raise Violation(f"I10 seed={self.seed}: universes {v} (known to {kinds[v][1]}) "
                                f"and {u} (known to {kinds[u][1]}) overlap: addresses in two "
                                "universes")
            if v is None or u.end > v.end:
                reach[u.family] = u

    def _check_markers(self, p: str, peer: Peer) -> None:
        a = peer.allocator
        for sp in [*SPARE, *(u for u in a.universes() if a.kind(u) == "blocks")]:
            ring = peer.replica.rings.get(sp)
            if ring is None or self.marks_checked.get((p, sp)) == (id(ring), ring.writes):
                continue  # unchanged since checked
            self.marks_checked[(p, sp)] = (id(ring), ring.writes)
            for e, lo, hi in ring.spans():
                if not is_marker(e.owner):
                    continue
                carve = parse_marker(e.owner)
                c, kind = carve.universe, carve.kind
                if c not in peer.allocator.rings or not c.start <= lo < hi <= c.end or \
                        kind != peer.allocator.kind(c):
                    raise Violation(f"I10 seed={self.seed}: {p}'s ring of {sp} carves "
                                    f"{sp.addr(lo)}-{format_addr(sp.family, hi - 1)} as "
                                    f"{e.owner!r}, which is not a {kind} universe of its own "
                                    "holding that span")

    def _check_counts(self) -> None:
        """Counted free space against a scan of the allocator's own tables (what is held,
        quarantined, reserved), over each whole range and over a random window of it: never
        an enumeration of the range."""
        for p, peer in sorted(self.live.items()):
            a = peer.allocator
            for u in a.universes():
                ring = a.rings[u]
                lo, hi = u.start, u.end
                if self.variety and self.rng.random() < 0.5:
                    lo = u.start + self.rng.randrange(u.size)
                    hi = lo + 1 + self.rng.randrange(u.end - lo)
                owned = sum(max(0, min(h, hi) - max(l, lo)) for l, h in ring.owned_by(p))
                blocked = {x.address for x in a.by_addr.values() if x.universe == u}
                blocked |= {x for x, t in a.freed[u].items() if t + a.reuse_delay > self.now}
                blocked |= {x for f, x in a.reserved if f == u.family}
                blocked |= set(a._never(u))  # a block's network, gateway and broadcast
                blocked = {x for x in blocked if lo <= x < hi and ring.owner_of(x) == p}
                counted = a.free_count(u, lo, hi, self.now)
                if counted != owned - len(blocked):
                    raise Violation(f"count seed={self.seed}: {p}'s counted free space in "
                                    f"[{u.addr(lo)}, {format_addr(u.family, hi - 1)}] of {u} "
                                    f"is {counted}, a scan says {owned - len(blocked)}")

    # -- running -------------------------------------------------------------------------------

    def step(self) -> None:
        if self.draining:
            self._leave_due()
        r = self.rng.random()
        down = [p for p in self.names if p not in self.live and self._restartable(p)]
        if r < self.faults.partition:
            self._reshape()
        elif down and r < 0.05:
            self._restart(self.rng.choice(down))
        elif r < 0.35 and self.live:
            self._client_op()
        elif r < 0.75 and (self.queue or self.due):
            while self.queue and self.queue[0][0] <= self.now:
                self.due.append(heapq.heappop(self.queue))
            if not self.due:
                self.now = self.queue[0][0]
                return
            # Everything due, in any order: one message a step would let a big cluster's
            # traffic pile up undelivered, and the run would test little but the final heal.
            batch, self.due = self.due, []
            self.rng.shuffle(batch)
            for _, _, src, dst, msg in batch:
                if dst in self.live and (src, dst) not in self.blocked:
                    self._handle(dst, self.live[dst].receive(src, msg, self.now))
        else:
            self.now += TICK * self.rng.random()
            for p in sorted(self.live):
                if p in self.live:
                    self._identify(p)
                if p in self.live:
                    self._handle(p, self.live[p].tick(self.now))

    def _drain(self) -> None:
        """Deliver everything in flight (the network is whole again)."""
        self.queue += self.due
        self.due = []
        heapq.heapify(self.queue)
        while self.queue:
            _, _, src, dst, msg = heapq.heappop(self.queue)
            if dst in self.live:
                self._handle(dst, self.live[dst].receive(src, msg, self.now))

    def _retire(self) -> None:
        """The operator's part before the heal: peers that left with nothing to hand over
        any more are stopped (the others once the rest are back: _linger); stale and removed
        ones (and those an rmpeer under way names) start afresh with an empty database, under
        a new id."""
        self.draining.clear()
        for p in list(self.condemned):
            self._void(p)
        for p in list(self.names):
            peer = self.live.get(p)
            d = self.durable[p]
            standing = peer.standing if peer is not None else \
                d.standing.state if d.standing is not None else "member"
            if standing == "left":
                if peer is not None and not peer.removals.handing_over():
                    self._depart(p)
            elif p in self.void or standing in NOT_MEMBER:
                self._wiped(p)

    def _linger(self) -> None:
        """At the heal, with every other peer back: peers that left and still wait for a
        Handover's acknowledgement (sent again every second) get a few seconds, as an operator
        watching `status` would give them, then are stopped."""
        left = [p for p in self.names if p in self.live and self.live[p].standing == "left"]
        if left:
            self._rounds(50, lambda: not any(self.live[p].removals.handing_over()
                                             for p in left if p in self.live))
            for p in left:
                self._depart(p)
            self._update_reachability()

    def heal(self, max_rounds: int = 400) -> None:
        self.faults = Faults()
        self.blocked = set()
        if not self._votes_over():  # before any voter starts afresh
            for p in [p for p in self.names if p not in self.live and self._restartable(p)]:
                self._restart(p)
            self._update_reachability()
            self._rounds(100, self._votes_over)
        self._retire()
        for p in [p for p in self.names if p not in self.live]:
            self._restart(p)
        self._update_reachability()
        self._linger()
        if self.departed:
            # Whatever a peer that left handed over has reached its new owners once what is
            # in flight is delivered: none of it may still be the leaver's (I5, checked before
            # any rmpeer could hide it).
            self._rounds(5)
            self._check_left()
        self._remove_gone()
        self.stats.rounds_to_converge = self._converge(max_rounds)
        if any(peer.standing != "member" for peer in self.live.values()):
            self._rounds(30, lambda: all(q.standing == "member" for q in self.live.values()))
            self._check_members()
        self._check_added()
        if self.carving.on:
            self.carving.check_after_heal()
        first = self.live[self.names[0]].replica
        ring = first.rings[self.u]
        self.stats.ring_entries, self.stats.segments = len(ring.entries), ring.segments()
        for u, ring in first.rings.items():
            # Space carved out of a universe (spare space for ranges, a tenant's block, a name
            # pool) is its marker's, and the carve's own ring is checked in its turn; the rest
            # needs a live owner like any space: the next range or block there asks it.
            covered = [s for p in self.names for s in ring.owned_by(p)]
            covered += [(lo, hi) for e, lo, hi in ring.spans() if is_marker(e.owner)]
            covered.sort()
            if not covered or covered[0][0] != u.start or covered[-1][1] != u.end or \
                    any(a[1] != b[0] for a, b in zip(covered, covered[1:])):
                owners = sorted({e.owner for e, _, _ in ring.spans()} - set(self.names)
                                - {e.owner for e in ring.entries if is_marker(e.owner)})
                holes = self._holes(ring)
                raise Violation(f"I5 seed={self.seed}: some space of {u} has no live owner"
                                f" (owners: {', '.join(owners)}; no entry for "
                                + ", ".join(f"{u.addr(lo)}-{format_addr(u.family, hi - 1)}"
                                            for lo, hi in holes) + ")")

    @staticmethod
    def _holes(ring: Ring) -> list[tuple[int, int]]:
        """The parts of the universe no entry of the ring covers."""
        holes, at = [], ring.universe.start
        for _, lo, hi in ring.spans() + [(None, ring.universe.end, ring.universe.end)]:
            if lo > at:
                holes.append((at, lo))
            at = max(at, hi)
        return holes

    def _check_members(self) -> None:
        """After the heal every live peer is a member."""
        for p, peer in sorted(self.live.items()):
            if peer.standing != "member":
                raise Violation(f"liveness seed={self.seed}: {p} is still {peer.standing} "
                                f"after the heal: {peer.note}")

    def _converge(self, max_rounds: int) -> int:
        """Rounds of ticks and deliveries until every ring is the same everywhere (I6)."""
        for rounds in range(1, max_rounds + 1):
            self.now += TICK
            for p in sorted(self.live):
                self._handle(p, self.live[p].tick(self.now))
            self._drain()
            rings = {p: {u: r.entries for u, r in peer.replica.rings.items()}
                     for p, peer in self.live.items()}
            if all(r == rings[self.names[0]] for r in rings.values()) and all(
                    not peer.waiting for peer in self.live.values()):
                return rounds
        raise Violation(f"I6 seed={self.seed}: rings still differ after {max_rounds} rounds")

    def _check_left(self) -> None:
        """I5 for peers that left: in the newest of what every live peer knows (what their
        rings converge to), none of their space is theirs. (Converging before the rmpeers of
        the dead is not always possible: writes only grants carried wait for them.)"""
        rings = {u: self._merged_ring(u) for u in sorted({u for q in self.live.values()
                                                          for u in q.replica.rings})}
        for p in self.departed:
            answer = self.leave_answers.get(p, "nothing")
            # Known bugs: its own writes, its Handover unacknowledged or lost with the disk of
            # its receiver; space another peer handed or granted to it after it left (it
            # ignores both). The operator's rmpeer of it reclaims those (_remove_gone).
            spread = max((q.replica.vector.get(p, 0) for q in self.live.values()), default=0)
            silent = "left_peer_silent" in self.known_bugs and (
                p in self.unfinished or self.handed_to.get(p, set()) & self.lost_disks
                or spread < self.durable[p].clock.seq)  # writes of its nobody else has
            given = "given_to_non_member" in self.known_bugs
            for u, ring in rings.items():
                kept = [(e, lo, hi) for e, lo, hi in ring.spans() if e.owner == p
                        and not (e.stamp[0] == p and silent) and not (e.stamp[0] != p and given)]
                if not kept and ring.owned_by(p):
                    self.stats.faults["known_bug_space_left_with_a_left_peer"] += 1
                if kept:
                    e, lo, hi = kept[0]
                    raise Violation(
                        f"I5 seed={self.seed}: {p} left (its leave answered {answer}), yet "
                        f"in the newest ring entries {len(kept)} part(s) of {u} are still "
                        f"its own: "
                        f"{u.addr(lo)}-{format_addr(u.family, hi - 1)} first, written by "
                        f"{e.stamp[0]} at its seq {e.stamp[1]}")

    def _merged_ring(self, u: Cidr) -> Ring:
        newest: dict[int, Entry] = {}
        for peer in self.live.values():
            for e in peer.replica.rings[u].entries if u in peer.replica.rings else ():
                if e.start not in newest or e.version > newest[e.start].version:
                    newest[e.start] = e
        return Ring(u, list(newest.values()))

    def _rounds(self, n: int, until=lambda: False) -> None:
        for _ in range(n):
            if until():
                return
            self.now += TICK
            for q in sorted(self.live):
                if q in self.live:
                    self._handle(q, self.live[q].tick(self.now))
            self._drain()

    def _remove_gone(self) -> None:
        """What an operator does after the heal: rmpeer the hosts whose disks were lost, until
        it succeeds. --force only where the dead are half or more of the membership."""
        for attempt in range(20):
            self._rounds(5)
            runner = sorted(self.live)[attempt % len(self.live)]
            peer = self.live[runner]
            # The operator names every dead host any live one knows (errors name them).
            known = set().union(*(q.members() | {e.owner for r in q.replica.rings.values()
                                                 for e in r.entries if not is_marker(e.owner)}
                                  for q in self.live.values()))
            # And hosts that left and were stopped, where some peer still counts them (a
            # leave with nothing to hand over tells nobody): the errors name them too.
            dead = tuple(g for g in self.gone + self.departed if g in known)
            if not dead:
                return  # removed, or never known to anyone (then it owns nothing)
            everyone = peer.members() | set(dead)
            force = (len(everyone) - len(dead)) * 2 <= len(everyone)
            ref = ("rmpeer", attempt)
            self.pending[ref] = (runner, m.RemovePeer(dead, force))
            self._handle(runner, peer.request(ref, m.RemovePeer(dead, force), self.now))
            self._rounds(50, lambda: ref not in self.pending)
        raise Violation(f"I5 seed={self.seed}: rmpeer of {', '.join(self.gone)} never succeeded "
                        "after the heal")

    def _check_added(self) -> None:
        """I11: every range whose add was acknowledged (and not lost with the disks that held
        it) is a range of every live member after the heal."""
        for c, adder in sorted(self.acked_ranges.items()):
            for p, peer in sorted(self.live.items()):
                if c not in peer.allocator.universes() or c in peer.allocator.static:
                    raise Violation(f"I11 seed={self.seed}: the add of range {c} on {adder} was "
                                    f"acknowledged, yet after the heal {p} has no such range")

    def liveness(self) -> None:
        """After healing, an allocation on any peer succeeds while the cluster has free space,
        in each range, those added online too (I11); in a retired one it is refused, naming
        that."""
        self.now += 60  # past every quarantine
        first = self.live[self.names[0]].allocator
        added = {u for u in first.universes() if first.kind(u) == "range"}
        for u in [*self.universes, *sorted(added - set(self.universes))]:
            if u in first.retired:
                answer = self._allocate_now(self.names[0], u)
                if answer is None or answer["ok"] or answer["error"]["code"] != "retired":
                    raise Violation(f"liveness seed={self.seed}: allocate in retired range {u} "
                                    f"answered {answer}")
                continue
            free = sum(peer.allocator.free_count(u, *u.host_bounds(), self.now)
                       for peer in self.live.values())
            for p in sorted(self.live):
                if free < 4 * len(self.live):
                    break
                answer = self._allocate_now(p, u)
                if answer is None or not answer["ok"]:
                    raise Violation(f"liveness seed={self.seed}: allocate in {u} on {p} failed "
                                    f"with {free} addresses free in the cluster: "
                                    f"{answer or 'no answer'}")
                free -= 1

    def _allocate_now(self, p: str, u: Cidr) -> dict | None:
        """An allocate in u on p, given 50 rounds to be answered: its answer, or None."""
        self.handles += 1
        ref = ("live", self.handles)
        req = m.Allocate(f"h{self.handles}") if u == self.u else \
            m.Allocate(f"h{self.handles}", u)
        self.pending[ref] = (p, req)
        self._handle(p, self.live[p].request(ref, req, self.now))
        for _ in range(50):
            if ref not in self.pending:
                break
            self.now += TICK
            for q in sorted(self.live):
                self._handle(q, self.live[q].tick(self.now))
            self._drain()
        return None if ref in self.pending else self.last_reply

    def run(self, ops: int) -> Stats:
        while self.stats.ops < ops:
            self.step()
            self.check()
        self.heal()
        self.check()
        self.liveness()
        self.check()
        return self.stats
