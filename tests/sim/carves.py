"""The simulator's tenants, blocks and name pools (issue #14): the operations it draws, what it
remembers of their acknowledgements, and invariants I13-I16 (simulator.py's docstring).

A collaborator of Sim, holding the state the checks need: block space candidates for the
seed, the tenants, lease handles and pools acknowledged and not given back, and which client
handle was taken for which tenant or pool.
"""
from __future__ import annotations

import random
from collections import Counter

from appliance.core import messages as m
from appliance.core.addr import Cidr, cidr, format_addr, parse_addr
from appliance.core.allocator import block_gateway
from appliance.core.spare import REGISTRY, key_of, marker

CARVE_SHARE = 0.05  # of client operations, in seeds that carve: a tenant, block or name op
CARVING_SEEDS = 0.7  # of the seeds that add ranges online: those that also carve
# name -> (family, prefix length, max blocks); the IPv6 tenant's prefix is drawn per seed.
TENANTS = {"acme": (4, 28, 2), "beta": (4, 29, 1), "gamma": (4, 26, 3), "v6a": (6, 64, 2)}
POOLS = {"small": "n-{0..15}", "web": "web-{000..999}"}
# Kinds that never hold an address.
EMPTY_KINDS = ("blocks", "lease", "tenant", "dissolved", "spare")


def block_candidates(rng: random.Random) -> list[Cidr]:
    """Block space the operator may add: an IPv4 /24, its first /25 and the /23 holding it;
    an IPv6 /60 and its first /61. They overlap on purpose (one add of each family wins), and
    lie apart from the range candidates (10.64-249.x.x, fd66::/16)."""
    v4 = Cidr(4, (10 << 24) | ((250 + rng.randrange(6)) << 16) | (rng.randrange(128) * 2 << 8),
              24)
    v6 = Cidr(6, (0xFD77 << 112) | (rng.getrandbits(44) << 68), 60)
    return [v4, Cidr(4, v4.start, 25), Cidr(4, v4.start >> 9 << 9, 23),
            v6, Cidr(6, v6.start, 61)]


