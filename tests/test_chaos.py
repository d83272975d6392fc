"""Chaos in CI: five real daemons in network namespaces for three minutes of churn and a
fault every 10 s; I1-I8 checked from the databases and the client log (tests/chaos.py).
`make soak MINUTES=n` runs it longer."""
import random

from .chaos import Chaos

SECONDS = 180


def test_five_hosts_three_minutes_of_faults_no_invariant_broken(tmp_path):
    seed = random.randrange(2**32)
    print(f"chaos seed={seed} (replay: python -m tests.chaos --minutes 3 --seed {seed})")
    report = Chaos(tmp_path, SECONDS, seed).run()
    print(report)
    assert report["faults"] and sum(report["faults"].values()) >= SECONDS // 10 - 1
    # At least 10 operations a second on every host, on average, answered or not.
    assert report["operations"] >= 10 * SECONDS * report["hosts"]
