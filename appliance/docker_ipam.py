"""Docker's remote IPAM driver API (libnetwork), answered from the allocator.

Pool ids name the pool itself ("ipamd:10.32.0.0/12", with ",SUBPOOL" when docker narrows it), so a
restarted daemon needs no pool table. Handles are "docker/POOLID/...": the gateway's, one per
address docker asked for by name, one random token per address we chose. Requests that docker
replays after its own restart (RequiresRequestReplay) name the addresses they had, and get them.
"""
from __future__ import annotations

import secrets

from .core import messages as m
from .core.addr import AddrError, Cidr, parse_addr, parse_cidr

GATEWAY_OPTION = "com.docker.network.gateway"


class DockerError(Exception):
    pass


def _cidr(text: str, what: str) -> Cidr:
    try:
        block, _ = parse_cidr(text)
    except AddrError as e:
        raise DockerError(f"{what}: {e}") from None
    return block


def _pool(pool_id) -> tuple[Cidr, Cidr | None]:
    if not isinstance(pool_id, str) or not pool_id.startswith("ipamd:"):
        raise DockerError(f"unknown PoolID {pool_id!r}")
    pool, _, sub = pool_id[len("ipamd:"):].partition(",")
    return _cidr(pool, "PoolID"), _cidr(sub, "PoolID") if sub else None


def _str(body: dict, key: str) -> str:
    v = body.get(key) or ""
    if not isinstance(v, str):
        raise DockerError(f"{key} must be a string")
    return v


def _check(reply: dict) -> dict:
    if not reply["ok"]:
        raise DockerError(f"{reply['error']['code']}: {reply['error']['message']}")
    return reply


def handle(path: str, body: dict, allocator, now: float, rows: list) -> dict:
    """One API call; raises DockerError for the driver's {"Error": ...} answer."""
    def apply(req):
        reply, r = allocator.apply(req, now)
        rows.extend(r)
        return reply

    if path == "/Plugin.Activate":
        return {"Implements": ["IpamDriver"]}
    if path == "/IpamDriver.GetCapabilities":
        return {"RequiresMACAddress": False, "RequiresRequestReplay": True}
    if path == "/IpamDriver.GetDefaultAddressSpaces":
        return {"LocalDefaultAddressSpace": "local", "GlobalDefaultAddressSpace": "global"}
    if path == "/IpamDriver.RequestPool":
        return _request_pool(body, allocator, apply)
    if path == "/IpamDriver.ReleasePool":
        pool_id = _str(body, "PoolID")
        _pool(pool_id)
        for h in [h for h in allocator.by_handle if h.startswith(f"docker/{pool_id}/")]:
            apply(m.Release(h))
        return {}
    if path == "/IpamDriver.RequestAddress":
        return _request_address(body, allocator, apply)
    if path == "/IpamDriver.ReleaseAddress":
        pool_id = _str(body, "PoolID")
        _pool(pool_id)
        try:
            key = parse_addr(_str(body, "Address").split("/")[0])
        except AddrError as e:
            raise DockerError(f"Address: {e}") from None
        held = allocator.by_addr.get(key)
        if held is not None and held.handle.startswith(f"docker/{pool_id}/"):
            apply(m.Release(held.handle, key))
        return {}
    raise LookupError(path)


def _request_pool(body: dict, allocator, apply) -> dict:
    v6 = body.get("V6") is True
    text = _str(body, "Pool")
    if text:
        pool = _cidr(text, "Pool")
    elif v6:
        pool = next((u for u in allocator.rings if u.family == 6), None)
        if pool is None:
            raise DockerError("ipamd has no IPv6 range; start it with an IPv6 --iprange")
    else:
        pool = allocator.default_subnet
    if not any(pool.overlaps(u) for u in allocator.rings):
        raise DockerError(f"pool {pool} overlaps no ipamd range "
                          f"({', '.join(map(str, allocator.rings))})")
    sub = _str(body, "SubPool")
    pool_id = f"ipamd:{pool}"
    if sub:
        subpool = _cidr(sub, "SubPool")
        if not pool.contains_cidr(subpool):
            raise DockerError(f"SubPool {subpool} is not inside {pool}")
        pool_id += f",{subpool}"
    gateway = pool.host_bounds()[0]
    reply = _check(apply(m.Claim(f"docker/{pool_id}/gateway", pool.family, gateway, pool)))
    return {"PoolID": pool_id, "Pool": str(pool),
            "Data": {GATEWAY_OPTION: reply["address"]}}


def _request_address(body: dict, allocator, apply) -> dict:
    pool_id = _str(body, "PoolID")
    pool, sub = _pool(pool_id)
    options = body.get("Options") or {}
    if not isinstance(options, dict):
        raise DockerError("Options must be an object")
    text = _str(body, "Address")
    key = None
    if text:
        try:
            key = parse_addr(text.split("/")[0])
        except AddrError as e:
            raise DockerError(f"Address: {e}") from None
        if key not in pool:
            raise DockerError(f"{text} is not in pool {pool}")
    if options.get("RequestAddressType") == GATEWAY_OPTION:
        if key is None:
            key = (pool.family, pool.host_bounds()[0])
        handle = f"docker/{pool_id}/gateway"
    elif key is not None:
        held = allocator.by_addr.get(key)
        if held is not None and held.handle.startswith(f"docker/{pool_id}/"):
            return {"Address": held.view()["address"], "Data": {}}  # a replay: it is ours
        handle = f"docker/{pool_id}/{text.split('/')[0]}"
    else:
        handle = f"docker/{pool_id}/{secrets.token_hex(8)}"
        rng = (sub.start, sub.end - 1) if sub else None
        reply = _check(apply(m.Allocate(handle, pool, None, rng)))
        return {"Address": reply["address"], "Data": {}}
    reply = _check(apply(m.Claim(handle, key[0], key[1], pool)))
    return {"Address": reply["address"], "Data": {}}
