"""`make report`: docs/scale-report.md and its plots (docs/scale/*.png) from the simulator's
scale matrix (docs/scale/matrix.json) and, if there is one, the last `make scale` run
(docs/scale/scale-run.json)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)

from appliance.core.addr import cidr  # noqa: E402
from appliance.protocols.peer_frames import PROTOCOL  # noqa: E402
from tests.sim.simulator import REUSE_DELAY  # noqa: E402

from .run import first_allocations  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
OUT = DOCS / "scale"

# metric key -> (title, what it means to a user)
METRICS = {
    "refused_with_space": ("allocations refused while space was free elsewhere",
                           "requirement: allocations succeed while free space exists"),
    "needed_peer_share": ("share of allocations that needed a peer", "each costs a round trip"),
    "wait_rounds_p95": ("p95 wait of those, rounds (0.1 s)", "how long such an allocation waits"),
    "bytes_per_change": ("peer bytes per ring change", "all peer traffic / ring writes"),
    "change_rounds": ("rounds for one change to reach every ring", "a claim's grant"),
    "ring_entries": ("ring entries after the run", "fragmentation"),
    "heal_rounds": ("rounds to converge after the heal", "rings equal everywhere"),
}


def bars(cases: list[dict], key: str, title: str, path: Path) -> None:
    names = [c["case"]["name"] for c in cases]
    values = [float(c[key]) for c in cases]
    dims = list(dict.fromkeys(c["case"]["dimension"] for c in cases))  # in the run's order
    colours = {d: plt.cm.tab10(i % 10) for i, d in enumerate(dims)}
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(cases) + 1.2))
    ax.barh(range(len(cases)), values,
            color=[colours[c["case"]["dimension"]] for c in cases])
    ax.set_yticks(range(len(cases)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    if key in ("bytes_per_change",) and max(values, default=0) > 0:
        ax.set_xscale("log")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def by_peers(cases: list[dict], path: Path) -> None:
    rows = sorted((c for c in cases if c["case"]["dimension"] == "node count"),
                  key=lambda c: c["case"]["peers"])
    if len(rows) < 2:
        return
    peers = [c["case"]["peers"] for c in rows]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, key in zip(axes, ("bytes_per_change", "ring_entries", "change_rounds")):
        ax.plot(peers, [c[key] for c in rows], marker="o")
        ax.set_xscale("log")
        ax.set_xlabel("peers")
        ax.set_title(METRICS[key][0], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def sim_cost(cases: list[dict], path: Path) -> list[str]:
    """How far the simulator goes: wall seconds per simulated second against peers, the
    exponent between the two largest node counts, and what 1,000 peers would take."""
    rows = sorted((c for c in cases if c["case"]["dimension"] == "node count"),
                  key=lambda c: c["case"]["peers"])
    # A case simulates 5 s of fill, 2 s settling and its churn time (the heal is short).
    pts = [(c["case"]["peers"], c["wall_s"] / (c["case"]["seconds"] + 7)) for c in rows]
    if len(pts) < 2:
        return []
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.loglog([p for p, _ in pts], [w for _, w in pts], marker="o")
    ax.set_xlabel("peers")
    ax.set_ylabel("wall s per simulated s")
    ax.set_title("simulator cost on this machine", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    (n1, w1), (n2, w2) = pts[-2], pts[-1]
    k = math.log(w2 / w1) / math.log(n2 / n1) if w1 > 0 and w2 > 0 and n2 > n1 else float("nan")
    big = rows[-1]
    rounds = 10 * (big["case"]["seconds"] + 7)  # the same span as the wall time above
    per_round = big["messages"] / (big["case"]["peers"] * rounds)
    reach = "" if n2 >= 1000 else (
        f"; at that rate one simulated second of 1,000 peers would take about "
        f"{w2 * (1000 / n2) ** k:,.0f} s (`make report MATRIX=huge` runs 200 and 1,000)")
    return [
        "## How far the simulator goes", "",
        "Wall time per simulated second: " + ", ".join(f"{n} peers {w:.2g} s" for n, w in pts)
        + f". Between {n1} and {n2} peers it grows as peers^{k:.1f}{reach}. At {n2:,} peers "
        f"each peer sent {per_round:.1f} messages a round on average ({big['messages']:,} in "
        "all). The time is the core's own work, not the harness: what was the harness' "
        "largest cost, encoding every message to count its bytes (and keeping every "
        "connection's vectors for that), is done on a sample of the pairs. Each peer merges "
        "every ring change, and a change costs it the entries it changes (Ring keeps its "
        "sorted view and spans up to date, and checks what was put and its neighbours), not a "
        "walk of the ring. A delta's version vectors go as their changes since the last delta "
        "on the connection, but a push still carries what the receiver may lack by what it "
        "last told the sender, so the bytes per ring change in the table still grow faster "
        "than the peers do.", "",
        "![simulator cost](scale/sim_cost.png)", ""] + _vector_memory(rows)


def _vector_memory(rows: list[dict]) -> list[str]:
    """What the version vectors kept per partner cost: they bounded the simulator once."""
    pts = [(c["case"]["peers"], c["vector_items"]) for c in rows if c.get("vector_items")]
    if len(pts) < 2:
        return []
    return [
        "Memory no longer stops the simulator. Each peer keeps, for the partners it gossips "
        "with, the last version vector each told it and the one it assumes each has "
        "(`Peer.known`, `Peer.sent`), and a vector names every peer. Kept for every partner, "
        "that was up to 2 x peers^2 items on a peer and peers^3 in the simulator (8.3 million "
        "items at 200 peers; a run of 1,000 peers grew past 22 GB and was stopped). Now a peer "
        "keeps them for the 32 partners it last heard from or sent to (`PARTNERS`): at most "
        "64 x peers items, 64,000 at 1,000 hosts, and one vector stands for every partner "
        "known to have all the peer has (`Replica.frozen`). A partner forgotten is treated as "
        "one never heard: news for it starts with a hello, so the delta that follows is made "
        "against what it really has. Items held at the end of each case (each dict once): "
        + ", ".join(f"{n:,} peers {v:,}" for n, v in pts) + ".", ""]


def _full_by_quarantine(c: dict) -> str:
    """Why a case's range is full though only part of it is in use: the addresses its churn
    frees stay in quarantine for the simulator's reuse delay."""
    case = c["case"]
    held = case["churn"] * REUSE_DELAY  # of the live addresses, in quarantine at any time
    if case["utilisation"] * (1 + held) < 0.95:
        return ""
    return (f": its churn replaces {100 * case['churn']:g}% of the live addresses a second and "
            f"each freed one stays in quarantine {REUSE_DELAY:g} s, so {100 * held:g}% as many "
            f"again are quarantined and, with {100 * case['utilisation']:g}% in use, the range "
            "is full but for the few addresses leaving quarantine at each moment")


