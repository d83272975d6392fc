"""Scenario files: an operator's log of commands with the expected output under `----`.

    python -m tests.scenario [--rewrite] [FILE ...]

Commands (peers are p0, p1, ...; p0 founds the cluster and owns everything):
  cluster peers=N range=CIDR      a new cluster; prints who owns what once gossip settles
  join PEER                       a new peer with an empty database
  allocate PEER HANDLE            an allocation on PEER (asking others for space if needed)
  claim PEER HANDLE ADDRESS       a specific address
  release PEER HANDLE
  owners                          who owns what, as CIDR blocks
  partition A B | C D             a network split; `heal` ends it
  stranger PEER                   a peer of another cluster talks to PEER
"""
from __future__ import annotations

import sys
from pathlib import Path

from appliance.core import messages as m
from appliance.core.addr import cidr, parse_addr, range_to_cidrs
from appliance.core.durable import Durable
from appliance.core.gossip import Replica
from appliance.core.peer import Gossip, Peer, Ready

TICK = 0.1


class Cluster:
    def __init__(self, n: int, universe):
        self.u, self.now = universe, 1000.0
        self.peers: dict[str, Peer] = {}
        self.durable: dict[str, Durable] = {}
        self.blocked: set[tuple[str, str]] = set()
        self.inbox: list[tuple[str, str, object]] = []
        self.replies: dict[object, dict] = {}
        self.alarms: list[str] = []
        founder, rows = Peer.founder("p0", "c1", [universe], universe, reuse_delay=30.0)
        self._add("p0", founder, rows)
        for i in range(1, n):
            self.join(f"p{i}")

    def _add(self, name: str, peer: Peer, rows: list) -> None:
        self.durable[name] = Durable(name, "c1", [self.u])
        self.durable[name].apply(rows)
        self.peers[name] = peer
        self._links()

    def join(self, name: str) -> None:
        self._add(name, Durable(name, "c1", [self.u]).load(self.u, 30.0), [])

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
                self.handle(p, self.peers[p].tick(self.now))
            while self.inbox:
                src, dst, msg = self.inbox.pop(0)
                self.handle(dst, self.peers[dst].receive(src, msg, self.now))

    def owners(self) -> str:
        view = self.peers["p0"].replica.rings[self.u]
        parts = []
        for p in sorted(self.peers, key=lambda x: int(x[1:])):
            blocks = [str(b) for lo, hi in view.owned_by(p)
                      for b in range_to_cidrs(self.u.family, lo, hi)]
            parts.append(f"{p} owns {' '.join(blocks) if blocks else 'nothing'}")
        return "; ".join(parts)

    def request(self, p: str, req) -> str:
        ref = ("req", len(self.replies), self.now)
        self.handle(p, self.peers[p].request(ref, req, self.now))
        for _ in range(60):
            if ref in self.replies:
                break
            self.settle(1)
        r = self.replies.get(ref)
        if r is None:
            return "no answer"
        if not r["ok"]:
            return f"error {r['error']['code']}: {r['error']['message']}"
        if isinstance(req, m.Release):
            return f"released {' '.join(r['released']) or 'nothing'}"
        return r["address"]


def run_command(state: dict, line: str) -> str:
    words = line.split()
    cmd, args = words[0], words[1:]
    c: Cluster | None = state.get("cluster")
    if cmd == "cluster":
        opts = dict(a.split("=", 1) for a in args)
        c = state["cluster"] = Cluster(int(opts["peers"]), cidr(opts["range"]))
        c.settle()
        return c.owners()
    if cmd == "join":
        c.join(args[0])
        c.settle()
        return c.owners()
    if cmd == "owners":
        return c.owners()
    if cmd == "allocate":
        out = c.request(args[0], m.Allocate(args[1]))
        c.settle()
        return out
    if cmd == "claim":
        out = c.request(args[0], m.Claim(args[1], *parse_addr(args[2])))
        c.settle()
        return out
    if cmd == "release":
        return c.request(args[0], m.Release(args[1]))
    if cmd == "partition":
        left, right = " ".join(args).split("|")
        a, b = left.split(), right.split()
        c.blocked = {(x, y) for x in a for y in b} | {(y, x) for x in a for y in b}
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
