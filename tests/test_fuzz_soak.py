"""The hostile-input soak (tests/fuzz, `make fuzz`) for a short while: a fixed seed, then a
random one (printed, so a failure replays with `python -m tests.fuzz --seed N --seconds 6`).
Two real daemons joined as peers are fed junk on the hook socket, the Docker socket and the
peer port, with and without the secret; afterwards every invariant of the soak must hold."""
import random

import pytest

from .daemon_proc import Daemon  # real daemons (and tests/mutate.py leaves this module out)
from .fuzz import soak

FIXED_SEED = 20240611


def run(tmp_path, seconds: float, seed: int):
    lines = []
    report = soak(seconds, seed, tmp_path / f"fuzz-{seed}", out=lines.append)
    print("\n".join(lines + [report.summary()]))
    if report.findings:
        pytest.fail(report.summary(), pytrace=False)
    counts = report.counts
    # It did fuzz every entrance, and kept allocations through it all.
    for target in ("hook_valid", "hook_junk", "docker", "peer_noauth", "peer_auth"):
        assert counts[f"steps.{target}"] > 20, report.summary()
    assert counts["peer_auth.sessions"] > 0 and counts["peer.closed_by_daemon"] > 0
    assert report.kept > 0, report.summary()
    assert not Daemon.started or all(d.proc.poll() is not None for d in Daemon.started)


def test_fuzz_soak_fixed_seed(tmp_path):
    run(tmp_path, 16.0, FIXED_SEED)


def test_fuzz_soak_random_seed(tmp_path):
    seed = random.randrange(2**32)
    print(f"fuzz seed {seed}")
    run(tmp_path, 6.0, seed)