def findings(cases: list[dict]) -> list[str]:
    """What the figures say, case by case, where a requirement is at stake."""
    out = ["## What the figures say", ""]
    refused = [c for c in cases if c["refused_with_space"]]
    if refused:
        out.append("- Allocations refused while the cluster had free space (the requirement "
                   "says they should succeed): " + "; ".join(
                       f"{c['case']['name']} {c['refused_with_space']} of "
                       f"{c['allocations'] + sum(c['refused'].values())} "
                       f"({', '.join(f'{k} {v}' for k, v in sorted(c['refused'].items()))}"
                       + (f"; at most {c['most_free_at_refusal']:,} of the range's "
                          f"{cidr(c['universe']).size:,} addresses free then"
                          if "most_free_at_refusal" in c else "") + ")" + _full_by_quarantine(c)
                       for c in refused) + ".")
    else:
        out.append("- No allocation was refused while the cluster had free space.")
    worst = max(cases, key=lambda c: c["bytes_per_change"])
    out.append(f"- Peer bytes per ring change are largest in {worst['case']['name']}: "
               f"{worst['bytes_per_change']:,.0f} B (the design's budget: O(change), not "
               "O(ring)).")
    frag = max(cases, key=lambda c: c["ring_entries"] / max(1, c["final_peers"]))
    out.append(f"- Most ring entries per peer: {frag['case']['name']}, {frag['ring_entries']} "
               f"entries for {frag['final_peers']} peers.")
    slow = max(cases, key=lambda c: c["change_rounds"])
    out.append(f"- Slowest change to reach every ring: {slow['case']['name']}, "
               f"{slow['change_rounds']} rounds ({slow['change_rounds'] / 10:g} s).")
    return out + [""]


