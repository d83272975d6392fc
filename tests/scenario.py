"""Scenario files: an operator's log of commands with the expected output under `----`.

    python -m tests.scenario [--rewrite] [FILE ...]

Commands (peers are p0, p1, ...):
  cluster peers=N range=CIDR [seeds=a,b,..|quorum=Q] [up=a,b,..]
                                  a new cluster: p0 founds it and owns everything, or the
                                  seeds split it, or the peers vote; `up` starts only those
  join PEER                       a new peer with an empty database
  start PEER                      start a peer of the cluster line with an empty database
  allocate PEER HANDLE [gateway=A] an allocation on PEER (asking others for space if needed),
                                  naming the subnet's gateway A
  claim PEER HANDLE ADDRESS       a specific address
  release PEER HANDLE
  leave PEER                      hand all its space to others and stop
  rmpeer PEER TARGET[,TARGET] [force]
  crash PEER / restart PEER       stop it (its database stays) / start it again from it
  wipe PEER as NEW                its database is lost: it comes back as NEW, a newcomer
  owners                          who owns what, as CIDR blocks
  reserved                        the gateways each peer keeps reserved, and for whom
  status PEER                     its standing and what it waits for
  partition A B | C D             a network split; `heal` ends it
  block A B                       what A sends B is lost (one way); `heal` ends it
  unblock A B                     A reaches B again (nothing is resent; no settling)
  tick N                          N rounds of ticks and deliveries
  stranger PEER                   a peer of another cluster talks to PEER
  range add|retire|unretire PEER CIDR
                                  add a range to the running cluster, or stop/resume new
                                  allocations there (spare.py)
  ranges PEER                     the universes PEER knows, with their state and who owns them
  allocate PEER HANDLE subnet=CIDR|tenant=NAME   from that subnet, or the tenant's blocks
  range add PEER CIDR blocks      block space: tenants' blocks and leased blocks come from it
  tenant create PEER NAME plen=N [max=N] [family=6] [in=CIDR]
  tenant grow PEER NAME / tenant delete PEER NAME [force]
  lease-block PEER HANDLE plen=N [family=6]
  names create PEER POOL PATTERN / lease-name PEER HANDLE POOL / claim-name PEER HANDLE POOL NAME
  CMD & CMD                       start both requests, then wait for both answers
"""
from __future__ import annotations

import sys
from pathlib import Path

from appliance.core import messages as m
from appliance.core.addr import cidr, parse_addr, range_to_cidrs
from appliance.core.durable import Durable
from appliance.core.gossip import Replica
from appliance.core.peer import Gossip, Peer, Ready
from appliance.core.spare import SPARE, is_spare

TICK = 0.1
CLUSTER = "c1"


