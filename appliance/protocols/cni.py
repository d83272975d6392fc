"""CNI 1.1.0 as an IPAM plugin: parsing what the runtime gives, formatting what it gets back.

Pure code. The runtime's env and stdin reach the daemon through a forwarder (dist/ipamd-cni or
the ipamd executable in CNI mode); the daemon parses them here, runs them against the allocator
(appliance/cni_ops.py), and formats the result as host-local does: four-space-indented JSON.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ..core.addr import AddrError, Cidr, format_addr, parse_addr, parse_cidr
from ..core.spare import check_name

SUPPORTED = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
COMMANDS = ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION")
NEEDS_ENV = {"ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
             "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
             "DEL": ("CNI_CONTAINERID", "CNI_IFNAME")}
MAX_STDIN = 1 << 20
# The spec's error codes (CNI SPEC "Error"); 100+ are the plugin's own.
INCOMPATIBLE, UNSUPPORTED_FIELD, UNKNOWN_CONTAINER, BAD_ENV, IO_FAILURE, BAD_DECODE, \
    BAD_CONFIG, TRY_LATER, NOT_AVAILABLE = 1, 2, 3, 4, 5, 6, 7, 11, 50
REFUSED = 100  # the daemon said no: exhausted, in use, not owned ...
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


@dataclass(frozen=True)
class Range:
    subnet: Cidr
    first: int
    last: int
    gateway: int | None

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self.subnet and self.first <= key[1] <= self.last


@dataclass
class Call:
    command: str
    version: str = "1.1.0"
    name: str = ""
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    range_sets: list[list[Range]] = field(default_factory=list)
    tenant: str | None = None  # "ipam": {"tenant": NAME}: one address from its blocks, no ranges
    routes: list = field(default_factory=list)
    dns: dict = field(default_factory=dict)
    ips: list[tuple[int, int]] = field(default_factory=list)  # addresses asked for by name
    valid: set[tuple[str, str]] | None = None  # GC: (container id, ifname) to keep
    prev: list[str] | None = None  # CHECK: prevResult's addresses, "a.b.c.d/len"

    @property
    def handle(self) -> str:
        return handle_for(self.name, self.container_id, self.ifname)


def handle_for(network: str, container_id: str, ifname: str) -> str:
    return f"cni/{network}/{container_id}/{ifname}"


def parse_call(env: dict[str, str], stdin: bytes) -> Call:
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(BAD_ENV, f"unknown CNI_COMMAND: {command}")
    if len(stdin) > MAX_STDIN:
        raise CniError(BAD_DECODE, f"network config of {len(stdin)} bytes is too large")
    try:
        conf = json.loads(stdin)
    except (ValueError, RecursionError) as e:
        raise CniError(BAD_DECODE, f"error unmarshall network config: {e}") from None
    if not isinstance(conf, dict):
        raise CniError(BAD_DECODE, "error unmarshall network config: not a JSON object")
    version = conf.get("cniVersion")
    if not isinstance(version, str) or version not in SUPPORTED:
        raise CniError(INCOMPATIBLE, "incompatible CNI versions",
                       f"config is {json.dumps(version)}, plugin supports {list(SUPPORTED)}")
    call = Call(command, version)
    if command == "VERSION":
        return call
    missing = [k for k in NEEDS_ENV.get(command, ()) if not env.get(k)]
    if missing:
        raise CniError(BAD_ENV, f"required env variables [{' '.join(missing)}] missing")
    call.container_id = env.get("CNI_CONTAINERID", "")
    call.netns = env.get("CNI_NETNS", "")
    call.ifname = env.get("CNI_IFNAME", "")
    if call.container_id and not _ID.match(call.container_id):
        raise CniError(BAD_ENV, f"invalid CNI_CONTAINERID {call.container_id!r}",
                       "letters, digits, '_', '.' and '-', starting with a letter or digit")
    if call.ifname and (len(call.ifname) > 15 or not _ifname_ok(call.ifname)):
        raise CniError(BAD_ENV, f"invalid CNI_IFNAME {call.ifname!r}")
    if call.netns and not call.netns.startswith("/"):
        raise CniError(BAD_ENV, f"CNI_NETNS must be an absolute path, got {call.netns!r}")
    name = conf.get("name")
    if not isinstance(name, str) or not _ID.match(name):
        raise CniError(BAD_CONFIG, "network config needs a \"name\" of letters, digits, '_', "
                       "'.' and '-'")
    call.name = name
    ipam = conf.get("ipam")
    if not isinstance(ipam, dict):
        raise CniError(BAD_CONFIG, "network config has no \"ipam\" object")
    call.tenant = _tenant(ipam)
    if call.tenant is None:
        call.range_sets = _range_sets(ipam)
    call.routes = _routes(ipam.get("routes"))
    call.dns = _dns(ipam.get("dns"))
    # DEL releases what the container holds, whatever it asks for now (host-local's DEL
    # succeeds for an address no longer in any range set).
    if command != "DEL":
        call.ips = _claims(conf, env.get("CNI_ARGS", ""), call.range_sets, call.tenant)
    if command == "CHECK":
        call.prev = _prev_addresses(conf.get("prevResult"))
    if command == "GC":
        call.valid = _attachments(conf)
    return call


def _ifname_ok(name: str) -> bool:
    return name not in (".", "..") and all(c.isprintable() and c not in "/: \t" for c in name)


def _cidr(text, where: str) -> Cidr:
    try:
        return parse_cidr(text)[0]  # host bits are dropped, as host-local does
    except AddrError as e:
        raise CniError(BAD_CONFIG, f"invalid CIDR address in {where}: {e}") from None


def _addr(text, where: str) -> tuple[int, int]:
    try:
        return parse_addr(text)
    except AddrError as e:
        raise CniError(BAD_CONFIG, f"invalid address in {where}: {e}") from None


def _range(r, where: str) -> Range:
    if not isinstance(r, dict) or "subnet" not in r:
        raise CniError(BAD_CONFIG, f"{where} needs a \"subnet\"")
    subnet = _cidr(r["subnet"], f"{where}.subnet")
    lo, hi = subnet.host_bounds()
    gateway = None
    if r.get("gateway") is not None:
        g = _addr(r["gateway"], f"{where}.gateway")
        if g not in subnet:
            raise CniError(BAD_CONFIG, f"{where}: gateway {r['gateway']} is not in {subnet}")
        gateway = g[1]
    elif hi - lo >= 2:
        gateway = lo  # host-local's default: the subnet's first address
    first, last = lo, hi - 1
    for key in ("rangeStart", "rangeEnd"):
        if r.get(key) is not None:
            a = _addr(r[key], f"{where}.{key}")
            if a not in subnet:
                raise CniError(BAD_CONFIG, f"{where}: {key} {r[key]} is not in {subnet}")
            if key == "rangeStart":
                first = a[1]
            else:
                last = a[1]
    if first > last:
        raise CniError(BAD_CONFIG, f"{where}: rangeStart is after rangeEnd")
    return Range(subnet, first, last, gateway)


def _tenant(ipam: dict) -> str | None:
    """ipam.tenant, checked as the core checks tenant names. With ranges it is refused: the
    tenant's blocks are the only place its addresses come from, so ranges would be ignored."""
    name = ipam.get("tenant")
    if name is None:
        return None
    if not isinstance(name, str):
        raise CniError(BAD_CONFIG, "ipam.tenant must be a string")
    why = check_name("tenant", name)
    if why is not None:
        raise CniError(BAD_CONFIG, f"ipam.tenant: {why}")
    given = [k for k in ("ranges", "subnet") if k in ipam]
    if given:
        raise CniError(BAD_CONFIG, f"ipam has both \"tenant\" and \"{given[0]}\": a tenant's "
                       "addresses come from its blocks only; give one or the other")
    return name


