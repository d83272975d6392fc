"""Metrics scrapes: numbers from the core's counts, formatted in a thread, served again for
metrics.FRESH seconds (the cost is measured in tests/bench/scrape_bench.py, not here)."""
from appliance import metrics as metrics_mod
from appliance.core import messages as m
from appliance.core.addr import cidr
from appliance.metrics import Metrics

from .test_gate import core_loop


def gauge(body: bytes, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    prefix = f"{name}{{{want}}} " if labels else f"{name} "
    (line,) = [x for x in body.decode().splitlines() if x.startswith(prefix)]
    return float(line[len(prefix):])


async def test_a_scrape_is_served_again_for_a_second_then_taken_anew(tmp_path, mock_clock):
    # mock_clock (pytest-trio): trio's time moves only when the test says.
    core = core_loop(tmp_path)
    met = Metrics(core)
    subnet = cidr("198.18.0.64/28")
    await core.submit(m.Allocate("a", subnet))
    first = await met.body()
    assert gauge(first, "ipamd_addresses_in_use", universe="198.18.0.0/24",
                 subnet="198.18.0.64/28") == 1
    # 13 usable in the /28 (14 hosts, one held)
    assert gauge(first, "ipamd_addresses_free", universe="198.18.0.0/24",
                 subnet="198.18.0.64/28") == 13
    await core.submit(m.Allocate("b", subnet))
    mock_clock.jump(metrics_mod.FRESH / 2)
    assert await met.body() is first  # within FRESH: the same body, not formatted again
    mock_clock.jump(metrics_mod.FRESH / 2)
    again = await met.body()
    assert gauge(again, "ipamd_addresses_in_use", universe="198.18.0.0/24",
                 subnet="198.18.0.64/28") == 2
    assert gauge(again, "ipamd_addresses_free", universe="198.18.0.0/24",
                 subnet="198.18.0.64/28") == 12
    core.store.close()


async def test_free_space_is_counted_in_chunks_and_agrees_with_the_allocator(
        tmp_path, monkeypatch):
    monkeypatch.setattr(metrics_mod, "CHUNK", 3)  # several chunks for ten subnets
    core = core_loop(tmp_path, clock=lambda: 1000.0)
    subnets = [cidr(f"198.18.0.{16 * i}/28") for i in range(10)]
    for i, s in enumerate(subnets):
        await core.submit(m.Allocate(f"h{i}", s))
    await core.submit(m.Allocate("x", subnets[3]))
    await core.submit(m.Release("x"))  # in quarantine: not free
    snap = await Metrics(core).snapshot()
    a = core.allocator
    free = dict(snap["free"])
    for s in subnets:
        lo, hi = s.host_bounds()
        assert free[(cidr("198.18.0.0/24"), s)] == a.free_count(cidr("198.18.0.0/24"), lo, hi,
                                                                 1000.0)
    assert free[(cidr("198.18.0.0/24"), subnets[3])] == 14 - 2  # h3's, and x's in quarantine
    assert len(free) == 11  # the ten, and the default subnet
    core.store.close()


async def test_ranges_added_online_and_retired_are_shown_and_spare_space_is_not(tmp_path):
    core = core_loop(tmp_path)
    added = cidr("10.99.0.0/24")
    assert await core.submit(m.AddRange(added)) == {"ok": True, "range": "10.99.0.0/24",
                                                    "owner": core.me, "blocks": False}
    assert (await core.submit(m.Allocate("a", added)))["address"] == "10.99.0.1/24"
    assert (await core.submit(m.RetireRange(added)))["retired"] is True
    body = await Metrics(core).body()
    assert gauge(body, "ipamd_range_retired", universe="10.99.0.0/24") == 1
    assert gauge(body, "ipamd_range_retired", universe="198.18.0.0/24") == 0
    assert gauge(body, "ipamd_addresses_in_use", universe="10.99.0.0/24",
                 subnet="10.99.0.0/24") == 1
    assert gauge(body, "ipamd_addresses_owned", universe="10.99.0.0/24") == 254
    assert "/0" not in body.decode()  # the spare universes 0.0.0.0/0 and ::/0
    core.store.close()


async def test_the_wal_is_shown_as_the_checkpoints_see_it(tmp_path):
    from appliance.daemon import _Checkpoints
    core = core_loop(tmp_path)
    assert b"ipamd_wal" not in await Metrics(core).body()  # no checkpoints run: nothing shown
    cp = core.checkpoints = _Checkpoints(core.store)
    await core.submit(m.Allocate("a"))
    cp.waits, cp.pinned = 3, True  # as after three waits and a reader found holding it
    body = await Metrics(core).body()
    assert core.store.wal_pages > 0
    assert gauge(body, "ipamd_wal_pages") == core.store.wal_pages
    assert gauge(body, "ipamd_wal_waits_total") == 3
    assert gauge(body, "ipamd_wal_pinned") == 1
    core.store.close()
