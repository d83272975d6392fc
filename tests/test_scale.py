"""`make scale`'s code at 20 hosts, for correctness only: real daemons joined through one or
two peers, filled, churned, some killed and removed with rmpeer, new ones joined; then no
address is held twice across the databases and every acknowledged allocation is in its host's
database. No timing is asserted, nor that every allocation succeeded (a refusal is a figure
`make scale` prints; losing or doubling an acknowledged one is the failure)."""
from tests.scale.run import Plan, run


def test_twenty_hosts_churn_kill_rmpeer_join_lose_nothing():
    r = run(Plan(hosts=20, seconds=5, live=15, rate=4, replace=2, idle=1, settle=0),
            log=lambda s: None)
    c = r["check"]
    assert c["duplicates"] == [] and c["lost"] == [], c
    assert r["fill"]["count"] == 20 * 15  # every request answered (ok or refused)
    # The databases hold exactly what was acknowledged and not released: nothing stray.
    assert c["acked_checked"] > 0 and c["rows"] == c["acked_checked"], c
    assert r["rmpeer"]["removed"] == 2 and len(r["join"]["ready_s"]) == 2
    assert r["ok"]
