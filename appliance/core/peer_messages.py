"""What peers say to each other: one frozen dataclass per message, each carrying the cluster.

The peer protocol (issue #4) frames these as msgpack; the simulator passes them as they are.
"""
from __future__ import annotations

from dataclasses import dataclass

from .addr import Cidr
from .gossip import Delta
from .ring import Entry

Ballot = tuple[int, str]  # (round, proposer): compared as a tuple, so no two proposers tie
Entries = tuple[tuple[Cidr, Entry], ...]


@dataclass(frozen=True)
class Gossip:
    cluster: str
    delta: Delta
    nack: bool = False  # "your last delta assumed more than I have": resend from my vector
    removed: tuple[tuple[str, str], ...] = ()  # (peer, who removed it): never to return
    # A probe: only the digest of the sender's vector and removals (the delta empty). The
    # receiver answers only when its own digest differs, with its whole vector (a hello).
    digest: bytes = b""
    # A reply to a delta (news pushed, or our answer to a hello): merged, never answered. Only
    # deltas without it are answered, once: else two busy peers, each with news for the other,
    # would talk every tick for ever, and each peer to ever more of the others.
    answer: bool = False


@dataclass(frozen=True)
class SpaceRequest:
    cluster: str
    req: int
    universe: Cidr
    lo: int
    hi: int
    address: int | None = None  # a claim: the block holding this address
    # A gateway: the owner reserves `address` for good (never handed out) and says so with an
    # empty grant; no space moves.
    gateway: bool = False
    # Exactly [lo, hi), all or nothing (leases.give_exact): a range, block or key to carve.
    exact: bool = False


@dataclass(frozen=True)
class SpaceGrant:
    """The donated space, committed at the donor first, as a gossip delta made against what
    the donor last knew of the receiver: merged whole, it raises the receiver's vector over the
    donor's writes, so the receiver passes them on even if the donor dies at once."""
    cluster: str
    req: int
    delta: Delta


@dataclass(frozen=True)
class SpaceDenied:
    cluster: str
    req: int
    reason: str
    code: str = "exhausted"  # the error the asker's client gets if no one else can help


@dataclass(frozen=True)
class Refuse:
    cluster: str
    reason: str
    removed_by: str = ""  # "you were removed, by this peer": the receiver stops for good


# -- leave and rmpeer ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Handover:
    """A leaving peer's space, committed before this is sent; a delta as in SpaceGrant. With
    it, the gateways in that space it kept reserved, and for whom (peer ids, or "kept"): the
    receiver keeps them reserved from the moment it owns them."""
    cluster: str
    req: int
    delta: Delta
    reserved: tuple[tuple[Cidr, int, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class HandoverAck:
    cluster: str
    req: int


@dataclass(frozen=True)
class RemovePrepare:
    """"Will you let me remove targets?" with the runner's vector, so the answer holds
    exactly what the runner lacks."""
    cluster: str
    req: int
    targets: tuple[str, ...]
    vector: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class RemoveAck:
    """A promise: from now on this peer takes nothing from the targets and lets no one else
    remove them. Carries everything it knows that the runner lacked, every write of the
    targets' it holds (grants included), and every peer it knows of."""
    cluster: str
    req: int
    delta: Delta
    writes: Entries
    members: tuple[str, ...]
    # Gateways in the targets' space that the sender's handles hold: the reclaimer keeps them
    # reserved for it from the moment it owns that space.
    reserved: tuple[tuple[Cidr, int, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class GatewayRelease:
    """"No handle of mine names this gateway any more": its owner drops the reservation it
    made for the sender, and answers GatewayReleased once that is durable."""
    cluster: str
    universe: Cidr
    address: int


@dataclass(frozen=True)
class GatewayReleased:
    cluster: str
    universe: Cidr
    address: int


@dataclass(frozen=True)
class RemoveNack:
    cluster: str
    req: int
    reason: str


@dataclass(frozen=True)
class RemoveAbort:
    cluster: str
    targets: tuple[str, ...]


@dataclass(frozen=True)
class RemoveDone:
    cluster: str
    targets: tuple[str, ...]


# -- quorum bootstrap (single-decree Paxos over the set of first peers) --------------------------

@dataclass(frozen=True)
class Prepare:
    cluster: str
    ballot: Ballot


@dataclass(frozen=True)
class Promise:
    cluster: str
    ballot: Ballot
    accepted: tuple[Ballot, tuple[str, ...]] | None


@dataclass(frozen=True)
class Accept:
    cluster: str
    ballot: Ballot
    value: tuple[str, ...]


@dataclass(frozen=True)
class Accepted:
    cluster: str
    ballot: Ballot


@dataclass(frozen=True)
class VoteNack:
    cluster: str
    ballot: Ballot
    promised: Ballot


@dataclass(frozen=True)
class Decided:
    cluster: str
    value: tuple[str, ...]


Message = (Gossip | SpaceRequest | SpaceGrant | SpaceDenied | Refuse | Handover | HandoverAck
           | GatewayRelease | GatewayReleased
           | RemovePrepare | RemoveAck | RemoveNack | RemoveAbort | RemoveDone
           | Prepare | Promise | Accept | Accepted | VoteNack | Decided)
