"""The command line of tenants, leased blocks and name pools (`ipamd tenant ...`,
`lease-block`, `names ...`, `lease-name`, `claim-name`): their requests, and views made from
a `status` reply (`tenant ls`, `tenant show`, `names ls`). Imports neither trio nor apsw."""
from __future__ import annotations

import argparse

from .core.addr import cidr, format_addr, parse_addr
from .core.names import Pattern
from .core.spare import REGISTRY

TENANT_HELP = (
    "Tenants: each has its own blocks, cut whole and aligned from block space (`ipamd range "
    "add CIDR --blocks`), and its containers' addresses come only from them (`ipamd allocate "
    "HANDLE --tenant NAME`), on any host; a block's first host address is its gateway, never "
    "handed out. `tenant ls` and `tenant show` read this host's `status`: the addresses in use "
    "on this host are exact; on other hosts they are estimated from the free-space hints "
    "those hosts gossip (owned minus free, changes under 16 addresses or a quarter of the "
    "free space are not sent), marked with ~.")
NAMES_HELP = (
    "Name pools: a pattern such as 'web-{000..999}' makes names that are unique in the "
    "cluster, leased (`ipamd lease-name HANDLE --pool POOL`), claimed (`ipamd claim-name "
    "HANDLE NAME`) and released (`ipamd release HANDLE`) as addresses are.")


def prefix_len_arg(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"{text!r} is not a prefix length (1 to 32 for IPv4, "
                                         "1 to 64 for IPv6)")
    return int(text)


