"""`ipamd`: the daemon (`launch`), its client commands, and `sql`.

Heavy modules (trio, apsw) are imported only by the commands that need them, so client commands
start fast.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
from pathlib import Path

from . import __version__, cli_tenants
from .client import Client, Unreachable
from .core.addr import AddrError, parse_addr, parse_cidr, parse_hostport
from .paths import DB_NAME, default_data_dir, default_socket

EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3
DOCKER_SOCKET = "/run/docker/plugins/ipamd.sock"


def _cidr_arg(flag: str):
    def parse(text: str):
        try:
            block, normalised = parse_cidr(text)
        except AddrError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if normalised:
            print(f"ipamd: notice: {flag} {text} taken as {block}", file=sys.stderr)
        return block
    return parse


def _addr_arg(text: str):
    try:
        return parse_addr(text)
    except AddrError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _hostport_arg(text: str) -> str:
    try:
        parse_hostport(text)
    except AddrError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _peer_arg(text: str) -> str:
    """HOST:PORT to dial: the host may not be left out."""
    _hostport_arg(text)
    if parse_hostport(text)[0] is None:
        raise argparse.ArgumentTypeError(f"{text!r} names no host to connect to")
    return text


def _hostport_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected HOST:PORT,HOST:PORT,...")
    return [_peer_arg(t) for t in items]


def _quorum_arg(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of hosts (1 to 1000)")
    return int(text)


def _secret(args) -> bytes | None:
    if args.secret_file is not None:
        try:
            secret = args.secret_file.read_bytes().strip()
        except OSError as e:
            raise ValueError(f"cannot read --secret-file: {e}") from None
    else:
        secret = os.environ.get("IPAMD_SECRET", "").encode()
    if (args.peer or args.listen or args.init_peers) and len(secret) < 16:
        raise ValueError("--peer, --listen and --init-peers need a cluster secret of at least "
                         "16 bytes (--secret-file or $IPAMD_SECRET), the same on every host")
    if args.init_peers and args.quorum:
        raise ValueError("--init-peers and --quorum are two ways to bootstrap: pick one")
    if (args.init_peers or args.quorum) and not args.listen:
        raise ValueError("--init-peers and --quorum need --listen: the first hosts dial each "
                         "other")
    return secret or None


def _delay_arg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= v <= 86400 * 365:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and a year, in seconds")
    return v


def _at_least(minimum: float, words: str):
    """Seconds (as _delay_arg takes them), refused below minimum."""
    def parse(text: str) -> float:
        v = _delay_arg(text)
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is too short; at least {words}")
        return v
    return parse


def _nickname_arg(text: str) -> str:
    from .protocols.peer_book import nickname_problem
    problem = nickname_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ipamd", description="Distributed IP address manager for containers.")
    p.add_argument("--version", action="version", version=f"ipamd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    la = sub.add_parser("launch", help="run the daemon in the foreground")
    la.add_argument("--iprange", action="append", type=_cidr_arg("--iprange"), metavar="CIDR",
                    help="allocation range (repeatable; IPv4 and IPv6). Default: the database's "
                         "ranges, or 10.32.0.0/12 for a new database")
    la.add_argument("--subnet", type=_cidr_arg("--subnet"), metavar="CIDR",
                    help="default subnet for allocations (default: the first range); may be "
                         "wider than the range, the rest being for claimed static addresses")
    la.add_argument("--gateway", action="append", default=[], type=_addr_arg, metavar="ADDRESS",
                    help="an address never handed out (repeatable)")
    la.add_argument("--data-dir", type=Path, default=None,
                    help=f"where {DB_NAME} lives (default: {default_data_dir()})")
    la.add_argument("--socket", type=Path, default=None,
                    help=f"hook socket (default: $IPAMD_SOCKET or {default_socket()})")
    la.add_argument("--nickname", "--name", dest="name", type=_nickname_arg,
                    default=socket.gethostname(), metavar="NAME",
                    help="what `ipamd status` and `ipamd peers` call this host, here and on "
                         "every peer (default: the hostname; up to 64 printable characters, "
                         "no spaces)")
    la.add_argument("--durability", choices=("process", "power"), default="process",
                    help="process: survive a crash of ipamd (WAL, synchronous=NORMAL); power: "
                         "also a power loss (synchronous=FULL). Default: process")
    la.add_argument("--reuse-delay", type=_delay_arg, default=30.0, metavar="SECONDS",
                    help="quarantine of a freed address before allocate reuses it (default: 30)")
    la.add_argument("--docker-plugin", nargs="?", const=Path(DOCKER_SOCKET), type=Path,
                    default=None, metavar="SOCKET",
                    help=f"also serve Docker's remote IPAM driver API (default socket: "
                         f"{DOCKER_SOCKET})")
    la.add_argument("--sweep-interval", type=_at_least(0.05, "0.05 seconds"), default=30.0,
                    metavar="SECONDS",
                    help="how often to release addresses whose container (netns or pid "
                         "anchor) is gone; released within two intervals (default: 30)")
    la.add_argument("--log-level", default="warning",
                    choices=("debug", "info", "warning", "error"), help="default: warning")
    la.add_argument("--peer", action="append", default=[], type=_peer_arg,
                    metavar="HOST:PORT",
                    help="a peer to connect to (repeatable; one is enough, the others are "
                         "learned from it). With a new database: join that peer's cluster, "
                         "owning nothing until space is needed. Needs the cluster secret")
    la.add_argument("--listen", type=_hostport_arg, metavar="HOST:PORT",
                    help="accept peers here (port 0: any free port, printed on the ready "
                         "line). Needs the cluster secret")
    la.add_argument("--init-peers", type=_hostport_list, default=[], metavar="HOST:PORT,...",
                    help="bootstrap by seeds: every first host is given the same list (itself "
                         "included) and the range is split among them once each has reached "
                         "the others. Only for a new database")
    la.add_argument("--quorum", type=_quorum_arg, metavar="N",
                    help="bootstrap by a vote of the first N hosts (reach each other with "
                         "--peer): a majority agrees on who shares the range. At most N hosts "
                         "may ever start with it. Only for a new database")
    la.add_argument("--metrics", type=_hostport_arg, metavar="HOST:PORT",
                    help="serve Prometheus metrics at http://HOST:PORT/metrics (port 0: any "
                         "free port, printed on the ready line)")
    la.add_argument("--candidate-ttl", type=_at_least(1, "1 second"), default=3600.0,
                    metavar="SECONDS",
                    help="forget a peer address learned from another peer once it has gone "
                         "this long without answering with the secret, unless it is a member "
                         "(default: 3600)")
    la.add_argument("--allow-route-overlap", action="store_true",
                    help="start even if a new range overlaps a route or an address of this "
                         "host (checked only when a database takes its ranges)")
    la.add_argument("--secret-file", type=Path, metavar="PATH",
                    help="file holding the cluster secret, shared by every host (default: "
                         "$IPAMD_SECRET). Peers prove they know it; it never travels")

    def client(name: str, help: str, parent=sub) -> argparse.ArgumentParser:
        c = parent.add_parser(name, help=help, description=help)
        c.add_argument("--json", action="store_true", help="print the daemon's JSON reply")
        c.add_argument("--socket", type=Path, default=None,
                       help=f"hook socket (default: $IPAMD_SOCKET or {default_socket()})")
        return c

    def anchor_flags(c) -> None:
        c.add_argument("--anchor-netns", metavar="PATH",
                       help="release automatically once this network namespace is gone")
        c.add_argument("--anchor-pid", type=int, metavar="PID",
                       help="release automatically once this process is gone")

    c = client("allocate", "give HANDLE an address (the same one again if it has one)")
    c.add_argument("handle")
    c.add_argument("--subnet", type=_cidr_arg("--subnet"), metavar="CIDR")
    c.add_argument("--tenant", metavar="NAME",
                   help="from tenant NAME's blocks only (--subnet may name one of them)")
    anchor_flags(c)
    c = client("claim", "give HANDLE a specific address")
    c.add_argument("handle")
    c.add_argument("address")
    c.add_argument("--subnet", type=_cidr_arg("--subnet"), metavar="CIDR")
    c.add_argument("--tenant", metavar="NAME",
                   help="an address in tenant NAME's blocks (refused there without it)")
    client("release", "free every address HANDLE holds (succeeds if it holds none)") \
        .add_argument("handle")
    client("lookup", "show the addresses HANDLE holds").add_argument("handle")
    client("ls", "list every allocation")
    client("status", "this peer, its ranges, how full they are, and every peer's share")
    client("peers", "the peers this one knows of, reachable or not")
    client("leave", "hand all of this peer's space to reachable peers and stop allocating "
                    "(refused while it holds addresses); stop the daemon once `status` shows "
                    "no peer it is still handing over to")
    c = client("rmpeer", "reclaim the space of peers that are gone for good (refused if one "
                         "is reachable, or without a majority of the known peers)")
    c.add_argument("peer", nargs="+", help="peer id (see `ipamd peers`)")
    c.add_argument("--force", action="store_true",
                   help="skip the reachability and majority checks: only when you know the "
                        "other peers are gone for good (dangerous behind a partition)")

    r = sub.add_parser("range", help="add, retire or list the cluster's allocation ranges, "
                                     "online, from any host", description=RANGE_HELP)
    ranges = r.add_subparsers(dest="range_command", required=True, metavar="ACTION")
    c = client("add", "add CIDR to every host's ranges (refused if it overlaps a range of the "
                      "cluster, or a route or address of this host)", ranges)
    c.add_argument("cidr", type=_cidr_arg("range"), metavar="CIDR")
    c.add_argument("--allow-route-overlap", action="store_true",
                   help="add it even if it overlaps a route or an address of this host")
    c.add_argument("--blocks", action="store_true",
                   help="block space: never allocated from itself; tenants' blocks and "
                        "leased blocks are cut from it (see `ipamd tenant --help`)")
    client("retire", "stop new allocations in the range CIDR on every host (addresses held "
                     "there stay)", ranges).add_argument("cidr", type=_cidr_arg("range"),
                                                         metavar="CIDR")
    client("unretire", "let allocations into the retired range CIDR again", ranges) \
        .add_argument("cidr", type=_cidr_arg("range"), metavar="CIDR")
    client("ls", "one line per range: kind, active or retired, addresses held here, free here",
           ranges)
    cli_tenants.add_commands(sub, client, _cidr_arg, anchor_flags)

    s = sub.add_parser("sql", help="SQL shell on the database (daemon running or not)")
    s.add_argument("db", nargs="?", type=Path, help=f"default: {default_data_dir() / DB_NAME}")
    s.add_argument("sql_args", nargs=argparse.REMAINDER,
                   help="passed to the shell (e.g. a statement to run)")
    return p


RANGE_HELP = ("The cluster's allocation ranges, changed online: a range added on one host "
              "reaches every host by gossip and is served at once; a retired range takes no "
              "new allocations (those held stay) until it is unretired. Not possible in a "
              "cluster whose databases were made before ipamd could add ranges "
              "(not_supported).")


def _command(args) -> str:
    """The command as _request and _show know it: "range add" for `ipamd range add`."""
    if args.command == "range":
        return f"range {args.range_command}"
    return cli_tenants.command(args) or args.command


def _anchor(args) -> dict | None:
    """The liveness anchor of --anchor-netns or --anchor-pid, if given."""
    if args.anchor_netns:
        return {"netns": os.path.abspath(args.anchor_netns)}
    if args.anchor_pid is not None:
        from .liveness import ALIVE, start_time
        state, start = start_time(args.anchor_pid)
        if state != ALIVE:
            raise SystemExit(f"ipamd: no process {args.anchor_pid} to anchor to")
        return {"pid": args.anchor_pid, "start_time": start}
    return None


def _request(args) -> dict:
    cmd = _command(args)
    if (req := cli_tenants.request(cmd, args, _anchor)) is not None:
        return req
    if cmd == "range add":
        req = {"v": 1, "op": "range_add", "range": str(args.cidr),
               "allow_route_overlap": args.allow_route_overlap}
        if args.blocks:
            req["blocks"] = True
        return req
    if cmd in ("range retire", "range unretire"):
        return {"v": 1, "op": "range_retire", "range": str(args.cidr),
                "undo": cmd == "range unretire"}
    if cmd == "range ls":
        return {"v": 1, "op": "status"}
    if cmd == "allocate":
        req = {"v": 1, "op": "allocate", "handle": args.handle}
        if args.subnet:
            req["subnet"] = str(args.subnet)
        if (anchor := _anchor(args)) is not None:
            req["anchor"] = anchor
    elif cmd == "claim":
        req = {"v": 1, "op": "claim", "handle": args.handle, "address": args.address}
        if args.subnet:
            req["subnet"] = str(args.subnet)
    if cmd in ("allocate", "claim"):
        if args.tenant:
            req["tenant"] = args.tenant
        return req
    if cmd in ("release", "lookup"):
        return {"v": 1, "op": cmd, "handle": args.handle}
    if cmd == "rmpeer":
        return {"v": 1, "op": "rmpeer", "peers": args.peer, "force": args.force}
    return {"v": 1, "op": {"ls": "list", "peers": "status"}.get(cmd, cmd)}


def _count(n: int) -> str:
    """A count that fits its column: exact up to 11 digits, else like 1.84e19."""
    if n < 10**11:
        return str(n)
    mantissa, exponent = f"{n:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


class _nicknames:
    """A peer's nickname from a status reply, "-" when not known (an older peer, or one not
    heard from yet); width(peers): a column that fits theirs."""

    def __init__(self, reply: dict):
        self.names = reply.get("nicknames") or {}

    def __call__(self, peer: str) -> str:
        return self.names.get(peer) or "-"

    def width(self, peers) -> int:
        return max([len(self(p)) for p in peers] + [len("NICKNAME")]) + 2


def _show(cmd: str, r: dict, args=None, names: dict | None = None) -> None:
    """Print reply r of cmd for people. names: each name pool's universe -> its pattern
    (cli_tenants.names_of), to show a released name as the name."""
    if cmd in ("allocate", "claim"):
        print(r["address"])
    elif cmd == "release":
        for a in r["released"]:
            name = cli_tenants.name_at(a, names) if names else None
            print(f"released {name or a}")
    elif cmd == "lookup":
        for a in r["addresses"]:
            print(a.get("name") or a["address"])
    elif cmd == "ls":
        rows = sorted(r["allocations"], key=lambda a: a["handle"])
        width = max([len(a["handle"]) for a in rows] + [6])
        print(f"{'HANDLE':<{width}}  ADDRESS")
        for a in rows:
            print(f"{a['handle']:<{width}}  {a['address']}"
                  + (f"  (name {a['name']} of pool {a['pool']})" if a.get("name") else "")
                  + (f"  (tenant {a['tenant']})" if a.get("tenant") else ""))
    elif cmd == "status":
        _status(r)
    elif cmd == "peers":
        reach, nick = set(r["reachable"]), _nicknames(r)
        width = nick.width([*r["members"], *r["removed"]])
        for peer in r["members"]:
            state = "this peer" if peer == r["peer"] else \
                "reachable" if peer in reach else "unreachable"
            print(f"{peer}  {nick(peer):<{width}}{state}")
        for peer, by in r["removed"].items():
            print(f"{peer}  {nick(peer):<{width}}removed by {by}")
    elif cmd == "leave":
        for peer, ranges in r["handed"].items():
            print(f"handed {', '.join(ranges)} to {peer}")
        print(f"{r['left']} left the cluster")
    elif cmd == "range add":
        print(f"{r['range']} is a range of the cluster already" if r.get("already") else
              f"added {r['range']} to the cluster's ranges")
    elif cmd in ("range retire", "range unretire"):
        print(f"retired {r['range']}: no new allocations there; addresses held stay"
              if r["retired"] else f"{r['range']} takes allocations again")
    elif cmd == "range ls":
        # What this host sees: IN USE and FREE count its own allocations and the space it
        # owns, as `status` does.
        # Tenants' blocks, leased blocks and name pools have commands of their own.
        print(f"{'RANGE':<28}{'KIND':<8}{'STATE':<9}{'IN USE':>12}{'FREE':>12}")
        for u in r["universes"]:
            kind = u.get("kind") or ("static" if u.get("static") else "range")
            if kind not in ("range", "static", "blocks"):
                continue
            state = "retired" if u.get("retired") else "active"
            print(f"{u['range']:<28}{kind:<8}{state:<9}{_count(u['allocated']):>12}"
                  f"{_count(u['free']):>12}")
    elif cmd == "rmpeer":
        print(f"removed {', '.join(r['removed'])} (by {r['by']}); reclaimed "
              f"{', '.join(r['reclaimed']) or 'nothing'}")
    else:
        cli_tenants.show(cmd, r, args, _nicknames(r))


# How status marks a universe that is not a plain range, by its kind (tenant keys, which hold
# no addresses, are not shown: `tenant ls` lists tenants).
_MARKS = {"static": "static", "blocks": "block space", "block": "block of {}",
          "lease": "leased to {}"}


def _status(r: dict) -> None:
    nick = _nicknames(r)
    print(f"peer {r['peer']} {nick(r['peer'])}  {r['standing']}{'  (' + r['note'] + ')' if r['note'] else ''}"
          f"  cluster {r['cluster'] or '(none yet)'}")
    print(f"default subnet {r['default_subnet']}  reuse delay {r['reuse_delay']:g}s  "
          f"{r['allocations']} addresses held by {r['handles']} handles  "
          f"{r['pending']} requests waiting for peers  {r.get('conflicts', 0)} ring conflicts")
    if r.get("handing_over"):
        print(f"handing over: {', '.join(f'{p} {nick(p)}' for p in r['handing_over'])} "
              "not acknowledged yet (sent again every second: stop this host once none is)")
    universes = [u for u in r["universes"] if u.get("kind") != "tenant"]
    # FREE: allocatable now (neither held, quarantined nor reserved). Counts of IPv6
    # size in a short form; --json keeps them exact.
    print(f"{'RANGE':<28}{'OWNED':>12}{'ALLOCATED':>12}{'QUARANTINED':>13}{'FREE':>12}")
    for u in universes:
        kind = u.get("kind") or ("static" if u.get("static") else "range")
        # A pool's /96 is long: it is named by its pool here, and listed under POOL below.
        name = f"pool {u.get('for')}" if kind == "names" else u["range"] + (
            f" ({_MARKS[kind].format(u.get('for'))})" if kind in _MARKS else "") + \
            (" (retired)" if u.get("retired") else "")
        print(f"{name:<28}{_count(u['owned']):>12}{_count(u['allocated']):>12}"
              f"{_count(u['quarantined']):>13}{_count(u['free']):>12}")
    for u in universes:
        # Carved space shows in its parent's ring as a marker ("@block ..."): no peer.
        peers = {p: x for p, x in u["peers"].items() if not p.startswith("@")}
        size = sum(p["owned"] for p in peers.values()) or 1
        width = nick.width(peers)
        print(f"\n{u['range']}: {u['ring_entries']} ring entries")
        print(f"  {'PEER':<18}{'NICKNAME':<{width}}{'SHARE':>8}{'FREE':>8}  STATE")
        for peer, p in peers.items():
            free = 100 * p["free_hint"] / p["owned"] if p["owned"] else 0
            state = "this peer" if peer == r["peer"] else \
                "reachable" if p["reachable"] else "unreachable"
            print(f"  {peer:<18}{nick(peer):<{width}}{100 * p['owned'] / size:>7.1f}%"
                  f"{free:>7.1f}%  {state}")
    # Gateways requests named (kept out of use while a holder still names them), tenants,
    # leased blocks and name pools: a table each, when there are any.
    for key, head, row in (
            ("reserved", f"{'RESERVED':<28}HELD BY", lambda k, v: f"{k:<28}{', '.join(v)}"),
            ("tenants", f"{'TENANT':<28}BLOCKS", lambda k, v: (
                f"{k:<28}{' '.join(v['blocks']) or '-'} ({len(v['blocks'])} of at most "
                f"{v['max_blocks']} /{v['prefix_len']})")),
            ("leases", f"{'LEASED BLOCK':<28}HANDLE", lambda k, v: f"{k:<28}{v}"),
            ("pools", f"{'POOL':<28}{'PATTERN':<28}{'SIZE':>12}  UNIVERSE", lambda k, v: (
                f"{k:<28}{v['pattern']:<28}{_count(v['size']):>12}  {v['universe']}"))):
        if r.get(key):
            print(f"\n{head}")
            for k, v in r[key].items():
                print(row(k, v))


def _client_command(args) -> int:
    request, cmd, names = _request(args), _command(args), None
    try:
        with Client(args.socket or default_socket()) as c:
            reply = _call(c, cmd, request)
            if cmd == "release" and reply.get("ok") and not args.json and \
                    any(map(cli_tenants.in_registry, reply["released"])):
                names = cli_tenants.names_of(c.call({"v": 1, "op": "status"}))
        if args.json and reply.get("ok") and cmd in ("tenant ls", "tenant show", "names ls"):
            reply = cli_tenants.json_view(cmd, args, reply)
    except Unreachable as e:
        print(f"ipamd: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except cli_tenants.Refused as e:
        reply = e.reply
    if args.json:
        print(json.dumps(reply, indent=2))
    if not reply.get("ok"):
        err = reply.get("error", {})
        if not args.json:
            print(f"ipamd: {err.get('code')}: {err.get('message')}", file=sys.stderr)
        return EXIT_ERROR
    if not args.json:
        try:
            _show(cmd, reply, args, names)
        except cli_tenants.Refused as e:
            print(f"ipamd: {e.reply['error']['code']}: {e}", file=sys.stderr)
            return EXIT_ERROR
    return 0


def _call(c: Client, cmd: str, request: dict) -> dict:
    """The daemon's reply to request; a claim-name without --pool first asks `status` for
    the pools and takes the one whose pattern makes the name."""
    if cmd == "claim-name" and request["pool"] is None:
        status = c.call({"v": 1, "op": "status"})
        if not status.get("ok"):
            return status
        request["pool"] = cli_tenants.pool_of(request["name"], status)
    return c.call(request)


def _launch(args) -> int:
    import logging

    import trio

    from .daemon import Config, Refused, run
    from .unixsock import SocketPathError

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s level=%(levelname)s %(message)s")
    ranges = args.iprange
    if ranges:
        for i, a in enumerate(ranges):
            for b in ranges[i + 1:]:
                if a.overlaps(b):
                    print(f"ipamd: --iprange {a} and {b} overlap", file=sys.stderr)
                    return EXIT_USAGE
    try:
        secret = _secret(args)
    except ValueError as e:
        print(f"ipamd: {e}", file=sys.stderr)
        return EXIT_USAGE
    config = Config(
        data_dir=args.data_dir or default_data_dir(), socket=args.socket or default_socket(),
        universes=ranges, subnet=args.subnet, name=args.name, durability=args.durability,
        reuse_delay=args.reuse_delay, gateways=frozenset(args.gateway),
        sweep_interval=args.sweep_interval, docker_socket=args.docker_plugin,
        peers=args.peer, listen=args.listen, secret=secret, metrics=args.metrics,
        init_peers=args.init_peers, quorum=args.quorum, candidate_ttl=args.candidate_ttl,
        allow_route_overlap=args.allow_route_overlap)
    try:
        trio.run(run, config, lambda line: print(line, flush=True))
    except (Refused, OSError) as e:
        print(f"ipamd: {e}", file=sys.stderr)
        return EXIT_ERROR
    except BaseExceptionGroup as group:  # refused while a listener started (trio wraps it)
        leaves = _leaves(group)
        if not all(isinstance(x, (Refused, OSError, SocketPathError)) for x in leaves):
            raise
        for x in leaves:
            print(f"ipamd: {x}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    return [y for x in group.exceptions
            for y in (_leaves(x) if isinstance(x, BaseExceptionGroup) else [x])]


def _sql(args) -> int:
    import apsw
    import apsw.shell

    db = args.db or default_data_dir() / DB_NAME
    if not db.exists():
        print(f"ipamd: no database at {db}", file=sys.stderr)
        return EXIT_ERROR
    shell = apsw.shell.Shell(args=[str(db), *args.sql_args])
    shell.db.set_busy_timeout(5000)  # the daemon may be committing right now
    if args.sql_args:
        return 0
    shell.cmdloop()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # `ipamd status | head`: the reader has gone; end quietly, as other tools do. Point
        # stdout at /dev/null so the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _main(argv: list[str] | None) -> int:
    if argv is None and "CNI_COMMAND" in os.environ:
        from .cni_forward import main as cni_main  # the executable is also a CNI plugin
        return cni_main()
    args = build_parser().parse_args(argv)
    if args.command != "launch":
        # A command whose reader has gone (`ipamd sql DB "..." | head`) ends at once and
        # quietly, as cat or sqlite3 would; the daemon keeps ignoring SIGPIPE (Python's
        # default), so a client that hangs up never stops it.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if args.command == "launch":
        from .frozen import bind_to_bootloader
        bind_to_bootloader()
        return _launch(args)
    if args.command == "sql":
        return _sql(args)
    return _client_command(args)


if __name__ == "__main__":
    sys.exit(main())
