"""Requests that carve space (spare.py): ranges added online, blocks leased to a handle or a
tenant, tenants, name pools; and giving blocks back. A collaborator of Peer, holding no state:
a request waits in the peer's `waiting` like an allocate that asked for space.

Each request is planned afresh at every attempt (after each grant): a plan is the spans this
host must own whole, and the change to make once it does. The host asks the owner of the first
part it lacks for exactly that part (SpaceRequest exact=True); the owner gives all of it, or
nothing and says why (`give_exact`); if it no longer owns the part, it first sends the news the
asker lacks, which plans again (`denied`). Then one change writes the markers and the new rings.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from . import messages as m
from .addr import Cidr, format_addr
from .names import Pattern
from .peer_messages import SpaceDenied, SpaceGrant, SpaceRequest
from .ring import Ring
from .rings import Change
from .spare import (DISSOLVED, REGISTRY, SPARE, block_size, check_name, is_marker, is_spare,
                    key_of, marker, parse_marker)

MAX_ASKS = 16  # owners asked for one request: each grant brings the ring it needs up to date


@dataclass
class Plan:
    needs: list[tuple[Cidr, int, int]]  # (universe, lo, hi) this host must own whole
    commit: Callable[[Change, tuple[str, int]], dict]  # the writes, given a stamp; the reply


def attempt(peer, w, now: float, out) -> None:
    req = w.request
    if isinstance(req, m.TenantDelete) and req.force:
        # What this host holds in the tenant's blocks is released first (then quarantined:
        # the blocks are given back once that is over; the error says so meanwhile).
        a = peer.allocator
        blocks = set(a.tenant_blocks.get(req.name, ()))
        for h in [h for h in list(a.by_addr.values()) if h.universe in blocks]:
            out.rows += a.apply(m.Release(h.handle, (h.family, h.address)), now)[1]
        # Once, when asked: an address allocated there while the delete waits for a peer was
        # acknowledged to its client, so it is not taken back (the delete finds it in use).
        w.request = req = replace(req, force=False)
    plan = PLANS[type(req)](peer, req)
    if isinstance(plan, dict):
        out.replies.append((w.ref, plan))
        return
    for u, lo, hi in plan.needs:
        lack = first_lacking(peer.rings[u], peer.me, lo, hi)
        if lack is not None:
            _ask(peer, w, u, lack, out)
            return
    busy = next((b for u, lo, hi in plan.needs if not is_spare(u)
                 for b in [_busy(peer, u, lo, hi, now)] if b), None)
    if busy:
        out.replies.append((w.ref, m.error("in_use", busy)))
        return
    with peer.writer.change(out.rows) as ch:
        reply = plan.commit(ch, peer.replica.next_stamp())
    out.replies.append((w.ref, reply))


def _ask(peer, w, u: Cidr, lack: tuple[str | None, int, int], out) -> None:
    owner, lo, hi = lack
    span = f"{format_addr(u.family, lo)}-{format_addr(u.family, hi - 1)}"
    if REGISTRY.start <= lo < REGISTRY.end:
        span = f"the place of its name in ipamd's registry ({span})"
    elif is_spare(u) or peer.allocator.kind(u) == "blocks":
        span = f"{'spare' if is_spare(u) else 'block'} space {span}"
    what = _what(w.request)
    if owner is not None and is_marker(owner):
        c = parse_marker(owner)
        out.replies.append((w.ref, m.error("overlap", f"{what}: {span} is part of "
                                           f"{c.kind} {c.universe}")))
    elif owner is None:
        if not peer.rings[u].entries and (peer.reachable or peer._unreached()):
            peer.next_req += 1  # a joiner that has heard no ring yet: wait for it
            w.parked = True
            peer.waiting[peer.next_req] = w
            return
        out.replies.append((w.ref, m.error("unreachable", f"{what}: no owner of {span} is "
                                           f"known to {peer.me}")))
    elif owner not in peer.reachable:
        out.replies.append((w.ref, m.error("unreachable", (
            f"{what}: {span} is owned by {owner}, which {peer.me} cannot reach; only the "
            "owner of that space may give it"))))
    elif len(w.asked) >= MAX_ASKS:
        out.replies.append((w.ref, m.error("timeout", f"{what}: asked {len(w.asked)} owners "
                                           "and still lacks space; try again")))
    else:
        peer.next_req += 1
        w.asked.append(owner)
        w.exact = (u, lo, hi)
        peer.waiting[peer.next_req] = w
        out.messages.append((owner, SpaceRequest(peer.cluster, peer.next_req, u, lo, hi,
                                                 exact=True)))


def denied(peer, w, sender: str, msg: SpaceDenied, now: float, out) -> None:
    """The owner asked gave nothing. If it no longer owns the part (it moved on before our
    view caught up) and its news, sent just before the denial, shows the part elsewhere now,
    or the request no longer needs it (a tenant at its limit), the request is planned again;
    each new ask is for another part or of another owner, at most MAX_ASKS in all. Otherwise
    (in use there, or our view still names the sender) the client is told why: no loop on a
    stale view."""
    if msg.code == "not_owned" and not _asks_again(peer, w, sender):
        peer._attempt(w, now, out)
        return
    out.replies.append((w.ref, m.error(msg.code, f"{_what(w.request)}: {sender} gave "
                                       f"nothing: {msg.reason}")))


def _asks_again(peer, w, sender: str) -> bool:
    """Whether planning w's request again would first ask `sender` for the part it was just
    asked for."""
    plan = PLANS[type(w.request)](peer, w.request)
    if isinstance(plan, dict):
        return False
    for u, lo, hi in plan.needs:
        lack = first_lacking(peer.rings[u], peer.me, lo, hi)
        if lack is not None:
            return lack[0] == sender and (u, lack[1], lack[2]) == w.exact
    return False


def give_exact(peer, sender: str, msg: SpaceRequest, now: float, out) -> None:
    """Another host asks for exactly [lo, hi): all of it, or nothing and why."""
    u, ring = msg.universe, peer.rings[msg.universe]
    span = f"{format_addr(u.family, msg.lo)}-{format_addr(u.family, msg.hi - 1)}"
    why, code = None, "not_owned"
    if msg.address is not None or msg.gateway:
        out.alarms.append(f"refused a space request from {sender}: an exact request names "
                          "no address")
        return
    if first_lacking(ring, peer.me, msg.lo, msg.hi) is not None:
        why = f"{peer.me} does not own all of {span}"
    elif not is_spare(u) and (busy := _busy(peer, u, msg.lo, msg.hi, now)):
        why, code = busy, "in_use"
    if why is not None:
        if code == "not_owned":
            peer.deny_not_owned(sender, msg.req, why, out)  # (denied: asks the owner it learns)
        else:
            out.messages.append((sender, SpaceDenied(peer.cluster, msg.req, why, code)))
        return
    with peer.writer.change(out.rows) as ch:
        ch.wrote(u, ring.transfer(peer.me, msg.lo, msg.hi, sender, peer.replica.next_stamp(),
                                  free_hint=msg.hi - msg.lo if peer.allocator.allocatable(u)
                                  else 0))
    out.messages.append((sender, SpaceGrant(peer.cluster, msg.req, peer.grant_delta(sender))))


def _busy(peer, u: Cidr, lo: int, hi: int, now: float) -> str:
    """Why [lo, hi) of u cannot change hands whole: what this host holds there."""
    a = peer.allocator
    never = set(a._never(u))  # a block's network, gateway and broadcast: held by no one
    blocked = [x for x in a._blocked(u, lo, hi, now) if x not in never]
    if not blocked:
        return ""
    first = format_addr(u.family, blocked[0])
    held = a.by_addr.get((u.family, blocked[0]))
    why = f"held by handle {held.handle!r}" if held else \
        "reserved" if (u.family, blocked[0]) in a.reserved else \
        f"in quarantine for {a.reuse_delay:g}s after its release"
    return (f"{peer.me} has {len(blocked)} address(es) in use in {u} ({first} {why}"
            f"{', ...' if len(blocked) > 1 else ''})")


def first_lacking(ring: Ring, me: str, lo: int, hi: int) -> tuple[str | None, int, int] | None:
    """The first part of [lo, hi) that `me` does not own in ring, as far as one other owner
    (or no known entry) goes: (that owner or None, lo, hi); None if me owns it all."""
    at, found = lo, None
    for e, a, b in ring.spans():
        if b <= at:
            continue
        if a >= hi:
            break
        if found is not None:
            if a == found[2] and e.owner == found[0]:
                found = (found[0], found[1], min(b, hi))
                continue
            return found
        if a > at:
            return None, at, min(a, hi)
        if e.owner != me:
            found = (e.owner, at, min(b, hi))
            continue
        at = b
    if found is not None:
        return found
    return (None, at, hi) if at < hi else None


def _what(req) -> str:
    if isinstance(req, m.AddRange):
        return f"range {req.cidr}"
    if isinstance(req, (m.TenantCreate, m.TenantGrow, m.TenantDelete)):
        return f"tenant {req.name}"
    if isinstance(req, m.NamesCreate):
        return f"name pool {req.pool}"
    return f"handle {req.handle!r}"


# -- plans --------------------------------------------------------------------------------------

def _spare(peer, family: int) -> Ring | dict:
    sp = peer.rings.get(SPARE[0 if family == 4 else 1])
    if sp is None or not sp.entries:
        if not any(r.entries for r in peer.rings.values()):
            if peer.reachable or peer._unreached():
                return sp  # a joiner that has heard no ring: asking will wait for one
            return m.error("unreachable", f"{peer.me} has heard no ring yet and reaches no "
                           "peer that could tell it who owns that space")
        return m.error("not_supported", (
            f"this cluster keeps no spare space for IPv{family} (its databases were made "
            "before ranges could be added online, schema 5): ranges, blocks, tenants and name "
            "pools cannot be added"))
    return sp


def _carve(peer, ch: Change, stamp, parent: Ring, c: Cidr, state: str, *args: str) -> None:
    """Mark c in parent and make (or make again) c's own ring, owned wholly by this host."""
    marks = ch.wrote(parent.universe, parent.transfer(peer.me, c.start, c.end,
                                                      marker(state, c, *args), stamp))
    kind = parse_marker(marker(state, c, *args)).kind
    if c in peer.rings:
        # Carved again after it was given back. This host's copy of c's ring may be behind
        # (the space came by a grant that did not carry c's last writes), but the parent's
        # entries it just wrote are exact (it owned them), and their versions grow with every
        # carve and give-back of c: c's entries are written above any version they had.
        version = max(e.version for e in marks) << 32
        ch.wrote(c, peer.rings[c].revive(peer.me, stamp,
                                         c.size if kind in ("block", "names") else 0, version))
    else:
        ch.create(Ring.single_owner(c, peer.me, stamp), kind)