class Carving:
    def __init__(self, sim, seed: int):
        self.sim = sim
        rng = random.Random(f"blocks {seed}")  # its own stream: the rest of a seed stays
        self.on = sim.variety and rng.random() < CARVING_SEEDS
        self.pool = block_candidates(rng)
        self.tenants = dict(TENANTS, v6a=(6, rng.choice((62, 64)), 2))
        # Acknowledged and not given back (nor lost with every disk that held them):
        self.acked_tenants: dict[str, tuple[str, str]] = {}  # name -> (its key's marker, peer)
        self.acked_blocks: dict[Cidr, tuple[str, str, str]] = {}  # block -> (kind, for, peer)
        self.acked_pools: dict[str, tuple[str, str]] = {}  # pool -> (marker, peer)
        self.leases: dict[str, str] = {}  # lease handle -> the peer that acknowledged it
        self.deleted: set[str] = set()  # tenants deleted (acknowledged), not created since
        self.handle_for: dict[str, tuple[str, str]] = {}  # handle -> ("tenant"|"pool", name)
        self.seen: dict[str, int] = {}  # peer -> id of the carves last checked (I13, I16)
        self.stats: Counter = Counter()
        self.checks = 0

    # -- operations ----------------------------------------------------------------------------

    def request(self, p: str):
        """(peer, request): the operator's or a client's tenant, block or name operation."""
        sim, rng = self.sim, self.sim.rng
        a = sim.live[p].allocator
        spaces = [u for u in a.universes() if a.kind(u) == "blocks"]
        if not spaces and rng.random() < 0.7 or rng.random() < 0.03:
            return p, m.AddRange(rng.choice(self.pool), blocks=True)
        x = rng.random()
        # Mostly a tenant or pool this peer knows (else most requests are refused no_tenant).
        known = sorted(t for t in a.tenant_blocks if t in self.tenants)
        name = rng.choice(known if known and rng.random() < 0.7 else sorted(self.tenants))
        family, plen, most = self.tenants[name]
        if x < 0.12:
            if rng.random() < 0.1:
                plen += 1  # other parameters: refused "exists" if the tenant is there
            return p, m.TenantCreate(name, plen, family, most)
        if x < 0.2:
            return p, m.TenantGrow(name)
        if x < 0.24:
            return p, m.TenantDelete(name, force=rng.random() < 0.5)
        if x < 0.45:
            sim.handles += 1
            handle = f"t{sim.handles}"
            self.handle_for[handle] = ("tenant", name)
            blocks = a.tenant_blocks.get(name, [])
            subnet = rng.choice(blocks) if blocks and rng.random() < 0.2 else None
            return p, m.Allocate(handle, subnet, tenant=name)
        if x < 0.53:
            return p, self._claim(a, name, family)
        if x < 0.62:
            if self.leases and rng.random() < 0.2:  # the same handle again: "already"
                handle = rng.choice(sorted(self.leases))
            else:
                sim.handles += 1
                handle = f"l{sim.handles}"
            fam = 6 if rng.random() < 0.3 else 4
            plen = rng.choice((62, 64)) if fam == 6 else rng.choice((27, 28, 30))
            return p, m.LeaseBlock(handle, plen, fam)
        if x < 0.7 and self.leases:
            handle = rng.choice(sorted(self.leases))
            q = self.leases[handle]
            return (q if q in sim.live and rng.random() < 0.7 else p), m.Release(handle)
        known = sorted(c.name for c in a.carves.values() if c.state == "names")
        pool = rng.choice(known if known and rng.random() < 0.8 else sorted(POOLS))
        if x < 0.76 or not known and rng.random() < 0.5:
            pattern = POOLS[pool] if rng.random() < 0.9 else "n-{0..7}"
            return p, m.NamesCreate(pool, pattern)
        sim.handles += 1
        handle = f"n{sim.handles}"
        self.handle_for[handle] = ("pool", pool)
        if x < 0.9:
            return p, m.LeaseName(handle, pool)
        name = f"n-{rng.randrange(18)}" if pool == "small" else f"web-{rng.randrange(1000):03d}"
        return p, m.ClaimName(handle, pool, name)

    def _claim(self, a, name: str, family: int):
        """A claim in one of the tenant's blocks as this peer knows them (its gateway
        sometimes, refused), or in another carve; a third without the tenant (refused)."""
        rng, sim = self.sim.rng, self.sim
        sim.handles += 1
        handle = f"t{sim.handles}"
        carved = sorted(u for u in a.carves if a.kind(u) in ("block", "lease")
                        and u.family == family)
        mine = a.tenant_blocks.get(name, [])
        where = rng.choice(mine) if mine and rng.random() < 0.8 else \
            rng.choice(carved) if carved else None
        if where is None:
            space = rng.choice([c for c in self.pool if c.family == family])
            return m.Claim(handle, family, space.start + 5, tenant=name)
        lo, hi = where.host_bounds()
        address = block_gateway(where) if rng.random() < 0.1 else \
            lo + rng.randrange(min(hi - lo, 1 << 16))
        if rng.random() < 0.3:
            return m.Claim(handle, family, address)
        self.handle_for[handle] = ("tenant", name)
        return m.Claim(handle, family, address, tenant=name)

    # -- what the simulator tells it -----------------------------------------------------------

    def releasing(self, p: str, req: m.TenantDelete) -> list[tuple[str, str]]:
        """The acknowledged (peer, handle) pairs a forced delete on p may release."""
        a = self.sim.live[p].allocator
        blocks = a.tenant_blocks.get(req.name, [])
        return [k for k, v in self.sim.acked.items() if k[0] == p
                and any(parse_addr(v) in b for b in blocks)]

    def in_doubt(self, req) -> None:
        """A request whose peer crashed before answering: it may or may not have taken effect."""
        if isinstance(req, m.TenantDelete):
            self._forget_tenant(req.name)
            self.deleted.discard(req.name)
        elif isinstance(req, m.TenantCreate):
            self.deleted.discard(req.name)
        elif isinstance(req, m.Release) and req.handle in self.leases:
            self._forget_lease(req.handle)

    def reply(self, p: str, req, reply: dict) -> None:
        kind = type(req).__name__
        if isinstance(req, (m.Allocate, m.Claim)) and req.tenant is not None:
            kind += " tenant"
        elif isinstance(req, m.Release) and req.handle.startswith("l"):
            kind = "Release lease"
        elif isinstance(req, m.AddRange) and req.blocks:
            kind = "AddRange blocks"
        elif isinstance(req, m.AddRange) or \
                not isinstance(req, m.LEASES + (m.LeaseName, m.ClaimName)):
            return  # not one of these operations
        if not reply["ok"]:
            self.stats[f"{kind} {reply['error']['code']}"] += 1
            return
        self.stats[f"{kind} {'already' if reply.get('already') else 'ok'}"] += 1
        if isinstance(req, m.TenantCreate) and not reply.get("already"):
            # An "already" may come from a peer that has not heard of a delete: not recorded.
            args = (req.name, str(req.family), str(req.prefix_len), str(req.max_blocks))
            self.acked_tenants[req.name] = (marker("tenant", key_of("tenant", req.name),
                                                   *args), p)
            self.deleted.discard(req.name)
            self._carved(p, cidr(reply["blocks"][0]), "block", req.name)
        elif isinstance(req, m.TenantGrow):
            self._carved(p, cidr(reply["block"]), "block", req.name)
        elif isinstance(req, m.LeaseBlock) and not reply.get("already"):
            self.leases[req.handle] = p
            self._carved(p, cidr(reply["block"]), "lease", req.handle)
        elif isinstance(req, m.NamesCreate) and not reply.get("already"):
            self.acked_pools[req.pool] = (marker("names", key_of("names", req.pool), req.pool,
                                                 req.pattern), p)
        elif isinstance(req, m.TenantDelete):
            self._forget_tenant(req.name)
            self.deleted.add(req.name)
        elif isinstance(req, m.Release) and req.handle in self.leases:
            gone = {c for c, (k, h, _) in self.acked_blocks.items()
                    if k == "lease" and h == req.handle and str(c) in reply["released"]}
            for c in gone:
                del self.acked_blocks[c]
            if not any(h == req.handle for _, h, _ in self.acked_blocks.values()):
                del self.leases[req.handle]

    def _carved(self, p: str, c: Cidr, kind: str, name: str) -> None:
        """I13: an acknowledged block overlaps no other block acknowledged and not given back.
        I16: nor does its tenant then have more of them than its limit."""
        for d, (k, n, q) in self.acked_blocks.items():
            if d.overlaps(c) and (d != c or (k, n) != (kind, name)):
                raise self.sim.violation("I13", f"{p} acknowledged {kind} {c} for {name}, "
                                         f"which overlaps {k} {d} for {n}, acknowledged by {q} "
                                         "and not given back")
        self.acked_blocks[c] = (kind, name, p)
        if kind == "block" and name in self.acked_tenants:
            most = int(self.acked_tenants[name][0].split()[5])
            have = sorted(d for d, (k, n, _) in self.acked_blocks.items()
                          if (k, n) == ("block", name))
            if len(have) > most:
                raise self.sim.violation("I16", f"tenant {name} (at most {most} blocks) has "
                                         f"{len(have)} acknowledged: "
                                         f"{', '.join(map(str, have))}")

    def _forget_tenant(self, name: str) -> None:
        self.acked_tenants.pop(name, None)
        for c in [c for c, (k, n, _) in self.acked_blocks.items() if (k, n) == ("block", name)]:
            del self.acked_blocks[c]

    def _forget_lease(self, handle: str) -> None:
        self.leases.pop(handle, None)
        for c in [c for c, (k, n, _) in self.acked_blocks.items() if (k, n) == ("lease", handle)]:
            del self.acked_blocks[c]

    def lost(self, why: str) -> None:
        """What no database that counts holds any more went with the disks that held it (the
        fault itself, as for an allocation); and a delete lost so is no delete."""
        sim = self.sim
        marks = {r.owner for q in sim.names if q not in sim.void
                 for r in sim.durable[q].ring.values() if r.owner.startswith("@")}
        for name, (text, _) in list(self.acked_tenants.items()):
            if text not in marks:
                self._forget_tenant(name)
                self.stats[f"lost_{why}"] += 1
        for c, (kind, name, _) in list(self.acked_blocks.items()):
            if marker(kind, c, name) not in marks:
                del self.acked_blocks[c]
                self.stats[f"lost_{why}"] += 1
        for handle in [h for h in self.leases
                       if not any(n == h for _, n, _ in self.acked_blocks.values())]:
            del self.leases[handle]
        for pool, (text, _) in list(self.acked_pools.items()):
            if text not in marks:
                del self.acked_pools[pool]
                self.stats[f"lost_{why}"] += 1
        for name in sorted(self.deleted):
            if any(t.startswith(f"@tenant {key_of('tenant', name)} ") for t in marks):
                self.deleted.discard(name)

    # -- invariants ----------------------------------------------------------------------------

    def check_ready(self, p: str, ready) -> None:
        """I14 on what p is about to answer: every address it hands out or lets a client claim
        lies where its request says: a tenant's in one of its blocks (not the gateway), a
        name in its pool, any other in a range or static space, never in a block, a leased
        block, block space or a key (p's own view as it answers)."""
        peer = self.sim.live.get(p)
        if peer is None:
            return
        a = peer.allocator
        for ref, reply in ready.replies:
            got = self.sim.pending.get(ref)
            if got is None or not reply["ok"] or not isinstance(
                    got[1], (m.Allocate, m.Claim, m.TakeSets, m.LeaseName, m.ClaimName)):
                continue
            req = got[1]
            for text in reply.get("addresses", [reply.get("address")]):
                key = parse_addr(text.split("/")[0])
                if isinstance(req, (m.LeaseName, m.ClaimName)):
                    want = ("pool", req.pool)
                elif isinstance(req, (m.Allocate, m.Claim)) and req.tenant is not None:
                    want = ("tenant", req.tenant)
                else:
                    want = None
                self._placed(p, a, req.handle, key, want, "answered")

    def _placed(self, p: str, a, handle: str, key: tuple[int, int], want, how: str) -> None:
        u = a.universe_of(key)
        kind = a.kind(u) if u is not None else "static"
        carve = a.carves.get(u)
        text = format_addr(*key)
        if want is not None and want[0] == "tenant":
            if kind != "block" or carve.name != want[1]:
                raise self.sim.violation("I14", f"{p} {how} {text} to {handle} of tenant "
                                         f"{want[1]}: it lies in {a.kind_text(u)} {u}")
            if key[1] == block_gateway(u):
                raise self.sim.violation("I14", f"{p} {how} {text} to {handle}: the gateway "
                                         f"of tenant {want[1]}'s block {u}")
        elif want is not None:
            if u != key_of("names", want[1]) or kind != "names":
                raise self.sim.violation("I14", f"{p} {how} {text} to {handle} as a name of "
                                         f"pool {want[1]}: it lies in {a.kind_text(u)} {u}")
        elif kind not in ("range", "static"):
            raise self.sim.violation("I14", f"{p} {how} {text} to {handle}, not a tenant's or "
                                     f"a pool's: it lies in {a.kind_text(u)} {u}")

    def check(self) -> None:
        """On every live peer's view: I14 for what it holds; I13 its blocks and leased blocks
        are disjoint, each inside its parent block space; I16 no tenant has more blocks than
        its key allows."""
        sim = self.sim
        self.checks += 1
        for p, peer in sorted(sim.live.items()):
            if p in sim.void:
                continue
            a = peer.allocator
            if self.checks % 10 == 0:
                for h in a.by_addr.values():
                    self._placed(p, a, h.handle, (h.family, h.address),
                                 self.handle_for.get(h.handle), "holds")
            if self.seen.get(p) == id(a.carves):
                continue
            self.seen[p] = id(a.carves)
            self.check_view(p, a)

    def check_view(self, p: str, a) -> None:
        nested = sorted(u for u in a.carves if a.kind(u) in ("block", "lease"))
        for u in nested:
            parent = a.parent_of(u)
            if parent is None or a.kind(parent) != "blocks" or not parent.contains_cidr(u):
                raise self.sim.violation("I13", f"{p} has {a.kind_text(u)} {u} outside block "
                                         f"space (its parent: {parent})")
        for u, v in zip(nested, nested[1:]):
            if v.start < u.end:
                raise self.sim.violation("I13", f"{p} has {a.kind_text(u)} {u} and "
                                         f"{a.kind_text(v)} {v}, which overlap")
        for u, c in a.carves.items():
            if c.state in ("tenant", "names") and not REGISTRY.contains_cidr(u):
                raise self.sim.violation("I10", f"{p} has {a.kind_text(u)} {u} outside the "
                                         f"registry {REGISTRY}")
            if c.state == "tenant":
                have = a.tenant_blocks.get(c.name, [])
                if len(have) > int(c.args[3]):
                    raise self.sim.violation("I16", f"{p} knows {len(have)} blocks of tenant "
                                             f"{c.name} (at most {c.args[3]}): "
                                             f"{', '.join(map(str, have))}")

    def check_after_heal(self) -> None:
        """I15: every tenant, block, leased block and pool acknowledged (and neither deleted,
        released nor lost with every disk that held it) is there on every live member; a
        tenant deleted (and not created again) has no key nor block anywhere. I16 on every
        member's converged view."""
        sim = self.sim
        for p, peer in sorted(sim.live.items()):
            a = peer.allocator
            for name, (text, q) in sorted(self.acked_tenants.items()):
                c = a.carves.get(key_of("tenant", name))
                if c is None or c.text() != text:
                    raise sim.violation("I15", f"tenant {name}, created on {q}, is "
                                        f"{c.text() if c else 'unknown'} on {p} after the heal")
            for b, (kind, name, q) in sorted(self.acked_blocks.items()):
                c = a.carves.get(b)
                if c is None or (c.state, c.name) != (kind, name):
                    raise sim.violation("I15", f"{kind} {b} for {name}, acknowledged by {q}, "
                                        f"is {c.text() if c else 'unknown'} on {p} after the "
                                        "heal")
            for pool, (text, q) in sorted(self.acked_pools.items()):
                c = a.carves.get(key_of("names", pool))
                if c is None or c.text() != text:
                    raise sim.violation("I15", f"pool {pool}, created on {q}, is "
                                        f"{c.text() if c else 'unknown'} on {p} after the heal")
            for name in sorted(self.deleted):
                left = a.tenant_blocks.get(name, [])
                if key_of("tenant", name) in a.carves or left:
                    raise sim.violation("I15", f"tenant {name} was deleted, yet after the heal "
                                        f"{p} has its key or blocks {', '.join(map(str, left))}")
            self.check_view(p, a)
