"""How the first peers come to own the universes (DESIGN.md rule 5): the state of this peer's
bootstrap, which Peer consults and feeds; it holds no reference to the peer.

- founder: one host owns everything (Peer.founder); a joiner owns nothing until it asks.
- seeds (`--init-peers a,b,c`): every seed computes the same split (Ring.split), no messages
  needed, once it knows every seed's id: given, or learned from the seeds' addresses as the
  transport reaches them (`identified`). A seed with a fresh database allocates only once it
  has heard every other seed and none of them knows a write of its id past the split: if one
  does, this database is not the one that made them (lost, or restored from a backup), and
  the peer stops (rule 3).
- quorum (`--quorum N`): single-decree Paxos among the peers that start together; the value is
  the set of peers the winning proposer could reach, and the split is made over it. Promises and
  acceptances are durable before they are answered, so a restart never votes twice. Safe while
  at most N peers vote: a majority of N is then a majority of the voters.
  A peer that starts voting after the decision is told it.
"""
from __future__ import annotations

import hashlib

from . import messages as m
from .peer_messages import Accept, Accepted, Decided, Prepare, Promise, VoteNack
from .ring import Ring
from .rings import RingWriter

ROUND_TICKS = 5  # ticks a proposal may take before it is dropped; later ranks wait longer


def decided_cluster(base: str, value: tuple[str, ...]) -> str:
    """The identity of a cluster made by a quorum: two quorums' clusters never match."""
    digest = hashlib.sha256("\0".join((base, *value)).encode()).hexdigest()[:16]
    return f"{base}/{digest}"


def adopt_split(writer: RingWriter, value: tuple[str, ...], rows: list,
                first=lambda ring: ring) -> None:
    """The split over value, as every peer computes it: each owner's write number 1.
    first: what the first peers make of a split ring (Peer.first_ring: spare rings carved)."""
    replica = writer.replica
    with writer.change(rows) as ch:
        for u in list(writer.rings):
            ch.replace(first(Ring.split(u, list(value))))
        for p in value:
            replica.vector[p] = max(replica.vector.get(p, 0), 1)
        replica.seq = max(replica.seq, replica.vector.get(replica.me, 0))


class Bootstrap:
    def __init__(self, me: str, base_cluster: str):
        self.me = me
        self.base_cluster = base_cluster  # a quorum's decided cluster is derived from it
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
        self.confirming: set[str] = set()  # seeds not heard from yet
        # Seeds known by address only: address -> id once the transport learned it.
        self.pending: dict[str, str | None] | None = None

    @property
    def decided(self) -> bool:
        return self.quorum is None or self.decision is not None

    # -- restart -------------------------------------------------------------------------------

    def restore(self, mode: str, quorum: int | None, vote: m.Vote | None,
                seed_addresses=()) -> None:
        """What the database says of this peer's bootstrap (Durable.load; durable.MODES).
        seed_addresses: a seed that does not know the seeds' ids yet."""
        self.mode = mode if mode in ("seeds", "quorum") else "founder"
        if mode == "seeds" and seed_addresses:
            self.pending = {a: None for a in seed_addresses}
        elif mode == "quorum":
            self.quorum = quorum
            if vote is not None:
                self.promised_ballot, self.accepted = vote.promised, vote.accepted
                self.decision = vote.decided
                if vote.promised:
                    self.max_round = vote.promised[0]

    def cluster(self) -> str:
        """The cluster this peer belongs to: a quorum's decision names its own."""
        if self.quorum is not None and self.decision is not None:
            return decided_cluster(self.base_cluster, self.decision)
        return self.base_cluster

    def waiting_note(self) -> str:
        """Why this peer may not allocate yet, or "" if bootstrap does not hold it back."""
        if self.pending is not None:
            missing = sorted(a for a, p in self.pending.items() if p is None)
            return f"waiting to learn the ids of seeds {', '.join(missing)}"
        if self.quorum is not None and self.decision is None:
            return (f"waiting for a quorum: {self.quorum // 2 + 1} of the first {self.quorum} "
                    "peers must agree on the initial split")
        if self.confirming:
            return (f"waiting to hear from seeds {', '.join(sorted(self.confirming))} "
                    "before allocating")
        return ""

    def status(self) -> dict:
        s = {"bootstrap": self.mode}
        if self.confirming:
            s["waiting_for"] = sorted(self.confirming)
        if self.quorum is not None:
            s["quorum"] = self.quorum
            s["decided"] = list(self.decision) if self.decision else None
            s["promised"] = list(self.promised_ballot) if self.promised_ballot else None
        return s

    # -- seeds ---------------------------------------------------------------------------------

    def identified(self, address: str, peer: str) -> tuple[str, ...] | None:
        """The transport learned who answers at a seed's address. Returns every seed's id
        once all are known (the split is then made over them), else None."""
        if self.pending is None or address not in self.pending:
            return None
        self.pending[address] = peer
        if any(p is None for p in self.pending.values()):
            return None
        ids = tuple(sorted(set(self.pending.values())))
        if self.me not in ids:
            raise ValueError(f"{self.me} is not one of the seeds {', '.join(ids)}")
        self.pending = None
        self.mode = "seeds"
        self.confirming = set(ids) - {self.me}
        return ids

    def heard(self, seed: str) -> str | None:
        """A seed answered, or was removed (its word can no longer come): "waiting" while
        others are still to be heard, "done" when it was the last, None if not waited for."""
        if seed not in self.confirming:
            return None
        self.confirming.discard(seed)
        return "waiting" if self.confirming else "done"

    # -- quorum voting -------------------------------------------------------------------------

    def _vote_row(self) -> m.Vote:
        return m.Vote(self.promised_ballot, self.accepted, self.decision)

    def vote(self, sender: str, msg, reachable: set[str], out) -> tuple[str, ...] | None:
        """A voting message (out: a Ready). Returns the value decided by it, if any: the
        caller then adopts the split (adopt_split) and becomes a member."""
        if self.decision is not None:
            if not (isinstance(msg, Decided) and msg.value):  # a question, or a late vote
                out.messages.append((sender, Decided(self.base_cluster, self.decision)))
            return None
        if self.quorum is None:
            return None  # not a voter: a founder's or a joiner's cluster has no vote
        majority = self.quorum // 2 + 1
        if isinstance(msg, Decided):
            if msg.value:
                return self._decide(msg.value, out)
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
                value = max(prior)[1] if prior else tuple(sorted(reachable | {self.me}))
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
                value = self._decide(self.accepted[1], out)
                for p in sorted(reachable):
                    out.messages.append((p, Decided(self.base_cluster, value)))
                return value
        elif isinstance(msg, VoteNack):
            self.max_round = max(self.max_round, msg.promised[0])
            if msg.ballot == self.ballot:
                self.ballot = None  # outbid: try again later with a higher round
        return None

    def _decide(self, value: tuple[str, ...], out) -> tuple[str, ...]:
        self.decision = tuple(value)
        self.ballot = None
        out.rows.append(self._vote_row())
        return self.decision

    def tick(self, reachable: set[str], out) -> None:
        if self.quorum is None or self.decision is not None:
            return
        self.vote_ticks += 1
        if self.ballot is not None and self.vote_ticks >= self.ballot_until:
            self.ballot = None
        voters = sorted(reachable | {self.me})
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
