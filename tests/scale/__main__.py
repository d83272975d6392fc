"""`make scale [N=100] [SECONDS=30]`: print the figures, write them as JSON, exit 1 on a
duplicate or a lost acknowledged allocation."""
import argparse
import json
import resource
import sys
from pathlib import Path

from .run import Plan, first_allocations, run


def show(r: dict) -> None:
    p = r["plan"]
    print(f"\n{p['hosts']} hosts, {p['live']} containers/host, {p['rate']:g} starts+stops/s/host "
          f"for {p['seconds']:g}s; load average before {r['load_before'][0]:.2f}, after "
          f"{r['load_after'][0]:.2f}")
    print(f"start: ready in {r['start']['ready_s_mean']:.2f}s mean ({r['start']['ready_s_max']:.2f}"
          f"s max), converged {r['start']['converged_after_last_s']:.1f}s after the last")
    for phase in ("fill", "churn"):
        x = r[phase]
        print(f"{phase:>5} allocate: n={x['count']} p50={x['p50_ms']:.1f}ms p95={x['p95_ms']:.1f}"
              f"ms p99={x['p99_ms']:.1f}ms max={x['max_ms']:.0f}ms, {100 * x['under_10ms']:.1f}% "
              f"under 10 ms; {x['needed_a_peer']} needed space from a peer")
    print(f"(idle: a {p['idle']:g} s window from {p.get('settle', 0):g} s after every ring "
          "agreed)")
    for name in ("idle", "churn"):
        x = r[name]
        print(f"{name:>5} per daemon: CPU {x['cpu_pct_mean']:.1f}% of a core (max "
              f"{x['cpu_pct_max']:.1f}%), peer bytes sent {x['peer_bytes_per_s_mean']:.0f}/s "
              f"(max {x['peer_bytes_per_s_max']:.0f}/s)")
    print(f"the client (one trio process driving every socket) used "
          f"{r['churn']['client_cpu_pct']:.0f}% of a core during the churn; "
          f"{r['churn']['late_starts']} starts began over 1 s late")
    print(f"RSS per daemon: {r['rss_mb']['mean']:.1f} MB mean, {r['rss_mb']['max']:.1f} MB max")
    rm = r["rmpeer"]
    print(f"rmpeer of {rm['removed']} killed hosts: {rm['kill_to_removed_s']:.1f}s from the kill "
          f"({rm['tries']} tries, the last call {rm['call_s']:.2f}s), rings agreed "
          f"{rm['converged_s']:.1f}s later")
    j = r["join"]
    print("join: ready " + ", ".join(f"{x:.2f}" for x in j["ready_s"]) + " s; first allocation "
          + first_allocations(j) + " s; the grant in every "
          "ring after " + ", ".join(f"{x:.2f}" for x in j["change_reached_all_s"]) + " s")
    c = r["check"]
    print(f"check: {c['rows']} allocations in {p['hosts']} databases, {c['acked_checked']} "
          f"acknowledged checked ({c['acked_void_on_removed_hosts']} void on removed hosts): "
          f"{len(c['duplicates'])} duplicates, {len(c['lost'])} lost; errors {r['errors']}")
    for kind, message in r["first_error"].items():
        print(f"  first {kind}: {message}")
    for line in (c["duplicates"] + c["lost"])[:20]:
        print("  " + line)


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.scale")
    ap.add_argument("-n", "--hosts", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--live", type=int, default=0, help="containers per host (0: scaled to N)")
    ap.add_argument("--rate", type=float, default=0.0, help="starts/s per host (0: scaled)")
    ap.add_argument("--replace", type=int, default=0, help="hosts killed, then joined")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--keep", action="store_true",
                    help="keep the hosts' data directories (printed) after the run")
    args = ap.parse_args()
    if args.hosts < 2:
        ap.error("--hosts must be at least 2 (one is killed and removed)")
    # A hook connection or two per host, and each daemon's stdout pipe: raise the soft limit.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    r = run(Plan(args.hosts, args.seconds, args.live, args.rate, args.replace, seed=args.seed),
            keep=args.keep)
    show(r)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=1, sort_keys=True) + "\n")
        print(f"written to {args.json}")
    return 0 if r["ok"] else 1


sys.exit(main())
