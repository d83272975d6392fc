"""The allocator of one peer: hands out addresses from the space its ring entries give it.

Pure: fed a request and the time, returns (reply, rows). The shell commits the rows before it
sends the reply. Order of reuse: never-used addresses first, lowest first (they are the least
recently freed of all), then freed addresses once their quarantine is over, least recently freed
first.
"""
from __future__ import annotations

from bisect import bisect_left, insort
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Callable

from .addr import Cidr, format_addr
from .donation import choose_block
from .intervals import IntervalSet
from .messages import (Allocate, Claim, ForgetFreed, FreeAddress, List, Lookup, PutAllocation,
                       Release, ReleaseIf, ReleaseUnlisted, Reserve, ReserveGateway, Row, Status,
                       TakeSets, error, ok)
from .ring import Ring

CLAIM_BLOCK = 16  # the most a claim takes from another peer's space


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
        self.by_addr: dict[tuple[int, int], Held] = {}
        self.by_handle: dict[str, dict[Cidr, Held]] = {}
        # Counted as they change, so that free space and metrics cost a bisect, not a scan of
        # every allocation: held addresses per universe, sorted; how many per subnet.
        self.held_sorted: dict[Cidr, list[int]] = {u: [] for u in self.rings}
        self.in_use: Counter = Counter()  # (universe or None, subnet) -> addresses held
        # Per universe: every address ever used (allocated or freed), and the freed ones in the
        # order they were freed.
        self.used: dict[Cidr, IntervalSet] = {u: IntervalSet() for u in self.rings}
        self.freed: dict[Cidr, OrderedDict[int, float]] = {u: OrderedDict() for u in self.rings}
        self._owned = {u: r.owned_by(me) for u, r in self.rings.items()}
        # Never handed out: --gateway addresses and gateways that requests named. Those inside a
        # universe also count as used, so the search for fresh space skips them.
        self.reserved: set[tuple[int, int]] = set()
        for g in gateways:
            self.load_reserved(g)
        # While a TakeSets runs: how to undo, in memory, each take it made (its rows are simply
        # not returned), so a half-served request leaves nothing behind, not even quarantine.
        self._journal: list | None = None
        # Set by the peer: are there other hosts? Static addresses outside every range have no
        # owner in the ring then, so nothing could stop two hosts claiming one: refuse them.
        self.clustered: Callable[[], bool] = lambda: False

    # -- loading (restart) ---------------------------------------------------------------------

    def load_allocation(self, held: Held) -> None:
        self._hold(held)
        if held.universe is not None:
            self.used[held.universe].add(held.address)

    def load_reserved(self, key: tuple[int, int]) -> None:
        self.reserved.add(key)
        u = self.universe_of(key)
        if u is not None:
            self.used[u].add(key[1])
            self.freed[u].pop(key[1], None)

    def _mark_used(self, u: Cidr, address: int):
        """Mark address used and not freed; return what undoes that."""
        was_used = address in self.used[u]
        freed_at = self.freed[u].pop(address, None)
        self.used[u].add(address)

        def undo():
            if not was_used:
                self.used[u].discard(address)
            if freed_at is not None:
                # Back in its place: the freed list is ordered by time of freeing.
                items = list(self.freed[u].items()) + [(address, freed_at)]
                items.sort(key=lambda kv: kv[1])
                self.freed[u] = OrderedDict(items)
        return undo

    def universe_of(self, key: tuple[int, int]) -> Cidr | None:
        return next((u for u in self.rings if key in u), None)

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
        if isinstance(req, TakeSets):
            reply, rows, _ = self.take_sets(req, now)
            return reply, rows
        if isinstance(req, Release):
            return self._release(req, now)
        if isinstance(req, ReleaseIf):
            return self._release_if(req, now)
        if isinstance(req, ReleaseUnlisted):
            return self._release_unlisted(req, now)
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
        bad = self._bad_subnet(subnet)
        if bad is not None:
            return bad, []
        rows: list[Row] = []
        undo_gateway = None
        if req.gateway is not None:
            err, undo_gateway = self._reserve_gateway((subnet.family, req.gateway), rows)
            if err is not None:
                return err, []
        lo, hi = req.range if req.range is not None else (subnet.start, subnet.end - 1)
        found = self._find(subnet, lo, hi, now)
        if found is not None:
            u, address = found
            reply, take = self._take(Held(u.family, address, u, subnet, req.handle, req.anchor,
                                          now))
            if undo_gateway is not None and self._journal is not None:
                self._journal.append(undo_gateway)
            return reply, rows + take
        if undo_gateway is not None:
            undo_gateway()  # a request that fails reserves nothing
        where = f"subnet {subnet}" if req.range is None else \
            f"{subnet.addr(lo)}-{subnet.addr(hi)} of subnet {subnet}"
        return error("exhausted", f"no free address in {where} on this peer"), []

    def _bad_subnet(self, subnet: Cidr) -> dict | None:
        """A request's subnet is the default one or lies inside a range: anything else (a
        /0, a subnet straddling a range) would hand out or record addresses no range gives."""
        if subnet == self.default_subnet or any(u.contains_cidr(subnet) for u in self.rings):
            return None
        return error("bad_subnet", f"subnet {subnet} is neither the default subnet "
                     f"{self.default_subnet} nor inside an allocation range "
                     f"({', '.join(map(str, self.rings))})")

    def can_allocate(self, subnet: Cidr, rng: tuple[int, int], now: float) -> bool:
        """Would an allocate from [first, last] of subnet succeed now? Changes nothing."""
        return self._find(subnet, rng[0], rng[1], now) is not None

    def _find(self, subnet: Cidr, first: int, last: int, now: float) -> tuple[Cidr, int] | None:
        """The address allocate would take from [first, last] of subnet, and its universe."""
        for u in self.rings:
            if u.overlaps(subnet):
                bounds = self._bounds(u, subnet, first, last + 1)
                found = self._fresh(u, bounds)
                if found is None:
                    found = self._reusable(u, bounds, now)
                if found is not None:
                    return u, found
        return None

    def _reserve_gateway(self, key: tuple[int, int], rows: list[Row]):
        """Reserve a gateway a request names; return (error, undo)."""
        if key in self.reserved:
            return None, None
        u = self.universe_of(key)
        if u is None:
            return None, None  # outside every range: never handed out anyway
        holder = self.by_addr.get(key)
        if holder is not None:
            return error("in_use", f"gateway {_fmt(key)} is held by handle "
                         f"{holder.handle!r}"), None
        owner = self.rings[u].owner_of(key[1])
        if owner != self.me:
            # Its owner must keep it out of use: the peer asks it to (ReserveGateway).
            return error("not_owned", f"gateway {_fmt(key)} is owned by peer {owner}, which "
                         "has not reserved it yet"), None
        self.reserved.add(key)
        undo_used = self._mark_used(u, key[1])
        rows.append(Reserve(_fmt(key), str(u), "gateway"))

        def undo():
            self.reserved.discard(key)
            undo_used()
        return None, undo

    def need_for(self, req, reply: dict):
        """What req lacks that a peer may give: space to allocate from, a claimed address's
        block, or a gateway's reservation by its owner. None when peers cannot help."""
        code = reply["error"]["code"]
        if code == "exhausted" and isinstance(req, Allocate) or \
                code == "not_owned" and isinstance(req, Claim):
            return req
        if code == "not_owned" and isinstance(req, Allocate) and req.gateway is not None:
            subnet = req.subnet or self.default_subnet
            return ReserveGateway(subnet.family, req.gateway, subnet)
        return None

    def reserve_remote(self, key: tuple[int, int], owner: str) -> list[Row]:
        """A gateway its owner has reserved for us: never handed out here either."""
        if key in self.reserved:
            return []
        self.load_reserved(key)
        return [Reserve(_fmt(key), str(self.universe_of(key)), f"gateway, reserved by {owner}")]

    def reserve_owned(self, key: tuple[int, int]) -> tuple[dict | None, list[Row]]:
        """Reserve a gateway this peer owns, asked by another peer: (error, rows)."""
        rows: list[Row] = []
        err, _ = self._reserve_gateway(key, rows)
        return err, rows

    def take_sets(self, req: TakeSets, now: float):
        """All of req's sets or none: returns (reply, rows, need), need being the Allocate or
        Claim that failed for want of space here (peers may have it), else None."""
        self._journal = []
        rows: list[Row] = []
        addresses = []
        try:
            for i, alternatives in enumerate(req.sets):
                reply, need = None, None
                for alt in alternatives:
                    reply, r = self.apply(alt, now)
                    if reply["ok"]:
                        rows += r
                        break
                    code = reply["error"]["code"]
                    if need is None:
                        need = self.need_for(alt, reply)
                    if code != "exhausted":
                        break
                if not reply["ok"]:
                    for undo in reversed(self._journal):
                        undo()
                    code = reply["error"]["code"]
                    if code not in ("exhausted", "not_owned"):
                        need = None
                    return error(code, f"range set {i}: {reply['error']['message']}"), [], need
                addresses.append(reply["address"])
        finally:
            self._journal = None
        return ok(handle=req.handle, addresses=addresses), rows, None

    def _claim(self, req: Claim, now: float) -> tuple[dict, list[Row]]:
        key = (req.family, req.address)
        subnet = req.subnet
        universe = self.universe_of(key)
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
        elif (bad := self._bad_subnet(subnet)) is not None:
            return bad, []
        if req.family == 6 and (req.address >> 32) == 0xFFFF:
            return error("bad_address", f"{_fmt(key)} is an IPv4-mapped IPv6 address; claim "
                         f"the IPv4 address {format_addr(4, req.address & 0xFFFFFFFF)}"), []
        holder = self.by_addr.get(key)
        if holder is not None:
            if holder.handle == req.handle and holder.subnet == subnet:
                return ok(**holder.view()), []
            return error("in_use", f"{_fmt(key)} is held by handle {holder.handle!r}"), []
        if universe is None and self.clustered():
            return error("no_owner", f"{_fmt(key)} lies outside every allocation range "
                         f"({', '.join(map(str, self.rings))}): in a cluster no host owns it, "
                         "so two hosts could each claim it; claim addresses inside a range"), []
        mine = self.by_handle.get(req.handle, {}).get(subnet)
        if mine is not None:
            return error("conflict", f"handle {req.handle!r} already holds {mine.text} in "
                         f"{subnet}; release it first"), []
        lo, hi = subnet.host_bounds()
        if not lo <= req.address < hi:
            return error("reserved", f"{_fmt(key)} is the network or broadcast address of "
                         f"{subnet}"), []
        if key in self.reserved:
            return error("reserved", f"{_fmt(key)} is a gateway"), []
        if universe is not None:
            owner = self.rings[universe].owner_of(req.address)
            if owner != self.me:
                return error("not_owned", f"{_fmt(key)} is owned by peer {owner}, not by this "
                             "peer"), []
        # A quarantined address may be claimed: quarantine keeps allocate from reusing an address
        # whose container may still be terminating; a claim names the address on purpose.
        return self._take(Held(req.family, req.address, universe, subnet, req.handle, req.anchor,
                               now))

    def _release_if(self, req: ReleaseIf, now: float) -> tuple[dict, list[Row]]:
        held = self.by_handle.get(req.handle, {})
        rows: list[Row] = []
        released: list[str] = []
        for family, address, at in req.allocations:
            h = self.by_addr.get((family, address))
            if h is not None and h.handle == req.handle and h.allocated_at == at and \
                    held.get(h.subnet) is h:
                reply, r = self._release(Release(req.handle, (family, address)), now)
                rows += r
                released += reply["released"]
        return ok(handle=req.handle, released=released), rows

    def _release_unlisted(self, req: ReleaseUnlisted, now: float) -> tuple[dict, list[Row]]:
        rows: list[Row] = []
        released: list[str] = []
        for handle in [h for h in self.by_handle if h.startswith(req.prefix)
                       and h not in req.keep]:
            reply, r = self._release(Release(handle), now)
            rows += r
            released += reply["released"]
        return ok(released=released), rows

    def _release(self, req: Release, now: float) -> tuple[dict, list[Row]]:
        mine = self.by_handle.get(req.handle, {})
        if req.address is None:
            held = self.by_handle.pop(req.handle, {})
        else:
            held = {s: h for s, h in mine.items() if (h.family, h.address) == req.address}
            for s in held:
                del mine[s]
            if not mine:
                self.by_handle.pop(req.handle, None)
        rows: list[Row] = []
        for h in held.values():
            self._unhold(h)
            if h.universe is not None:
                self.freed[h.universe][h.address] = now
                self.freed[h.universe].move_to_end(h.address)
            rows.append(FreeAddress(h.text,
                                    str(h.universe) if h.universe else None, now))
        return ok(handle=req.handle,
                  released=[f"{h.text}/{h.subnet.prefix}" for h in held.values()]), rows

    # -- space moving between peers ------------------------------------------------------------

    def ring_changed(self, universe: Cidr) -> list[Row]:
        """After the ring moved space: forget freed addresses that are no longer ours."""
        self._owned[universe] = self.rings[universe].owned_by(self.me)
        rows: list[Row] = []
        ring = self.rings[universe]
        for address in [a for a in self.freed[universe] if ring.owner_of(a) != self.me]:
            del self.freed[universe][address]
            self.used[universe].discard(address)
            rows.append(ForgetFreed(format_addr(universe.family, address)))
        return rows

    def free_count(self, universe: Cidr, lo: int, hi: int, now: float) -> int:
        """Addresses in [lo, hi) that this peer could hand out or give away now: what it owns
        there less what is held (counted by bisect), quarantined (only the recently freed
        are looked at) or reserved. Equal to owned - len(_blocked(...)), without the scan."""
        n = held = 0
        hs = self.held_sorted[universe]
        for olo, ohi in self._owned[universe]:
            a, b = max(olo, lo), min(ohi, hi)
            if a < b:
                n += b - a
                held += bisect_left(hs, b) - bisect_left(hs, a)
        other = {a for a, _ in self.quarantined(universe, now) if lo <= a < hi}
        other |= {a for f, a in self.reserved if f == universe.family and lo <= a < hi}
        ring = self.rings[universe]
        return n - held - sum(1 for a in other if ring.owner_of(a) == self.me)

    def quarantined(self, universe: Cidr, now: float):
        """(address, freed_at) of those freed less than reuse_delay ago, most recent first:
        the freed list is in order of freeing, so only its tail is read."""
        for address, t in reversed(self.freed[universe].items()):
            if t + self.reuse_delay <= now:
                return
            yield address, t

    def _blocked(self, universe: Cidr, lo: int, hi: int, now: float) -> list[int]:
        """Owned addresses in [lo, hi) that are not free: held, quarantined or reserved."""
        fam = universe.family
        out = [h.address for h in self.by_addr.values() if h.universe == universe
               and lo <= h.address < hi]
        out += [a for a, t in self.freed[universe].items()
                if lo <= a < hi and t + self.reuse_delay > now]
        out += [a for f, a in self.reserved if f == fam and lo <= a < hi]
        ring = self.rings[universe]
        return sorted(a for a in set(out) if ring.owner_of(a) == self.me)

    def donatable(self, universe: Cidr, lo: int, hi: int, now: float, limit: int,
                  to: str) -> tuple[int, int] | None:
        """A block of free owned space in [lo, hi) for `to`, at most `limit` long, chosen to
        fragment the ring least (donation.py)."""
        blocked = self._blocked(universe, lo, hi, now)
        runs = []
        for olo, ohi in self._owned[universe]:
            a, b = max(lo, olo), min(hi, ohi)
            start = a
            for x in [x for x in blocked if a <= x < b] + [b]:
                if x > start:
                    runs.append((start, x))
                start = max(start, x + 1)
        return choose_block(self.rings[universe], self.me, to, runs, limit)

    def why_not_free(self, universe: Cidr, address: int, now: float) -> tuple[str, str]:
        """(code, message) for an owned address a claim from another peer cannot have."""
        key = (universe.family, address)
        h = self.by_addr.get(key)
        if h is not None:
            return "in_use", f"{_fmt(key)} is held by handle {h.handle!r} on peer {self.me}"
        if key in self.reserved:
            return "reserved", f"{_fmt(key)} is a gateway, reserved on peer {self.me}"
        t = self.freed[universe].get(address)
        if t is not None and t + self.reuse_delay > now:
            return "quarantined", (f"{_fmt(key)} was freed on peer {self.me} and is in "
                                   f"quarantine for {t + self.reuse_delay - now:.0f}s more")
        return "exhausted", f"{_fmt(key)} is not free on peer {self.me}"

    def block_holding(self, universe: Cidr, address: int, now: float,
                      to: str) -> tuple[int, int] | None:
        """A free owned block that holds address, up to CLAIM_BLOCK long, chosen like a
        donation: a claim asks for one address, and a little more spares the next claim
        nearby a round trip."""
        if self.rings[universe].owner_of(address) != self.me:
            return None
        lo, hi = address - CLAIM_BLOCK + 1, address + CLAIM_BLOCK
        blocked = set(self._blocked(universe, lo, hi, now))
        if address in blocked:
            return None
        olo, ohi = next((a, b) for a, b in self._owned[universe] if a <= address < b)
        s, x = address, address + 1
        while s > max(lo, olo) and s - 1 not in blocked:
            s -= 1
        while x < min(hi, ohi) and x not in blocked:
            x += 1
        return choose_block(self.rings[universe], self.me, to, [(s, x)], CLAIM_BLOCK, address)

    # -- search --------------------------------------------------------------------------------

    def _bounds(self, u: Cidr, subnet: Cidr, lo: int, hi: int) -> tuple[int, int]:
        """[lo, hi) of what may be handed out: hosts of the subnet, in the universe and range."""
        slo, shi = subnet.host_bounds()
        return max(slo, u.start, lo), min(shi, u.end, hi)

    def _fresh(self, u: Cidr, bounds: tuple[int, int]) -> int | None:
        lo, hi = bounds
        used = self.used[u]  # reserved addresses are in it too
        for olo, ohi in self._owned[u]:
            g = used.first_gap(max(lo, olo), min(hi, ohi))
            if g is not None:
                return g
        return None

    def _reusable(self, u: Cidr, bounds: tuple[int, int], now: float) -> int | None:
        lo, hi = bounds
        ring = self.rings[u]
        for address, freed_at in self.freed[u].items():
            if freed_at + self.reuse_delay > now:
                return None  # the rest were freed later still
            if lo <= address < hi and ring.owner_of(address) == self.me:
                return address
        return None

    def _take(self, held: Held) -> tuple[dict, list[Row]]:
        undo_used = self._mark_used(held.universe, held.address) if held.universe else None
        self._hold(held)
        if self._journal is not None:
            def undo():
                self._unhold(held)
                mine = self.by_handle[held.handle]
                del mine[held.subnet]
                if not mine:
                    del self.by_handle[held.handle]
                if undo_used is not None:
                    undo_used()
            self._journal.append(undo)
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
        if held.universe is not None:
            insort(self.held_sorted[held.universe], held.address)
        self.in_use[(held.universe, held.subnet)] += 1

    def _unhold(self, held: Held) -> None:
        """Forget held in by_addr and the counts (by_handle is the caller's)."""
        del self.by_addr[(held.family, held.address)]
        if held.universe is not None:
            hs = self.held_sorted[held.universe]
            del hs[bisect_left(hs, held.address)]
        key = (held.universe, held.subnet)
        self.in_use[key] -= 1
        if not self.in_use[key]:
            del self.in_use[key]

    # -- status --------------------------------------------------------------------------------

    def status(self, now: float) -> dict:
        universes = []
        for u, ring in self.rings.items():
            lo, hi = u.host_bounds()
            owned = sum(max(0, min(h, hi) - max(l, lo)) for l, h in self._owned[u])
            allocated = len(self.held_sorted[u])
            quarantined = sum(1 for _ in self.quarantined(u, now))
            universes.append({"range": str(u), "owned": owned, "allocated": allocated,
                              "quarantined": quarantined, "free": owned - allocated,
                              "ring_entries": len(ring.entries)})
        return {"peer": self.me, "default_subnet": str(self.default_subnet),
                "reuse_delay": self.reuse_delay, "allocations": len(self.by_addr),
                "reserved": sorted(_fmt(k) for k in self.reserved),
                "handles": len(self.by_handle), "universes": universes}


def _fmt(key: tuple[int, int]) -> str:
    return format_addr(*key)