def _range_sets(ipam: dict) -> list[list[Range]]:
    raw = ipam.get("ranges")
    if raw is None and "subnet" in ipam:  # host-local's older single-range form
        raw = [[{k: ipam[k] for k in ("subnet", "rangeStart", "rangeEnd", "gateway")
                 if k in ipam}]]
    if not isinstance(raw, list) or not raw:
        raise CniError(BAD_CONFIG, "ipam needs \"ranges\": a list of range sets")
    sets = []
    for i, rs in enumerate(raw):
        if not isinstance(rs, list) or not rs:
            raise CniError(BAD_CONFIG, f"range set {i} must be a non-empty list of ranges")
        ranges = [_range(r, f"range set {i} range {j}") for j, r in enumerate(rs)]
        if len({r.subnet.family for r in ranges}) > 1:
            raise CniError(BAD_CONFIG, f"range set {i} mixes address families")
        sets.append(ranges)
    flat = [(i, r) for i, rs in enumerate(sets) for r in rs]
    for a, (i, r) in enumerate(flat):
        for j, q in flat[a + 1:]:
            if r.subnet.family == q.subnet.family and r.first <= q.last and q.first <= r.last:
                raise CniError(BAD_CONFIG, f"range set {i} overlaps with {j}")
            if i != j and r.subnet == q.subnet:
                # A container holds one address per subnet: a second set there would be
                # answered with the first set's address.
                raise CniError(BAD_CONFIG, f"range sets {i} and {j} share subnet {r.subnet}; "
                               "ipamd gives a container one address per subnet")
    return sets


