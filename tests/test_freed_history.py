"""A host's cost follows its live state: freed addresses past quarantine beyond the most recent
`keep` fold into spans, in memory and in the database, and the reuse order stays as README says."""
import apsw
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance import store as store_mod
from appliance.core.addr import cidr, format_addr, parse_addr
from appliance.core.freelist import FreeList
from appliance.core.messages import Allocate, Claim, Release
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


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from("fftteu"), st.integers(0, 11),
                              st.sampled_from([0.0, 0.0, 1.0, 7.0])), max_size=80),
       packed=st.booleans())
def test_quarantine_with_holes_against_a_model(ops, packed):
    """Frees, takes (a claim of a quarantined address leaves a hole in the FIFO), undone takes
    and expiry, against lists of (free count, address, freed_at). Packed: offsets in arrays;
    else lists, as for a universe over 2**64 addresses."""
    base = 1 << 70
    fl = FreeList(10.0, keep=100, base=base, size=64 if packed else 1 << 66)
    quarantine, cool = [], []  # (n, address, freed_at), in order of n
    now, n, last_expire, undos = 0.0, 0, 0.0, []

    def expire(t):
        nonlocal last_expire
        last_expire = t
        while quarantine and quarantine[0][2] + 10.0 <= t:
            cool.append(quarantine.pop(0))
        fl.expire(t)

    for op, k, dt in ops:
        a = base + k
        now += dt
        held = {x[1] for x in quarantine + cool}
        if op == "f" and a not in held:
            fl.free(a, now)
            quarantine.append((n, a, now))
            n += 1
        elif op == "t" and a in held:
            undo = fl.take(a, {})
            part = quarantine if any(x[1] == a for x in quarantine) else cool
            entry = next(x for x in part if x[1] == a)
            part.remove(entry)
            undos.append((undo, entry))
        elif op == "u" and undos:  # undo the latest take whose address is free again
            undo, entry = undos.pop()
            if entry[1] in held:
                continue
            undo()
            part = quarantine if entry[2] + 10.0 > last_expire else cool
            part.append(entry)
            part.sort()
        elif op == "e":
            expire(now)
        assert list(fl.items()) == [(x[1], x[2]) for x in cool + quarantine]
        assert len(fl) == len(cool) + len(quarantine)
        assert all(h >= fl._q_base + fl._q_head for h in fl._holes)  # none outlives its entry
        assert fl.quarantined_between(base, base + 12) == sorted(x[1] for x in quarantine)
        assert fl.quarantined_in(base + 3, base + 9) == \
            sum(base + 3 <= x[1] < base + 9 for x in quarantine)
        for x in cool + quarantine:
            assert fl.get(x[1]) == x[2] and x[1] in fl
        assert fl.get(a) is None or a in held or any(x[1] == a for x in cool + quarantine)
    expire(now)
    assert list(fl.quarantined(now)) == [(x[1], x[2]) for x in reversed(quarantine)]


def test_freed_rows_load_into_the_innermost_universe_holding_them(tmp_path):
    """Freed rows do not name their universe (schema 7). A universe with another inside it
    (static space around a range: a database made by hand or by a tool) does not swallow the
    inner one's rows that follow its own."""
    path, outer, inner = tmp_path / "ipamd.db", cidr("10.0.0.0/8"), cidr("10.32.0.0/12")
    s = Store(path)
    a = s.load_peer(s.open([inner], "t", static=[outer]), inner, 30).allocator
    assert do(s, a, Claim("s", *parse_addr("10.1.2.3")), 1000.0)["ok"]
    assert do(s, a, Allocate("r", inner), 1000.0)["address"] == "10.32.0.1/12"
    do(s, a, Release("s"), 1001.0)
    do(s, a, Release("r"), 1002.0)

    def freed(a):
        return {str(u): list(fl.items()) for u, fl in a.freed.items() if len(fl)}
    before = freed(a)
    assert before == {str(outer): [(parse_addr("10.1.2.3")[1], 1001.0)],
                      str(inner): [(parse_addr("10.32.0.1")[1], 1002.0)]}
    s.close()
    s = Store(path)
    assert freed(s.load_peer(s.open(None, "t"), inner, 30).allocator) == before
    s.close()
