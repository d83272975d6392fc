"""Docker's remote IPAM driver API (libnetwork's ipamapi): its JSON calls decoded, and each
planned as core requests.

Pure (the HTTP and the answers to its questions are docker_server.py's): `call(path, body, state, caller)` is a generator. It yields the core requests that decide
the answer (messages.Allocate, Claim and Release change who holds an address; Status and List
only read) and `Gone(owner)` questions about a docker daemon's process; the shell
(docker_server.py) answers each one (`await core.submit(req)`, or a look at /proc) and sends the
answer back in. The generator's return value is Docker's answer; DockerError is the driver's
{"Error": ...} answer. Every change of who holds an address is a core request, judged by the
core's checks (standing, ownership, quarantine, holders) and committed before it is answered.

Names, so that the handles alone say what belongs to what (no table to lose):

- A pool id is made afresh by every RequestPool: "ipamd:POOL[,SUBPOOL]#TOKEN@OWNER", OWNER being
  the docker daemon that asked ("p<pid>.<start time>", or "e<epoch>" when its pid is unknown).
  Docker rolls back a network it refuses (ReleaseAddress of the gateway, ReleasePool) with that
  pool's own id, so a refused duplicate network never touches the live one.
- Every address held for Docker has the handle "docker/POOLID/ROLE": "gateway" (one per pool),
  "addr/ADDRESS" (an auxiliary address, or an endpoint replayed without its identity), or
  "ep/TOKEN[/MAC[/NAME]]" (an endpoint: libnetwork sends the MAC address because we declare
  RequiresMACAddress, newer versions also the endpoint's name).

Telling a replay from a new request. libnetwork (controller.reservePools) replays on its own
start, because we declare RequiresRequestReplay: RequestPool for every local network (with the
old subnet and gateway named), RequestAddress for the gateway, for each --aux-address, and for
each endpoint it has stored, with no options (an endpoint's options are not persisted). A new
endpoint's request always carries its MAC address. So an address that is already held is given
again only when:
- the holder is in the same pool and in the same role (the same gateway; the same MAC; an
  auxiliary or replayed address asked again without options), or
- the holder is a pool with the same POOL and SUBPOOL whose docker daemon is gone (a restarted
  daemon replaying: the allocation moves to the new pool id, Release then Claim, keeping its
  role), never from a daemon still running (that is a second network on the same subnet).
Otherwise the answer is the core's "in_use" error naming the holder, which Docker shows.
Pool ids of an older ipamd ("ipamd:POOL[,SUBPOOL]", handles "docker/POOLID/...") keep working;
their daemon counts as gone once a docker daemon has sent /Plugin.Activate to this ipamd.

Tenants' blocks (#14). A pool in a tenant's block has the id "ipamd:BLOCK[,SUBPOOL]~TENANT#..."
and every address of it is allocated or claimed for that tenant; its gateway is the block's
own (its first host address, which the core keeps free and nobody holds).
- `--ipam-opt tenant=NAME` without --subnet: a block of NAME that no live pool of this driver
  uses (the tenant is grown if all are used and its --max-blocks allows); with --subnet: the
  subnet must be one of NAME's blocks.
- No tenant and no --subnet, with block space of the family in the cluster: a tenant of the
  network's own, "docker-TOKEN-OWNER" (TOKEN: the pool id's, OWNER: the asking daemon's), with
  one block of DEFAULT_PREFIX, so that networks made on two hosts never overlap. ReleasePool
  deletes it; while its released addresses wait out their quarantine the delete is refused,
  and the shell tries again (`doomed`). A replay naming its block binds the new pool id to the
  same tenant, unless a docker daemon that still runs uses it. Without block space of the
  family: a block of the default subnet chosen on this host, as before.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Callable

from ..core import messages as m
from ..core.addr import BITS, AddrError, Cidr, format_addr, parse_addr, parse_cidr
from ..core.allocator import block_gateway
from ..core.spare import check_name

GATEWAY_OPTION = "com.docker.network.gateway"  # netlabel.Gateway
ADDRESS_TYPE = "RequestAddressType"  # ipamapi.RequestAddressType
MAC_OPTION = "com.docker.network.endpoint.macaddress"  # netlabel.MacAddress
NAME_OPTION = "com.docker.network.endpoint.name"  # netlabel.EndpointName (Docker 27 and later)
CAPABILITIES = {"RequiresMACAddress": True, "RequiresRequestReplay": True}
DEFAULT_PREFIX = {4: 24, 6: 64}  # a network without --subnet gets a block this size
TENANT_OPTION = "tenant"  # --ipam-opt tenant=NAME
OWN_TENANT = "docker-"  # the prefix of a network's own tenant's name
CONTENT_TYPE = b"application/vnd.docker.plugins.v1+json"
ENDPOINTS = {"/Plugin.Activate", "/IpamDriver.GetCapabilities",
             "/IpamDriver.GetDefaultAddressSpaces", "/IpamDriver.RequestPool",
             "/IpamDriver.ReleasePool", "/IpamDriver.RequestAddress",
             "/IpamDriver.ReleaseAddress"}

_CIDR = r"[0-9A-Fa-f.:]+/\d{1,3}"
_TENANT = r"[a-z0-9][a-z0-9._-]{0,62}"
_POOL_ID = re.compile(rf"ipamd:({_CIDR})(?:,({_CIDR}))?(?:~({_TENANT}))?"
                      r"(?:#([0-9a-f]{1,32})@([a-z0-9.]{0,64}))?")
_HANDLE = re.compile(rf"docker/(ipamd:{_CIDR}(?:,{_CIDR})?(?:~{_TENANT})?(?:#[^/]*)?)/(.+)")
_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5,19}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")


class DockerError(Exception):
    pass


class BadCall(Exception):
    """Not a call of the API: an unknown endpoint (HTTP 404) or a body that is not a JSON
    object (400). The message names which."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_call(path: str, raw: bytes) -> dict:
    """The body of a POST to path, checked: a JSON object (an empty body is {})."""
    if path not in ENDPOINTS:
        raise BadCall(404, f"no such endpoint {path}")
    try:
        body = json.loads(raw) if raw.strip() else {}
    except (ValueError, RecursionError) as e:
        raise BadCall(400, f"request body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadCall(400, "request body must be a JSON object")
    return body


def encode_answer(answer: dict) -> bytes:
    return json.dumps(answer).encode()


@dataclass(frozen=True)
class Gone:
    """Question to the shell: is the docker daemon `owner` ("p<pid>.<start>") gone, on proof
    (no such process, or one started at another time)? Answer True, or False when it is alive
    or cannot be told (DESIGN.md rule 10)."""
    owner: str


@dataclass
class DriverState:
    """What the shell keeps between calls (memory only; the handles are the durable truth)."""
    token: Callable[[], str]  # random hex, from the shell
    epoch: str = ""  # renewed by every /Plugin.Activate: a docker daemon (re)started
    activated: bool = False  # an Activate came since this ipamd started
    pools: dict[str, Cidr] = field(default_factory=dict)  # ids handed out, not yet released
    doomed: set[str] = field(default_factory=set)  # own tenants released, to delete
    notes: list[str] = field(default_factory=list)  # for the shell's log, drained by it

    def __post_init__(self):
        if not self.epoch:
            self.epoch = self.token()


@dataclass(frozen=True)
class PoolId:
    text: str
    pool: Cidr
    sub: Cidr | None
    owner: str | None  # None: an id from an ipamd before pool ids were unique
    tenant: str | None = None  # a pool in this tenant's block

    @property
    def prefix(self) -> str:
        return f"docker/{self.text}/"


def parse_pool_id(value) -> PoolId:
    if not isinstance(value, str) or not (match := _POOL_ID.fullmatch(value)):
        raise DockerError(f"unknown PoolID {value!r}")
    pool = _cidr(match[1], "PoolID")
    sub = _cidr(match[2], "PoolID") if match[2] else None
    return PoolId(value, pool, sub, match[5] if match[4] else None, match[3])


def split_handle(handle: str) -> tuple[PoolId, str] | None:
    """(pool, role) of a Docker handle; None for any other handle."""
    match = _HANDLE.fullmatch(handle)
    if not match:
        return None
    try:
        return parse_pool_id(match[1]), match[2]
    except DockerError:
        return None


def _cidr(text: str, what: str) -> Cidr:
    try:
        block, _ = parse_cidr(text)
    except AddrError as e:
        raise DockerError(f"{what}: {e}") from None
    return block


def _str(body: dict, key: str) -> str:
    v = body.get(key) or ""
    if not isinstance(v, str):
        raise DockerError(f"{key} must be a string")
    return v


def _options(body: dict) -> dict:
    options = body.get("Options") or {}
    if not isinstance(options, dict) or not all(isinstance(v, str) for v in options.values()):
        raise DockerError("Options must be an object of strings")
    return options


def _failed(reply: dict) -> DockerError:
    return DockerError(f"{reply['error']['code']}: {reply['error']['message']}")


def _ok(reply: dict) -> dict:
    if not reply["ok"]:
        raise _failed(reply)
    return reply


def call(path: str, body: dict, state: DriverState, caller: str):
    """One API call (a generator, see the module's doc). caller: the asking docker daemon,
    "p<pid>.<start>", or "" when the shell could not tell."""
    if path == "/Plugin.Activate":
        # A docker daemon starts using us: any daemon that used us before has restarted.
        state.epoch, state.activated = state.token(), True
        return {"Implements": ["IpamDriver"]}
    if path == "/IpamDriver.GetCapabilities":
        return dict(CAPABILITIES)
    if path == "/IpamDriver.GetDefaultAddressSpaces":
        return {"LocalDefaultAddressSpace": "local", "GlobalDefaultAddressSpace": "global"}
    if path == "/IpamDriver.RequestPool":
        return (yield from _request_pool(body, state, caller or f"e{state.epoch}"))
    if path == "/IpamDriver.ReleasePool":
        pool = parse_pool_id(body.get("PoolID"))
        state.pools.pop(pool.text, None)
        listing = _ok((yield m.List()))
        for handle in sorted({a["handle"] for a in listing["allocations"]
                              if a["handle"].startswith(pool.prefix)}):
            _ok((yield m.Release(handle)))
        if pool.tenant is not None and pool.tenant.startswith(OWN_TENANT):
            state.doomed.add(pool.tenant)
            yield from delete_doomed(state)
        return {}
    if path == "/IpamDriver.RequestAddress":
        return (yield from _request_address(body, state))
    if path == "/IpamDriver.ReleaseAddress":
        pool = parse_pool_id(body.get("PoolID"))
        key = _address(_str(body, "Address"))
        holder = yield from _holder(key)
        if holder is not None and holder.startswith(pool.prefix):
            _ok((yield m.Release(holder, key)))  # only this pool's own holder of it
        return {}
    raise LookupError(path)


def _address(text: str) -> tuple[int, int]:
    try:
        return parse_addr(text.split("/")[0])
    except AddrError as e:
        raise DockerError(f"Address: {e}") from None


def _holder(key: tuple[int, int]):
    """The handle holding address key, or None."""
    return _ok((yield m.Holder(*key)))["handle"]


def delete_doomed(state: DriverState):
    """Delete the own tenants of released networks. One whose released addresses still wait
    out their quarantine is refused (in_use) and stays doomed: the shell calls again."""
    for name in sorted(state.doomed):
        reply = yield m.TenantDelete(name)
        if reply["ok"] or reply["error"]["code"] == "no_tenant":
            state.doomed.discard(name)
            state.notes.append(f"event=docker_tenant_deleted tenant={name}")
        elif reply["error"]["code"] != "in_use":
            state.notes.append(f"event=docker_tenant_kept tenant={name} "
                               f"code={reply['error']['code']} "
                               f"message={reply['error']['message']!r}")


# -- pools ---------------------------------------------------------------------------------------

def _request_pool(body: dict, state: DriverState, owner: str):
    v6 = body.get("V6") is True
    family = 6 if v6 else 4
    tenant = _tenant_option(_options(body))
    text, subtext = _str(body, "Pool"), _str(body, "SubPool")
    status = _ok((yield m.Status()))
    # The ranges: not static space (claim-only), block space or blocks, which allocate never
    # serves without a tenant.
    universes = [_cidr(u["range"], "range") for u in status["universes"]
                 if u.get("kind", "range") == "range"]
    ranges = ", ".join(map(str, universes))
    token = state.token()
    if text:
        pool = _cidr(text, "Pool")
        if pool.family != family:
            raise DockerError(f"Pool {pool} is not IPv{family}, as V6={v6} asks")
    if tenant is not None:
        pool = yield from _tenant_pool(tenant, pool if text else None, family, status, state)
    elif text:
        tenant = yield from _block_of(pool, status, state)
    elif any(u.get("kind") == "blocks" and _cidr(u["range"], "range").family == family
             for u in status["universes"]):
        # A tenant of the network's own: its block is carved cluster-wide, so no network of
        # another host gets it.
        tenant = f"{OWN_TENANT}{token}-{owner}"
        made = _ok((yield m.TenantCreate(tenant, DEFAULT_PREFIX[family], family, 1)))
        pool = _cidr(made["blocks"][0], "block")
    else:
        pool = yield from _default_pool(family, universes, _cidr(status["default_subnet"],
                                                                 "default subnet"), state)
        state.notes.append(f"event=docker_pool_on_this_host pool={pool} why='no IPv{family} "
                           "block space: ipamd range add CIDR --blocks'")
    if tenant is None and not any(pool.overlaps(u) for u in universes):
        raise DockerError(f"pool {pool} lies outside every ipamd range ({ranges}); "
                          f"ipamd hands out addresses only from its ranges")
    pool_id = f"ipamd:{pool}"
    if subtext:
        sub = _cidr(subtext, "SubPool")
        if not pool.contains_cidr(sub):
            raise DockerError(f"SubPool {sub} is not inside {pool}")
        if tenant is None and not any(sub.overlaps(u) for u in universes):
            raise DockerError(f"SubPool {sub} lies outside every ipamd range ({ranges})")
        pool_id += f",{sub}"
    if tenant is not None:
        pool_id += f"~{tenant}"
    pool_id += f"#{token}@{owner}"
    state.pools[pool_id] = pool
    # No gateway in Data: libnetwork then asks for one with RequestAddress (gateway type),
    # the user's --gateway or one we choose, held under this pool's own handle.
    return {"PoolID": pool_id, "Pool": str(pool), "Data": {}}


def _tenant_option(options: dict) -> str | None:
    name = options.get(TENANT_OPTION)
    if name is None:
        return None
    why = check_name("tenant", name)
    if why is not None:
        raise DockerError(f"--ipam-opt {TENANT_OPTION}: {why}")
    if name.startswith(OWN_TENANT):
        raise DockerError(f"--ipam-opt {TENANT_OPTION}={name}: names starting with "
                          f"{OWN_TENANT} are the driver's own (one per network without --subnet)")
    return name


def _tenant_pool(name: str, pool: Cidr | None, family: int, status: dict, state):
    """The block of tenant name a pool takes: pool, which must be one of them, or one that no
    live pool of this driver uses (the tenant grown if all are)."""
    t = status["tenants"].get(name)
    if t is None:
        raise DockerError(f"no_tenant: no tenant {name} is known; create it first "
                          "(ipamd tenant create)")
    if t["family"] != family:
        raise DockerError(f"tenant {name} has IPv{t['family']} blocks, the pool asked for is "
                          f"IPv{family}")
    blocks = [_cidr(b, "block") for b in t["blocks"]]
    if pool is not None:
        if pool not in blocks:
            raise DockerError(f"bad_subnet: {pool} is not a block of tenant {name} "
                              f"({', '.join(map(str, blocks))})")
        return pool
    used = {p.pool for p in (yield from _pools(state))}
    free = [b for b in blocks if b not in used]
    if free:
        return free[0]
    reply = yield m.TenantGrow(name)
    if not reply["ok"]:
        raise DockerError(f"{reply['error']['code']}: every block of tenant {name} is used by "
                          f"a network here, and it may not grow: {reply['error']['message']}")
    return _cidr(reply["block"], "block")


def _block_of(pool: Cidr, status: dict, state):
    """A pool named without a tenant: None if it is no tenant's block and not in block space;
    a network's own tenant if pool is its block and no docker daemon that still runs uses it
    (a restarted daemon replaying its network); else refused."""
    for name, t in status["tenants"].items():
        if str(pool) not in t["blocks"]:
            continue
        if not name.startswith(OWN_TENANT):
            raise DockerError(f"pool {pool} is a block of tenant {name}: add --ipam-opt "
                              f"{TENANT_OPTION}={name}")
        users = [name.split("-", 2)[2]] + [p.owner for p in (yield from _pools(state))
                                           if p.tenant == name]
        for owner in users:
            if not (yield from _gone(owner, state)):
                raise DockerError(f"in_use: pool {pool} is the block of tenant {name}, made "
                                  "for a network of a docker daemon that is still running")
        state.doomed.discard(name)
        return name
    for u in status["universes"]:
        if u.get("kind") == "blocks" and pool.overlaps(_cidr(u["range"], "range")):
            raise DockerError(f"pool {pool} lies in block space {u['range']}: give no --subnet, "
                              f"or name a tenant (--ipam-opt {TENANT_OPTION}=NAME)")
    return None


def _pools(state: DriverState):
    """The pools of this driver in use: those handed out in this run to a docker daemon that is
    not gone (the others are forgotten: docker forgot them), and those addresses are held in."""
    out = []
    for pool_id in list(state.pools):
        pool = parse_pool_id(pool_id)
        if (yield from _gone(pool.owner, state)):
            del state.pools[pool_id]
        else:
            out.append(pool)
    listing = _ok((yield m.List()))
    for a in listing["allocations"]:
        parts = split_handle(a["handle"])
        if parts is not None:
            out.append(parts[0])
    return out


def _default_pool(family: int, universes: list[Cidr], default_subnet: Cidr, state):
    """A network without --subnet: the lowest block of DEFAULT_PREFIX (or the whole base, if
    smaller) in the default subnet (for IPv6, or when the default subnet is of the other
    family: the first range of that family) that no Docker pool uses. libnetwork asks again
    while a pool overlaps a route of the host, so each answer must differ from the last."""
    base = default_subnet if default_subnet.family == family else \
        next((u for u in universes if u.family == family), None)
    if base is None:
        raise DockerError(f"ipamd has no IPv{family} range; start it with an IPv{family} "
                          "--iprange, or give the network a --subnet")
    taken = {p.pool for p in (yield from _pools(state)) if p.pool.family == family}
    prefix = max(base.prefix, DEFAULT_PREFIX[family])
    size = 1 << (BITS[family] - prefix)
    inside = [u for u in universes if u.family == family]
    # The lowest free aligned block starts at the base, right after a taken pool, or at a range.
    starts = {base.start} | {-(-t.end // size) * size for t in taken} | \
        {u.start // size * size for u in inside}
    for start in sorted(starts):
        block = Cidr(family, start, prefix)
        if base.contains_cidr(block) and any(block.overlaps(u) for u in inside) and \
                not any(block.overlaps(t) for t in taken):
            return block
    raise DockerError(f"every /{prefix} of {base} is used by a Docker pool; give the network a "
                      "--subnet")


# -- addresses -----------------------------------------------------------------------------------

def _request_address(body: dict, state: DriverState):
    pool = parse_pool_id(body.get("PoolID"))
    options = _options(body)
    text = _str(body, "Address")
    key = _address(text) if text else None
    if key is not None and key not in pool.pool:
        raise DockerError(f"{format_addr(*key)} is not in pool {pool.pool}")
    if options.get(ADDRESS_TYPE) == GATEWAY_OPTION:
        role = "gateway"
        if pool.tenant is not None and key in (None, (pool.pool.family, block_gateway(pool.pool))):
            # The block's own gateway: kept free by the core, held by nobody.
            gateway = format_addr(pool.pool.family, block_gateway(pool.pool))
            return {"Address": f"{gateway}/{pool.pool.prefix}", "Data": {}}
        if key is None:
            # The pool's first address, as Docker's own driver gives; if that is taken, any.
            first = pool.pool.host_bounds()[0]
            reply = yield m.Claim(pool.prefix + role, pool.pool.family, first, pool.pool)
            if reply["ok"] or reply["error"]["code"] not in ("in_use", "reserved"):
                return _answer(reply)
            return _answer((yield m.Allocate(pool.prefix + role, pool.pool)))
        return (yield from _claim(pool, role, key, state))
    mac = options.get(MAC_OPTION, "").lower()
    if mac and not _MAC.fullmatch(mac):
        raise DockerError(f"{MAC_OPTION} {mac!r} is not a MAC address")
    name = options.get(NAME_OPTION, "")
    fresh = bool(mac or name)  # a new endpoint: replays and auxiliary addresses carry neither
    if key is None:
        role = _endpoint(state.token(), mac, name)
        rng = (pool.sub.start, pool.sub.end - 1) if pool.sub else None
        return _answer((yield m.Allocate(pool.prefix + role, pool.pool, None, rng,
                                         tenant=pool.tenant)))
    role = _endpoint(state.token(), mac, name) if fresh else f"addr/{format_addr(*key)}"
    return (yield from _claim(pool, role, key, state))


def _endpoint(token: str, mac: str, name: str) -> str:
    role = f"ep/{token}"
    if mac:
        role += f"/{mac}"
        if _NAME.fullmatch(name):
            role += f"/{name}"
    return role


def _answer(reply: dict) -> dict:
    return {"Address": _ok(reply)["address"], "Data": {}}


def _claim(pool: PoolId, role: str, key: tuple[int, int], state: DriverState):
    """Claim key for pool in role; if it is held, give it again only to the same holder, or
    move it from a pool of a docker daemon that is gone (see the module's doc)."""
    reply = yield _claim_request(pool, role, key)
    if reply["ok"] or reply["error"]["code"] != "in_use":
        return _answer(reply)
    holder = yield from _holder(key)
    if holder is None:  # freed meanwhile: one more try
        return _answer((yield _claim_request(pool, role, key)))
    parts = split_handle(holder)
    if parts is None or not _same_role(role, parts[1]):
        raise _failed(reply)
    theirs, their_role = parts
    if (theirs.pool, theirs.sub, theirs.tenant) != (pool.pool, pool.sub, pool.tenant):
        raise _failed(reply)
    if theirs.text == pool.text:
        return {"Address": f"{format_addr(*key)}/{pool.pool.prefix}", "Data": {}}
    if not (yield from _gone(theirs.owner, state)):
        raise DockerError(f"in_use: {reply['error']['message']}, a pool of a docker daemon "
                          "that is still running")
    # A restarted docker daemon replays: the allocation moves to the new pool id.
    state.pools.pop(theirs.text, None)
    _ok((yield m.Release(holder, key)))
    return _answer((yield _claim_request(pool, their_role, key)))


def _claim_request(pool: PoolId, role: str, key: tuple[int, int]) -> m.Claim:
    return m.Claim(pool.prefix + role, key[0], key[1], pool.pool, None, pool.tenant)


def _same_role(role: str, theirs: str) -> bool:
    """May a request in `role` be given an address held in role `theirs`?"""
    if role == "gateway" or theirs == "gateway":
        return role == theirs
    if role.startswith("ep/"):  # a new endpoint: only its own address (the same MAC)
        mine = role.split("/")[2:]
        other = theirs.split("/")[2:] if theirs.startswith("ep/") else []
        return bool(mine) and bool(other) and mine[0] == other[0] and \
            (len(mine) < 2 or len(other) < 2 or mine[1] == other[1])
    return True  # asked without identity: an auxiliary address or a replayed endpoint


def _gone(owner: str | None, state: DriverState):
    """Is the docker daemon that made a pool gone? (A generator: a pid is asked of the shell.)"""
    if owner is not None and owner.startswith("p"):
        return (yield Gone(owner))
    if owner is not None and owner.startswith("e"):
        return state.activated and owner[1:] != state.epoch
    # An id from before pool ids were unique, or of unknown owner: a docker daemon started
    # since this ipamd did, so the daemon that made it has restarted (one daemon per ipamd).
    return state.activated
