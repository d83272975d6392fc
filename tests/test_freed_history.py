"""A host's cost follows its live state: freed addresses past quarantine beyond the most recent
`keep` fold into spans, in memory and in the database, and the reuse order stays as README says."""
import apsw

from appliance import store as store_mod
from appliance.core.addr import cidr, format_addr, parse_addr
from appliance.core.messages import Allocate, Release
from appliance.store import Store

from .test_store import as_version_3

U = cidr("10.32.0.0/20")
SMALL = cidr("10.0.0.0/28")  # hosts .1 to .14


def open_allocator(path, universe, keep):
    s = Store(path)
    a = s.load_peer(s.open([universe], "t"), universe, 30).allocator
    for fl in a.freed.values():
        fl.keep = keep
    return s, a


def do(s, a, req, now):
    reply, rows = a.apply(req, now)
    s.commit(rows)
    return reply


def test_many_cycles_leave_bounded_structures(tmp_path):
    s, a = open_allocator(tmp_path / "ipamd.db", U, keep=50)
    now = 1000.0
    for i in range(500):
        assert do(s, a, Allocate(f"live{i}"), now)["ok"]
    for i in range(20_000):  # almost five times round the /20: every address reused
        now += 0.5
        assert do(s, a, Allocate(f"c{i}"), now)["ok"]
        assert do(s, a, Release(f"c{i}"), now)["ok"]
    fl = a.freed[U]
    assert len(fl.q_sorted) == 60  # 30 s of quarantine at two frees a second
    assert len(fl.cool) == 50
    assert len(fl.folded.intervals()) <= 3
    assert fl.folded_count == 4094 - 500 - 110
    assert s.conn.execute("SELECT count(*) FROM freed").fetchall() == [(110,)]
    assert len(s.conn.execute("SELECT * FROM freed_spans").fetchall()) == \
        len(fl.folded.intervals())
    assert a.status(now)["universes"][0]["quarantined"] == 60
    assert a.status(now)["universes"][0]["free"] == 4094 - 500 - 60
    s.close()


def test_reuse_order_across_the_fold_and_a_restart(tmp_path):
    path = tmp_path / "ipamd.db"
    s, a = open_allocator(path, SMALL, keep=2)
    for i in range(1, 15):
        assert do(s, a, Allocate(f"h{i}"), 1.0)["address"] == f"10.0.0.{i}/28"
    for t, i in enumerate([6, 2, 10, 1, 14, 8], start=2):
        do(s, a, Release(f"h{i}"), float(t))
    # All six past quarantine at 100; freeing .4 folds the four least recently freed.
    do(s, a, Release("h4"), 100.0)
    fl = a.freed[SMALL]
    assert fl.folded.intervals() == [(SMALL.start + 1, SMALL.start + 3),
                                     (SMALL.start + 6, SMALL.start + 7),
                                     (SMALL.start + 10, SMALL.start + 11)]
    assert [a for a, _ in fl.items()] == [SMALL.start + 14, SMALL.start + 8, SMALL.start + 4]
    s.close()
    s, a = open_allocator(path, SMALL, keep=2)
    # Folded lowest first, then the tracked least recently freed first, then (after its
    # quarantine) the last one freed.
    got = [do(s, a, Allocate(f"n{i}"), 101.0)["address"] for i in range(6)]
    assert got == [f"10.0.0.{i}/28" for i in (1, 2, 6, 10, 14, 8)]
    assert do(s, a, Allocate("n6"), 101.0)["error"]["code"] == "exhausted"
    assert do(s, a, Allocate("n6"), 130.0)["address"] == "10.0.0.4/28"
    assert s.conn.execute("SELECT count(*) FROM freed").fetchall() == [(0,)]
    assert s.conn.execute("SELECT count(*) FROM freed_spans").fetchall() == [(0,)]
    s.close()


def test_a_version_3_database_keeps_its_reuse_order(tmp_path):
    path = tmp_path / "ipamd.db"
    s, a = open_allocator(path, SMALL, keep=2)
    for i in range(1, 15):
        do(s, a, Allocate(f"h{i}"), 1.0)
    s.close()
    c = apsw.Connection(str(path))
    as_version_3(c)
    order = [9, 3, 12, 5, 1, 7]
    c.executemany("DELETE FROM allocations WHERE handle = ?", [(f"h{i}",) for i in order])
    c.executemany("INSERT INTO freed VALUES (?, ?, ?)",
                  [(f"10.0.0.{i}", str(SMALL), float(t)) for t, i in enumerate(order, 2)])
    c.close()
    s = Store(path)
    loaded = s.open(None, "t")
    assert s.conn.execute("PRAGMA user_version").fetchall()[0][0] == store_mod.SCHEMA_VERSION
    a = s.load_peer(loaded, SMALL, 30).allocator
    # Every row kept, in its order: nothing is folded until an address is freed.
    assert [format_addr(4, x) for x, _ in a.freed[SMALL].items()] == \
        [f"10.0.0.{i}" for i in order]
    for fl in a.freed.values():
        fl.keep = 2
    do(s, a, Release("h4"), 100.0)  # folds 9, 3, 12, 5: order kept as far as spans can
    got = [do(s, a, Allocate(f"n{i}"), 101.0)["address"] for i in range(6)]
    assert got == [f"10.0.0.{i}/28" for i in (3, 5, 9, 12, 1, 7)]
    assert [r[0] for r in s.conn.execute("SELECT address FROM freed")] == ["10.0.0.4"]
    assert parse_addr("10.0.0.4") in {(4, x) for x, _ in a.freed[SMALL].items()}
    s.close()
