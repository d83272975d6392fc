"""python -m tests.fuzz --minutes N [--seed S] [--keep]: the hostile-input soak (make fuzz).
Exit status 1 when anything was found; the seed is printed first, and again at the end."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import soak


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    ap.add_argument("--minutes", type=float, default=None, help="how long to run (default 10)")
    ap.add_argument("--seconds", type=float, default=None, help="or as many seconds")
    ap.add_argument("--seed", type=int, default=None, help="replay this seed (default: random)")
    ap.add_argument("--dir", type=Path, default=None,
                    help="work directory (default: a new one under $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory after a "
                    "clean run (it is always kept when something was found)")
    args = ap.parse_args()
    seconds = args.seconds if args.seconds is not None else 60 * (args.minutes or 10)
    report = soak(seconds, args.seed, args.dir, args.keep, out=lambda s: print(s, flush=True))
    print(report.summary(), flush=True)
    if report.findings:
        print(f"fuzz: FAILED, seed={report.seed} (replay: python -m tests.fuzz "
              f"--seed {report.seed} --seconds {seconds:g})", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
