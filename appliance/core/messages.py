"""Requests the core accepts, and the rows it asks the shell to persist.

Requests arrive already validated by a protocol parser; rows are plain values the store turns
into SQL in one transaction before any reply leaves (DESIGN.md section 2).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .addr import Cidr


@dataclass(frozen=True)
class Allocate:
    handle: str
    subnet: Cidr | None = None
    anchor: str | None = None  # JSON text of the liveness anchor, kept as given
    # Only from [first, last] (CNI's rangeStart/rangeEnd), as integers of the subnet's family.
    range: tuple[int, int] | None = None
    # The subnet's gateway: reserved while this handle holds an address of its family, so
    # that no allocation takes it meanwhile (on any host: its owner reserves it).
    gateway: int | None = None
    # Only from this tenant's blocks (and nothing but a tenant's allocations lands there).
    tenant: str | None = None


@dataclass(frozen=True)
class Claim:
    handle: str
    family: int
    address: int
    subnet: Cidr | None = None
    anchor: str | None = None
    tenant: str | None = None  # an address in this tenant's blocks (refused there without it)


@dataclass(frozen=True)
class Release:
    handle: str
    address: tuple[int, int] | None = None  # only this one of the handle's addresses


@dataclass(frozen=True)
class TakeSets:
    """One address per set, all or nothing, in one commit (a CNI ADD with several range sets).

    Each set lists alternatives (Allocate or Claim for `handle`), tried in order; only
    "exhausted" moves on to the next one. When a set cannot be served here, nothing of this
    request is kept and peers are asked for space as for a single Allocate or Claim."""
    handle: str
    sets: tuple[tuple[Allocate | Claim, ...], ...]


@dataclass(frozen=True)
class ReserveGateway:
    """Not a client request: what an Allocate lacks when the gateway it names is owned by
    another peer. That owner is asked to reserve it, so no host ever hands it out."""
    family: int
    address: int
    subnet: Cidr
    handle: str


@dataclass(frozen=True)
class ReleaseIf:
    """The sweeper's release: only these allocations of handle, and only while each is still
    the very allocation found dead (same address and allocated_at), so an address given
    anew in the meantime is never taken from its new holder."""
    handle: str
    allocations: tuple[tuple[int, int, float], ...]  # (family, address, allocated_at)


@dataclass(frozen=True)
class ReleaseUnlisted:
    """CNI GC: release every handle that starts with prefix and is not in keep."""
    prefix: str
    keep: frozenset[str]


@dataclass(frozen=True)
class CanServe:
    """Could allocations for these sets succeed now, from this host or a reachable peer
    (CNI STATUS)? Changes nothing. Each set: (subnet, first, last) alternatives."""
    sets: tuple[tuple[tuple[Cidr, int, int], ...], ...]


@dataclass(frozen=True)
class Lookup:
    handle: str


@dataclass(frozen=True)
class List:
    pass


@dataclass(frozen=True)
class Holder:
    """Which handle holds this address here, if any (a read, without listing them all)."""
    family: int
    address: int


@dataclass(frozen=True)
class Status:
    pass


@dataclass(frozen=True)
class Leave:
    """Hand all of this peer's space to live peers and stop."""


@dataclass(frozen=True)
class RemovePeer:
    """Reclaim peers that are gone for good (DESIGN.md rule 6)."""
    targets: tuple[str, ...]
    force: bool = False  # skip the reachability and majority checks: the operator vouches


@dataclass(frozen=True)
class AddRange:
    """Add an allocation range to the whole cluster (`ipamd range add`): carved out of the
    spare space (spare.py), which only its owner may do, so two hosts can never add
    overlapping ranges, partitioned or not. blocks: block space (`--blocks`), which blocks
    for tenants and leases are cut from, never allocated from itself."""
    cidr: Cidr
    blocks: bool = False


@dataclass(frozen=True)
class RetireRange:
    """Stop (retired=True) or resume new allocations in a range; existing ones stay."""
    cidr: Cidr
    retired: bool = True


@dataclass(frozen=True)
class LeaseBlock:
    """A block of block space leased whole to handle (a VM host, a VPN): `release` gives it
    back."""
    handle: str
    prefix_len: int
    family: int = 4
    within: Cidr | None = None


@dataclass(frozen=True)
class ReleaseBlocks:
    """Not a client request: what a Release does after the addresses, when the handle also
    holds blocks (released: the addresses it gave back already)."""
    handle: str
    released: tuple[str, ...] = ()


@dataclass(frozen=True)
class TenantCreate:
    name: str
    prefix_len: int
    family: int = 4
    max_blocks: int = 1
    within: Cidr | None = None  # the block space its blocks come from (remembered)


@dataclass(frozen=True)
class TenantGrow:
    name: str
    within: Cidr | None = None


@dataclass(frozen=True)
class TenantDelete:
    """Refused while an address is held in the tenant's blocks on any host; force releases
    those this host holds first (they then wait out their quarantine)."""
    name: str
    force: bool = False


