"""How the first peers come to own the universes (mixed into Peer; DESIGN.md rule 5).

- founder: one host owns everything (Peer.founder).
- seeds (`--init-peers a,b,c`): every seed computes the same split (Ring.split), no messages
  needed. A seed with a fresh database allocates only once it has heard every other seed and
  none of them knows a write of its id past the split: if one does, this database is not the
  one that made them (lost, or restored from a backup), and the peer stops (rule 3).
- quorum (`--quorum N`): single-decree Paxos among the peers that start together; the value is
  the set of peers the winning proposer could reach, and the split is made over it. Promises and
  acceptances are durable before they are answered, so a restart never votes twice. Safe while
  at most N peers vote: a majority of N is then a majority of the voters.
- joiner: owns nothing until it asks. A peer that starts voting after the decision is told it.

Any peer also stops if another knows more writes of its id than it has made (the same check
as the seed's, made on every gossip).
"""
from __future__ import annotations

import hashlib

from . import messages as m
from .addr import Cidr
from .ring import Ring
from .wire import Accept, Accepted, Decided, Prepare, Promise, VoteNack

ROUND_TICKS = 5  # ticks a proposal may take before it is dropped; later ranks wait longer


def decided_cluster(base: str, value: tuple[str, ...]) -> str:
    """The identity of a cluster made by a quorum: two quorums' clusters never match."""
    digest = hashlib.sha256("\0".join((base, *value)).encode()).hexdigest()[:16]
    return f"{base}/{digest}"


