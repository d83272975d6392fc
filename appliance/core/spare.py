"""Carved space: ranges, block space, tenants' blocks and name pools, all made by the one who
owns the space they are cut from (DESIGN.md rule 9: leases of blocks and names by the same
ring rules as addresses).

Spare space: every database made since schema 5 has two spare universes, 0.0.0.0/0 and ::/0,
split among the first peers like the ranges (a founder owns all; seeds split them) and moved by
leave and rmpeer like any space. Everything else is carved out of a parent ring: an entry whose
owner is a marker ("@range 10.32.0.0/12"), never a peer, says that span is now a universe of
its own, with a ring of its own. What may be carved where:

  parent          marker                         the universe it makes (kind)
  spare           @range C / @retired C          an allocation range; retired: no new allocations
  spare           @static C                      claim-only space (--subnet outside the ranges)
  spare           @blocks C                      block space: never allocated from; blocks are
                                                 cut from it
  spare (REGISTRY) @tenant C NAME FAMILY PLEN MAX [IN]
                                                 a tenant's key: whoever owns it adds blocks
  spare (REGISTRY) @names C POOL PATTERN         a pool of names: its addresses are the names
  block space     @block C TENANT                a tenant's block: allocated from for it only
  block space     @lease C HANDLE                a block leased whole to a handle
  a block, key    @dissolved C                   (in the carved universe's own ring) given back

To carve, a host must own all of C in the parent; it asks the owners for exactly the parts it
lacks (SpaceRequest with exact=True), then in one change writes the marker over C in the parent
and C's own ring, owned wholly by itself (rings.Change.create). Since only an owner writes its
entries, two hosts can never carve overlapping universes, partitioned or not: the side without
the owner is refused, naming it. Peers learn of C from the marker, which travels in the same
write as C's first ring entry. A tenant's or a pool's key is a fixed CIDR in REGISTRY derived
from its name, so a name can be created once in the whole cluster; and only the key's owner
adds a tenant's blocks, so the tenant's block limit holds under partitions too.

To give a block (or a tenant's key) back, a host must own all of it with nothing held there;
it rewrites the parent's markers over C as its own plain space again, and C's own entries as
"@dissolved C". A universe, once known, is never forgotten: carved again, its entries are
rewritten to the new holder at higher versions (rings.Change.revive).

Retiring a range rewrites its marker "@range" <-> "@retired". Any member may: that is no
question of ownership, and two writes of one version are settled by the larger (owner, stamp)
rather than reported as a conflict (Ring.merge), since either outcome is safe.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from .addr import BITS, AddrError, Cidr, exact_cidr

SPARE = (Cidr(4, 0, 0), Cidr(6, 0, 0))
# Where tenants' and name pools' keys are carved: one /96 per name, by a hash of it. No range
# may overlap it (AddRange refuses). Two names whose hashes collide: the second is refused.
REGISTRY = Cidr(6, 0xfdff_ffff_ffff_ffff << 64, 64)
MARK = "@"
DISSOLVED = "dissolved"
# marker state -> (the kind of universe it makes, the parent kinds it may be carved from,
# how many words follow the CIDR)
STATES = {"range": ("range", ("spare",), 0), "retired": ("range", ("spare",), 0),
          "static": ("static", ("spare",), 0), "blocks": ("blocks", ("spare",), 0),
          "tenant": ("tenant", ("spare",), (4, 5)), "names": ("names", ("spare",), 2),
          "block": ("block", ("blocks",), 1), "lease": ("lease", ("blocks",), 1)}
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}\Z")
MAX_OWNER = 255  # what the peer codec accepts as an entry's owner (peer ids are shorter)


@dataclass(frozen=True)
class Carve:
    state: str        # a key of STATES, or DISSOLVED
    universe: Cidr
    args: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return STATES[self.state][0] if self.state != DISSOLVED else DISSOLVED

    @property
    def name(self) -> str:
        """The tenant, handle or pool a block, lease, key or pool is for."""
        return self.args[0] if self.args else ""

    def text(self) -> str:
        return " ".join((f"{MARK}{self.state}", str(self.universe), *self.args))


def is_spare(u: Cidr) -> bool:
    return u.prefix == 0


def is_marker(owner: str) -> bool:
    return owner.startswith(MARK)


def marker(state: str, u: Cidr, *args: str) -> str:
    """The owner written over carved space: its state, its CIDR and what it is for."""
    text = Carve(state, u, tuple(args)).text()
    parse_marker(text)  # our own markers obey the grammar peers are held to
    return text


def parse_marker(owner: str) -> Carve:
    """A marker's meaning; ValueError naming the fault for anything else (a peer's bad data)."""
    words = owner[len(MARK):].split(" ") if is_marker(owner) else []
    if len(words) < 2 or len(owner) > MAX_OWNER:
        raise ValueError(f"{owner[:80]!r} is not a carve marker")
    state, text, args = words[0], words[1], tuple(words[2:])
    if state != DISSOLVED and state not in STATES:
        raise ValueError(f"{owner[:80]!r}: unknown carve state {state!r}")
    try:
        u = exact_cidr(text, "carved universe")
    except AddrError as e:
        raise ValueError(str(e)) from None
    if is_spare(u):
        raise ValueError(f"{owner[:80]!r} carves a whole address family")
    n = 0 if state == DISSOLVED else STATES[state][2]
    if len(args) not in (n if isinstance(n, tuple) else (n,)) or not all(args):
        raise ValueError(f"{owner[:80]!r}: {state} takes {n} words after its CIDR")
    if state == "tenant":
        fam, plen, most = args[1:4]
        if fam not in ("4", "6") or not plen.isdigit() or not most.isdigit() or \
                not 1 <= int(plen) <= BITS[int(fam)]:
            raise ValueError(f"{owner[:80]!r}: a tenant needs a family, a prefix length and a "
                             "block limit")
        if len(args) == 5:
            try:
                exact_cidr(args[4], "tenant space")
            except AddrError as e:
                raise ValueError(str(e)) from None
    return Carve(state, u, args)


def key_of(kind: str, name: str) -> Cidr:
    """The /96 of REGISTRY that a tenant's or a pool's name is carved at."""
    h = int.from_bytes(hashlib.blake2b(f"{kind}:{name}".encode(), digest_size=4).digest(), "big")
    return Cidr(6, REGISTRY.start + (h << 32), 96)


def check_name(what: str, name: str) -> str | None:
    """Why name cannot name a tenant or a pool, or None."""
    if not NAME.match(name):
        return (f"{what} name {name!r} must be 1 to 63 characters of a-z, 0-9, '.', '_' and "
                "'-', starting with a letter or digit")
    return None


def block_size(family: int, prefix_len: int) -> int:
    return 1 << (BITS[family] - prefix_len)