class Cluster:
    def __init__(self, n: int, universe, seeds=None, quorum=None, up=None):
        self.u, self.now = universe, 1000.0
        self.names = [f"p{i}" for i in range(n)]
        self.peers: dict[str, Peer] = {}
        self.durable: dict[str, Durable] = {}
        self.blocked: set[tuple[str, str]] = set()
        self.inbox: list[tuple[str, str, object]] = []
        self.replies: dict[object, dict] = {}
        self.asked = 0  # requests submitted: each its own ref (two may wait at once)
        self.alarms: list[str] = []
        self.seeds, self.quorum = seeds, quorum
        for name in (up or self.names):
            self.start(name)

    def start(self, name: str) -> None:
        """A first start with an empty database, as its flags say."""
        if self.seeds:
            boot = {"mode": "seeds", "seeds": tuple(self.seeds)}
        elif self.quorum:
            boot = {"mode": "quorum", "quorum": self.quorum}
        else:
            boot = {"mode": "single" if name == "p0" else "join"}
        d = self.durable[name] = Durable.new(name, CLUSTER, [self.u, *SPARE], spare=SPARE,
                                             **boot)
        self.peers[name] = d.load(self.u, 30.0)
        self._links()

    def join(self, name: str) -> None:
        self.durable[name] = Durable.new(name, CLUSTER, [self.u, *SPARE], spare=SPARE)
        self.peers[name] = self.durable[name].load(self.u, 30.0)
        self._links()

    def crash(self, name: str) -> None:
        del self.peers[name]
        self._links()

    def restart(self, name: str) -> None:
        self.peers[name] = self.durable[name].load(self.u, 30.0)
        self._links()

    def _links(self) -> None:
        for p, peer in self.peers.items():
            peer.reachable = {q for q in self.peers if q != p and (p, q) not in self.blocked}

    def handle(self, p: str, ready: Ready) -> None:
        self.durable[p].apply(ready.rows)  # commit first
        for dst, msg in ready.messages:
            if (p, dst) not in self.blocked and dst in self.peers:
                self.inbox.append((p, dst, msg))
        self.replies.update(dict(ready.replies))
        self.alarms += ready.alarms

    def settle(self, rounds: int = 60) -> None:
        for _ in range(rounds):
            self.now += TICK
            for p in sorted(self.peers):
                if p in self.peers:
                    self.handle(p, self.peers[p].tick(self.now))
            while self.inbox:
                src, dst, msg = self.inbox.pop(0)
                if dst in self.peers:
                    self.handle(dst, self.peers[dst].receive(src, msg, self.now))

    def owners(self) -> str:
        members = [p for n, p in sorted(self.peers.items()) if p.standing == "member"]
        view = (members or [p for n, p in sorted(self.peers.items())])[0].replica.rings[self.u]
        parts = []
        everyone = sorted(set(self.durable) | {e.owner for e in view.entries},
                          key=lambda x: (len(x), x))
        for p in everyone:
            blocks = [str(b) for lo, hi in view.owned_by(p)
                      for b in range_to_cidrs(self.u.family, lo, hi)]
            if blocks or p in self.peers:
                parts.append(f"{p} owns {' '.join(blocks) if blocks else 'nothing'}")
        return "; ".join(parts)

    def submit(self, p: str, req) -> object:
        self.asked += 1
        ref = ("req", self.asked, p)
        self.handle(p, self.peers[p].request(ref, req, self.now))
        return ref

    def answer(self, ref, req) -> str:
        r = self.replies.get(ref)
        if r is None:
            return "no answer"
        if not r["ok"]:
            return f"error {r['error']['code']}: {r['error']['message']}"
        if isinstance(req, m.Release):
            return f"released {' '.join(r['released']) or 'nothing'}"
        if isinstance(req, m.Leave):
            handed = "; ".join(f"{' '.join(v)} to {k}" for k, v in sorted(r["handed"].items()))
            return f"{r['left']} left, handing {handed or 'nothing'}"
        if isinstance(req, m.RemovePeer) and r.get("already"):
            return f"{', '.join(r['removed'])} already removed by {r['by']}"
        if isinstance(req, m.RemovePeer):
            return (f"removed {', '.join(r['removed'])} (by {r.get('by', '?')}); reclaimed "
                    f"{' '.join(r['reclaimed']) or 'nothing'}")
        if isinstance(req, m.AddRange):
            kind = "block space" if req.blocks else "range"
            return f"added {kind} {r['range']}" + (" (already)" if r.get("already") else "")
        if isinstance(req, (m.TenantCreate, m.TenantGrow)):
            return f"tenant {r['tenant']}: blocks {' '.join(r['blocks'])}" + \
                (" (already)" if r.get("already") else "")
        if isinstance(req, m.TenantDelete):
            return f"tenant {r['tenant']} deleted; gave back {' '.join(r['blocks']) or 'nothing'}"
        if isinstance(req, m.LeaseBlock):
            return f"{r['handle']} holds {r['block']}" + (" (already)" if r.get("already") else "")
        if isinstance(req, m.NamesCreate):
            return f"pool {r['pool']}: {r['size']} names" + (" (already)" if r.get("already") else "")
        if isinstance(req, (m.LeaseName, m.ClaimName)):
            return f"{r['name']} ({r['address']})"
        if isinstance(req, m.Allocate) and req.tenant:
            return f"{r['address']} (tenant {r['tenant']})"
        if isinstance(req, m.RetireRange):
            return f"{r['range']} {'retired' if r['retired'] else 'open'}" + \
                (" (already)" if r.get("already") else "")
        return r["address"]

    def requests(self, pairs: list[tuple[str, object]]) -> list[str]:
        refs = [self.submit(p, req) for p, req in pairs]
        for _ in range(60):
            if all(ref in self.replies for ref in refs):
                break
            self.settle(1)
        return [self.answer(ref, req) for ref, (_, req) in zip(refs, pairs)]


