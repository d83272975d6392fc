"""Spare space: all of IPv4 and IPv6 not yet made a universe, in a ring like any universe.

Ranges are added to a running cluster (`ipamd range add`) by carving them out of spare space,
so the question "may this host add that range?" is the one the rings already answer safely:
who owns that space? Every database made since schema 5 has two spare universes, 0.0.0.0/0
and ::/0, split among the first peers like the ranges (a founder owns all; seeds split them),
moved by leave and rmpeer like any space. Every range and static universe is a carved span
there: an entry whose owner is a marker naming it ("@range 10.32.0.0/12"), never a peer.

To add a range a host must own all of its spare space; it asks the owners for the parts it
lacks (a SpaceRequest in a spare universe asks for exactly [lo, hi)), then in one change writes
the marker over that space and a new ring for the range, owned wholly by itself (rings.py
Change.create). Since only an owner writes its entries, two hosts can never carve overlapping
ranges, partitioned or not: the side without the owner is refused, naming it. Peers learn of
the range from the marker, which travels in the same delta as the new ring's first entry.

Retiring a range (no new allocations there) rewrites its marker "@range" <-> "@retired". Any
member may: that is no question of ownership, and concurrent writes of one version are settled
by the larger (owner, stamp) rather than reported as a conflict (Ring.merge), since either
outcome is safe: a retired range still holds what it held.
"""
from __future__ import annotations

from .addr import Cidr, exact_cidr

SPARE = (Cidr(4, 0, 0), Cidr(6, 0, 0))
MARK = "@"
KINDS = {"range": "range", "retired": "range", "static": "static"}  # state -> universe kind
RETIRED = MARK + "retired "


def is_spare(u: Cidr) -> bool:
    return u.prefix == 0


def is_marker(owner: str) -> bool:
    return owner.startswith(MARK)


def marker(state: str, u: Cidr) -> str:
    """The owner written over a carved universe's spare space: its state and its CIDR."""
    if state not in KINDS:
        raise ValueError(f"unknown carve state {state!r}")
    return f"{MARK}{state} {u}"


def parse_marker(owner: str) -> tuple[str, Cidr]:
    """(state, universe) of a marker; ValueError for anything else (a peer's bad data)."""
    state, _, text = owner[len(MARK):].partition(" ")
    if not is_marker(owner) or state not in KINDS:
        raise ValueError(f"{owner!r} is not a carve marker")
    try:
        u = exact_cidr(text, "carved universe")
    except ValueError as e:
        raise ValueError(str(e)) from None
    if is_spare(u):
        raise ValueError(f"{owner!r} carves a whole address family")
    return state, u


def spare_of(u: Cidr) -> Cidr:
    return SPARE[0] if u.family == 4 else SPARE[1]