def count_arg(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1 << 20:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of blocks (1 to 1048576)")
    return int(text)


def add_commands(sub, client, cidr_arg, anchor_flags) -> None:
    """The parsers: `client(name, help, parent)` makes a client command (--json, --socket);
    cidr_arg(flag) parses a CIDR; anchor_flags(parser) adds --anchor-netns/--anchor-pid."""
    t = sub.add_parser("tenant", help="create, grow, list, show or delete tenants: address "
                                      "blocks of their own, on every host",
                       description=TENANT_HELP)
    tenants = t.add_subparsers(dest="tenant_command", required=True, metavar="ACTION")
    c = client("create", "create tenant NAME with its first block", tenants)
    c.add_argument("name", metavar="NAME")
    _shape(c, cidr_arg)
    c.add_argument("--max-blocks", type=count_arg, default=1, metavar="N",
                   help="the most blocks it may have (default: 1; `tenant grow` adds one)")
    c = client("grow", "give tenant NAME one more block (up to its --max-blocks)", tenants)
    c.add_argument("name", metavar="NAME")
    c.add_argument("--range", type=cidr_arg("--range"), metavar="CIDR",
                   help="cut the block from this block space (default: the tenant's)")
    client("ls", "one line per tenant: its blocks and the addresses in use there", tenants)
    client("show", "tenant NAME's blocks, their gateways, and the addresses in use there by "
                   "host (exact here, ~ estimated elsewhere)", tenants) \
        .add_argument("name", metavar="NAME")
    c = client("delete", "delete tenant NAME and give its blocks back (refused while an "
                         "address is in use or in quarantine there, naming it)", tenants)
    c.add_argument("name", metavar="NAME")
    c.add_argument("--force", action="store_true",
                   help="first release what this host holds in its blocks, once, when asked (run "
                        "it again once their quarantine, --reuse-delay, is over)")

    c = client("lease-block", "lease HANDLE a whole block of block space (`ipamd release "
                              "HANDLE` gives it back)")
    c.add_argument("handle")
    _shape(c, cidr_arg)

    n = sub.add_parser("names", help="create or list name pools", description=NAMES_HELP)
    names = n.add_subparsers(dest="names_command", required=True, metavar="ACTION")
    c = client("create", "create pool POOL of the names PATTERN makes, e.g. 'web-{000..999}'",
               names)
    c.add_argument("pool", metavar="POOL")
    c.add_argument("pattern", metavar="PATTERN")
    client("ls", "one line per pool: its pattern, size and names in use", names)
    c = client("lease-name", "give HANDLE a free name of POOL (the same one again if it has one)")
    c.add_argument("handle")
    c.add_argument("--pool", required=True, metavar="POOL")
    anchor_flags(c)
    c = client("claim-name", "give HANDLE the name NAME (its pool: --pool, or the one pool "
                             "whose pattern makes it)")
    c.add_argument("handle")
    c.add_argument("name", metavar="NAME")
    c.add_argument("--pool", metavar="POOL")
    anchor_flags(c)


def _shape(c, cidr_arg) -> None:
    c.add_argument("--prefix-len", type=prefix_len_arg, required=True, metavar="N",
                   help="the blocks' size: a /N (IPv4: 1-32; IPv6: 1-64)")
    c.add_argument("--ipv6", action="store_true", help="IPv6 blocks (default: IPv4)")
    c.add_argument("--range", type=cidr_arg("--range"), metavar="CIDR",
                   help="cut blocks from this block space only (default: any of the family)")


def command(args) -> str | None:
    """"tenant create", "names ls", ... for these commands; None for others."""
    for group in ("tenant", "names"):
        if args.command == group:
            return f"{group} {getattr(args, group + '_command')}"
    return None


def _family(args) -> int:
    return 6 if args.ipv6 or (args.range is not None and args.range.family == 6) else 4


def request(cmd: str, args, anchor) -> dict | None:
    """The hook request of a command (a status for the views); None if not one of these.
    anchor(args): the anchor a request carries, or None."""
    req = {"v": 1}
    if cmd in ("tenant ls", "tenant show", "names ls"):
        req["op"] = "status"
    elif cmd == "tenant create":
        req.update(op="tenant_create", tenant=args.name, prefix_len=args.prefix_len,
                   family=_family(args), max_blocks=args.max_blocks)
    elif cmd == "tenant grow":
        req.update(op="tenant_grow", tenant=args.name)
    elif cmd == "tenant delete":
        req.update(op="tenant_delete", tenant=args.name, force=args.force)
    elif cmd == "lease-block":
        req.update(op="lease_block", handle=args.handle, prefix_len=args.prefix_len,
                   family=_family(args))
    elif cmd == "names create":
        req.update(op="names_create", pool=args.pool, pattern=args.pattern)
    elif cmd in ("lease-name", "claim-name"):
        req.update(op=cmd.replace("-", "_"), handle=args.handle, pool=args.pool)
        if cmd == "claim-name":
            req["name"] = args.name
        if (a := anchor(args)) is not None:
            req["anchor"] = a
    else:
        return None
    if getattr(args, "range", None) is not None:
        req["range"] = str(args.range)
    return req


class Refused(Exception):
    """What the daemon would answer as an error, found by the command line itself (a
    claim-name whose pool cannot be told, a tenant show of no tenant)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.reply = {"ok": False, "error": {"code": code, "message": message}}


def pool_of(name: str, status: dict) -> str:
    """The one pool whose pattern makes name; Refused if none or several do."""
    pools = status.get("pools") or {}
    found = sorted(p for p, x in pools.items() if Pattern.parse(x["pattern"]).ordinal(name)
                   is not None)
    if not found:
        known = ", ".join(f"{p} ({x['pattern']})" for p, x in sorted(pools.items()))
        raise Refused("no_pool", f"no name pool makes {name!r} (pools: {known or 'none'})")
    if len(found) > 1:
        raise Refused("bad_request", f"{name!r} is a name of pools {', '.join(found)}: name "
                      "one with --pool")
    return found[0]


def names_of(status: dict) -> dict[str, str]:
    """address (as a reply writes it, with its /96) -> name, for the names in released."""
    return {cidr(x["universe"]): Pattern.parse(x["pattern"])
            for x in (status.get("pools") or {}).values()}


def name_at(address: str, pools: dict) -> str | None:
    """The name an address of a pool stands for (its ordinal is the offset from the pool's
    first address, less one: names.py)."""
    family, value = parse_addr(address.split("/")[0])
    for u, pattern in pools.items():
        if family == u.family and u.start < value < u.end and value - u.start - 1 < pattern.size:
            return pattern.name(value - u.start - 1)
    return None


def in_registry(address: str) -> bool:
    family, value = parse_addr(address.split("/")[0])
    return family == 6 and REGISTRY.start <= value < REGISTRY.end


def _in_use(universe: dict | None, me: str) -> dict[str, tuple[int, bool]]:
    """peer -> (addresses in use, exact?) in one universe of a status reply: this host's
    own count exactly, the others' as owned minus their free hint."""
    if universe is None:
        return {}
    out = {}
    for peer, p in universe.get("peers", {}).items():
        if peer.startswith("@"):  # a carve marker, not a host
            continue
        out[peer] = (universe["allocated"], True) if peer == me else \
            (max(0, p["owned"] - p["free_hint"]), False)
    return out


def tenant_view(status: dict, name: str) -> dict:
    """Tenant name as `tenant show --json` prints it: its parameters, and each block with its
    gateway and the addresses in use there by host."""
    t = (status.get("tenants") or {}).get(name)
    if t is None:
        raise Refused("no_tenant", f"no tenant {name} is known to {status['peer']}")
    by_range = {u["range"]: u for u in status["universes"]}
    blocks = []
    for b in t["blocks"]:
        c = cidr(b)
        use = _in_use(by_range.get(b), status["peer"])
        blocks.append({"block": b, "gateway": format_addr(c.family, c.host_bounds()[0]),
                       "in_use": {p: n for p, (n, _) in use.items()},
                       "estimated": sorted(p for p, (_, exact) in use.items() if not exact)})
    return {"ok": True, "tenant": name, **{k: v for k, v in t.items() if k != "blocks"},
            "blocks": blocks, "in_use": sum(n for b in blocks for n in b["in_use"].values())}


def pools_view(status: dict) -> dict:
    by_range = {u["range"]: u for u in status["universes"]}
    pools = {}
    for p, x in sorted((status.get("pools") or {}).items()):
        use = _in_use(by_range.get(x["universe"]), status["peer"])
        pools[p] = {**x, "in_use": sum(n for n, _ in use.values()),
                    "here": use.get(status["peer"], (0, True))[0]}
    return {"ok": True, "pools": pools}


def json_view(cmd: str, args, status: dict) -> dict:
    """What --json prints for the views: the part of status they show, with counts."""
    if cmd == "tenant show":
        return tenant_view(status, args.name)
    if cmd == "tenant ls":
        return {"ok": True, "tenants": {n: {k: v for k, v in tenant_view(status, n).items()
                                            if k not in ("ok", "tenant")}
                                        for n in sorted(status.get("tenants") or {})},
                "leases": status.get("leases") or {}}
    return pools_view(status)


def show(cmd: str, r: dict, args, nick) -> bool:
    """Print the reply of one of these commands for people; False if cmd is not one."""
    if cmd == "tenant create":
        print(f"tenant {r['tenant']} exists already; blocks {' '.join(r['blocks'])}"
              if r.get("already") else
              f"created tenant {r['tenant']} with block {' '.join(r['blocks'])}")
    elif cmd == "tenant grow":
        print(f"tenant {r['tenant']} grew by {r['block']}; blocks {' '.join(r['blocks'])}")
    elif cmd == "tenant delete":
        print(f"deleted tenant {r['tenant']}; gave back {' '.join(r['blocks']) or 'nothing'}")
    elif cmd == "lease-block":
        print(f"{r['handle']} holds {r['block']}")
    elif cmd == "names create":
        print(f"pool {r['pool']} exists already: {r['size']} names ({r['pattern']})"
              if r.get("already") else f"created pool {r['pool']}: {r['size']} names "
              f"({r['pattern']})")
    elif cmd in ("lease-name", "claim-name"):
        print(r["name"])
    elif cmd == "tenant ls":
        _tenant_ls(r)
    elif cmd == "tenant show":
        _tenant_show(tenant_view(r, args.name), r, nick)
    elif cmd == "names ls":
        print(f"{'POOL':<20}{'PATTERN':<28}{'SIZE':>12}{'IN USE':>10}{'HERE':>10}")
        for p, x in pools_view(r)["pools"].items():
            print(f"{p:<20}{x['pattern']:<28}{x['size']:>12}{x['in_use']:>10}{x['here']:>10}")
    else:
        return False
    return True


def _tenant_ls(status: dict) -> None:
    print(f"{'TENANT':<20}{'FAMILY':<8}{'SIZE':<7}{'BLOCKS':>8}{'IN USE':>10}  BLOCK LIST")
    for name in sorted(status.get("tenants") or {}):
        v = tenant_view(status, name)
        have = f"{len(v['blocks'])}/{v['max_blocks']}"
        rough = "~" if any(b["estimated"] for b in v["blocks"]) else ""
        print(f"{name:<20}{'IPv' + str(v['family']):<8}{'/' + str(v['prefix_len']):<7}"
              f"{have:>8}{rough + str(v['in_use']):>10}  "
              f"{' '.join(b['block'] for b in v['blocks'])}")
    for block, handle in (status.get("leases") or {}).items():
        print(f"block {block} leased to {handle}")


def _tenant_show(v: dict, status: dict, nick) -> None:
    where = f"from block space {v['within']}" if v.get("within") else "from any block space"
    print(f"tenant {v['tenant']}: IPv{v['family']} /{v['prefix_len']} blocks, "
          f"{len(v['blocks'])} of at most {v['max_blocks']}, {where}; {v['in_use']} "
          "address(es) in use")
    for b in v["blocks"]:
        print(f"\n{b['block']}  gateway {b['gateway']}")
        width = nick.width(b["in_use"])
        print(f"  {'PEER':<18}{'NICKNAME':<{width}}{'IN USE':>8}")
        for peer, n in b["in_use"].items():
            count = ("~" if peer in b["estimated"] else "") + str(n)
            print(f"  {peer:<18}{nick(peer):<{width}}{count:>8}"
                  f"{'  this peer' if peer == status['peer'] else ''}")
