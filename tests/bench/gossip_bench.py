"""`make bench` (gossip part): in the simulator, how far one ring change travels and what it costs.

After churn has spread the space, one peer makes one change (it donates space to a peer that
ran out); we count gossip rounds (0.1 s ticks) until every peer has it, and the bytes of gossip
sent meanwhile (entries msgpack-encoded as the peer protocol will carry them), next to the size
of the full ring: what a full-state protocol would send each peer.
"""
import random
import sys

import msgpack

from appliance.core import messages as m
from appliance.core import peer as peer_mod
from appliance.core.peer import Gossip, Ready
from tests.sim.simulator import TICK, Faults, Sim


def encoded(entries) -> int:
    return len(msgpack.packb([[str(u), e.start, e.end, e.owner, e.version, e.free_hint,
                               *e.stamp] for u, e in entries]))


def measure(n: int, seed: int = 1) -> dict:
    sim = Sim(seed, n, Faults())
    rng = random.Random(seed)
    for _ in range(3 * n):  # churn: everyone allocates, space spreads by donation
        p = rng.choice(sim.names)
        sim.handles += 1
        sim._handle(p, sim.live[p].request(("warm", sim.handles), m.Allocate(f"w{sim.handles}"),
                                           sim.now))
        sim.now += TICK
        for q in sim.names:
            sim._handle(q, sim.live[q].tick(sim.now))
        sim._drain()
    sim.heal()
    ring = sim.live[sim.names[0]].replica.rings[sim.u]
    full = encoded([(sim.u, e) for e in ring.entries])
    sent = {"bytes": 0, "messages": 0}
    real_send = sim._send

    def counting(src, dst, msg):
        if isinstance(msg, Gossip) and msg.delta.entries:
            sent["bytes"] += encoded(msg.delta.entries)
            sent["messages"] += 1
        real_send(src, dst, msg)

    sim._send = counting
    # Hint refreshes are changes too; pause them so the window holds exactly one change.
    peer_mod.HINTS = 10**9
    # The change: exactly one transfer, a block of the richest peer's free space to another.
    rich = max(sim.names, key=lambda p: sim.live[p].allocator.free_count(
        sim.u, sim.u.start, sim.u.end, sim.now))
    other = next(p for p in sim.names if p != rich)
    peer = sim.live[rich]
    lo, hi = peer.allocator.donatable(sim.u, sim.u.start, sim.u.end, sim.now, 16, other)
    rows: list = []
    with peer.writer.change(rows) as ch:
        written = ch.wrote(sim.u, peer.rings[sim.u].transfer(
            rich, lo, hi, other, peer.replica.next_stamp(), hi - lo))
    sim._handle(rich, Ready(rows=rows))
    change = encoded([(sim.u, e) for e in written])
    rounds = 0
    while True:
        rounds += 1
        sim.now += TICK
        for q in sim.names:
            sim._handle(q, sim.live[q].tick(sim.now))
        sim._drain()
        rings = [sim.live[p].replica.rings[sim.u].entries for p in sim.names]
        if all(r == rings[0] for r in rings):
            break
    peer_mod.HINTS = 10
    return {"peers": n, "ring_entries": len(ring.entries), "full_ring_bytes": full,
            "change_bytes": change,
            "rounds": rounds, "seconds": rounds * TICK, "gossip_messages": sent["messages"],
            "gossip_bytes": sent["bytes"], "bytes_per_peer": sent["bytes"] / n}


def main() -> None:
    print("Gossip: one ring change after churn (simulator, no faults; a round is a 0.1 s tick)")
    print(f"{'peers':>6}{'ring entries':>14}{'full ring B':>13}{'change B':>10}{'rounds':>8}"
          f"{'seconds':>9}{'messages':>10}{'gossip B':>10}{'B per peer':>12}")
    for n in (20, 100):
        r = measure(n)
        print(f"{r['peers']:>6}{r['ring_entries']:>14}{r['full_ring_bytes']:>13}"
              f"{r['change_bytes']:>10}{r['rounds']:>8}{r['seconds']:>9.1f}"
              f"{r['gossip_messages']:>10}{r['gossip_bytes']:>10}{r['bytes_per_peer']:>12.0f}")


if __name__ == "__main__":
    sys.exit(main())
