"""The allocator of one peer: hands out addresses from the space its ring entries give it.

Pure: fed a request and the time, returns (reply, rows). The shell commits the rows before it
sends the reply. Order of reuse: never-used addresses first, lowest first (they are the least
recently freed of all), then freed addresses once their quarantine is over, least recently freed
first.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .addr import Cidr, format_addr
from .intervals import IntervalSet
from .messages import (Allocate, Claim, FreeAddress, List, Lookup, PutAllocation, Release, Row,
                       Status, error, ok)
from .ring import Ring


@dataclass
class Held:
    family: int
    address: int
    universe: Cidr | None
    subnet: Cidr
    handle: str
    anchor: str | None
    allocated_at: float
    text: str = ""  # the address as text, formatted once: ipaddress formatting is slow

    def __post_init__(self):
        if not self.text:
            self.text = format_addr(self.family, self.address)

    def view(self) -> dict:
        return {"handle": self.handle, "address": f"{self.text}/{self.subnet.prefix}",
                "subnet": str(self.subnet), "anchor": self.anchor,
                "allocated_at": self.allocated_at}


class Allocator:
    def __init__(self, me: str, rings: list[Ring], default_subnet: Cidr, reuse_delay: float,
                 gateways: frozenset[tuple[int, int]] = frozenset()):
        self.me = me
        self.rings = {r.universe: r for r in rings}
        self.default_subnet = default_subnet
        self.reuse_delay = reuse_delay
        self.gateways = gateways
        self.by_addr: dict[tuple[int, int], Held] = {}
        self.by_handle: dict[str, dict[Cidr, Held]] = {}
        # Per universe: every address ever used (allocated or freed), and the freed ones in the
        # order they were freed.
        self.used: dict[Cidr, IntervalSet] = {u: IntervalSet() for u in self.rings}
        self.freed: dict[Cidr, OrderedDict[int, float]] = {u: OrderedDict() for u in self.rings}
        self._owned = {u: r.owned_by(me) for u, r in self.rings.items()}

    # -- loading (restart) ---------------------------------------------------------------------

    def load_allocation(self, held: Held) -> None:
        self._hold(held)
        if held.universe is not None:
            self.used[held.universe].add(held.address)

    def load_freed(self, universe: Cidr, address: int, freed_at: float) -> None:
        """Call in order of freed_at."""
        self.used[universe].add(address)
        self.freed[universe][address] = freed_at

    # -- requests ------------------------------------------------------------------------------

    def apply(self, req, now: float) -> tuple[dict, list[Row]]:
        if isinstance(req, Allocate):
            return self._allocate(req, now)
        if isinstance(req, Claim):
            return self._claim(req, now)
        if isinstance(req, Release):
            return self._release(req, now)
        if isinstance(req, Lookup):
            held = self.by_handle.get(req.handle)
            if not held:
                return error("not_found", f"no address is held by handle {req.handle!r}"), []
            return ok(handle=req.handle, addresses=[h.view() for h in held.values()]), []
        if isinstance(req, List):
            return ok(allocations=[h.view() for h in self.by_addr.values()]), []
        if isinstance(req, Status):
            return ok(**self.status(now)), []
        raise TypeError(f"not a request: {req!r}")  # a bug in the caller, not bad input

    def _allocate(self, req: Allocate, now: float) -> tuple[dict, list[Row]]:
        subnet = req.subnet or self.default_subnet
        existing = self.by_handle.get(req.handle, {}).get(subnet)
        if existing is not None:
            return ok(**existing.view()), []
        universes = [u for u in self.rings if u.overlaps(subnet)]
        if not universes:
            return error("bad_subnet", f"subnet {subnet} overlaps no allocation range "
                         f"({', '.join(map(str, self.rings))})"), []
        for u in universes:
            found = self._fresh(u, subnet)
            if found is None:
                found = self._reusable(u, subnet, now)
            if found is not None:
                held = Held(u.family, found, u, subnet, req.handle, req.anchor, now)
                return self._take(held)
        return error("exhausted", f"no free address in subnet {subnet} on this peer"), []

    def _claim(self, req: Claim, now: float) -> tuple[dict, list[Row]]:
        key = (req.family, req.address)
        subnet = req.subnet
        universe = next((u for u in self.rings if key in u), None)
        if subnet is None:
            if key in self.default_subnet:
                subnet = self.default_subnet
            elif universe is not None:
                subnet = universe
            else:
                return error("bad_address", f"{_fmt(key)} lies in no allocation range and not in "
                             f"the default subnet {self.default_subnet}; name its subnet"), []
        elif key not in subnet:
            return error("bad_address", f"{_fmt(key)} is not inside subnet {subnet}"), []
        holder = self.by_addr.get(key)
        if holder is not None:
            if holder.handle == req.handle and holder.subnet == subnet:
                return ok(**holder.view()), []
            return error("in_use", f"{_fmt(key)} is held by handle {holder.handle!r}"), []
        mine = self.by_handle.get(req.handle, {}).get(subnet)
        if mine is not None:
            return error("conflict", f"handle {req.handle!r} already holds {mine.text} in "
                         f"{subnet}; release it first"), []
        lo, hi = subnet.host_bounds()
        if not lo <= req.address < hi:
            return error("reserved", f"{_fmt(key)} is the network or broadcast address of "
                         f"{subnet}"), []
        if key in self.gateways:
            return error("reserved", f"{_fmt(key)} is a configured gateway"), []
        if universe is not None:
            owner = self.rings[universe].owner_of(req.address)
            if owner != self.me:
                return error("not_owned", f"{_fmt(key)} is owned by peer {owner}, not by this "
                             "peer"), []
        # A quarantined address may be claimed: quarantine keeps allocate from reusing an address
        # whose container may still be terminating; a claim names the address on purpose.
        return self._take(Held(req.family, req.address, universe, subnet, req.handle, req.anchor,
                               now))

    def _release(self, req: Release, now: float) -> tuple[dict, list[Row]]:
        held = self.by_handle.pop(req.handle, {})
        rows: list[Row] = []
        for h in held.values():
            del self.by_addr[(h.family, h.address)]
            if h.universe is not None:
                self.freed[h.universe][h.address] = now
                self.freed[h.universe].move_to_end(h.address)
            rows.append(FreeAddress(h.text,
                                    str(h.universe) if h.universe else None, now))
        return ok(handle=req.handle,
                  released=[f"{h.text}/{h.subnet.prefix}" for h in held.values()]), rows

    # -- search --------------------------------------------------------------------------------

    def _bounds(self, u: Cidr, subnet: Cidr) -> tuple[int, int]:
        lo, hi = subnet.host_bounds()
        return max(lo, u.start), min(hi, u.end)

    def _fresh(self, u: Cidr, subnet: Cidr) -> int | None:
        lo, hi = self._bounds(u, subnet)
        used = self.used[u]
        for olo, ohi in self._owned[u]:
            x, end = max(lo, olo), min(hi, ohi)
            while x < end:
                g = used.first_gap(x, end)
                if g is None:
                    break
                if (u.family, g) not in self.gateways:
                    return g
                x = g + 1
        return None

    def _reusable(self, u: Cidr, subnet: Cidr, now: float) -> int | None:
        lo, hi = self._bounds(u, subnet)
        ring = self.rings[u]
        for address, freed_at in self.freed[u].items():
            if freed_at + self.reuse_delay > now:
                return None  # the rest were freed later still
            if lo <= address < hi and (u.family, address) not in self.gateways \
                    and ring.owner_of(address) == self.me:
                return address
        return None

    def _take(self, held: Held) -> tuple[dict, list[Row]]:
        if held.universe is not None:
            self.used[held.universe].add(held.address)
            self.freed[held.universe].pop(held.address, None)
        self._hold(held)
        row = PutAllocation(held.text,
                            str(held.universe) if held.universe else None, str(held.subnet),
                            held.handle, held.anchor, held.allocated_at)
        return ok(**held.view()), [row]

    def _hold(self, held: Held) -> None:
        key = (held.family, held.address)
        if key in self.by_addr:
            raise AssertionError(f"{_fmt(key)} held twice")  # the store's primary key forbids it
        self.by_addr[key] = held
        self.by_handle.setdefault(held.handle, {})[held.subnet] = held

    # -- status --------------------------------------------------------------------------------

    def status(self, now: float) -> dict:
        universes = []
        for u, ring in self.rings.items():
            lo, hi = u.host_bounds()
            owned = sum(max(0, min(h, hi) - max(l, lo)) for l, h in self._owned[u])
            allocated = sum(1 for h in self.by_addr.values() if h.universe == u)
            quarantined = sum(1 for t in self.freed[u].values() if t + self.reuse_delay > now)
            universes.append({"range": str(u), "owned": owned, "allocated": allocated,
                              "quarantined": quarantined, "free": owned - allocated,
                              "ring_entries": len(ring.entries)})
        return {"peer": self.me, "default_subnet": str(self.default_subnet),
                "reuse_delay": self.reuse_delay, "allocations": len(self.by_addr),
                "handles": len(self.by_handle), "universes": universes}


def _fmt(key: tuple[int, int]) -> str:
    return format_addr(*key)
