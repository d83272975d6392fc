"""One peer of the cluster: its allocator, its view of the rings, and what it says to others.

Pure: fed request(ref, req, now), receive(sender, message, now), tick(now) and reachability,
it returns a Ready of rows to persist, then messages to send and replies to give. The shell
commits the rows first; nothing leaves before that (DESIGN.md section 2, rules 1 and 2).

Space on demand: an allocate that finds no local free space asks the reachable peer whose ring
entries hint at the most free space in that subnet; the donor gives at most half its free space
there, as one block chosen to fragment the ring least (donation.py), commits the transfer, then
grants. A claim of an address owned elsewhere asks its owner for a free block holding it.
Requests wait at most `request_timeout`, then fail with an error naming whom they asked.

Its rings are held by one Rings object that the allocator and the replica read, and change only
through its RingWriter (rings.py). Bootstrap (bootstrap.py) and leave and rmpeer (removal.py)
are collaborators holding their own state: Peer feeds them and applies what they decide.
"""
from __future__ import annotations

import hashlib
from bisect import bisect_left
from dataclasses import dataclass, field
from itertools import islice

from . import messages as m
from .addr import Cidr, format_addr
from .allocator import Allocator
from .bootstrap import Bootstrap, adopt_split
from .donation import returnable
from .gossip import Delta, Replica, Vector
from .peer_messages import (Accept, Accepted, Decided, GatewayRelease, GatewayReleased, Gossip, Handover,
                   HandoverAck, Message, Prepare, Promise, Refuse, RemoveAbort, RemoveAck,
                   RemoveDone, RemoveNack, RemovePrepare, SpaceDenied, SpaceGrant, SpaceRequest,
                   VoteNack)
from .removal import Removals
from .ring import HINT_MAX, Ring, RingConflict, RingError
from .rings import Rings, RingWriter
from . import leases
from .spare import (DISSOLVED, REGISTRY, STATES, is_marker, is_spare, key_of, marker,
                    parse_marker)

FANOUT = 3    # peers each piece of news is pushed to
# Partners whose vectors a peer keeps (Peer._remember): beyond this many, the least recently
# heard from or sent to is forgotten. A cluster of up to this many hosts forgets none.
PARTNERS = 32
# Ticks between probes of the next peer in rotation (anti-entropy): a digest of our vector,
# answered only when the other's differs. News is pushed as rumours; probes only repair.
PROBE = 10
# Seconds after news of ours during which we probe every tick: a rumour pushed once to FANOUT
# peers misses a few (about 5%); they are found at once, not at the next idle probe.
AFTER_NEWS = 1.0
HINTS = 10    # ticks between refreshes of the free hints on our own entries
# Ticks between reminders to the owners of gateways reserved for us (idempotent: it heals a
# lost message, or an owner that took the space over from a removed peer) and telling owners
# of the ones we no longer need.
GATEWAYS = 50

VOTING = (Prepare, Promise, Accept, Accepted, VoteNack, Decided)


@dataclass
class Ready:
    rows: list = field(default_factory=list)
    messages: list[tuple[str, Message]] = field(default_factory=list)
    replies: list[tuple[object, dict]] = field(default_factory=list)
    alarms: list[str] = field(default_factory=list)


# What Allocator.apply serves whole: nearly every request, and the hot path (the hook's
# allocate and release), which so skips the tests for the kinds the peer serves itself.
_APPLIED = frozenset({m.Allocate, m.Claim, m.Release, m.ReleaseIf, m.ReleaseUnlisted, m.Lookup,
                      m.List, m.Holder})


@dataclass
class _Waiting:
    ref: object
    request: m.Allocate | m.Claim | m.TakeSets
    deadline: float
    asked: list[str]
    need: m.Allocate | m.Claim | None = None  # what we lack: space for it is asked of peers
    parked: bool = False  # nobody to ask yet, but peers we have not reached: wait for them
    # Space asked of a peer for these bounds (u, lo, hi of each candidate universe): another
    # request lacking space in the same bounds waits for that answer instead of asking too.
    bounds: tuple | None = None
    follows: int | None = None  # the request (id) whose answer this one waits for
    exact: tuple | None = None  # (u, lo, hi): the part a carve (leases.py) last asked for


def _covers(theirs: Vector, ours: Vector) -> bool:
    return all(theirs.get(p, 0) >= s for p, s in ours.items())


