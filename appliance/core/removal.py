"""Peers leaving and being removed (a collaborator of Peer; DESIGN.md rules 3 and 6).

leave: the peer hands each of its ranges to a reachable peer (the owner of the range just
before it when that one is reachable, so space coalesces), commits, sends, and waits for every
receiver's acknowledgement. It refuses while it still holds addresses: those would become
free space elsewhere while their containers still run.

rmpeer TARGET..., run on peer R: a promise round, then one write.
1. R needs every other known peer reachable (any of them may hold TARGET's last writes, or be
   removing TARGET itself) and, with TARGET, a majority of the membership: so in a split at
   most one side can, and a 2-peer cluster cannot (without --force; the operator then vouches
   that the other side is dead). A peer that can still reach TARGET refuses: it is not dead.
2. R asks each for a promise. A promise is durable and means: take nothing more from TARGET and
   let no one else remove it. It carries everything the promiser knows that R lacks, and every
   write of TARGET's it holds (grants included), so once R has all promises it holds TARGET's
   final state: nobody can receive another of its writes. Any peer R did not know of that a
   promiser names is asked too.
3. R rewrites TARGET's entries as its own, and any part of the universe that no entry it now
   holds covers (only dead peers knew who owned it), commits, and says so. Two runners cannot both get
   every promise (each peer promises one runner at a time, and each runner asks the other),
   so TARGET's space never gets two owners. A refused or timed-out round is withdrawn.
A removed peer that talks again is refused and told to start afresh under a new id.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from . import messages as m
from .addr import range_to_cidrs
from .allocator import Allocator
from .gossip import Delta, Replica
from .rings import RingWriter
from .spare import is_marker, is_spare
from .peer_messages import (Handover, HandoverAck, Refuse, RemoveAbort, RemoveAck, RemoveDone,
                   RemoveNack, RemovePrepare)


@dataclass
class _Removing:
    ref: object
    targets: tuple[str, ...]
    deadline: float
    force: bool
    skipped: bool = False  # --force left out a peer it could not reach
    asked: set[str] = field(default_factory=set)
    promised: set[str] = field(default_factory=set)
    gateways: list = field(default_factory=list)  # (universe, address, holders) from acks


# A Handover not acknowledged is sent again this often (seconds) for as long as the peer that
# left runs: a lost one would otherwise leave its space with a peer that says nothing any more.
RESEND = 1.0


@dataclass
class _Leaving:
    ref: object  # None once the client has been answered (a timeout): resent still
    deadline: float
    unacked: set[str]
    handed: dict[str, list[str]]
    stamp: tuple[str, int]  # the leave's ring writes: what each receiver gets is in them
    resend_at: float


class Host(Protocol):
    """What removal reads and does of the peer it serves (core/peer.py), and nothing else."""
    me: str
    cluster: str
    standing: str
    note: str
    reachable: set[str]
    request_timeout: float
    next_req: int
    waiting: dict
    allocator: Allocator
    replica: Replica
    writer: RingWriter

    def members(self) -> set[str]: ...
    def merge(self, sender: str, delta: Delta, out) -> None: ...
    def merge_given(self, sender: str, delta: Delta, out) -> None: ...
    def delta_for(self, peer: str) -> Delta: ...
    def peer_removed(self, peer: str, out) -> None: ...


class Removals:
    """This peer's part in leaves and removals: its own state, fed by Peer with the peer
    (as a Host) and the event."""

    def __init__(self):
        self.removed: dict[str, str] = {}   # peer -> who removed it (or itself, on leave)
        self.promised: dict[str, str] = {}  # peer being removed -> the runner promised to
        self.promised_at: dict[str, float] = {}
        self.removing: dict[int, _Removing] = {}
        self.leaving: dict[int, _Leaving] = {}
        self.stale_promises = False  # our own rounds cut off by a restart: withdraw them
        self.heard_of: set[str] = set()  # peers others named in their promises

    def busy(self) -> bool:
        """A leave or removal under way here: its deadlines and retries need ticks."""
        return bool(self.promised or self.removing or self.leaving or self.stale_promises)

    def restore(self, me: str, rows: list[m.Removal]) -> None:
        for r in rows:
            if r.state == "removed":
                self.removed[r.target] = r.by
            elif r.state == "promised":
                self.promised[r.target] = r.by
                self.promised_at[r.target] = r.at
                self.stale_promises |= r.by == me

    # -- leave ---------------------------------------------------------------------------------

    def leave(self, peer: Host, ref, now: float, out) -> None:
        held = len(peer.allocator.by_addr)
        if held:
            out.replies.append((ref, m.error("busy", f"{peer.me} still holds {held} "
                                             f"address{'es' if held > 1 else ''}: "
                                             "release them before it leaves")))
            return
        # Quarantined addresses would reach their new owner as never used, and be handed out
        # at once while their old containers may still be terminating.
        a = peer.allocator
        until = [t + a.reuse_delay for u in a.freed for _, t in a.quarantined(u, now)]
        if until:
            out.replies.append((ref, m.error("busy", (
                f"{peer.me} freed {len(until)} address{'es' if len(until) > 1 else ''} less "
                f"than {a.reuse_delay:g}s ago; they are in quarantine for "
                f"{max(until) - now:.0f}s more: leave then"))))
            return
        if peer.waiting:
            # A grant answering one of them would reach a peer that left, and be ignored.
            out.replies.append((ref, m.error("busy", f"{peer.me} has {len(peer.waiting)} "
                                             "requests waiting for peers: leave when they are "
                                             "answered")))
            return
        # Never a peer known to have left or been removed: it would ignore the handover.
        targets = sorted(peer.reachable - set(self.promised) - set(self.removed))
        if not targets:
            out.replies.append((ref, m.error("unreachable", f"{peer.me} can reach no peer to "
                                             "take its space")))
            return
        by_peer: set[str] = set()
        handed: dict[str, list[str]] = {}
        i = 0
        with peer.writer.change(out.rows) as ch:
            stamp = peer.replica.next_stamp()
            for u, ring in peer.replica.rings.items():
                for lo, hi in ring.owned_by(peer.me):
                    before = ring.owner_of(lo - 1) if lo > u.start else None
                    to = before if before in targets else targets[i % len(targets)]
                    i += 1
                    ch.wrote(u, ring.transfer(peer.me, lo, hi, to, stamp, free_hint=hi - lo))
                    by_peer.add(to)
                    if not is_spare(u):  # spare space goes too, unlisted
                        handed.setdefault(to, []).extend(
                            str(c) for c in range_to_cidrs(u.family, lo, hi))
        peer.standing, peer.note = "left", f"{peer.me} left the cluster"
        self.removed[peer.me] = peer.me
        out.rows += [m.Standing("left", peer.note), m.Removal(peer.me, peer.me, "removed")]
        if not by_peer:
            out.replies.append((ref, m.ok(left=peer.me, handed={})))
            return
        peer.next_req += 1
        self.leaving[peer.next_req] = _Leaving(ref, now + peer.request_timeout, set(by_peer),
                                               handed, stamp, now + RESEND)
        for to in sorted(by_peer):
            out.messages.append((to, self._handover(peer, peer.next_req, to)))

    def resume_leave(self, peer: Host) -> None:
        """A peer that left, restarted: which of its Handovers were acknowledged is not
        kept, so each is sent again (a receiver that has it acknowledges again). Its last ring
        write is its leave: a peer that left writes nothing more."""
        stamp = (peer.me, peer.replica.seq)
        to = {e.owner for ring in peer.replica.rings.values() for e in ring.entries
              if e.stamp == stamp and e.owner != peer.me and not is_marker(e.owner)}
        if to:
            peer.next_req += 1
            self.leaving[peer.next_req] = _Leaving(None, 0.0, to, {}, stamp, 0.0)

    def _handover(self, peer: Host, req: int, to: str) -> Handover:
        """Made anew for each send, from the leave's writes: the same space each time, as a
        peer that left changes nothing more. The gateways reserved in the space go with it."""
        stamp = self.leaving[req].stamp
        reserved = tuple(r for u, ring in peer.replica.rings.items() for e in ring.entries
                         if e.owner == to and e.stamp == stamp
                         for r in peer.allocator.reservations_in(u, e.start, e.end))
        return Handover(peer.cluster, req, peer.grant_delta(to), reserved)

    def handing_over(self) -> list[str]:
        """The peers a leave of this one still waits for: stop it only once there are none."""
        return sorted({p for lv in self.leaving.values() for p in lv.unacked})

    # -- rmpeer --------------------------------------------------------------------------------

    def rmpeer(self, peer: Host, ref, req: m.RemovePeer, now: float, out) -> None:
        # A removed peer that still owns space here (the reclaim's news died with the hosts
        # that had it) may be removed again: the same round, the same safety.
        owners = {e.owner for ring in peer.replica.rings.values() for e, _, _ in ring.spans()}
        targets = tuple(sorted(t for t in set(req.targets)
                               if t not in self.removed or t in owners))
        members = peer.members()
        err = None
        if peer.me in req.targets:
            err = m.error("bad_request", f"{peer.me} cannot remove itself: use leave")
        elif not targets:
            by = ", ".join(sorted({self.removed[t] for t in req.targets}))
            out.replies.append((ref, m.ok(removed=list(req.targets), by=by, reclaimed=[],
                                          already=True)))
            return
        elif not set(targets) & (members | owners):
            # One unknown name among known ones is fine (others may know it: they answer
            # with its writes); none known is more likely a typo.
            err = m.error("not_found", f"no peer {', '.join(targets)} is known to {peer.me}")
        elif any(not ring.entries for u, ring in peer.replica.rings.items()
                 if not is_spare(u)):
            # Every gap of an unknown ring would look like space only dead peers knew.
            err = m.error("no_ring", f"{peer.me} has not heard the ring yet, so it cannot tell "
                          "the removed peers' space from live peers'; remove them from a peer "
                          "that has")
        elif set(targets) & peer.reachable:
            err = m.error("reachable", f"{', '.join(sorted(set(targets) & peer.reachable))} "
                          f"can be reached from {peer.me}: not gone; ask it to leave instead")
        elif any(self.promised.get(t, peer.me) not in (peer.me, *targets) for t in targets):
            busy = next(t for t in targets
                        if self.promised.get(t, peer.me) not in (peer.me, *targets))
            err = m.error("busy", f"{busy} is being removed by {self.promised[busy]}")
        elif not req.force:
            cut = sorted(members - set(targets) - {peer.me} - peer.reachable)
            members |= set(targets)
            left = len(members) - len(targets)
            if cut:
                err = m.error("unreachable", f"cannot remove {', '.join(targets)} while "
                              f"{peer.me} cannot reach {', '.join(cut)}: they may hold its last "
                              "changes, or be removing it too (name them as well if they are "
                              "gone)")
            elif left * 2 <= len(members):
                err = m.error("no_majority", f"removing {', '.join(targets)} needs a majority "
                              f"of the {len(members)} peers, and only {left} would be left "
                              "(--force only if you know every other peer is gone for good)")
        if err is not None:
            out.replies.append((ref, err))
            return
        for t in targets:
            self.promised[t], self.promised_at[t] = peer.me, now
            out.rows.append(m.Removal(t, peer.me, "promised", now))
        peer.next_req += 1
        r = _Removing(ref, targets, now + peer.request_timeout, req.force)
        self.removing[peer.next_req] = r
        self._ask_promises(peer, peer.next_req, r, members - set(targets) - {peer.me}, out)

    def _ask_promises(self, peer: Host, req: int, r: _Removing, peers: set[str], out,
                      via: str = "") -> None:
        vector = tuple(sorted(peer.replica.vector.items()))
        for p in sorted(peers - r.asked):
            if p not in peer.reachable:
                if r.force:
                    r.skipped = True
                    continue
                return self._abort(peer, req, f"{p}, known to {via}, cannot be reached (name it "
                                   "too if it is gone)", out)
            r.asked.add(p)
            out.messages.append((p, RemovePrepare(peer.cluster, req, r.targets, vector)))
        if r.promised >= r.asked:
            self._reclaim(peer, req, out)

    def _on_prepare(self, peer: Host, sender: str, msg: RemovePrepare, now: float, out) -> None:
        reason = ""
        for t in msg.targets:
            if t == peer.me:
                reason = f"{t} is alive and answering"
            elif t in self.removed:
                continue  # already removed: promising again changes nothing
            elif t in peer.reachable:
                reason = f"{peer.me} can still reach {t}"
            elif self.promised.get(t, sender) not in (sender, *msg.targets):
                # (A promise to a runner that is itself being removed is void.)
                reason = f"{t} is being removed by {self.promised[t]}"
            if reason:
                out.messages.append((sender, RemoveNack(peer.cluster, msg.req, reason)))
                return
        for t in msg.targets:
            if t not in self.removed and self.promised.get(t) != sender:
                self.promised[t], self.promised_at[t] = sender, now
                out.rows.append(m.Removal(t, sender, "promised", now))
        writes = tuple((u, e) for u, ring in peer.replica.rings.items() for e in ring.entries
                       if e.stamp[0] in msg.targets)
        delta = peer.replica.delta_for(dict(msg.vector))
        held = tuple((u, key[1], (peer.me,)) for key in peer.allocator.held_remotely()
                     for u in [peer.allocator.universe_of(key)]
                     if peer.replica.rings[u].owner_of(key[1]) in msg.targets)
        out.messages.append((sender, RemoveAck(peer.cluster, msg.req, delta, writes,
                                               tuple(sorted(peer.members())), held)))

    def _on_ack(self, peer: Host, sender: str, msg: RemoveAck, out) -> None:
        r = self.removing.get(msg.req)
        if r is None or sender not in r.asked:
            return
        if peer.replica.complete_for_me(msg.delta):
            peer.merge(sender, msg.delta, out)
        else:  # cannot be (it was made against our own vector), but never raise it wrongly
            peer.merge(sender, Delta((), msg.delta.entries), out)
        peer.merge(sender, Delta((), msg.writes), out)
        r.promised.add(sender)
        r.gateways += msg.reserved
        others = set(msg.members) - set(r.targets) - {peer.me} - set(self.removed)
        self.heard_of |= others
        self._ask_promises(peer, msg.req, r, others, out, via=sender)

    def _reclaim(self, peer: Host, req: int, out) -> None:
        r = self.removing.pop(req)
        reclaimed = []
        for u, address, names in r.gateways:
            if u in peer.replica.rings and (u.family, address) in u and \
                    peer.replica.rings[u].owner_of(address) in r.targets:
                out.rows += peer.allocator.adopt_reserved(u, address, names)
        with peer.writer.change(out.rows) as ch:
            stamp = peer.replica.next_stamp()
            for u, ring in peer.replica.rings.items():
                for t in r.targets:
                    reclaimed += [str(c) for lo, hi in ring.owned_by(t)
                                  for c in range_to_cidrs(u.family, lo, hi) if not is_spare(u)]
                    ch.wrote(u, ring.reclaim(t, peer.me, stamp))
                if is_spare(u) and not ring.entries:
                    continue  # a cluster made before spare space (schema 5): none to claim
                if not r.skipped:  # --force skipped someone: its ring may hold the gap
                    gaps = ch.wrote(u, ring.claim_gaps(peer.me, stamp))
                    reclaimed += [str(c) for e in gaps if not is_spare(u)
                                  for c in range_to_cidrs(u.family, e.start, e.end)]
            for t in r.targets:
                self._set_removed(peer, t, peer.me, out)
                # Every write of t that survives anywhere is now here, so our vector may cover
                # them all: then gossip passes on the ones only grants carried (t is not there
                # to).
                top = max((e.stamp[1] for ring in peer.replica.rings.values()
                           for e in ring.entries if e.stamp[0] == t), default=0)
                peer.replica.vector[t] = max(peer.replica.vector.get(t, 0), top)
        for p in sorted(r.asked):
            out.messages.append((p, RemoveDone(peer.cluster, r.targets)))
        out.replies.append((r.ref, m.ok(removed=list(r.targets), by=peer.me,
                                        reclaimed=reclaimed)))

    def _abort(self, peer: Host, req: int, reason: str, out) -> None:
        r = self.removing.pop(req)
        for t in r.targets:
            if self.promised.get(t) == peer.me:
                del self.promised[t]
                out.rows.append(m.Removal(t, peer.me, "released"))
        for p in sorted(r.asked):
            out.messages.append((p, RemoveAbort(peer.cluster, r.targets)))
        out.replies.append((r.ref, m.error("refused", f"{', '.join(r.targets)} not removed: "
                                           f"{reason}")))

    def _set_removed(self, peer: Host, t: str, by: str, out) -> None:
        self.removed[t] = by
        self.promised.pop(t, None)
        out.rows.append(m.Removal(t, by, "removed"))
        peer.peer_removed(t, out)
        # Promises to a runner that is itself removed will never be kept or withdrawn.
        for target, runner in list(self.promised.items()):
            if runner == t:
                del self.promised[target]
                out.rows.append(m.Removal(target, runner, "released"))

    def learn_removed(self, peer: Host, removed, out) -> None:
        for t, by in removed:
            if t == peer.me and peer.standing != "left":
                peer.standing = "removed"
                peer.note = (f"{peer.me} was removed from the cluster by {by}: start it afresh "
                             "with an empty database (a new id)")
                out.rows.append(m.Standing("removed", peer.note))
                out.alarms.append(peer.note)
            elif t != peer.me and t not in self.removed:
                self._set_removed(peer, t, by, out)

    def refused(self, peer: Host, sender: str, msg: Refuse, out) -> None:
        out.alarms.append(f"{sender} refused us: {msg.reason}")
        if msg.removed_by:
            self.learn_removed(peer, [(peer.me, msg.removed_by)], out)

    # -- messages and time ---------------------------------------------------------------------

    def receive(self, peer: Host, sender: str, msg, now: float, out) -> None:
        if isinstance(msg, Handover):
            # Only reservations inside the space this very message hands us.
            given = [(u, e) for u, e in msg.delta.entries if e.owner == peer.me]
            for u, address, names in msg.reserved:
                if any(v == u and e.start <= address < e.end for v, e in given):
                    out.rows += peer.allocator.adopt_reserved(u, address, names)
            peer.merge_given(sender, msg.delta, out)
            if sender not in self.removed:
                self._set_removed(peer, sender, sender, out)
            out.messages.append((sender, HandoverAck(peer.cluster, msg.req)))
        elif isinstance(msg, HandoverAck):
            lv = self.leaving.get(msg.req)
            if lv is not None:
                lv.unacked.discard(sender)
                if not lv.unacked:
                    del self.leaving[msg.req]
                    if lv.ref is not None:
                        out.replies.append((lv.ref, m.ok(left=peer.me, handed=lv.handed)))
        elif isinstance(msg, RemovePrepare):
            self._on_prepare(peer, sender, msg, now, out)
        elif isinstance(msg, RemoveAck):
            self._on_ack(peer, sender, msg, out)
        elif isinstance(msg, RemoveNack):
            if msg.req in self.removing:
                self._abort(peer, msg.req, f"{sender} refused: {msg.reason}", out)
        elif isinstance(msg, RemoveAbort):
            for t in msg.targets:
                if self.promised.get(t) == sender:
                    del self.promised[t]
                    out.rows.append(m.Removal(t, sender, "released"))
        elif isinstance(msg, RemoveDone):
            for t in msg.targets:
                if self.promised.get(t) == sender:
                    self._set_removed(peer, t, sender, out)

    def tick(self, peer: Host, now: float, out) -> None:
        if self.stale_promises:
            # A round of ours that a restart cut off: its client is gone, so withdraw it.
            self.stale_promises = False
            for t, runner in list(self.promised.items()):
                if runner == peer.me:
                    del self.promised[t]
                    out.rows.append(m.Removal(t, peer.me, "released"))
                    for p in sorted(peer.reachable):
                        out.messages.append((p, RemoveAbort(peer.cluster, (t,))))
        for t, runner in list(self.promised.items()):
            # A runner's round ends by its deadline, done or withdrawn; a withdrawal can be
            # lost. Twice that long after promising, the round is surely over, so the promise
            # lapses. Safe: a later round must get a promise from that runner too, and it
            # answers with what it reclaimed (or refuses while its round still runs).
            if runner != peer.me and now - self.promised_at.get(t, now) > \
                    2 * peer.request_timeout:
                del self.promised[t]
                out.rows.append(m.Removal(t, runner, "released"))
        for req, r in list(self.removing.items()):
            if now >= r.deadline:
                silent = sorted(r.asked - r.promised)
                self._abort(peer, req, f"no answer within {peer.request_timeout:g}s from "
                            f"{', '.join(silent)}", out)
        for req, lv in self.leaving.items():
            if lv.ref is not None and now >= lv.deadline:
                out.replies.append((lv.ref, m.error("timeout", (
                    f"{peer.me} handed its space over, but {', '.join(sorted(lv.unacked))} did "
                    f"not acknowledge in time; it sends the handover again every {RESEND:g}s "
                    "while it runs: stop it only once `ipamd status` shows no peer in "
                    "handing_over (one that never answers: rmpeer it once this one is "
                    "stopped)"))))
                lv.ref = None
            if now >= lv.resend_at:
                lv.resend_at = now + RESEND
                for to in sorted(lv.unacked & peer.reachable):
                    out.messages.append((to, self._handover(peer, req, to)))