def latency_plot(run: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3))
    phases = ["fill", "churn"]
    for i, q in enumerate(("p50_ms", "p95_ms", "p99_ms")):
        ax.bar([x + 0.25 * i for x in range(2)], [run[p][q] for p in phases], width=0.25,
               label=q.split("_")[0])
    ax.axhline(10, color="red", linestyle="--", linewidth=1, label="10 ms")
    ax.set_xticks([0.25, 1.25], phases)
    ax.set_yscale("log")
    ax.set_ylabel("allocate, ms")
    ax.legend(fontsize=8)
    p = run["plan"]
    ax.set_title(f"{p['hosts']} real daemons, {p['live']} containers each, "
                 f"{p['rate']:g} starts/s per host", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(cases: list[dict]) -> list[str]:
    out = ["| case | peers (end) | range | allocations | refused (with space free) | "
           "needed a peer | p95 wait | bytes / change | one change: rounds, bytes | "
           "ring entries (runs) | heal rounds | joined / left / crashed | wall s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        refused = sum(c["refused"].values())
        codes = ", ".join(f"{k} {v}" for k, v in sorted(c["refused"].items()))
        sampled = "" if c["bytes_sampled"] >= 1 else f" (sampled {c['bytes_sampled']:.2g})"
        if c.get("protocol") != PROTOCOL:  # run before the last change of the encoding
            sampled += f" (protocol {c.get('protocol', '?')})"
        out.append(
            f"| {c['case']['name']} | {c['case']['peers']} ({c['final_peers']}) | "
            f"{c['universe']} | {c['allocations']} | {refused} ({c['refused_with_space']})"
            f"{' ' + codes if codes else ''} | {100 * c['needed_peer_share']:.1f}% | "
            f"{c['wait_rounds_p95']} | {c['bytes_per_change']:,.0f}{sampled} | "
            f"{c['change_rounds']}, {c['change_bytes']:,} | {c['ring_entries']} "
            f"({c['ring_runs']}) | {c['heal_rounds']} | {c['joined']} / {c['left']} / "
            f"{c['crashes']} | {c['wall_s']:.0f} |")
    return out


def scale_section(run: dict) -> list[str]:
    p, c = run["plan"], run["check"]
    j, rm = run["join"], run["rmpeer"]
    lines = [
        "## Real daemons (`make scale`)", "",
        f"{p['hosts']} daemons on 127.0.0.1 of this machine, {p['live']} containers each, "
        f"{p['rate']:g} starts and {p['rate']:g} stops per second per host for "
        f"{p['seconds']:g} s, then {p['replace']} hosts killed (-9) and removed with `rmpeer`, "
        f"then {p['replace']} new hosts joined. Load average before "
        f"{run['load_before'][0]:.2f}, after {run['load_after'][0]:.2f}"
        + (" (other work shared the machine)." if run['load_before'][0] > 2 else
           " (the run's own load: the machine was otherwise idle)."), "",
        "![allocation latency](scale/latency.png)", "",
        "| phase | allocations | p50 ms | p95 ms | p99 ms | under 10 ms | needed a peer |",
        "|---|---|---|---|---|---|---|"]
    for phase in ("fill", "churn"):
        x = run[phase]
        lines.append(f"| {phase} | {x['count']} | {x['p50_ms']:.1f} | {x['p95_ms']:.1f} | "
                     f"{x['p99_ms']:.1f} | {100 * x['under_10ms']:.1f}% | "
                     f"{x['needed_a_peer']} |")
    lines += [
        "", "The tail on one machine: every daemon sends its keepalives at the same points of "
        "wall time, so daemons sharing a machine all wake together once an interval (2.38 s at "
        "100 peers) and take it whole for a moment; requests made then wait. Measured, and the "
        "alternative tried: docs/design.md, \"The grid has a price\". What one host of a "
        "cluster this size feels, with a core of its own (the other daemons on the other "
        "core): `make bench-host`, whose figures are there too.",
        "", "| per daemon | CPU, % of a core (mean / max) | peer bytes sent/s (mean / max) |",
        "|---|---|---|"]
    plan = run["plan"]
    labels = {"idle": f"idle ({plan['idle']:g} s from {plan.get('settle', 0):g} s after the "
                      "rings agreed)", "churn": "churn"}
    for name in ("idle", "churn"):
        x = run[name]
        lines.append(f"| {labels[name]} | {x['cpu_pct_mean']:.1f} / {x['cpu_pct_max']:.1f} | "
                     f"{x['peer_bytes_per_s_mean']:,.0f} / {x['peer_bytes_per_s_max']:,.0f} |")
    lines += [
        "", "- The client (one trio process driving every hook socket): "
        + (f"{run['churn']['client_cpu_pct']:.0f}% of a core during the churn; "
           if "client_cpu_pct" in run["churn"] else "its CPU was not measured in this run; ")
        + f"{run['churn']['late_starts']} starts began over 1 s behind schedule.",
        f"- RSS per daemon: {run['rss_mb']['mean']:.1f} MB mean, "
        f"{run['rss_mb']['max']:.1f} MB max.",
        f"- Start: ready in {run['start']['ready_s_mean']:.2f} s mean; every host a member with "
        f"one ring {run['start']['converged_after_last_s']:.1f} s after the last started.",
        f"- rmpeer of {rm['removed']}: done {rm['kill_to_removed_s']:.1f} s after the kill "
        f"({rm['tries']} tries; the last call took {rm['call_s']:.2f} s); rings equal "
        f"{rm['converged_s']:.1f} s later.",
        "- Join of a new host: ready in " + ", ".join(f"{x:.2f}" for x in j["ready_s"])
        + " s; its first allocation (space from a peer) answered "
        + first_allocations(j) + " s after launch; that "
        "grant in every other ring " + ", ".join(f"{x:.2f}" for x in j["change_reached_all_s"])
        + " s later.",
        f"- Check (databases read after stopping): {c['rows']} allocations, "
        f"{len(c['duplicates'])} duplicates, {len(c['lost'])} lost of {c['acked_checked']} "
        f"acknowledged ({c['acked_void_on_removed_hosts']} were on removed hosts).",
        f"- Refusals: {run['errors'] or 'none'}."]
    for kind, message in run.get("first_error", {}).items():
        lines.append(f"  - first `{kind}`: {message}")
    return lines + [""]


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    matrix = json.loads((OUT / "matrix.json").read_text())
    broken = [c for c in matrix["cases"] if "violation" in c]
    cases = [c for c in matrix["cases"] if "violation" not in c]
    for key, (title, _) in METRICS.items():
        bars(cases, key, title, OUT / f"{key}.png")
    by_peers(cases, OUT / "by_peers.png")
    lines = [
        "# Scale report", "",
        "Generated by `make report` (tests/scale/report.py) from the simulator's scale matrix "
        "(`python -m tests.sim.matrix`, tests/sim/matrix.py)"
        + (" and the last `make scale` run" if (OUT / "scale-run.json").exists() else "")
        + ". The requirements: up to 100 hosts, hundreds of containers per host, up to 10 "
        "starts/s per host, under 10 ms for 95% of requests.", ""]
    if (OUT / "scale-run.json").exists():
        run = json.loads((OUT / "scale-run.json").read_text())
        latency_plot(run, OUT / "latency.png")
        lines += scale_section(run)
    load, b = matrix["load_before"], matrix["baseline"]
    lines += [
        "## The matrix in the simulator", "",
        f"Matrix size `{matrix['size']}`; load average when it started {load[0]:.2f}, "
        f"when it ended {matrix['load_after'][0]:.2f}. One baseline ({b['peers']} peers, "
        f"{b['per_node']} live addresses per peer, {100 * b['utilisation']:.0f}% of the range "
        f"in use, even load, {100 * b['churn']:g}% of the live addresses replaced per second, "
        f"static membership, no failures, {b['seconds']:g} simulated seconds of churn), and "
        "each dimension of the requirements varied from it in turn; every dimension but node "
        "count runs again at 100 peers (the requirements' size) for 5 simulated seconds "
        "(its cases end in \"100 peers\"). Each case fills the range in 5 simulated "
        "seconds, churns for the case's time, lets leaves finish, heals (every peer back, "
        "rmpeer of wiped ones, rings equal) and then measures one claim of an address another "
        "peer owns. A round is one 0.1 s tick of every peer. Bytes are the real codec's "
        "(past 10 peers estimated from a random sample of the messages, the rate shown). "
        "The simulator's invariants (I1-I9) are checked every 10 simulated seconds and after "
        "the heal: every case below passed them (bar the known core bugs named below, which the "
        "checks tolerate).", "",
        *table(cases), ""]
    if (OUT / "by_peers.png").exists():
        lines += ["![by node count](scale/by_peers.png)", ""]
    for c in broken:
        lines += [f"**{c['case']['name']}: the simulator found a violation** (not in the table "
                  f"or plots): `{c['violation']}`. It replays the same: `python -m "
                  f"tests.sim.matrix --only '{c['case']['name']}'`.", ""]
    for c in cases:
        if c.get("known_bugs"):
            lines += [f"**{c['case']['name']}** met core bugs the simulator knows of and "
                      "tolerates (tests/sim/simulator.py KNOWN_BUGS; a strict reproduction "
                      "of each in tests/test_sim.py): " + ", ".join(
                          f"`{k}` ({n})" for k, n in c["known_bugs"].items()) + ".", ""]
    lines += findings(cases)
    lines += sim_cost(cases, OUT / "sim_cost.png")
    for key, (title, meaning) in METRICS.items():
        lines += [f"### {title[0].upper() + title[1:]}", "", f"({meaning})", "",
                  f"![{title}](scale/{key}.png)", ""]
    (DOCS / "scale-report.md").write_text("\n".join(lines))
    print(f"wrote {DOCS / 'scale-report.md'} and {len(METRICS)} plots in {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
