"""A parsed CNI call as one request to the core, and the core's reply as the CNI result.

Pure. Every verb that changes who holds an address is one core request, judged at the gate
(core/peer.py `request`) like a hook request: ADD is one TakeSets (all range sets or none, in
one commit, asking peers for space where needed), DEL a Release, GC a ReleaseUnlisted. CHECK
reads the container's allocations (Lookup); STATUS asks whether the cluster could serve every
range set now (CanServe), not just this host.

A network with "tenant" instead of ranges: ADD is one set whose one alternative is an
Allocate (or a Claim of the requested IP) for the tenant; the address comes with its block's
prefix and the block's gateway (its first host address, which the core keeps free for the
bridge). STATUS for a tenant asks only that this host be a member in good standing: CanServe
names (subnet, first, last) windows of ranges and cannot name a tenant's blocks, so whether
the tenant has a free address is known at ADD (tenant_full names its limit).
"""
from __future__ import annotations

import json

from .core import messages as m
from .core.addr import parse_addr, parse_cidr
from .core.allocator import block_gateway
from .protocols import cni
from .protocols.cni import Call, CniError

# The core's refusals as CNI codes. A host not in good standing (removed, left, waiting,
# stale) refuses with 100 and names why; timeouts are worth retrying (11).
_CODES = {"bad_subnet": cni.BAD_CONFIG, "bad_address": cni.BAD_CONFIG,
          "no_tenant": cni.BAD_CONFIG, "timeout": cni.TRY_LATER, "internal": cni.IO_FAILURE}


def request_for(call: Call):
    """The core request that carries out call, or None (VERSION needs none)."""
    if call.command == "VERSION":
        return None
    if call.command == "ADD":
        anchor = json.dumps({"netns": call.netns}, sort_keys=True)
        if call.tenant is not None:
            return m.TakeSets(call.handle, ((_tenant_take(call, anchor),),))
        sets = []
        for i, rs in enumerate(call.range_sets):
            want = [ip for ip in call.ips if any(ip in r for r in rs)]
            if len(want) > 1:
                raise CniError(cni.BAD_CONFIG, f"more than one requested IP for range set {i}")
            if want:
                r = next(r for r in rs if want[0] in r)
                sets.append((m.Claim(call.handle, want[0][0], want[0][1], r.subnet, anchor),))
            else:
                sets.append(tuple(m.Allocate(call.handle, r.subnet, anchor, (r.first, r.last),
                                             r.gateway) for r in rs))
        return m.TakeSets(call.handle, tuple(sets))
    if call.command == "DEL":
        return m.Release(call.handle)
    if call.command == "CHECK":
        return m.Lookup(call.handle)
    if call.command == "GC":
        return m.ReleaseUnlisted(f"cni/{call.name}/",
                                 frozenset(cni.handle_for(call.name, cid, ifname)
                                           for cid, ifname in call.valid))
    if call.command == "STATUS":  # for a tenant: () asks only the standing (module doc)
        return m.CanServe(tuple(tuple((r.subnet, r.first, r.last) for r in rs)
                                for rs in call.range_sets))
    raise AssertionError(call.command)  # parse_call admits no other


def _tenant_take(call: Call, anchor: str) -> m.Allocate | m.Claim:
    if len(call.ips) > 1:
        raise CniError(cni.BAD_CONFIG, f"more than one requested IP for tenant {call.tenant}")
    if call.ips:
        (family, address), = call.ips
        return m.Claim(call.handle, family, address, None, anchor, call.tenant)
    return m.Allocate(call.handle, None, anchor, tenant=call.tenant)


def result(call: Call, reply: dict | None) -> tuple[bytes, int]:
    """What the plugin prints, and its exit code."""
    try:
        return _result(call, reply), 0
    except CniError as e:
        return cni.error_result(e, call.version), 1


def _result(call: Call, reply: dict | None) -> bytes:
    if call.command == "VERSION":
        return cni.version_result()
    if call.command == "CHECK":
        return _check(call, reply)
    if not reply["ok"]:
        err = reply["error"]
        if call.command == "STATUS":
            raise CniError(cni.NOT_AVAILABLE, err["message"], err["code"])
        message = err["message"]
        if call.tenant is not None:  # its one set is no range set of the config
            message = message.removeprefix("range set 0: ")
        raise CniError(_CODES.get(err["code"], cni.REFUSED),
                       f"{call.command} refused ({err['code']}): {message}", err["code"])
    if call.command == "ADD" and call.tenant is not None:
        (address,) = reply["addresses"]
        block = parse_cidr(address)[0]  # the tenant's block: the address has its prefix
        return cni.add_result(call, [(address, cni.Range(block, block.start, block.end - 1,
                                                         block_gateway(block)))])
    if call.command == "ADD":
        served = []
        for i, (rs, address) in enumerate(zip(call.range_sets, reply["addresses"])):
            key = parse_addr(address.split("/")[0])
            r = next((r for r in rs if key in r), None)
            if r is None:  # held from before, by an ADD whose config had other ranges
                raise CniError(cni.BAD_CONFIG, f"{call.handle} already holds {address}, outside "
                               f"range set {i}; DEL it first")
            served.append((address, r))
        return cni.add_result(call, served)
    return b""


def _check(call: Call, reply: dict) -> bytes:
    if not reply["ok"]:
        raise CniError(cni.UNKNOWN_CONTAINER, f"no address is held for {call.handle}")
    if call.prev is not None:
        have = sorted(a["address"] for a in reply["addresses"])
        if sorted(call.prev) != have:
            prev = ", ".join(sorted(call.prev)) or "no address"
            raise CniError(cni.UNKNOWN_CONTAINER,
                           f"prevResult has {prev} but {call.handle} holds {', '.join(have)}")
    if call.tenant is not None:
        if not any(a.get("tenant") == call.tenant for a in reply["addresses"]):
            raise CniError(cni.UNKNOWN_CONTAINER,
                           f"{call.handle} holds no address of tenant {call.tenant}")
        return b""
    held = [parse_addr(a["address"].split("/")[0]) for a in reply["addresses"]]
    for i, rs in enumerate(call.range_sets):
        if not any(key in r for key in held for r in rs):
            raise CniError(cni.UNKNOWN_CONTAINER,
                           f"{call.handle} holds no address of range set {i}")
    return b""