def parse_request(words: list[str]):
    cmd, args = words[0], words[1:]
    if cmd == "allocate":
        opts = dict(a.split("=", 1) for a in args[2:])
        gateway = parse_addr(opts["gateway"])[1] if "gateway" in opts else None
        subnet = cidr(opts["subnet"]) if "subnet" in opts else None
        return args[0], m.Allocate(args[1], subnet, gateway=gateway, tenant=opts.get("tenant"))
    if cmd == "claim":
        return args[0], m.Claim(args[1], *parse_addr(args[2]))
    if cmd == "release":
        return args[0], m.Release(args[1])
    if cmd == "leave":
        return args[0], m.Leave()
    if cmd == "rmpeer":
        return args[0], m.RemovePeer(tuple(args[1].split(",")), "force" in args[2:])
    opts = dict(a.split("=", 1) for a in args if "=" in a)
    if cmd == "range" and args[0] == "add":
        return args[1], m.AddRange(cidr(args[2]), "blocks" in args[3:])
    if cmd == "tenant" and args[0] == "create":
        return args[1], m.TenantCreate(args[2], int(opts["plen"]), int(opts.get("family", 4)),
                                       int(opts.get("max", 1)),
                                       cidr(opts["in"]) if "in" in opts else None)
    if cmd == "tenant" and args[0] == "grow":
        return args[1], m.TenantGrow(args[2])
    if cmd == "tenant" and args[0] == "delete":
        return args[1], m.TenantDelete(args[2], "force" in args[3:])
    if cmd == "lease-block":
        return args[0], m.LeaseBlock(args[1], int(opts["plen"]), int(opts.get("family", 4)))
    if cmd == "names" and args[0] == "create":
        return args[1], m.NamesCreate(args[2], args[3])
    if cmd == "lease-name":
        return args[0], m.LeaseName(args[1], args[2])
    if cmd == "claim-name":
        return args[0], m.ClaimName(args[1], args[2], args[3])
    if cmd == "range" and args[0] in ("retire", "unretire"):
        return args[1], m.RetireRange(cidr(args[2]), args[0] == "retire")
    return None


def run_command(state: dict, line: str) -> str:
    c: Cluster | None = state.get("cluster")
    if " & " in line:
        out = c.requests([parse_request(part.split()) for part in line.split(" & ")])
        c.settle()
        return "\n".join(out)
    words = line.split()
    cmd, args = words[0], words[1:]
    if cmd == "cluster":  # a quorum cluster is left to `tick`: the vote is the point
        opts = dict(a.split("=", 1) for a in args)
        c = state["cluster"] = Cluster(
            int(opts["peers"]), cidr(opts["range"]),
            seeds=opts["seeds"].split(",") if "seeds" in opts else None,
            quorum=int(opts["quorum"]) if "quorum" in opts else None,
            up=opts["up"].split(",") if "up" in opts else None)
        if "quorum" not in opts:
            c.settle()
        return c.owners() if any(p.standing == "member" for p in c.peers.values()) else \
            "no peer owns anything yet"
    if cmd == "join":
        c.join(args[0])
        c.settle()
        return c.owners()
    if cmd == "start":  # no settling: `tick` says how long to let it run
        c.start(args[0])
        return status_line(c, args[0])
    if cmd == "owners":
        return c.owners()
    if cmd == "reserved":
        return "\n".join(
            f"{p} reserves " + ("; ".join(f"{a} for {', '.join(h)}" for a, h in r.items())
                                or "nothing")
            for p, peer in sorted(c.peers.items())
            for r in [peer.allocator.status(c.now)["reserved"]])
    request = parse_request(words)
    if request is not None:
        out = c.requests([request])[0]
        if cmd != "release":
            c.settle()
        return out
    if cmd == "crash":
        c.crash(args[0])
        return "ok"
    if cmd == "restart":
        c.restart(args[0])
        return status_line(c, args[0])
    if cmd == "wipe":
        c.crash(args[0])
        c.join(args[2])
        c.settle()
        return c.owners()
    if cmd == "status":
        return status_line(c, args[0])
    if cmd == "ranges":
        return ranges_line(c, args[0])
    if cmd == "tenants":
        return tenants_line(c, args[0])
    if cmd == "tick":
        c.settle(int(args[0]))
        return "ok"
    if cmd == "partition":
        left, right = " ".join(args).split("|")
        a, b = left.split(), right.split()
        c.blocked = {(x, y) for x in a for y in b} | {(y, x) for x in a for y in b}
        c._links()
        return "ok"
    if cmd == "block":  # one way: what A sends B is lost
        c.blocked.add((args[0], args[1]))
        c._links()
        return "ok"
    if cmd == "unblock":
        c.blocked.discard((args[0], args[1]))
        c._links()
        return "ok"
    if cmd == "heal":
        c.blocked = set()
        c._links()
        c.settle()
        return "ok"
    if cmd == "stranger":
        before = dict(c.durable[args[0]].ring)
        ready = c.peers[args[0]].receive("x9", Gossip("c2", Replica("x9", []).hello()), c.now)
        answers = [f"{args[0]} tells x9: {msg.reason}" for dst, msg in ready.messages
                   if dst == "x9"]
        c.handle(args[0], ready)
        changed = "ring unchanged" if c.durable[args[0]].ring == before else "RING CHANGED"
        return "\n".join(ready.alarms + answers + [changed])
    raise ValueError(f"unknown command {cmd!r}")