def _dissolve(peer, ch: Change, stamp, c: Cidr) -> None:
    """Give c back to the space it was cut from, as this host's own; c's entries say so."""
    parent_u = peer.allocator.parent_of(c)
    parent = peer.rings[parent_u]
    ch.wrote(parent_u, parent.unmark(c, peer.me, stamp))
    ring = peer.rings[c]
    ch.wrote(c, ring.transfer(peer.me, c.start, c.end, marker(DISSOLVED, c), stamp))


def _add_range(peer, req: m.AddRange) -> Plan | dict:
    c = req.cidr
    a = peer.allocator
    if is_spare(c):
        return m.error("bad_range", f"{c} is a whole address family; a range must be smaller")
    if c.overlaps(REGISTRY):
        return m.error("bad_range", f"{c} overlaps {REGISTRY}, where ipamd keeps the keys of "
                       "tenants and name pools")
    clash = min((u for u in a.universes() if u.overlaps(c)), key=lambda u: u.prefix,
                default=None)
    want = "blocks" if req.blocks else "range"
    if clash == c and a.kind(c) in (want, "retired" if want == "range" else want):
        return m.ok(range=str(c), already=True, blocks=req.blocks)
    if clash is not None:
        return m.error("overlap", f"{c} overlaps {a.kind_text(clash)} {clash}")
    sp = _spare(peer, c.family)
    if isinstance(sp, dict):
        return sp
    return Plan([(sp.universe, c.start, c.end)], lambda ch, stamp: (
        _carve(peer, ch, stamp, sp, c, want),
        m.ok(range=str(c), owner=peer.me, blocks=req.blocks))[1])


