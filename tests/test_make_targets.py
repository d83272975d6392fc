"""The Makefile's documented defaults: each target's own (a global `N ?=` set twice once made
`make scale` run with bench-idle's "10 20 40" and fail on its arguments)."""
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def dry_run(*args: str) -> str:
    """The last command `make -n` would run (the target's own; the stamp's come first)."""
    out = subprocess.run(["make", "-s", "-n", "-C", str(ROOT), *args], check=True,
                         capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


@pytest.mark.parametrize("args, command", [
    (["scale"], "-m tests.scale --hosts 100 --seconds 30 "),
    (["scale", "N=20", "SECONDS=5"], "-m tests.scale --hosts 20 --seconds 5 "),
    (["bench-idle"], "-m tests.bench.idle_bench -n 10 20 40 --idle 15"),
    (["bench-idle", "N=10 20"], "-m tests.bench.idle_bench -n 10 20 --idle 15"),
    (["bench-host"], "-m tests.bench.host_bench --hosts 100 --seconds 60"),
    (["bench-host", "N=20", "SECONDS=5"], "-m tests.bench.host_bench --hosts 20 --seconds 5"),
])
def test_a_target_runs_with_its_documented_defaults(args, command):
    assert command in dry_run(*args)