class Peer:
    def __init__(self, me: str, cluster: str, rings: list[Ring], default_subnet: Cidr,
                 reuse_delay: float = 30.0, vector: Vector | None = None, seq: int = 0,
                 request_timeout: float = 2.0, gateways: frozenset = frozenset(),
                 static: frozenset = frozenset()):
        self.me, self.cluster = me, cluster
        self.rings = Rings(rings)
        self.replica = Replica(me, self.rings, vector, seq)
        self.allocator = Allocator(me, self.rings, default_subnet, reuse_delay, gateways, static)
        self.writer = RingWriter(me, self.rings, self.replica, self.allocator)
        self.boot = Bootstrap(me, cluster)
        self.removals = Removals()
        self.seen: set[str] = set()  # peers ever heard from (persisted)
        # Asked only by a claim outside every range (rare): not worked out for every request.
        self.allocator.clustered = lambda: self.dialling or len(self.members()) > 1
        self.request_timeout = request_timeout
        self.reachable: set[str] = set()
        self.known: dict[str, Vector] = {}  # what each peer told us it has
        self.sent: dict[str, Vector] = {}   # what we assume it has, counting what we sent
        self._partners: dict[str, None] = {}  # those of both, least recently touched first
        self.owe_ack: set[str] = set()      # peers that sent us news and await our vector
        self.asking: set[str] = set()  # peers asked for their vector; the answer resets `sent`
        self.pushed: Vector = {}       # our vector when we last pushed news
        self.heard: set[str] = set()   # peers heard from since the last tick: answer them next
        self.greeted: set[str] = set()  # of those, ones that sent a hello: our delta wants a reply
        self.ticks = 0
        self.probes = 0               # probes sent: the rotation's place
        self.news_until = -1.0        # probing every tick until then (AFTER_NEWS)
        self.last_tick = 0.0
        self.waiting: dict[int, _Waiting] = {}
        self.next_req = 0
        # "member" allocates; "waiting" (bootstrap undecided or unconfirmed), "left" and
        # "removed" do not. `note` says why, for status and errors.
        self.standing, self.note = "member", ""
        self.dialling = False  # the shell's transport has peer addresses it has not reached
        self.ever_reached: set[str] = set()  # peers reachable at some time since start
        self.reminded: dict[tuple[int, int], str] = {}  # gateway -> owner last asked to keep it

    # What the shell, status and tests read of the collaborators.
    base_cluster = property(lambda self: self.boot.base_cluster,
                            lambda self, v: setattr(self.boot, "base_cluster", v))
    removed = property(lambda self: self.removals.removed)
    promised = property(lambda self: self.removals.promised)
    decision = property(lambda self: self.boot.decision)
    confirming = property(lambda self: self.boot.confirming)

    # -- first starts (Durable.first_rows) and restarts (Durable.load) -------------------------

    @classmethod
    def founder(cls, me: str, cluster: str, universes: list[Cidr], default_subnet: Cidr,
                **kw) -> tuple[Peer, list]:
        """The first host: owns every universe. Returns the peer and the rows that say so."""
        peer = cls(me, cluster, [Ring(u) for u in universes], default_subnet, **kw)
        rows: list = []
        with peer.writer.change(rows) as ch:
            stamp = peer.replica.next_stamp()
            for u in universes:
                ch.replace(peer.first_ring(Ring.single_owner(u, me, stamp)))
        return peer, rows

    def first_ring(self, ring: Ring) -> Ring:
        """A universe's ring as the first peers make it: spare rings with every other
        universe carved out of them (spare.py), the rest as they are."""
        if not is_spare(ring.universe):
            return ring
        return ring.carve_first({u: "static" if u in self.allocator.static else "range"
                                 for u in self.rings if not is_spare(u)})

    @classmethod
    def seeded(cls, me: str, cluster: str, universes: list[Cidr], default_subnet: Cidr,
               seeds: list[str], **kw) -> tuple[Peer, list]:
        """A seed's first start, every seed's id known: the split, and a wait to hear from
        the other seeds."""
        if me not in seeds:
            raise ValueError(f"{me} is not one of the seeds {', '.join(sorted(seeds))}")
        peer = cls(me, cluster, [Ring(u) for u in universes], default_subnet, **kw)
        peer.boot.restore("seeds", None, None)
        rows: list = []
        peer._split_seeds(tuple(sorted(set(seeds))), rows)
        return peer, rows

    @classmethod
    def voter(cls, me: str, cluster: str, universes: list[Cidr], default_subnet: Cidr,
              quorum: int, **kw) -> tuple[Peer, list]:
        peer = cls(me, cluster, [Ring(u) for u in universes], default_subnet, **kw)
        peer.restore("quorum", quorum, None, None)
        return peer, [m.Vote(None, None, None), m.Standing(peer.standing, peer.note)]

    def restore(self, mode: str, quorum: int | None, vote: m.Vote | None,
                standing: m.Standing | None, seeds=(), seed_addresses=(),
                removals: list[m.Removal] = ()) -> None:
        """The bootstrap and removal state the database holds."""
        self.boot.restore(mode, quorum, vote, seed_addresses if not seeds else ())
        self.cluster = self.boot.cluster()
        self._hold_for_bootstrap()
        if standing is not None:
            self.standing, self.note = standing.state, standing.note
            if standing.state == "waiting" and mode == "seeds" and seeds:
                self.boot.confirming = set(seeds) - {self.me}
                self._hold_for_bootstrap()
        self.removals.restore(self.me, removals)
        if self.standing == "left":
            self.removals.resume_leave(self)
        for t in list(self.removed):
            self._heard_seed(t, None)  # a seed's word that can no longer come

    def _hold_for_bootstrap(self) -> None:
        note = self.boot.waiting_note()
        if note:
            self.standing, self.note = "waiting", note

    # -- bootstrap -----------------------------------------------------------------------------

    def identified(self, address: str, peer: str, now: float) -> Ready:
        """The transport learned who answers at address. A seed that knows its seeds by
        address only makes the split once it has every id (the same on every seed), and
        keeps the ids with it, in the same commit."""
        out = Ready()
        ids = self.boot.identified(address, peer)
        if ids is not None:
            self._split_seeds(ids, out.rows)
            out.rows.append(m.SeedIds(ids))
        elif self.boot.pending is not None:
            self.note = self.boot.waiting_note()  # fewer ids missing now
        return out

    def _split_seeds(self, ids: tuple[str, ...], rows: list) -> None:
        self.boot.confirming = set(ids) - {self.me}
        adopt_split(self.writer, ids, rows, self.first_ring)
        self._hold_for_bootstrap()
        rows.append(m.Standing(self.standing, self.note))

    def _decided(self, value: tuple[str, ...], out: Ready) -> None:
        """The quorum decided the first peers: the split over them, and the cluster's name."""
        adopt_split(self.writer, value, out.rows, self.first_ring)
        self.cluster = self.boot.cluster()
        self.standing, self.note = "member", ""
        out.rows.append(m.Standing("member"))

    def _heard_seed(self, seed: str, out: Ready | None) -> None:
        """A seed answered, or was removed (its word can no longer come). out None: at
        restart, nothing to write."""
        heard = self.boot.heard(seed)
        if heard == "waiting":
            self.standing, self.note = "waiting", self.boot.waiting_note()
        elif heard == "done" and self.standing == "waiting":
            self.standing, self.note = "member", ""
            if out is not None:
                out.rows.append(m.Standing("member"))

    def peer_removed(self, peer: str, out: Ready) -> None:
        """From removal.py: peer was removed (or left)."""
        self._heard_seed(peer, out)

    def _check_vector(self, sender: str, theirs: dict, out: Ready) -> None:
        """On every gossip: a peer that knows more writes of ours than we made means this
        database was lost or restored (rule 3): stop. Else a seed we waited for is heard."""
        if theirs.get(self.me, 0) > self.replica.seq and self.standing != "stale":
            self.standing = "stale"
            self.note = (f"{sender} knows writes of {self.me} up to {theirs[self.me]} but this "
                         f"database has only {self.replica.seq}: it was lost or restored from a "
                         "backup; start afresh with an empty database (a new id)")
            out.rows.append(m.Standing("stale", self.note))
            out.alarms.append(self.note)
            return
        self._heard_seed(sender, out)

    def members(self) -> set[str]:
        """Every peer this one knows of, itself included, removed ones not."""
        known = {self.me} | set(self.replica.vector) | self.seen | self.reachable | \
            self.removals.heard_of
        for ring in self.rings.values():
            known |= {e.owner for e in ring.entries if not is_marker(e.owner)}
        return known - set(self.removed)

    # -- events --------------------------------------------------------------------------------

    def request(self, ref, req, now: float) -> Ready:
        out = self._request(ref, req, now)
        self._settle(now, out)
        return out

    def _request(self, ref, req, now: float) -> Ready:
        """The one gate (DESIGN.md rule 9): every entrance (hook, CNI, Docker, sweeper, GC)
        hands its change here. Taking addresses or moving space needs a member in good
        standing; giving addresses back is allowed in every standing (it never gives anyone
        an address, and a container that is gone must not keep one)."""
        out = Ready()
        kind = type(req)  # `is`: cheaper than isinstance, and no request type has subclasses
        if kind is m.Status:
            out.replies.append((ref, m.ok(**self.status(now))))
            return out
        if kind is m.Leave or kind is m.RemovePeer:
            if self.standing != "member":
                out.replies.append((ref, m.error(self.standing, self.note or
                                                 f"{self.me} is {self.standing}")))
            elif kind is m.Leave:
                self.removals.leave(self, ref, now, out)
            else:
                self.removals.rmpeer(self, ref, req, now, out)
            return out
        self._attempt(_Waiting(ref, req, now + self.request_timeout, []), now, out)
        return out

    def _attempt(self, w: _Waiting, now: float, out: Ready, denied: dict | None = None) -> None:
        """Serve w's request from this peer's space, or ask a peer for the space it lacks.
        `denied`: the last peer's refusal, which the client is told if nobody else can help."""
        req = w.request
        need = None
        if type(req) is m.Release and req.address is None and \
                req.handle in self.allocator.lease_blocks:
            # Its addresses here first (released in any standing), then its blocks, which it
            # may have to gather whole: that moves space, a member's work only.
            reply, rows = self.allocator.apply(req, now)
            out.rows += rows
            w.request = req = m.ReleaseBlocks(req.handle, tuple(reply["released"]))
        if self.standing != "member" and \
                isinstance(req, m.TAKES + (m.CanServe, m.ReleaseBlocks)):
            # Checked again at every retry: the standing may have changed while it waited.
            out.replies.append((w.ref, m.error(self.standing, self.note or
                                               f"{self.me} is {self.standing}")))
            return
        if type(req) not in _APPLIED:  # the commonest (allocate, release) skip these tests
            if isinstance(req, m.CanServe):
                reply = self._can_serve(req, now)
                if not reply["ok"] and self._unreached():
                    # Judged as an ADD would be: it would wait for peers not reached yet.
                    self.next_req += 1
                    w.parked = True
                    self.waiting[self.next_req] = w
                else:
                    out.replies.append((w.ref, reply))
                return
            if isinstance(req, (m.LeaseName, m.ClaimName)):
                as_address = self._name_request(req)
                if isinstance(as_address, dict):
                    out.replies.append((w.ref, as_address))
                    return
                w.request = req = as_address
            if isinstance(req, m.LEASES):
                leases.attempt(self, w, now, out)
                return
            if isinstance(req, m.RetireRange):
                out.replies.append((w.ref, self._retire_range(req, out)))
                return
        if type(req) is m.TakeSets:
            reply, rows, need = self.allocator.take_sets(req, now)
        else:
            reply, rows = self.allocator.apply(req, now)
            if not reply["ok"]:
                need = self.allocator.need_for(req, reply)
        out.rows += rows
        if reply["ok"] or need is None:
            out.replies.append((w.ref, reply))
            return
        if need != w.need:  # another set of a TakeSets: its own round of peers
            w.need, w.asked = need, []
        self._ask(w, out, denied or reply)

    def _can_serve(self, req: m.CanServe, now: float) -> dict:
        """Could each set be served now, here or by a reachable peer (CNI STATUS)?"""
        for i, alternatives in enumerate(req.sets):
            if any(self.allocator.can_allocate(s, (first, last), now)
                   for s, first, last in alternatives):
                continue
            bounds = [b for s, first, last in alternatives
                      for b in self._bounds(s, (first, last))]
            if any(n > 0 and p in self.reachable for u, lo, hi in bounds
                   for p, n in self._hints(u, lo, hi, surely=True).items()):
                continue
            if self.reachable and any(not self.rings[u].entries for u, _, _ in bounds):
                continue  # a newcomer that has not heard the ring: a reachable peer may serve
            where = ", ".join(f"{s}" for s, _, _ in alternatives)
            return m.error("exhausted", f"set {i}: no free address in {where} on {self.me} "
                           "or any peer it can reach")
        return m.ok()

    def status(self, now: float) -> dict:
        s = self.allocator.status(now)
        s.update(standing=self.standing, note=self.note, cluster=self.cluster,
                 reachable=sorted(self.reachable),
                 pending=len(self.waiting), removed=dict(sorted(self.removed.items())),
                 removing={t: by for t, by in sorted(self.promised.items())},
                 handing_over=self.removals.handing_over())
        s.update(self.boot.status())
        # Each peer's share of each universe as this peer sees it (free: the owner's hints),
        # and a digest of the ring, equal on every peer once gossip has converged.
        digest = hashlib.sha256()
        by_range = {x["range"]: x for x in s["universes"]}
        spare: dict[str, dict[str, int]] = {}
        # In one order on every host, whatever order each learned its universes in.
        for universe, ring in sorted(self.rings.items(),
                                     key=lambda x: (x[0].family, x[0].start, x[0].prefix)):
            if str(universe) not in by_range:  # spare or dissolved: no share of addresses
                owned = spare.setdefault(str(universe), {}) if is_spare(universe) else {}
                for e, lo, hi in ring.spans():
                    if not is_marker(e.owner):
                        owned[e.owner] = owned.get(e.owner, 0) + hi - lo
                for e in ring.entries:
                    digest.update(repr((str(universe), e)).encode())
                continue
            u = by_range[str(universe)]
            share: dict[str, dict] = {}
            for e, lo, hi in ring.spans():
                d = share.setdefault(e.owner, {"owned": 0, "free_hint": 0})
                d["owned"] += hi - lo
                if lo == e.start:
                    d["free_hint"] += e.free_hint
            u["peers"] = {p: dict(d, reachable=p == self.me or p in self.reachable)
                          for p, d in sorted(share.items())}
            for e in ring.entries:
                digest.update(repr((u["range"], e)).encode())
        s["spare"] = {u: dict(sorted(o.items())) for u, o in spare.items()}
        a = self.allocator
        s["tenants"], s["leases"], s["pools"] = {}, {}, {}
        for u, c in sorted(a.carves.items(), key=lambda x: x[1].name):
            if c.state == "tenant":
                s["tenants"][c.name] = {
                    "family": int(c.args[1]), "prefix_len": int(c.args[2]),
                    "max_blocks": int(c.args[3]), "within": c.args[4] if len(c.args) > 4 else None,
                    "key": str(u), "blocks": [str(b) for b in a.tenant_blocks.get(c.name, ())]}
            elif c.state == "lease":
                s["leases"][str(u)] = c.name
            elif c.state == "names":
                s["pools"][c.name] = {"pattern": c.args[1], "size": a.pools[u].size,
                                      "universe": str(u)}
        s["members"] = sorted(self.members())
        s["ring_digest"] = digest.hexdigest()[:16]
        return s

    def receive(self, sender: str, msg: Message, now: float) -> Ready:
        out = self._receive(sender, msg, now)
        self._settle(now, out)
        return out

    def _receive(self, sender: str, msg: Message, now: float) -> Ready:
        out = Ready()
        if self.boot.pending is not None:
            return out  # no ring of its own yet: what peers say waits for the split
        if isinstance(msg, VOTING) and msg.cluster == self.base_cluster:
            value = self.boot.vote(sender, msg, self.reachable, out)
            if value is not None:
                self._decided(value, out)
            return out
        if msg.cluster != self.cluster:
            out.alarms.append(f"refused a message from {sender}: it belongs to cluster "
                              f"{msg.cluster}, this peer to {self.cluster}")
            if not isinstance(msg, Refuse):
                out.messages.append((sender, Refuse(self.cluster, f"cluster {self.cluster} "
                                                    f"refuses members of {msg.cluster}")))
            return out
        if isinstance(msg, Refuse):
            self.removals.refused(self, sender, msg, out)
            return out
        if sender in self.removed and not (isinstance(msg, Handover) and
                                           self.removed[sender] == sender):
            # (A Handover of a peer that left is sent again until acknowledged: the first may
            # have been merged here and the acknowledgement lost. It only ever says what that
            # peer's first one did: a peer that left writes nothing more.)
            by = self.removed[sender]
            out.alarms.append(f"refused {sender}: it was removed from the cluster by {by}")
            out.messages.append((sender, Refuse(self.cluster, f"{sender} was removed from the "
                                                f"cluster by {by}; start it afresh with an "
                                                "empty database (a new id)", removed_by=by)))
            return out
        if sender in self.promised:
            # Promised not to take anything from it while its removal is under way.
            out.alarms.append(f"ignored {sender}: it is being removed by "
                              f"{self.promised[sender]}")
            return out
        if sender not in self.seen:
            self.seen.add(sender)
            out.rows.append(m.PeerSeen(sender))
        if self.standing in ("left", "removed", "stale") and not isinstance(msg, HandoverAck):
            return out
        if isinstance(msg, Gossip):
            self._gossip(sender, msg, out)
        elif isinstance(msg, SpaceRequest):
            self._donate(sender, msg, now, out)
        elif isinstance(msg, SpaceGrant):
            # Ownership moved whether or not anyone still waits for it: merge it always.
            self.merge_given(sender, msg.delta, out)
            w = self._answered(sender, msg.req)
            if w is not None:
                if isinstance(w.need, m.ReserveGateway):
                    out.rows += self.allocator.reserve_remote(
                        (w.need.family, w.need.address), w.need.handle, sender)
                self._attempt(w, now, out)
                self._wake_followers(msg.req, w, now, out, granted=True)
        elif isinstance(msg, SpaceDenied):
            w = self._answered(sender, msg.req)
            if w is not None and isinstance(w.request, m.LEASES):
                leases.denied(self, w, sender, msg, now, out)
            elif w is not None:
                w.bounds = None  # asks anew (if at all) under a new id: followers re-join it
                # Here first, as its followers do: space may have come meanwhile (a grant to
                # another request of ours). Asking the next peer straight away refused
                # clients while this peer had thousands of free addresses (scale matrix).
                self._attempt(w, now, out, m.error(msg.code, msg.reason))
                self._wake_followers(msg.req, w, now, out, granted=False)
        elif isinstance(msg, (GatewayRelease, GatewayReleased)):
            self._gateway_released(sender, msg, now, out)
        elif isinstance(msg, (Handover, HandoverAck, RemovePrepare, RemoveAck, RemoveNack,
                              RemoveAbort, RemoveDone)):
            self.removals.receive(self, sender, msg, now, out)
        return out

    # -- gateways reserved across hosts ----------------------------------------------------------

    def _settle(self, now: float, out: Ready) -> None:
        """After every event: handles that released, or whose request reserved a gateway and
        is over, give up the gateways they no longer need (none while a request of theirs is
        still in flight: it may yet succeed). Owners elsewhere are told at once."""
        a = self.allocator
        if not a.unsettled:
            return
        busy = {getattr(w.request, "handle", None) for w in self.waiting.values()}
        before = set(a.releasing())
        for handle in sorted(a.unsettled - busy):
            out.rows += a.settle(handle, now)
        a.unsettled &= busy
        if set(a.releasing()) - before:
            self._tell_owners(now, out)

    def _tell_owners(self, now: float, out: Ready) -> None:
        """Gateways no handle here needs any more: their owners are asked to drop the
        reservation they keep for us (retried until they answer)."""
        a = self.allocator
        for key in a.releasing():
            u = a.universe_of(key)
            owner = self.rings[u].owner_of(key[1])
            if owner == self.me:
                out.rows += a.released_remotely(key, now)  # ours now: freed here
            elif owner is not None and owner in self.reachable:
                out.messages.append((owner, GatewayRelease(self.cluster, u, key[1])))

    def _gateways(self, now: float, out: Ready) -> None:
        a = self.allocator
        self._tell_owners(now, out)
        self._remind_owners(out)
        for peer, keys in a.peer_holders().items():
            if peer in self.removed:
                for key in keys:  # reserved for a peer that is gone for good
                    out.rows += a.drop_peer(key, peer, now)

    def _remind_owners(self, out: Ready, moved: set | None = None) -> None:
        """Ask the owners of gateways our handles hold to (go on) reserving them: a no-op for
        an owner that does, and the repair for one that took the space over from a removed
        peer. Answers are not waited for. With `moved` (universes the ring just changed in):
        only those whose owner changed, at once."""
        a = self.allocator
        for key in a.held_remotely():
            u = a.universe_of(key)
            owner = self.rings[u].owner_of(key[1])
            if moved is not None and (u not in moved or self.reminded.get(key) == owner):
                continue
            if owner in self.reachable:
                self.reminded[key] = owner
                self.next_req += 1
                out.messages.append((owner, SpaceRequest(self.cluster, self.next_req, u, key[1],
                                                         key[1] + 1, key[1], True)))

    def _gateway_released(self, sender: str, msg, now: float, out: Ready) -> None:
        u = msg.universe
        if u not in self.rings or (u.family, msg.address) not in u:
            out.alarms.append(f"refused a gateway release from {sender}: bad address")
            return
        key = (u.family, msg.address)
        if isinstance(msg, GatewayRelease):
            out.rows += self.allocator.drop_peer(key, sender, now)
            # Sent after the commit, as every message is: the asker forgets only then.
            out.messages.append((sender, GatewayReleased(self.cluster, u, msg.address)))
        else:
            out.rows += self.allocator.released_remotely(key, now)

    def _answered(self, sender: str, req: int) -> _Waiting | None:
        """The request waiting for this answer: only one sent to `sender`, last in its asked
        list (a parked one was sent to nobody; anything else is late, or forged)."""
        w = self.waiting.get(req)
        if w is None or w.parked or not w.asked or w.asked[-1] != sender:
            return None
        return self.waiting.pop(req)

    def _gossip(self, sender: str, msg: Gossip, out: Ready) -> None:
        if msg.digest:
            # A probe. Equal digests: nothing to repair either way, and nothing is sent. Else
            # our whole vector (a hello): the prober answers with what we lack and learns
            # what it lacks from it, as after any hello.
            if msg.digest != self.replica.digest(self.removed):
                out.messages.append((sender, self._gossip_msg(self.replica.hello())))
                self.asking.add(sender)
            elif sender in self.known:
                # In step: its vector is ours (the digest is of both), so what it told us
                # last and what we assumed it has are both our own, held once. Its vector
                # only grows: ours remains a vector it covers, as grants need.
                self._remember(self.known, sender, self.replica.frozen())
                self._remember(self.sent, sender, self.replica.frozen())
            return
        incomplete = bool(msg.delta.entries) and not self.replica.complete_for_me(msg.delta)
        if msg.delta.entries and not incomplete:
            self.merge(sender, msg.delta, out)
        theirs = dict(msg.delta.vector)
        self.removals.learn_removed(self, msg.removed, out)
        self._check_vector(sender, theirs, out)
        # The vectors in known and sent are never changed in place, so one dict can stand for
        # many partners: ours (Replica.frozen), once they have all we have.
        theirs = self._held_once(theirs)
        self._remember(self.known, sender, theirs)
        if not msg.answer:
            self.heard.add(sender)
        sent = self.sent.get(sender)
        if msg.nack or sender in self.asking or sent is None:
            self._remember(self.sent, sender, theirs)  # what it has, not what we assumed
            self.asking.discard(sender)
        else:
            # An answer that crossed our message in flight must not lower what we sent.
            raised = {p: v for p, v in theirs.items() if v > sent.get(p, 0)}
            if raised:
                self._remember(self.sent, sender, self._held_once({**sent, **raised}))
        if incomplete:
            # Made against more than we have (a message before it was lost): merge nothing
            # and say so, with what we do have, so the next delta is whole.
            out.messages.append((sender, self._gossip_msg(self.replica.hello(), True)))
        elif msg.answer:
            pass  # a reply to ours: what it lacked, it has; what we lacked, we merged
        elif msg.delta.base is None:
            self.owe_ack.add(sender)  # it asked for our vector: a delta, and its reply
            self.greeted.add(sender)
        elif msg.delta.entries:
            self.owe_ack.add(sender)  # it sent news: our vector, and what it lacks

    def _held_once(self, vector: Vector) -> Vector:
        """Our own frozen vector if it is equal: held once for every partner so known."""
        frozen = self.replica.frozen()
        return frozen if vector == frozen else vector

    def _gossip_msg(self, delta: Delta, nack: bool = False, answer: bool = False) -> Gossip:
        return Gossip(self.cluster, delta, nack, tuple(sorted(self.removed.items())),
                      answer=answer)

    def idle(self) -> bool:
        """Nothing a tick soon would do: no news to push nor gossip to answer, no request
        waiting, no bootstrap, leave or removal under way. The shell may then tick less
        often (until the next event): what ticks still do at idle (probes, hint refreshes,
        reminders) only repairs what was lost, and a slower rhythm is no danger."""
        return not (self.waiting or self.owe_ack or self.heard or self.boot.confirming
                    or self.last_tick < self.news_until
                    or self.boot.pending is not None or not self.boot.decided
                    or self.reachable and self.replica.vector != self.pushed
                    or self.removals.busy()
                    or self.allocator.unsettled)

    def tick(self, now: float) -> Ready:
        out = self._tick(now)
        self._settle(now, out)
        return out

    def _tick(self, now: float) -> Ready:
        out = Ready()
        self.last_tick = now
        if self.boot.pending is not None:
            return out  # nothing to do before the split
        for req, w in list(self.waiting.items()):
            if self.waiting.get(req) is not w:
                continue  # woken (and asked again under a new id) by a leader's timeout
            if now >= w.deadline:
                del self.waiting[req]
                if w.parked:
                    out.replies.append((w.ref, m.error("timeout", (
                        f"no free space on {self.me}, and within {self.request_timeout:g}s it "
                        f"reached none of the peers that might have some "
                        f"({self._unreached_text()})"))))
                    continue
                if isinstance(w.need, m.ReserveGateway) and w.asked:
                    out.rows += self.allocator.maybe_reserved((w.need.family, w.need.address))
                lead = self.waiting.get(w.follows) if w.follows is not None else None
                out.replies.append((w.ref, self._no_answer(w.asked or
                                                           (lead.asked if lead else []))))
                self._wake_followers(req, w, now, out, granted=False)
            elif w.parked and (self.reachable or not self._unreached()):
                del self.waiting[req]  # someone to ask now (or no one left to wait for)
                w.parked = False
                self._attempt(w, now, out)
        self.ticks += 1
        self.removals.tick(self, now, out)
        if not self.boot.decided:
            self.boot.tick(self.reachable, out)
            return out
        if self.standing in ("left", "removed", "stale"):
            return out
        if self.ticks % HINTS == 0:
            self._refresh_hints(now, out)
            self._give_back(now, out)
        if self.ticks % GATEWAYS == 0:
            self._gateways(now, out)
        # Rumours and anti-entropy. News (our vector moved since we last pushed) goes once to
        # FANOUT peers in rotation, who pass it on the same way: a change reaches everyone in
        # about log(peers) ticks and each peer receives it a few times. Every PROBE ticks
        # (every tick for AFTER_NEWS seconds after news of ours) we also probe the next peer in
        # rotation with our vector's digest; if its own differs it sends its vector, and the
        # exchange that follows brings each what it lacks: that repairs whatever was lost, at
        # a few dozen bytes a probe when nothing was. Peers that sent us news, or just told us
        # their vector, get what they lack at once.
        peers = sorted(self.reachable)
        targets = set((self.owe_ack | self.heard) & self.reachable)
        if self.boot.confirming and self.ticks % HINTS == 1:
            # A seed on its first start: ask every seed it has not heard yet, not one a tick.
            for p in sorted(self.boot.confirming & self.reachable - targets):
                out.messages.append((p, self._gossip_msg(self.replica.hello())))
                self.asking.add(p)
        # A delta to a peer that just sent us one is its answer (not answered in turn), but
        # not to one that sent a hello: our delta tells it our vector, its reply what we lack.
        answering = (self.owe_ack | self.heard) - self.greeted
        self.heard.clear()
        self.greeted.clear()
        if peers:
            # Each peer starts its rotation at its own place: peers that tick in step would
            # otherwise all push to, and probe, the same few peers.
            rank = bisect_left(peers, self.me)
            if self.replica.vector != self.pushed:
                # The next FANOUT peers in rotation that may lack it: not the ones that sent it.
                self.pushed = self.replica.frozen()
                self.news_until = now + AFTER_NEWS
                start = rank + self.ticks * FANOUT
                # Lazily: the first few in rotation usually lack it, and testing all of them
                # was a walk of every partner's vector, for each push.
                lacking = (q for q in (peers[(start + i) % len(peers)] for i in range(len(peers)))
                           if not _covers(self.sent.get(q, {}), self.pushed))
                targets.update(islice(lacking, FANOUT))
            probe = peers[(rank + self.probes) % len(peers)]
            if (self.ticks % PROBE == 0 or now < self.news_until) and probe not in targets:
                self.probes += 1
                out.messages.append((probe, Gossip(self.cluster, Delta((), ()), digest=(
                    self.replica.digest(self.removed)))))
        for peer in sorted(targets):
            if peer not in self.known:
                # Never heard its vector: ask for it rather than send everything we have. Full
                # state then goes only to peers that really know nothing.
                out.messages.append((peer, self._gossip_msg(self.replica.hello())))
                self.asking.add(peer)
                continue
            delta = self.replica.delta_for(self.sent.get(peer, self.known[peer]))
            if delta.entries or peer in self.owe_ack:
                out.messages.append((peer, self._gossip_msg(delta, answer=peer in answering)))
                self._remember(self.sent, peer, self.replica.frozen())
        self.owe_ack.clear()
        return out

    # -- gossip --------------------------------------------------------------------------------

    def merge(self, sender: str, delta: Delta, out: Ready, adopt: bool = False) -> None:
        try:
            with self.writer.change(out.rows) as ch:
                for u, kind in self._declared(delta).items():
                    ch.create(Ring(u), kind)
                changed = self.replica.receive(delta)
                if adopt:
                    # Space given to us by a grant or a handover: write it again under our own
                    # stamp. Gossip passes on only writes a vector covers, and the giver's may
                    # never be (it can die before its next gossip); ours are, so the news
                    # cannot die with it.
                    stamp = None
                    for i, (u, e) in enumerate(changed):
                        if e.owner == self.me:
                            stamp = stamp or self.replica.next_stamp()
                            ring = self.rings[u]
                            changed[i] = (u, ring.set_hint(self.me, e.start, e.free_hint, stamp))
                for u, e in changed:
                    ch.wrote(u, [e])
                ch.clock = bool(delta.vector)
        except (RingConflict, RingError) as e:
            out.alarms.append(f"refused ring data from {sender}: {e}")
            return
        if changed and self.allocator.reserved:
            self._remind_owners(out, {u for u, _ in changed})

    def _declared(self, delta: Delta) -> dict[Cidr, str]:
        """Universes new to this host that the delta's carve markers make (spare.py: a marker
        and the new ring's first entry travel in one write). RingError for a marker that is
        malformed, is carved where it may not be, or carves space a universe here has
        already."""
        a = self.allocator
        new: dict[Cidr, str] = {}
        marks = []
        for u, e in delta.entries:
            if not is_marker(e.owner):
                continue
            try:
                c = parse_marker(e.owner)
            except ValueError as err:
                raise RingError(str(err)) from None
            if not c.universe.start <= e.start < e.end <= c.universe.end or \
                    c.universe.family != u.family:
                raise RingError(f"the marker at {u.addr(e.start)} of {u} lies outside "
                                f"{c.universe}")
            marks.append((u, c))
        if not marks:
            return {}  # most deltas: nothing carved, nothing to look up per universe
        # Given back: holds nothing, so a carve may overlap it (a block of another size).
        dissolved = {u for u in self.rings if a.kind(u) == DISSOLVED} | \
            {c.universe for _, c in marks if c.state == DISSOLVED}
        for _ in range(3):  # a block of block space declared in the same delta as the space
            for u, c in marks:
                parent = a.kind(u) if u in self.rings else new.get(u)
                if c.state == DISSOLVED:
                    if c.universe != u:
                        raise RingError(f"{u} holds a marker of {c.universe}")
                    if u not in self.rings and u not in new:
                        # Given back before this host heard of it (no marker in its parent
                        # says what it was): known from now on, as every universe is.
                        new[u] = "tenant" if REGISTRY.contains_cidr(u) else "block"
                    continue
                if parent is None or c.universe in self.rings or c.universe in new:
                    continue
                if parent not in STATES[c.state][1] or not u.contains_cidr(c.universe) or \
                        c.universe == u:
                    raise RingError(f"{c.kind} {c.universe} may not be carved out of "
                                    f"{parent} {u}")
                # Only its ancestors (its parent, and what holds that) may overlap it.
                clash = next((x for x in [*self.rings, *new] if not is_spare(x)
                              and x not in dissolved
                              and x != c.universe and x.overlaps(c.universe)
                              and not x.contains_cidr(u)), None)
                if clash is not None:
                    raise RingError(f"a carve of {c.universe} overlaps universe {clash}")
                new[c.universe] = c.kind
        return new

    def merge_given(self, sender: str, delta: Delta, out: Ready) -> None:
        """Space given to us (a grant, a handover): ownership moved whether or not anyone still
        waits for it, so merge it always: whole when we can, else just its entries, written
        again under our own stamp (gossip passes on only writes a vector covers; the giver's
        might never be, if it died at once)."""
        if self.replica.complete_for_me(delta):
            self.merge(sender, delta, out)
        else:
            self.merge(sender, Delta((), delta.entries), out, adopt=True)

    def delta_for(self, peer: str) -> Delta:
        """What we know that the peer lacks, as far as we know what it has."""
        return self._delta_against(peer, self.sent.get(peer, self.known.get(peer, {})))

    def grant_delta(self, peer: str) -> Delta:
        """The delta of a grant or a handover (space given): made against the vector the peer
        last told us (its vector only grows), not against what we think we sent it since, so
        the peer can merge it whole. Given space merged in part could carry a parent's rewrite
        of a given-back block without the block's own @dissolved entry (the peer took the block
        for a range), or miss the entry a leaver kept when it split its space for a grant still
        on its way (a hole no ring covers, once the grant arrives after the leaver's Handover
        and is refused)."""
        return self._delta_against(peer, self.known.get(peer, {}))

    def _delta_against(self, peer: str, base: Vector) -> Delta:
        delta = self.replica.delta_for(base)
        self._remember(self.sent, peer, self.replica.frozen())
        return delta

    def _remember(self, table: dict[str, Vector], peer: str, vector: Vector) -> None:
        """Keep a partner's vector in known (what it told) or sent (what we assume it has),
        for the PARTNERS partners heard from or sent to last: each vector names every peer,
        and kept for every partner they were hosts^2 items on each host. A partner forgotten
        is as one never heard: asked for its vector before a push, sent everything in a
        grant. Only bytes depend on these vectors, never what is merged."""
        table[peer] = vector
        self._partners.pop(peer, None)  # one order for both tables: the last touched last
        self._partners[peer] = None
        if len(self._partners) > PARTNERS:
            oldest = next(iter(self._partners))
            del self._partners[oldest]
            self.known.pop(oldest, None)
            self.sent.pop(oldest, None)

    def _refresh_hints(self, now: float, out: Ready, exact: Cidr | None = None) -> None:
        """Tell others how much is free in our entries, when it changed enough to matter
        (in universe `exact`: whenever it changed at all)."""
        with self.writer.change(out.rows) as ch:
            stamp = None
            for u, ring in self.rings.items():
                if exact is not None and u != exact or is_spare(u):
                    continue  # spare space is never allocated from: no hint to keep
                pieces: dict[int, list[tuple[int, int]]] = {}
                for e, lo, hi in ring.spans():
                    if e.owner == self.me:
                        pieces.setdefault(e.start, []).append((lo, hi))
                for start, spans in pieces.items():
                    e = ring.get(start)
                    free = sum(self.allocator.free_count(u, lo, hi, now) for lo, hi in spans)
                    if exact is not None and min(free, HINT_MAX) != e.free_hint or \
                            (free == 0) != (e.free_hint == 0) or abs(free - e.free_hint) > \
                            max(16, e.free_hint // 4):
                        stamp = stamp or self.replica.next_stamp()
                        ch.wrote(u, [ring.set_hint(self.me, e.start, free, stamp)])

    def _give_back(self, now: float, out: Ready) -> None:
        """Hand small wholly free runs of our space to a neighbouring peer (donation.py), so
        that claims and grants do not leave the ring ever more fragmented. Only with no
        request of ours waiting for space, only to a reachable peer no removal is under way
        for, and only runs small beside what we keep free elsewhere in that universe (at most
        a quarter of it): space is not pushed on peers that did not ask."""
        if self.waiting or self.removals.leaving or self.removals.removing:
            return
        with self.writer.change(out.rows) as ch:
            stamp = None
            for u, ring in self.rings.items():
                if is_spare(u):
                    continue  # asked for exactly, by range adds: never pushed on anyone
                candidates = returnable(ring, self.me)
                if not candidates:
                    continue  # a lone host, or nothing beside another's space: no scan each second
                free = self.allocator.free_count(u, u.start, u.end, now)
                for lo, hi, to in candidates:
                    if to not in self.reachable or to in self.removed or to in self.promised or \
                            free - (hi - lo) < 4 * (hi - lo) or \
                            self.allocator.free_count(u, lo, hi, now) != hi - lo:
                        continue
                    stamp = stamp or self.replica.next_stamp()
                    ch.wrote(u, ring.transfer(self.me, lo, hi, to, stamp, free_hint=hi - lo))
                    free -= hi - lo

    # -- space on demand -----------------------------------------------------------------------

    def _subnet_bounds(self, req) -> list[tuple[Cidr, int, int]]:
        rng = req.range if isinstance(req, m.Allocate) else None
        tenant = getattr(req, "tenant", None)
        if tenant is not None:  # every block of the tenant
            return [b for u in self.allocator.tenant_blocks.get(tenant, [])
                    for b in self._bounds(u, rng, tenant)]
        return self._bounds(req.subnet or self.allocator.default_subnet, rng)

    def _bounds(self, subnet: Cidr, rng, tenant: str | None = None) -> list[tuple[Cidr, int, int]]:
        lo, hi = subnet.host_bounds()
        if rng is not None:
            lo, hi = max(lo, rng[0]), min(hi, rng[1] + 1)
        return [(u, max(lo, u.start), min(hi, u.end))
                for u in self.allocator.candidates(subnet, tenant) if u.overlaps(subnet)]

    def _hints(self, u: Cidr, lo: int, hi: int, surely: bool = False) -> dict[str, int]:
        """What each owner's hints say is free in [lo, hi) of u, in one walk of the ring (a
        walk per peer asked about was most of a fill's time at 1,000 peers). An entry
        reaching outside [lo, hi) may have its free space there: `surely` counts only what
        must lie inside (its hint less the part outside), as CNI STATUS needs for a
        rangeStart-rangeEnd window."""
        free: dict[str, int] = {}
        for e, a, b in self.rings[u].spans():
            if a < hi and b > lo:
                n = e.free_hint if not surely else \
                    max(0, e.free_hint - (e.end - e.start - (min(e.end, hi) - max(e.start, lo))))
                free[e.owner] = free.get(e.owner, 0) + n
        return free

    def _ask(self, w: _Waiting, out: Ready, last_error: dict) -> None:
        """Send the request to the next peer worth asking, or give the client its answer."""
        req = w.need
        self.next_req += 1
        if isinstance(req, (m.Claim, m.ReserveGateway)):
            self._ask_owner(w, out, last_error, req.family, req.address,
                            isinstance(req, m.ReserveGateway))
            return
        bounds = tuple(self._subnet_bounds(req))
        # A lead that already asked every peer this one asked (so after a denial, those that
        # waited for it follow it again to the next peer).
        lead = next((r for r, x in self.waiting.items() if x.bounds == bounds
                     and x.follows is None and not x.parked and x.asked
                     and set(w.asked) <= set(x.asked)), None)
        if lead is not None:
            # One of ours already asks for space there (a burst of starts on a host with none
            # left): wait for its answer, then try again, rather than ask as well. Every
            # request asking at once made a donor's work grow with the burst, and on a loaded
            # machine answers came too late (make scale N=100).
            w.follows = lead
            self.waiting[self.next_req] = w
            return
        offers = []
        for u, lo, hi in bounds:
            free = self._hints(u, lo, hi)
            offers += [(free[peer], peer, u, lo, hi) for peer in
                       sorted(self.reachable - set(w.asked)) if free.get(peer, 0) > 0]
        best = None
        if offers:
            # Any peer with at least half the most free space: each host picks its own (by a
            # hash of its id), so the hosts of a cluster that all lack space at once (a fill
            # after a start) spread their questions instead of all asking the richest.
            most = max(o[0] for o in offers)
            rich = [o for o in offers if 2 * o[0] >= most]
            pick = hashlib.blake2b(f"{self.me}/{len(w.asked)}".encode(), digest_size=4)
            best = rich[int.from_bytes(pick.digest(), "big") % len(rich)]
        if best is None:
            # Knowing no entry at all (a newcomer that has not heard the ring yet), ask a
            # reachable peer anyway rather than fail: its answer or grant brings the ring.
            blind = [(peer, u, lo, hi) for u, lo, hi in self._subnet_bounds(req)
                     if not self.rings[u].entries
                     for peer in sorted(self.reachable - set(w.asked))]
            if blind:
                peer, u, lo, hi = blind[0]
                w.asked.append(peer)
                self.waiting[self.next_req] = w
                out.messages.append((peer, SpaceRequest(self.cluster, self.next_req, u, lo, hi)))
                return
            if not w.asked and self._unreached():
                # Peers we know of but have not reached yet (a joiner just started): wait for
                # them, up to the request's deadline, rather than refuse at once.
                w.parked = True
                self.waiting[self.next_req] = w
                return
            tenant = getattr(req, "tenant", None)
            if tenant is not None and last_error["error"]["code"] == "exhausted":
                out.replies.append((w.ref, self._tenant_full(tenant, w.asked)))
                return
            out.replies.append((w.ref, last_error if not w.asked else m.error(
                "exhausted", f"{last_error['error']['message']}; asked "
                f"{', '.join(w.asked)} for space in vain")))
            return
        _, peer, u, lo, hi = best
        w.asked.append(peer)
        w.bounds = bounds
        self.waiting[self.next_req] = w
        out.messages.append((peer, SpaceRequest(self.cluster, self.next_req, u, lo, hi)))

    def _wake_followers(self, req: int, leader: _Waiting, now: float, out: Ready,
                        granted: bool) -> None:
        """Request `req` was answered or gave up: those waiting for its answer try again (the
        space may be here now). Unless it brought space, they skip the peers it asked."""
        for r in sorted(r for r, x in self.waiting.items() if x.follows == req):
            f = self.waiting.pop(r)
            f.follows = None
            if not granted:
                f.asked = list(leader.asked)
            if now >= f.deadline:  # its time is up too: no new round of asking
                out.replies.append((f.ref, self._no_answer(leader.asked)))
                continue
            self._attempt(f, now, out)

    def _no_answer(self, asked: list[str]) -> dict:
        return m.error("timeout", f"no answer within {self.request_timeout:g}s from "
                       f"{', '.join(asked) or 'nobody'}")

    def _ask_owner(self, w: _Waiting, out: Ready, last_error: dict, family: int, address: int,
                   gateway: bool) -> None:
        """A claim (or a gateway's reservation) of an address owned elsewhere: ask its owner."""
        u = self.allocator.universe_of((family, address))
        owner = self.rings[u].owner_of(address) if u else None
        what = f"gateway {format_addr(family, address)}" if gateway else \
            format_addr(family, address)
        if u is not None and owner is None and (self.reachable or self._unreached()):
            # No ring heard yet (a joiner): wait for it; ticks retry, up to the deadline.
            w.parked = True
            self.waiting[self.next_req] = w
        elif owner is None or owner in w.asked or owner == self.me:
            out.replies.append((w.ref, last_error))
        elif owner not in self.reachable:
            out.replies.append((w.ref, m.error(
                "unreachable", f"{what} is owned by {owner}, which {self.me} cannot reach")))
        else:
            w.asked.append(owner)
            self.waiting[self.next_req] = w
            out.messages.append((owner, SpaceRequest(self.cluster, self.next_req, u, address,
                                                     address + 1, address, gateway)))

    def _unreached(self) -> set[str]:
        """Peers that may hold space we lack and that we have not reached since start: members
        we know of, or peer addresses the transport is still dialling (`dialling`, set by the
        shell). A peer reached once and lost since is not waited for: it may be dead."""
        gone = self.members() - self.reachable - self.ever_reached - {self.me}
        return gone | ({"(peers being dialled)"} if self.dialling else set())

    def _unreached_text(self) -> str:
        names = sorted(self._unreached())
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    def _donate(self, sender: str, msg: SpaceRequest, now: float, out: Ready) -> None:
        u = msg.universe
        if u not in self.rings or not u.start <= msg.lo < msg.hi <= u.end or \
                msg.address is not None and not msg.lo <= msg.address < msg.hi:
            out.alarms.append(f"refused a space request from {sender}: bad bounds")
            return
        a = self.allocator
        if msg.exact:
            leases.give_exact(self, sender, msg, now, out)
            return
        if not a.allocatable(u):
            out.messages.append((sender, SpaceDenied(self.cluster, msg.req, (
                f"{a.kind_text(u)} {u} is given only exactly"), "not_owned")))
            return
        if msg.gateway:
            if msg.address is None or self.rings[u].owner_of(msg.address) != self.me:
                self.deny_not_owned(sender, msg.req, f"{self.me} does not own that gateway",
                                    out)
                return
            err, rows = a.reserve_owned((u.family, msg.address), sender)
            if err is not None:
                out.messages.append((sender, SpaceDenied(self.cluster, msg.req,
                                                         err["error"]["message"],
                                                         err["error"]["code"])))
                return
            # Durable here before the (empty) grant says it is reserved.
            out.rows += rows
            out.messages.append((sender, SpaceGrant(self.cluster, msg.req,
                                                    self.grant_delta(sender))))
            return
        if msg.address is not None:
            block = a.block_holding(u, msg.address, now, sender)
            if block is None:
                if self.rings[u].owner_of(msg.address) != self.me:
                    self.deny_not_owned(sender, msg.req, f"{format_addr(u.family, msg.address)}"
                                        f" is not owned by {self.me}", out)
                else:
                    code, why = a.why_not_free(u, msg.address, now)
                    out.messages.append((sender, SpaceDenied(self.cluster, msg.req, why, code)))
                return
        else:
            # At most half of what is free there, and of a range at most _share, but the last
            # free address too: allocation must succeed while free space exists anywhere (the
            # asker has none).
            free = a.free_count(u, msg.lo, msg.hi, now)
            block = a.donatable(u, msg.lo, msg.hi, now,
                                max(1, min(free // 2, self._share(u, sender))), sender) \
                if free >= 1 else None
            if block is None:
                # The asker counted on space of ours that has left: it went, by our own
                # writes, to peers the asker may not have heard of yet. Send what it lacks
                # first (same connection, so before the denial), so it asks one of them next
                # instead of refusing its client while space is free elsewhere.
                delta = self.delta_for(sender)
                if delta.entries:
                    out.messages.append((sender, self._gossip_msg(delta)))
                out.messages.append((sender, SpaceDenied(self.cluster, msg.req,
                                     f"{self.me} has no free space to spare there")))
                return
        lo, hi = block
        with self.writer.change(out.rows) as ch:
            ch.wrote(u, self.rings[u].transfer(self.me, lo, hi, sender,
                                               self.replica.next_stamp(), free_hint=hi - lo))
        # Our entries split by the transfer still carry hints of their old size: correct them
        # now, so no peer counts on space that just left (status would show over 100% free).
        self._refresh_hints(now, out, exact=u)
        out.messages.append((sender, SpaceGrant(self.cluster, msg.req, self.grant_delta(sender))))

    def _share(self, u: Cidr, asker: str) -> int:
        """The most a grant of a range gives: a fair share of it (its size over this peer and
        those it reaches), or as much as the asker owns there already, if more. Halving alone
        let a donor serve only log2(its space) askers before it had none: at a cold start
        every other host chased hints gone stale from donor to donor, and allocations timed
        out while most of the range was free (the scale matrix at 1,000 peers: 2,336; an
        ad-hoc fill of 400: 117). A busy host may still double its space with each grant. A
        range smaller than its hosts goes an address a grant, each host's fair share (a floor
        of 16 served fewer hosts at once: the scale matrix's 100 hosts with 5 addresses each
        on a /22 needed a peer more often, 23.6% against 20.1%). Other carves (tenants'
        blocks, name pools) are shared by a few hosts, not all: halving, as before."""
        if self.allocator.kind(u) != "range":
            return u.size
        owned = sum(hi - lo for lo, hi in self.rings[u].owned_by(asker))
        return max(u.size // (len(self.reachable) + 1), owned)

    def deny_not_owned(self, sender: str, req: int, why: str, out: Ready) -> None:
        """The asker named us the owner of what it asked for, and we are not (any more): its
        view is behind ours. What it lacks goes first (the same connection, so before the
        denial), against the vector it told us so it merges whole: it then asks the owner it
        learns of instead of refusing its client (a claim of a name held elsewhere got
        not_owned instead of in_use, naming the holder)."""
        delta = self.grant_delta(sender)
        if delta.entries:
            out.messages.append((sender, self._gossip_msg(delta)))
        out.messages.append((sender, SpaceDenied(self.cluster, req, why, "not_owned")))

    # -- carved space (spare.py, leases.py) ------------------------------------------------------

    def _retire_range(self, req: m.RetireRange, out: Ready) -> dict:
        """Rewrite the range's carve markers: retired (no new allocations) or resumed."""
        c, a = req.cidr, self.allocator
        if a.kind(c) != "range" or c not in self.rings:
            ranges = [u for u in a.universes() if a.kind(u) == "range"]
            return m.error("no_range", f"{c} is not a range of this cluster (ranges: "
                           f"{', '.join(map(str, ranges))})")
        if c not in a.carves:
            if not any(r.entries for r in self.rings.values()):
                return m.error("unreachable", f"{self.me} has heard no ring yet")
            return m.error("not_supported", f"{c} was made before ranges could be retired "
                           "online (schema 5): it has no marker to change")
        parent = self.rings[a.parent_of(c)]
        marks = [e for e in parent.entries if is_marker(e.owner)
                 and parse_marker(e.owner).universe == c]
        want = marker("retired" if req.retired else "range", c)
        if all(e.owner == want for e in marks):
            return m.ok(range=str(c), retired=req.retired, already=True)
        with self.writer.change(out.rows) as ch:
            stamp = self.replica.next_stamp()
            ch.wrote(parent.universe, [parent.remark(e.start, want, stamp) for e in marks])
        return m.ok(range=str(c), retired=req.retired)

    def _tenant_full(self, tenant: str, asked: list[str]) -> dict:
        a = self.allocator
        blocks = a.tenant_blocks.get(tenant, [])
        key = a.carves.get(key_of("tenant", tenant))
        most = f"; it may have {key.args[3]} block(s)" if key else ""
        return m.error("tenant_full", (
            f"tenant {tenant} is full: no free address in its {len(blocks)} block(s) "
            f"({', '.join(map(str, blocks))}) on {self.me}"
            f"{', nor on the peers it asked (' + ', '.join(asked) + ')' if asked else ''}"
            f"{most} (ipamd tenant grow {tenant})"))

    def _name_request(self, req) -> m.Allocate | m.Claim | dict:
        """A name lease as the allocate or claim in its pool that it is (names.py)."""
        key = key_of("names", req.pool)
        pattern = self.allocator.pools.get(key)
        if pattern is None or self.allocator.carves[key].name != req.pool:
            return m.error("no_pool", f"no name pool {req.pool} is known to {self.me}")
        if isinstance(req, m.LeaseName):
            return m.Allocate(req.handle, key, req.anchor,
                              (key.start + 1, key.start + pattern.size))
        n = pattern.ordinal(req.name)
        if n is None:
            return m.error("bad_request", f"{req.name!r} is not a name of pool {req.pool} "
                           f"({self.allocator.carves[key].args[1]})")
        return m.Claim(req.handle, 6, key.start + 1 + n, key, req.anchor)