def _routes(raw) -> list:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise CniError(BAD_CONFIG, "ipam.routes must be a list")
    out = []
    for i, r in enumerate(raw):
        if not isinstance(r, dict) or "dst" not in r:
            raise CniError(BAD_CONFIG, f"ipam.routes[{i}] needs a \"dst\"")
        route = {"dst": str(_cidr(r["dst"], f"ipam.routes[{i}].dst"))}
        if r.get("gw") is not None:
            route["gw"] = format_addr(*_addr(r["gw"], f"ipam.routes[{i}].gw"))
        out.append(route)
    return out


def _dns(raw) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CniError(BAD_CONFIG, "ipam.dns must be an object")
    out = {}
    for key in ("nameservers", "search", "options"):
        if key in raw:
            v = raw[key]
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise CniError(BAD_CONFIG, f"ipam.dns.{key} must be a list of strings")
            out[key] = v
    if "domain" in raw:
        if not isinstance(raw["domain"], str):
            raise CniError(BAD_CONFIG, "ipam.dns.domain must be a string")
        out["domain"] = raw["domain"]
    return out


def _claims(conf: dict, cni_args: str, sets: list[list[Range]],
            tenant: str | None = None) -> list[tuple[int, int]]:
    texts = []
    rc = conf.get("runtimeConfig")
    if isinstance(rc, dict) and rc.get("ips") is not None:
        texts += _str_list(rc["ips"], "runtimeConfig.ips")
    args = conf.get("args")
    if isinstance(args, dict) and isinstance(args.get("cni"), dict) \
            and args["cni"].get("ips") is not None:
        texts += _str_list(args["cni"]["ips"], "args.cni.ips")
    for part in cni_args.split(";"):
        key, _, value = part.partition("=")
        if key == "IP" and value:
            texts += value.split(",")
    out = []
    for t in texts:
        text, slash, prefix = t.partition("/")
        a = _addr(text, "requested ips")
        if slash and not (prefix.isdigit() and int(prefix) <= (32 if a[0] == 4 else 128)):
            raise CniError(BAD_CONFIG, f"invalid requested IP address {t!r}: bad prefix length")
        # A tenant's blocks are known to the core only: it judges the address there.
        if tenant is None and not any(a in r for rs in sets for r in rs):
            raise CniError(BAD_CONFIG, f"requested IP address {t} is not in any range set")
        if a not in out:
            out.append(a)
    return out


def _prev_addresses(prev) -> list[str] | None:
    """CHECK: the addresses the runtime was given (prevResult.ips[].address), or None."""
    if prev is None:
        return None
    if not isinstance(prev, dict) or not isinstance(prev.get("ips", []), list):
        raise CniError(BAD_CONFIG, "prevResult must be an object with a list of \"ips\"")
    out = []
    for i, ip in enumerate(prev.get("ips", [])):
        if not isinstance(ip, dict) or not isinstance(ip.get("address"), str):
            raise CniError(BAD_CONFIG, f"prevResult.ips[{i}] needs an \"address\"")
        out.append(ip["address"])
    return out


def _str_list(v, where: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise CniError(BAD_CONFIG, f"{where} must be a list of strings")
    return v


def _attachments(conf: dict) -> set[tuple[str, str]]:
    raw = conf.get("cni.dev/valid-attachments", conf.get("cni.dev/attachments"))
    if raw is None:
        raise CniError(BAD_CONFIG, "GC needs \"cni.dev/valid-attachments\"")
    if not isinstance(raw, list):
        raise CniError(BAD_CONFIG, "cni.dev/valid-attachments must be a list")
    out = set()
    for i, a in enumerate(raw):
        if not isinstance(a, dict) or not isinstance(a.get("containerID"), str) \
                or not isinstance(a.get("ifname"), str):
            raise CniError(BAD_CONFIG, f"valid-attachments[{i}] needs containerID and ifname")
        out.add((a["containerID"], a["ifname"]))
    return out


# -- output ------------------------------------------------------------------------------------

def dump(obj) -> bytes:
    return json.dumps(obj, indent=4).encode()


def version_result(version: str = "1.1.0") -> bytes:
    return dump({"cniVersion": version, "supportedVersions": list(SUPPORTED)})


def add_result(call: Call, ips: list[tuple[str, Range]]) -> bytes:
    """ips: (address/prefix, its range), in range-set order."""
    entries = []
    for address, r in ips:
        e = {}
        if call.version < "1.0.0":
            e["version"] = "4" if r.subnet.family == 4 else "6"
        e["address"] = address
        if r.gateway is not None:
            e["gateway"] = r.subnet.addr(r.gateway)
        entries.append(e)
    out = {"cniVersion": call.version, "ips": entries}
    if call.routes:
        out["routes"] = call.routes
    out["dns"] = call.dns
    return dump(out)


def error_result(e: CniError, version: str = "1.1.0") -> bytes:
    out = {"cniVersion": version, "code": e.code, "msg": e.msg}
    if e.details:
        out["details"] = e.details
    return dump(out)
