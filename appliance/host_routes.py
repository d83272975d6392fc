"""Refuse a range this host already reaches some other way (Weave's launch check).

A range that overlaps a route or an interface address of this host would hand containers
addresses the host sends elsewhere: both sides break, quietly. So before a database takes
its ranges (and whenever a range is added), every route of the main table and every interface
address is compared with them; an overlap refuses the range, naming the route or address and
its interface, unless the operator says it is intended (--allow-route-overlap).

What never counts: default routes (they overlap every range), and loopback, link-local and
multicast space (never routed off this host). The check is run only for ranges new to the
database, not on every start: once a range is ours, the routes for it on this host are most
likely our own containers' (a CNI or Docker bridge holding a gateway of the range), and a
restart must not be refused because of them. Routes of other tables (policy routing) are left
out: they apply only to traffic that rules send there; the main table is where the host's own
routes are, and the interfaces' addresses stand for the local table.

The check is advisory about host networking, not part of address uniqueness (the ring keeps
that whatever the host's routes are): if the routes cannot be read (not Linux, no netlink, no
permission), that is logged and the launch goes on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from .core.addr import Cidr, cidr, parse_cidr

log = logging.getLogger("ipamd")

NEVER_COUNTED = [cidr(c) for c in ("127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4",
                                    "::1/128", "fe80::/10", "ff00::/8")]
MAIN_TABLE = 254
PROTO_KERNEL = 2  # a route the kernel made for an interface address
ROUTE_TYPES = {1: "", 6: "blackhole ", 7: "unreachable ", 8: "prohibit ", 9: "throw "}
HINT = "pass --allow-route-overlap if this is intended"


class RangeOverlapsHost(Exception):
    """A range overlaps a route or an address of this host; the message names them."""


@dataclass(frozen=True)
class HostNet:
    """A route or an interface address, as the network it covers and how to name it."""
    net: Cidr
    text: str  # "route 10.40.0.0/16 dev eth1", "address 10.40.0.5/16 on eth1"


def check_ranges(ranges: list[Cidr], allow: bool) -> None:
    """Raise RangeOverlapsHost if a range overlaps this host's routes or addresses (logged
    instead when allow). Routes that cannot be read are logged and the check passes."""
    try:
        dump = _dump()
    except Exception as e:  # noqa: BLE001 (any failure to read: not Linux, EPERM, no module)
        log.warning("event=route_check_skipped reason=%r",
                    f"cannot read this host's routes ({type(e).__name__}: {e}); ranges are "
                    "not checked against them")
        return
    found = overlaps(ranges, host_nets(*dump))
    if not found:
        return
    text = describe(found)
    if allow:
        log.warning("event=route_overlap_allowed overlaps=%r", text)
        return
    raise RangeOverlapsHost(f"{text}; {HINT}")


def overlaps(ranges: list[Cidr], host: list[HostNet]) -> dict[Cidr, list[HostNet]]:
    """For each range, the host's routes and addresses it overlaps, in the order given."""
    counted = [h for h in host if h.net.prefix > 0
               and not any(n.contains_cidr(h.net) for n in NEVER_COUNTED)]
    found = {r: [h for h in counted if r.overlaps(h.net)] for r in ranges}
    return {r: hs for r, hs in found.items() if hs}


def describe(found: dict[Cidr, list[HostNet]]) -> str:
    return "; ".join(f"range {r} overlaps {', '.join(h.text for h in hs)} on this host"
                     for r, hs in found.items())


def host_nets(names: dict, addrs: list, routes: list) -> list[HostNet]:
    """This host's interface addresses, then the routes of its main table (IPv4 and IPv6),
    leaving out the routes the kernel made for those addresses (named once, as addresses)."""
    out, own = [], set()
    for address, prefixlen, index in addrs:
        net, _ = parse_cidr(f"{address}/{prefixlen}")
        own.add((net, index))
        out.append(HostNet(net, f"address {address}/{prefixlen} on {names.get(index, index)}"))
    for family, dst, dst_len, kind, proto, oifs, gateway in routes:
        dst = dst or ("0.0.0.0" if family == 4 else "::")
        net, _ = parse_cidr(f"{dst}/{dst_len}")
        if proto == PROTO_KERNEL and oifs and all((net, i) in own for i in oifs):
            continue
        via = f" via {gateway}" if gateway else ""
        dev = f" dev {','.join(str(names.get(i, i)) for i in oifs)}" if oifs else ""
        out.append(HostNet(net, f"route {ROUTE_TYPES.get(kind, '')}{net}{via}{dev}"))
    return out


def _dump():
    """Links, addresses and main-table routes over netlink, as plain tuples."""
    from socket import AF_INET, AF_INET6

    from pyroute2 import IPRoute

    families = {AF_INET: 4, AF_INET6: 6}
    with IPRoute() as ipr:
        names = {link["index"]: link.get("ifname") for link in ipr.link("dump")}
        # IFA_LOCAL is this host's end; IFA_ADDRESS is the far end on a point-to-point link.
        addrs = [(a.get("local") or a.get("address"), a["prefixlen"], a["index"])
                 for a in ipr.addr("dump") if a["family"] in families]
        routes = []
        for r in ipr.route("dump", table=MAIN_TABLE):
            family = families.get(r["family"])
            if family is None:
                continue
            hops = r.get("multipath") or []
            oifs = [r.get("oif")] if r.get("oif") else [h["oif"] for h in hops if h.get("oif")]
            routes.append((family, r.get("dst"), r["dst_len"], r["type"], r["proto"], oifs,
                           r.get("gateway")))
    return names, addrs, routes