def _choose_block(peer, family: int, prefix_len: int, within: Cidr | None,
                  what: str) -> tuple[Ring, Cidr] | dict:
    """A block of that size to carve out of block space (within `within`, if given): one this
    host owns whole if it can, else one inside the largest run of block space one reachable
    peer owns. Block space never holds an address, so any such block can be given whole."""
    a = peer.allocator
    spaces = [u for u in a.universes() if a.kind(u) == "blocks" and u.family == family
              and (within is None or u.overlaps(within))]
    if not spaces:
        where = f" in {within}" if within else ""
        return m.error("no_block_space", f"{what}: no block space for IPv{family}{where}: add "
                       "some with `ipamd range add CIDR --blocks`")
    size = block_size(family, prefix_len)
    best, away = None, set()
    for u in spaces:
        if size >= u.size:
            continue  # a block is a universe of its own: smaller than the space it is cut from
        lo_bound = max(u.start, within.start) if within else u.start
        hi_bound = min(u.end, within.end) if within else u.end
        for e, lo, hi in peer.rings[u].spans():
            if is_marker(e.owner) or hi <= lo_bound or lo >= hi_bound:
                continue
            lo, hi = max(lo, lo_bound), min(hi, hi_bound)
            start = -(-lo // size) * size
            if start + size > hi:
                continue
            mine = e.owner == peer.me
            if not mine and e.owner not in peer.reachable:
                away.add(e.owner)
                continue
            key = (mine, hi - lo, -start)
            if best is None or key > best[0]:
                best = (key, u, start)
    if best is None and away:
        return m.error("unreachable", f"{what}: no free /{prefix_len} in block space "
                       f"{', '.join(map(str, spaces))} that {peer.me} or a peer it reaches "
                       f"owns whole; {', '.join(sorted(away))} own(s) some, which {peer.me} "
                       "cannot reach")
    if best is None:
        return m.error("exhausted", f"{what}: no free /{prefix_len} in block space "
                       f"{', '.join(map(str, spaces))} that {peer.me} or a peer it reaches "
                       "owns whole")
    _, u, start = best
    return peer.rings[u], Cidr(family, start, prefix_len)


def _check_len(family: int, prefix_len: int) -> dict | None:
    most = 32 if family == 4 else 64
    if not 1 <= prefix_len <= most:
        return m.error("bad_request", f"a block of IPv{family} must be a /1 to /{most}, "
                       f"not /{prefix_len}")
    return None


def _lease_block(peer, req: m.LeaseBlock) -> Plan | dict:
    a = peer.allocator
    have = a.lease_blocks.get(req.handle, [])
    for c in have:
        if c.family == req.family and c.prefix == req.prefix_len:
            return m.ok(handle=req.handle, block=str(c), already=True)
    bad = _check_len(req.family, req.prefix_len)
    if bad:
        return bad
    chosen = _choose_block(peer, req.family, req.prefix_len, req.within, _what(req))
    if isinstance(chosen, dict):
        return chosen
    space, c = chosen
    return Plan([(space.universe, c.start, c.end)], lambda ch, stamp: (
        _carve(peer, ch, stamp, space, c, "lease", req.handle),
        m.ok(handle=req.handle, block=str(c)))[1])


def _release_blocks(peer, req: m.ReleaseBlocks) -> Plan | dict:
    blocks = list(peer.allocator.lease_blocks.get(req.handle, []))
    reply = m.ok(released=list(req.released) + [str(c) for c in blocks])

    def commit(ch, stamp):
        for c in blocks:
            _dissolve(peer, ch, stamp, c)
        return reply
    if not blocks:
        return reply
    return Plan([(c, c.start, c.end) for c in blocks], commit)


def _tenant(peer, name: str, known: bool = False) -> tuple[Cidr, object] | dict:
    """The tenant's key and its carve (None if not made; with `known`, an error instead)."""
    key = key_of("tenant", name)
    c = peer.allocator.carves.get(key)
    if c is not None and c.state == "tenant" and c.name != name:
        return m.error("conflict", f"tenant name {name!r} collides with tenant {c.name!r} in "
                       "ipamd's registry; choose another name")
    if known and c is None:
        return m.error("no_tenant", f"no tenant {name} is known to {peer.me}")
    return key, c


def _tenant_create(peer, req: m.TenantCreate) -> Plan | dict:
    bad = check_name("tenant", req.name) or None
    if bad:
        return m.error("bad_request", bad)
    bad = _check_len(req.family, req.prefix_len)
    if bad:
        return bad
    if req.max_blocks < 1:
        return m.error("bad_request", "--max-blocks must be at least 1")
    found = _tenant(peer, req.name)
    if isinstance(found, dict):
        return found
    key, c = found
    args = (req.name, str(req.family), str(req.prefix_len), str(req.max_blocks)) + \
        ((str(req.within),) if req.within else ())
    if c is not None:
        if c.args == args:
            return m.ok(tenant=req.name, already=True,
                        blocks=[str(b) for b in peer.allocator.tenant_blocks.get(req.name, [])])
        return m.error("exists", f"tenant {req.name} exists already (IPv{c.args[1]}, "
                       f"prefix-len {c.args[2]}, at most {c.args[3]} blocks)")
    sp = _spare(peer, 6)
    if isinstance(sp, dict):
        return sp
    chosen = _choose_block(peer, req.family, req.prefix_len, req.within, _what(req))
    if isinstance(chosen, dict):
        return chosen
    space, block = chosen

    def commit(ch, stamp):
        _carve(peer, ch, stamp, sp, key, "tenant", *args)
        _carve(peer, ch, stamp, space, block, "block", req.name)
        return m.ok(tenant=req.name, blocks=[str(block)])
    return Plan([(sp.universe, key.start, key.end), (space.universe, block.start, block.end)],
                commit)


def _tenant_grow(peer, req: m.TenantGrow) -> Plan | dict:
    found = _tenant(peer, req.name, known=True)
    if isinstance(found, dict):
        return found
    key, c = found
    family, plen, most = int(c.args[1]), int(c.args[2]), int(c.args[3])
    blocks = peer.allocator.tenant_blocks.get(req.name, [])
    if len(blocks) >= most:
        return m.error("limit", f"tenant {req.name} has {len(blocks)} blocks, its limit "
                       f"(--max-blocks {most})")
    within = req.within or (_cidr_arg(c.args[4]) if len(c.args) > 4 else None)
    lack = first_lacking(peer.rings[key], peer.me, key.start, key.end)
    if lack is not None and lack[0] is not None and lack[0] not in peer.reachable:
        # The key first: without it no block may be added, wherever block space is.
        return m.error("unreachable", f"{_what(req)}: its key is owned by {lack[0]}, which "
                       f"{peer.me} cannot reach; only the key's owner adds blocks")
    chosen = _choose_block(peer, family, plen, within, _what(req))
    if isinstance(chosen, dict):
        return chosen
    space, block = chosen

    def commit(ch, stamp):
        _carve(peer, ch, stamp, space, block, "block", req.name)
        return m.ok(tenant=req.name, block=str(block),
                    blocks=[str(b) for b in blocks] + [str(block)])
    # The key first: only its owner adds blocks, so the limit holds across partitions.
    return Plan([(key, key.start, key.end), (space.universe, block.start, block.end)], commit)


def _tenant_delete(peer, req: m.TenantDelete) -> Plan | dict:
    found = _tenant(peer, req.name, known=True)
    if isinstance(found, dict):
        return found
    key, c = found
    blocks = list(peer.allocator.tenant_blocks.get(req.name, []))

    def commit(ch, stamp):
        for b in blocks:
            _dissolve(peer, ch, stamp, b)
        _dissolve(peer, ch, stamp, key)
        return m.ok(tenant=req.name, deleted=True, blocks=[str(b) for b in blocks])
    return Plan([(key, key.start, key.end)] + [(b, b.start, b.end) for b in blocks], commit)


def _names_create(peer, req: m.NamesCreate) -> Plan | dict:
    bad = check_name("pool", req.pool)
    if bad:
        return m.error("bad_request", bad)
    try:
        pattern = Pattern.parse(req.pattern)
    except ValueError as e:
        return m.error("bad_request", str(e))
    key = key_of("names", req.pool)
    c = peer.allocator.carves.get(key)
    if c is not None:
        if c.state == "names" and c.args == (req.pool, req.pattern):
            return m.ok(pool=req.pool, pattern=req.pattern, size=pattern.size, already=True)
        if c.state == "names" and c.name == req.pool:
            return m.error("exists", f"name pool {req.pool} exists already ({c.args[1]})")
        return m.error("conflict", f"pool name {req.pool!r} collides with {c.kind} {c.name!r} "
                       "in ipamd's registry; choose another name")
    sp = _spare(peer, 6)
    if isinstance(sp, dict):
        return sp
    return Plan([(sp.universe, key.start, key.end)], lambda ch, stamp: (
        _carve(peer, ch, stamp, sp, key, "names", req.pool, req.pattern),
        m.ok(pool=req.pool, pattern=req.pattern, size=pattern.size))[1])


def _cidr_arg(text: str) -> Cidr:
    return parse_marker(f"@range {text}").universe


PLANS = {m.AddRange: _add_range, m.LeaseBlock: _lease_block, m.ReleaseBlocks: _release_blocks,
         m.TenantCreate: _tenant_create, m.TenantGrow: _tenant_grow,
         m.TenantDelete: _tenant_delete, m.NamesCreate: _names_create}