class Bootstrap:
    def __init__(self):
        self.base_cluster = self.cluster
        self.mode = "founder"
        self.quorum: int | None = None
        self.promised_ballot = None
        self.accepted = None
        self.decision: tuple[str, ...] | None = None
        self.ballot = None
        self.promises: dict[str, object] = {}
        self.accepts: set[str] = set()
        self.vote_ticks = 0
        self.ballot_until = 0
        self.next_try = 0
        self.max_round = 0
        self.confirming: set[str] = set()

    @property
    def decided(self) -> bool:
        return self.quorum is None or self.decision is not None

    # -- construction and restart --------------------------------------------------------------

    @classmethod
    def seeded(cls, me: str, cluster: str, universes: list[Cidr], default_subnet: Cidr,
               seeds: list[str], **kw):
        """A seed's first start: the split, and a wait to hear from the other seeds."""
        if me not in seeds:
            raise ValueError(f"{me} is not one of the seeds {', '.join(sorted(seeds))}")
        peer = cls(me, cluster, [Ring(u) for u in universes], default_subnet, **kw)
        peer.mode = "seeds"
        rows = peer._adopt(tuple(sorted(set(seeds))))
        peer._confirm(set(seeds) - {me})
        return peer, rows + [m.Standing(peer.standing, peer.note)]

    @classmethod
    def voter(cls, me: str, cluster: str, universes: list[Cidr], default_subnet: Cidr,
              quorum: int, **kw):
        peer = cls(me, cluster, [Ring(u) for u in universes], default_subnet, **kw)
        peer.restore_bootstrap("quorum", quorum, None, None)
        return peer, [m.Vote(None, None, None), m.Standing(peer.standing, peer.note)]

    def restore_bootstrap(self, mode: str, quorum: int | None, vote: m.Vote | None,
                          standing: m.Standing | None, seeds=()) -> None:
        self.mode = mode
        if mode == "quorum":
            self.quorum = quorum
            if vote is not None:
                self.promised_ballot, self.accepted = vote.promised, vote.accepted
                self.decision = vote.decided
                if vote.promised:
                    self.max_round = vote.promised[0]
            if self.decision is not None:
                self.cluster = decided_cluster(self.base_cluster, self.decision)
            else:
                self.standing = "waiting"
                self.note = (f"waiting for a quorum: {quorum // 2 + 1} of the first {quorum} "
                             "peers must agree on the initial split")
        if standing is not None:
            self.standing, self.note = standing.state, standing.note
            if standing.state == "waiting" and mode == "seeds":
                self._confirm(set(seeds) - {self.me})

    def _confirm(self, seeds: set[str]) -> None:
        self.confirming = set(seeds)
        if self.confirming:
            self.standing = "waiting"
            self.note = (f"waiting to hear from seeds {', '.join(sorted(self.confirming))} "
                         "before allocating")

    def bootstrap_status(self) -> dict:
        s = {"bootstrap": self.mode}
        if self.confirming:
            s["waiting_for"] = sorted(self.confirming)
        if self.quorum is not None:
            s["quorum"] = self.quorum
            s["decided"] = list(self.decision) if self.decision else None
            s["promised"] = list(self.promised_ballot) if self.promised_ballot else None
        return s

    def _adopt(self, value: tuple[str, ...]) -> list:
        """The split over value, as every peer computes it: each owner's write number 1."""
        rows = []
        for u in list(self.replica.rings):
            ring = Ring.split(u, list(value))
            self.replica.rings[u] = self.allocator.rings[u] = ring
            rows += m.ring_rows(u, ring.entries) + self.allocator.ring_changed(u)
        for p in value:
            self.replica.vector[p] = max(self.replica.vector.get(p, 0), 1)
        self.replica.seq = max(self.replica.seq, self.replica.vector.get(self.me, 0))
        return rows + [self._clock_row()]

    # -- checks made on every gossip -----------------------------------------------------------

    def _check_vector(self, sender: str, theirs: dict, out) -> None:
        if theirs.get(self.me, 0) > self.replica.seq and self.standing != "stale":
            self.standing = "stale"
            self.note = (f"{sender} knows writes of {self.me} up to {theirs[self.me]} but this "
                         f"database has only {self.replica.seq}: it was lost or restored from a "
                         "backup; start afresh with an empty database (a new id)")
            out.rows.append(m.Standing("stale", self.note))
            out.alarms.append(self.note)
            return
        self._heard_seed(sender, out)

    def _heard_seed(self, seed: str, out) -> None:
        """A seed answered, or was removed (its word can no longer come)."""
        if seed in self.confirming:
            self.confirming.discard(seed)
            if self.confirming:
                self._confirm(self.confirming)
            elif self.standing == "waiting":
                self.standing, self.note = "member", ""
                out.rows.append(m.Standing("member"))

    # -- quorum voting -------------------------------------------------------------------------

    def _vote_row(self) -> m.Vote:
        return m.Vote(self.promised_ballot, self.accepted, self.decision)

    def _vote(self, sender: str, msg, out) -> None:
        if self.decision is not None:
            if not (isinstance(msg, Decided) and msg.value):  # a question, or a late vote
                out.messages.append((sender, Decided(self.base_cluster, self.decision)))
            return
        if self.quorum is None:
            return  # not a voter: a founder's or a joiner's cluster has no vote
        majority = self.quorum // 2 + 1
        if isinstance(msg, Decided):
            if msg.value:
                self._decide(msg.value, out)
        elif isinstance(msg, Prepare):
            self.max_round = max(self.max_round, msg.ballot[0])
            if self.promised_ballot is None or msg.ballot > tuple(self.promised_ballot):
                self.promised_ballot = msg.ballot
                out.rows.append(self._vote_row())
                out.messages.append((sender, Promise(self.base_cluster, msg.ballot,
                                                     self.accepted)))
            else:
                out.messages.append((sender, VoteNack(self.base_cluster, msg.ballot,
                                                      self.promised_ballot)))
        elif isinstance(msg, Accept):
            self.max_round = max(self.max_round, msg.ballot[0])
            if self.promised_ballot is None or msg.ballot >= tuple(self.promised_ballot):
                self.promised_ballot = msg.ballot
                self.accepted = (msg.ballot, tuple(msg.value))
                out.rows.append(self._vote_row())
                out.messages.append((sender, Accepted(self.base_cluster, msg.ballot)))
            else:
                out.messages.append((sender, VoteNack(self.base_cluster, msg.ballot,
                                                      self.promised_ballot)))
        elif isinstance(msg, Promise) and msg.ballot == self.ballot and not self.accepts:
            self.promises[sender] = msg.accepted
            if len(self.promises) >= majority:
                prior = [a for a in self.promises.values() if a is not None]
                value = max(prior)[1] if prior else tuple(sorted(self.reachable | {self.me}))
                # Our own acceptance first (durable before the Accepts leave), then theirs.
                self.promised_ballot = self.ballot
                self.accepted = (self.ballot, value)
                self.accepts = {self.me}
                out.rows.append(self._vote_row())
                for p in sorted(self.promises):
                    if p != self.me:
                        out.messages.append((p, Accept(self.base_cluster, self.ballot, value)))
        elif isinstance(msg, Accepted) and msg.ballot == self.ballot and self.accepts:
            self.accepts.add(sender)
            if len(self.accepts) >= majority:
                value = self.accepted[1]
                self._decide(value, out)
                for p in sorted(self.reachable):
                    out.messages.append((p, Decided(self.base_cluster, value)))
        elif isinstance(msg, VoteNack):
            self.max_round = max(self.max_round, msg.promised[0])
            if msg.ballot == self.ballot:
                self.ballot = None  # outbid: try again later with a higher round

    def _decide(self, value: tuple[str, ...], out) -> None:
        self.decision = tuple(value)
        self.ballot = None
        out.rows.append(self._vote_row())
        out.rows += self._adopt(self.decision)
        self.cluster = decided_cluster(self.base_cluster, self.decision)
        self.standing, self.note = "member", ""
        out.rows.append(m.Standing("member"))

    def _vote_tick(self, out) -> None:
        if self.quorum is None or self.decision is not None:
            return
        self.vote_ticks += 1
        if self.ballot is not None and self.vote_ticks >= self.ballot_until:
            self.ballot = None
        voters = sorted(self.reachable | {self.me})
        if self.vote_ticks % ROUND_TICKS == 1:
            # Ask whether the others have decided already (a late starter, a restart).
            for p in voters:
                if p != self.me:
                    out.messages.append((p, Decided(self.base_cluster, ())))
        if len(voters) < self.quorum // 2 + 1:
            return  # too few to decide
        rank = voters.index(self.me)
        if self.ballot is None and self.vote_ticks >= self.next_try + ROUND_TICKS * rank:
            self.max_round += 1
            self.ballot = (self.max_round, self.me)
            self.ballot_until = self.vote_ticks + ROUND_TICKS
            self.next_try = self.vote_ticks + ROUND_TICKS
            self.accepts = set()
            self.promises = {}
            if self.promised_ballot is None or self.ballot > tuple(self.promised_ballot):
                self.promised_ballot = self.ballot
                self.promises[self.me] = self.accepted
                out.rows.append(self._vote_row())
            for p in voters:
                if p != self.me:
                    out.messages.append((p, Prepare(self.base_cluster, self.ballot)))