def status_line(c: Cluster, p: str) -> str:
    peer = c.peers[p]
    s = peer.status(c.now)
    words = [f"{p} {s['standing']}"]
    if s["note"]:
        words.append(f"({s['note']})")
    if s.get("decided"):
        words.append(f"decided {','.join(s['decided'])}")
    elif s.get("promised"):
        words.append(f"promised round {s['promised'][0]} of {s['promised'][1]}")
    if s["removed"]:
        words.append("knows removed: " + ", ".join(f"{t} by {by}"
                                                    for t, by in s["removed"].items()))
    return " ".join(words)


def ranges_line(c: Cluster, p: str) -> str:
    peer = c.peers[p]
    out = []
    for x in peer.status(c.now)["universes"]:
        state = "static" if x["kind"] == "static" else "retired" if x["retired"] else "open"
        owners = ", ".join(f"{q} {d['owned']}" for q, d in x["peers"].items()) or "nobody known"
        out.append(f"{x['range']} {state}: {x['allocated']} allocated here; owned by {owners}")
    return "\n".join(out)


def tenants_line(c: Cluster, p: str) -> str:
    s = c.peers[p].status(c.now)
    out = [f"tenant {n}: IPv{t['family']} /{t['prefix_len']} blocks, at most {t['max_blocks']}; "
           f"blocks {' '.join(t['blocks']) or 'none'}" for n, t in s["tenants"].items()]
    out += [f"block {b} leased to {h}" for b, h in s["leases"].items()]
    out += [f"pool {n}: {x['pattern']}" for n, x in s["pools"].items()]
    return "\n".join(out) or "none"


def run_file(path: Path) -> tuple[str, str]:
    """(the file as it is, the file as it should be)."""
    text = path.read_text()
    out, state = [], {}
    blocks = text.split("\n\n")
    for block in blocks:
        if not block.strip():
            continue
        lines = block.strip("\n").split("\n")
        if "----" not in lines:
            out.append("\n".join(lines))  # comments
            continue
        i = lines.index("----")
        commands = [ln for ln in lines[:i] if ln and not ln.startswith("#")]
        result = "\n".join(run_command(state, cmd) for cmd in commands)
        out.append("\n".join(lines[:i] + ["----", result]))
    return text, "\n\n".join(out) + "\n"


def main() -> int:
    rewrite = "--rewrite" in sys.argv
    files = [Path(a) for a in sys.argv[1:] if a != "--rewrite"] or \
        sorted(Path(__file__).parent.joinpath("scenarios").glob("*.txt"))
    failed = 0
    for f in files:
        have, want = run_file(f)
        if have != want:
            if rewrite:
                f.write_text(want)
                print(f"rewrote {f}")
            else:
                failed += 1
                print(f"{f}: differs (run with --rewrite to accept)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