@dataclass(frozen=True)
class NamesCreate:
    pool: str
    pattern: str  # prefix{000..999}suffix: names.Pattern


@dataclass(frozen=True)
class LeaseName:
    handle: str
    pool: str
    anchor: str | None = None


@dataclass(frozen=True)
class ClaimName:
    handle: str
    pool: str
    name: str
    anchor: str | None = None


LEASES = (AddRange, LeaseBlock, ReleaseBlocks, TenantCreate, TenantGrow, TenantDelete,
          NamesCreate)

Request = (Allocate | Claim | TakeSets | Release | ReleaseIf | ReleaseUnlisted | Lookup | List
           | Holder | Status | CanServe | Leave | RemovePeer | AddRange | RetireRange | LeaseBlock
           | TenantCreate | TenantGrow | TenantDelete | NamesCreate | LeaseName | ClaimName)
# What a host may do only as a member in good standing: it gives out addresses or moves space.
TAKES = (Allocate, Claim, TakeSets, Leave, RemovePeer, AddRange, RetireRange, LeaseBlock,
         TenantCreate, TenantGrow, TenantDelete, NamesCreate, LeaseName, ClaimName)


# Rows: what must be durable before a reply is sent.
@dataclass(frozen=True)
class PutAllocation:
    address: str
    universe: str | None  # None: a static address outside every universe
    subnet: str
    handle: str
    anchor: str | None
    allocated_at: float
    # Never used before (so it has no freed row to drop: what is freed was used first). Most
    # allocations: the store skips their DELETE FROM freed. Not part of what the row says.
    fresh: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class FreeAddress:
    address: str
    universe: str | None  # None: static, forgotten at once rather than quarantined
    freed_at: float


@dataclass(frozen=True)
class Reserve:
    """An address not to be handed out (a gateway) while it has a holder: a handle here, a
    peer it was reserved for, "kept" or "releasing" (allocator.KEPT)."""
    address: str
    holder: str
    universe: str
    note: str


@dataclass(frozen=True)
class Unreserve:
    """One holder of a reserved address no longer holds it."""
    address: str
    holder: str


@dataclass(frozen=True)
class ForgetFreed:
    """A freed address no longer remembered one by one: it left with donated space, or was
    folded into a FreedSpan."""
    address: str


@dataclass(frozen=True)
class FreedSpan:
    """[start, last] were freed once and are free: less recently freed than every address
    remembered one by one (allocator.py, freelist.py). Replaces the span starting at start."""
    universe: str
    start: str
    last: str


@dataclass(frozen=True)
class DropFreedSpan:
    """The span of freed addresses starting at start is gone (taken from, merged, forgotten)."""
    start: str


@dataclass(frozen=True)
class RingWrite:
    universe: str
    start: str
    last: str  # the entry's last address: [start, last] as text, readable in sqlite3
    owner: str
    version: int
    free_hint: int
    stamp_peer: str
    stamp_seq: int


@dataclass(frozen=True)
class ClockWrite:
    """This peer's write counter and version vector, durable before any write leaves."""
    seq: int
    vector: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Removal:
    """target is being removed by `by` (state "promised", since `at`), was removed
    ("removed"), or the promise was withdrawn ("released": the row is deleted)."""
    target: str
    by: str
    state: str
    at: float = 0.0


@dataclass(frozen=True)
class PeerSeen:
    """A peer this one has heard from: a member until removed, even if it never wrote."""
    peer: str


@dataclass(frozen=True)
class Standing:
    """This peer's place: "member", "waiting" (bootstrap not decided), "left", or "removed"
    (told by the cluster that it was removed), with why."""
    state: str
    note: str = ""


@dataclass(frozen=True)
class Vote:
    """Quorum bootstrap state: what this peer promised and accepted, and what was decided.
    Durable before any answer leaves, so a restart never votes twice."""
    promised: tuple[int, str] | None
    accepted: tuple[tuple[int, str], tuple[str, ...]] | None
    decided: tuple[str, ...] | None


@dataclass(frozen=True)
class SeedIds:
    """The ids of the seeds, learned from their addresses: the split was made over them."""
    ids: tuple[str, ...]


@dataclass(frozen=True)
class AddUniverse:
    """A universe this peer learned of or made after the database was created (a range
    added online): its row comes before any ring row of it. kind: "range" or "static"."""
    cidr: str
    family: int
    kind: str


Row = (AddUniverse | PutAllocation | FreeAddress | Reserve | Unreserve | ForgetFreed | FreedSpan | DropFreedSpan
       | RingWrite | ClockWrite | Removal | PeerSeen | Standing | Vote | SeedIds)


def ring_rows(u: Cidr, entries) -> list[RingWrite]:
    """The rows that persist ring entries of universe u."""
    return [RingWrite(str(u), u.addr(e.start), u.addr(e.end - 1), e.owner, e.version,
                      e.free_hint, e.stamp[0], e.stamp[1]) for e in entries]


def ok(**fields) -> dict:
    return {"ok": True, **fields}


def error(code: str, message: str) -> dict:
    return {"ok": False, "error": {"code": code, "message": message}}
