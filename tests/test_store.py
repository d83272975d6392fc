"""The database: creation, refusals that leave the file untouched, migrations, plain readability."""
import hashlib
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import apsw
import pytest

from appliance import store as store_mod
from appliance.core.addr import cidr, format_addr, parse_addr
from appliance.core.messages import Allocate, Claim, Release
from appliance.core.spare import SPARE
from appliance.store import APPLICATION_ID, Store, StoreError

from .conftest import need_tool

RANGE = [cidr("10.32.0.0/12")]


def file_digest(path) -> str:
    """The bytes of a database file and its WAL companions."""
    h = hashlib.sha256()
    for p in (Path(path), Path(f"{path}-wal"), Path(f"{path}-shm")):
        h.update(p.name.encode())
        h.update(p.read_bytes() if p.exists() else b"<none>")
    return h.hexdigest()


def make_db(path, allocations=0):
    s = Store(path)
    loaded = s.open(RANGE, "t")
    a = s.load_peer(loaded, RANGE[0], 30).allocator
    for i in range(allocations):
        s.commit(a.apply(Allocate(f"h{i}"), 1000.0 + i)[1])
    s.close()
    return loaded


def open_two_ranges(path):
    """A new database with RANGE and an IPv6 range: (store, allocator, the IPv6 range)."""
    s, v6 = Store(path), cidr("fd00::/64")
    return s, s.load_peer(s.open([*RANGE, v6], "t"), RANGE[0], 30).allocator, v6


def as_version_6(c):
    """The table version 7 changed, as version 6 had it: freed rows naming their universe,
    the innermost one holding the address."""
    unis = [cidr(u) for (u,) in c.execute("SELECT cidr FROM universes WHERE kind != 'spare'")]
    rows = [(a, str(max((u for u in unis if parse_addr(a) in u), key=lambda u: u.prefix)), t)
            for a, t in c.execute("SELECT address, freed_at FROM freed")]
    c.execute("DROP TABLE freed; CREATE TABLE freed (address TEXT PRIMARY KEY, universe TEXT "
              "NOT NULL REFERENCES universes (cidr), freed_at REAL NOT NULL) STRICT, "
              "WITHOUT ROWID; PRAGMA user_version = 6")
    c.executemany("INSERT INTO freed VALUES (?, ?, ?)", rows)


def as_version_5(c):
    """The table version 6 changed, as version 5 had it: allocations with a rowid and a
    unique index on (handle, subnet), the view held over it."""
    as_version_6(c)
    c.execute("DROP VIEW held; "
              "CREATE TABLE a5 (address TEXT PRIMARY KEY, universe TEXT REFERENCES universes "
              "(cidr), subnet TEXT NOT NULL, handle TEXT NOT NULL, anchor TEXT, "
              "allocated_at REAL NOT NULL) STRICT; "
              "INSERT INTO a5 SELECT * FROM allocations; DROP TABLE allocations; "
              "ALTER TABLE a5 RENAME TO allocations; "
              "CREATE UNIQUE INDEX allocations_handle ON allocations (handle, subnet); "
              "CREATE VIEW held AS SELECT handle, address || '/' || substr(subnet, "
              "instr(subnet, '/') + 1) AS address, subnet, anchor, datetime(allocated_at, "
              "'unixepoch') AS allocated FROM allocations ORDER BY handle; "
              "PRAGMA user_version = 5")


def as_version_4(c):
    """The tables version 5 changed, as version 4 had them: universes of kind 'range' or
    'static' only (its CHECK word for word), no spare universes, nor their ring rows."""
    as_version_5(c)
    c.execute("DELETE FROM ring WHERE universe IN (SELECT cidr FROM universes "
              "WHERE kind = 'spare'); "
              "CREATE TABLE u4 (cidr TEXT PRIMARY KEY, "
              "family INTEGER NOT NULL CHECK (family IN (4, 6)), "
              "kind TEXT NOT NULL DEFAULT 'range' CHECK (kind IN ('range', 'static'))) STRICT; "
              "INSERT INTO u4 SELECT cidr, family, kind FROM universes WHERE kind != 'spare'; "
              "DROP TABLE universes; ALTER TABLE u4 RENAME TO universes; "
              "PRAGMA user_version = 4")


def as_version_3(c):
    """The tables version 4 changed, as version 3 had them: freed with a rowid, no spans."""
    as_version_4(c)
    c.execute("DROP TABLE freed_spans; "
              "CREATE TABLE f3 (address TEXT PRIMARY KEY, universe TEXT NOT NULL REFERENCES "
              "universes (cidr), freed_at REAL NOT NULL) STRICT; "
              "INSERT INTO f3 SELECT * FROM freed; DROP TABLE freed; "
              "ALTER TABLE f3 RENAME TO freed; PRAGMA user_version = 3")


def as_version_2(c):
    """The tables version 3 changed, as version 2 had them (universes without a kind, one
    reservation per address, for good)."""
    as_version_3(c)
    c.execute("CREATE TABLE u2 (cidr TEXT PRIMARY KEY, family INTEGER NOT NULL) STRICT; "
              "INSERT INTO u2 SELECT cidr, family FROM universes; DROP TABLE universes; "
              "ALTER TABLE u2 RENAME TO universes; "
              "DROP TABLE reserved; CREATE TABLE reserved (address TEXT PRIMARY KEY, "
              "universe TEXT NOT NULL REFERENCES universes (cidr), note TEXT NOT NULL) STRICT; "
              "PRAGMA user_version = 2")


def refuses(path, match, universes=RANGE):
    before = file_digest(path)
    with pytest.raises(StoreError, match=match):
        Store(path).open(universes, "t")
    assert file_digest(path) == before, "a refused database must be left as it was"


def test_create(tmp_path):
    path = tmp_path / "ipamd.db"
    loaded = make_db(path)
    assert loaded.created and len(loaded.peer_id) == 16
    c = apsw.Connection(str(path))
    assert c.execute("PRAGMA application_id").fetchall()[0][0] == APPLICATION_ID
    assert c.execute("PRAGMA user_version").fetchall()[0][0] == store_mod.SCHEMA_VERSION
    assert c.execute("PRAGMA journal_mode").fetchall()[0][0] == "wal"
    assert c.execute("SELECT start, owner, version FROM ring WHERE universe = ?",
                     (str(RANGE[0]),)).fetchall() == [("10.32.0.0", loaded.peer_id, 1)]
    assert c.execute("SELECT cidr, family, kind, added FROM universes ORDER BY rowid").fetchall() \
        == [("10.32.0.0/12", 4, "range", 0), ("0.0.0.0/0", 4, "spare", 0),
            ("::/0", 6, "spare", 0)]
    assert (loaded.ranges, loaded.spare, loaded.founding) == (RANGE, list(SPARE), RANGE)
    again = Store(path).open(None, "t")
    assert (again.peer_id, again.cluster_id, again.created) == (loaded.peer_id, loaded.cluster_id,
                                                                False)


@pytest.mark.parametrize("durability, level", [("process", 1), ("power", 2)])
def test_durability_maps_to_synchronous(tmp_path, durability, level):
    s = Store(tmp_path / "ipamd.db", durability)
    s.open(RANGE, "t")
    assert s.conn.execute("PRAGMA synchronous").fetchall()[0][0] == level
    s.close()


def test_refuses_text_file(tmp_path):
    path = tmp_path / "ipamd.db"
    path.write_text("these are not the pages you are looking for\n" * 100)
    refuses(path, "not a usable SQLite database")


def test_refuses_foreign_sqlite(tmp_path):
    path = tmp_path / "ipamd.db"
    c = apsw.Connection(str(path))
    c.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT); "
              "INSERT INTO customers VALUES (1, 'x')")
    c.close()
    refuses(path, "another application")


def test_refuses_newer_schema(tmp_path):
    path = tmp_path / "ipamd.db"
    make_db(path)
    c = apsw.Connection(str(path))
    c.execute("PRAGMA user_version = 99")
    c.close()
    refuses(path, "schema version 99, newer")


def test_refuses_corrupt(tmp_path):
    path = tmp_path / "ipamd.db"
    make_db(path, allocations=2000)
    data = bytearray(path.read_bytes())
    assert len(data) > 8 * 4096
    data[5 * 4096:5 * 4096 + 200] = os.urandom(200)  # scribble over a b-tree page
    path.write_bytes(bytes(data))
    refuses(path, "corrupt|not a usable")


def test_refuses_a_flag_range_the_database_lacks(tmp_path):
    path = tmp_path / "ipamd.db"
    make_db(path)
    for flags in ([cidr("10.1.0.0/16")], [*RANGE, cidr("10.1.0.0/16")]):
        before = file_digest(path)
        with pytest.raises(StoreError) as e:
            Store(path).open(flags, "t")
        assert str(e.value) == (
            f"{path} belongs to a cluster with ranges 10.32.0.0/12, but this launch asked for "
            "10.1.0.0/16 too; add a range to the cluster with `ipamd range add 10.1.0.0/16` on "
            "a running host, or use another --data-dir for a new cluster")
        assert file_digest(path) == before, "a refused database must be left as it was"


def test_the_database_is_the_truth_flags_may_name_a_subset_of_its_ranges(tmp_path):
    # A range added online (an AddUniverse row, as the core writes it) is kept when the host
    # restarts with the --iprange flags it was first started with, or with none.
    from appliance.core import messages as m
    path = tmp_path / "ipamd.db"
    first = make_db(path)
    s = Store(path)
    s.open(RANGE, "t")
    s.commit([m.AddUniverse("10.40.0.0/16", 4, "range"),
              m.AddUniverse("10.40.0.0/16", 4, "range"),  # learned twice: one row
              m.RingWrite("10.40.0.0/16", "10.40.0.0", "10.40.255.255", first.peer_id, 1,
                          0, first.peer_id, 9)])
    assert s.conn.execute("SELECT cidr, family, kind, added FROM universes WHERE added = 1"
                          ).fetchall() == [("10.40.0.0/16", 4, "range", 1)]
    s.close()
    added = cidr("10.40.0.0/16")
    for flags in (RANGE, None, [added], [added, *RANGE]):
        s = Store(path)
        loaded = s.open(flags, "t")
        assert loaded.ranges == [*RANGE, added] and loaded.founding == RANGE, flags
        assert loaded.universes == [*RANGE, *SPARE, added]  # as made or learned
        peer = s.load_peer(loaded, RANGE[0], 30)
        reply, rows = peer.allocator.apply(Allocate("x", added), 1000.0)
        assert reply["address"] == "10.40.0.1/16", reply  # served without a restart of mind
        s.close()


def test_load_peer_reads_universes_added_after_open(tmp_path):
    # A rebuild of memory (after a failed commit) must see a range added since start.
    from appliance.core import messages as m
    path = tmp_path / "ipamd.db"
    s = Store(path)
    loaded = s.open(RANGE, "t")
    s.commit([m.AddUniverse("fd40::/64", 6, "range"),
              m.RingWrite("fd40::/64", "fd40::", "fd40::ffff:ffff:ffff:ffff", loaded.peer_id,
                          1, 0, loaded.peer_id, 3)])
    peer = s.load_peer(loaded, RANGE[0], 30)
    reply, _ = peer.allocator.apply(Allocate("v6", cidr("fd40::/64")), 1000.0)
    assert reply["address"] == "fd40::1/64", reply
    s.close()


def test_migration_applies_in_order(tmp_path, monkeypatch):
    path = tmp_path / "ipamd.db"
    make_db(path, allocations=3)
    now = store_mod.SCHEMA_VERSION
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", now + 2)
    migrations = {now: "ALTER TABLE allocations ADD COLUMN note TEXT",
                  now + 1: "UPDATE allocations SET note = 'migrated'"}
    s = Store(path)
    s.open(None, "t", migrations=migrations)
    assert s.conn.execute("PRAGMA user_version").fetchall()[0][0] == now + 2
    assert {r[0] for r in s.conn.execute("SELECT note FROM allocations")} == {"migrated"}
    s.close()


def test_failed_migration_changes_nothing(tmp_path, monkeypatch):
    path = tmp_path / "ipamd.db"
    make_db(path, allocations=3)
    now = store_mod.SCHEMA_VERSION
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", now + 2)
    before = apsw.Connection(str(path)).execute("SELECT * FROM allocations").fetchall()
    migrations = {now: "ALTER TABLE allocations ADD COLUMN note TEXT",
                  now + 1: "UPDATE no_such_table SET x = 1"}
    with pytest.raises(StoreError, match="migrating .* failed"):
        Store(path).open(None, "t", migrations=migrations)
    c = apsw.Connection(str(path))
    assert c.execute("PRAGMA user_version").fetchall()[0][0] == now
    assert c.execute("SELECT * FROM allocations").fetchall() == before  # no 'note' column


def test_missing_migration_refused(tmp_path, monkeypatch):
    path = tmp_path / "ipamd.db"
    make_db(path)
    now = store_mod.SCHEMA_VERSION
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", now + 1)
    refuses(path, f"no migration from version {now}", None)


def test_version_2_reservations_are_kept_for_good(tmp_path):
    # Before holders, a gateway named by a request was reserved for good: it stays so.
    path = tmp_path / "ipamd.db"
    make_db(path)
    c = apsw.Connection(str(path))
    as_version_2(c)
    c.execute(f"INSERT INTO reserved VALUES ('10.32.0.1', '{RANGE[0]}', 'gateway')")
    c.close()
    s = Store(path)
    loaded = s.open(None, "t")
    assert s.conn.execute("SELECT address, holder, note FROM reserved").fetchall() == [
        ("10.32.0.1", "kept", "gateway")]
    a = s.load_peer(loaded, RANGE[0], 30).allocator
    assert a.reserved == {(4, parse_addr("10.32.0.1")[1]): {"kept"}}
    reply, _ = a.apply(Claim("x", *parse_addr("10.32.0.1")), 1.0)
    assert reply["error"]["code"] == "reserved"
    s.close()


def test_version_4_database_migrates_to_ranges_online(tmp_path):
    # A version-4 database with something in every table that refers to universes: the
    # rebuilt universes table keeps every row and reference, and gains the spare universes
    # with no ring rows (such a cluster cannot add ranges: the core says not_supported).
    from appliance.core import messages as m
    path = tmp_path / "ipamd.db"
    s = Store(path)
    loaded = s.open(RANGE, "t", static=[cidr("10.0.0.0/13")])
    a = s.load_peer(loaded, RANGE[0], 30).allocator
    for i in range(3):
        s.commit(a.apply(Allocate(f"h{i}"), 1000.0 + i)[1])
    s.commit(a.apply(Release("h1"), 1010.0)[1])
    s.commit([m.Reserve("10.32.0.9", "kept", "10.32.0.0/12", "gateway"),
              m.FreedSpan("10.32.0.0/12", "10.32.1.0", "10.32.1.9")])
    s.close()
    c = apsw.Connection(str(path))
    as_version_4(c)
    tables = ("ring", "allocations", "freed", "freed_spans", "reserved")
    before = {t: c.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in tables}
    before["freed"] = [(a, t) for a, _, t in before["freed"]]  # version 7 drops the universe
    c.close()
    s = Store(path)
    again = s.open(RANGE, "t")
    c = s.conn
    assert c.execute("PRAGMA user_version").fetchall()[0][0] == store_mod.SCHEMA_VERSION
    assert c.execute("SELECT cidr, family, kind, added FROM universes ORDER BY rowid"
                     ).fetchall() == [("10.32.0.0/12", 4, "range", 0),
                                      ("10.0.0.0/13", 4, "static", 0),
                                      ("0.0.0.0/0", 4, "spare", 0), ("::/0", 6, "spare", 0)]
    assert {t: c.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in tables} == before
    assert c.execute("SELECT count(*) FROM ring WHERE universe IN ('0.0.0.0/0', '::/0')"
                     ).fetchall() == [(0,)]
    assert c.execute("PRAGMA foreign_key_check").fetchall() == []
    assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert "REFERENCES universes" in c.execute(
        "SELECT sql FROM sqlite_schema WHERE name = 'ring'").fetchall()[0][0]
    assert (again.ranges, again.static, again.spare, again.founding) == (
        RANGE, [cidr("10.0.0.0/13")], list(SPARE), [*RANGE, cidr("10.0.0.0/13")])
    peer = s.load_peer(again, RANGE[0], 30)
    assert sorted(peer.allocator.by_handle) == ["h0", "h2"]
    s.close()


def test_version_6_database_migrates_to_freed_rows_without_their_universe(tmp_path):
    # Freed rows in an IPv4 and an IPv6 range keep their address and time; loaded again, each
    # is in its own range's quarantine, in the order it was freed.
    path = tmp_path / "ipamd.db"
    s, a, v6 = open_two_ranges(path)
    for i in range(3):
        s.commit(a.apply(Allocate(f"h{i}"), 1000.0)[1])
        s.commit(a.apply(Allocate(f"h{i}", v6), 1000.0)[1])
    s.commit(a.apply(Release("h1"), 1010.0)[1])
    s.commit(a.apply(Release("h0"), 1011.0)[1])
    s.close()
    c = apsw.Connection(str(path))
    as_version_6(c)
    assert c.execute("SELECT * FROM freed ORDER BY freed_at, address").fetchall() == [
        ("10.32.0.2", "10.32.0.0/12", 1010.0), ("fd00::2", "fd00::/64", 1010.0),
        ("10.32.0.1", "10.32.0.0/12", 1011.0), ("fd00::1", "fd00::/64", 1011.0)]
    c.close()
    s = Store(path)
    again = s.open(None, "t")
    c = s.conn
    assert c.execute("PRAGMA user_version").fetchall()[0][0] == 7
    assert c.execute("SELECT * FROM freed ORDER BY freed_at, address").fetchall() == [
        ("10.32.0.2", 1010.0), ("fd00::2", 1010.0), ("10.32.0.1", 1011.0), ("fd00::1", 1011.0)]
    a = s.load_peer(again, RANGE[0], 30).allocator
    assert [r["quarantined"] for r in a.status(1020.0)["universes"]
            if not r["static"]] == [2, 2]
    assert {str(u): [(format_addr(u.family, x), t) for x, t in fl.items()]
            for u, fl in a.freed.items() if len(fl)} == {
        "10.32.0.0/12": [("10.32.0.2", 1010.0), ("10.32.0.1", 1011.0)],
        "fd00::/64": [("fd00::2", 1010.0), ("fd00::1", 1011.0)]}
    assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    s.close()


def test_version_5_database_migrates_to_allocations_by_address(tmp_path):
    # Every kind of allocation row (IPv4 and IPv6, anchored, one handle in two subnets):
    # kept as it was, now in one b-tree keyed by address, without the handle index; the
    # view for people reads it as before.
    path = tmp_path / "ipamd.db"
    s, a, v6 = open_two_ranges(path)
    for i in range(4):
        s.commit(a.apply(Allocate(f"h{i}"), 1000.0 + i)[1])
    s.commit(a.apply(Allocate("h1", v6), 1005.0)[1])
    s.commit(a.apply(Release("h2"), 1010.0)[1])
    s.close()
    c = apsw.Connection(str(path))
    as_version_5(c)
    before = c.execute("SELECT * FROM allocations ORDER BY address").fetchall()
    held = c.execute("SELECT * FROM held").fetchall()
    c.close()
    assert len(before) == 4 and len(held) == 4
    s = Store(path)
    again = s.open(None, "t")
    c = s.conn
    assert c.execute("PRAGMA user_version").fetchall()[0][0] == store_mod.SCHEMA_VERSION
    assert c.execute("SELECT * FROM allocations ORDER BY address").fetchall() == before
    assert c.execute("SELECT * FROM held").fetchall() == held
    assert "WITHOUT ROWID" in c.execute(
        "SELECT sql FROM sqlite_schema WHERE name = 'allocations'").fetchall()[0][0]
    assert c.execute("SELECT name FROM sqlite_schema WHERE type = 'index' AND "
                     "tbl_name = 'allocations'").fetchall() == []  # the table is its key
    assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    peer = s.load_peer(again, RANGE[0], 30)
    assert {h: sorted(map(str, by)) for h, by in peer.allocator.by_handle.items()} == {
        "h0": ["10.32.0.0/12"], "h1": ["10.32.0.0/12", "fd00::/64"], "h3": ["10.32.0.0/12"]}
    s.close()


def test_handle_holding_two_addresses_in_a_subnet_refused(tmp_path):
    # Nothing in the schema stops it any more; opening does, and names the rows. One handle
    # in two subnets (IPv4 and IPv6) is the normal case and opens.
    path = tmp_path / "ipamd.db"
    v6 = cidr("fd00::/64")
    s = Store(path)
    a = s.load_peer(s.open([*RANGE, v6], "t"), RANGE[0], 30).allocator
    for req in (Allocate("h0"), Allocate("h1"), Allocate("h0", v6)):
        s.commit(a.apply(req, 1000.0)[1])
    s.close()
    s = Store(path)
    assert sorted(map(str, s.load_peer(s.open(None, "t"), RANGE[0], 30).allocator
                      .by_handle["h0"])) == ["10.32.0.0/12", "fd00::/64"]
    s.close()
    c = apsw.Connection(str(path))
    c.execute("UPDATE allocations SET handle = 'h0' WHERE handle = 'h1'")
    c.close()
    refuses(path, r"inconsistent: handle 'h0' holds 10\.32\.0\.1 10\.32\.0\.2 in "
            r"10\.32\.0\.0/12 \(one address per handle and subnet\); refusing to start", None)
    # The same subnet written another way (as no daemon writes it) is the same subnet.
    c = apsw.Connection(str(path))
    c.execute("UPDATE allocations SET subnet = '10.32.0.9/12' WHERE address = '10.32.0.2'")
    c.close()
    refuses(path, r"handle 'h0' holds 10\.32\.0\.1 10\.32\.0\.2 in 10\.32\.0\.0/12 \(one", None)


def test_version_1_database_migrates_to_the_peer_protocol_schema(tmp_path):
    # A version-1 database as the single-host release wrote it: no clock, no removals.
    path = tmp_path / "ipamd.db"
    loaded = make_db(path, allocations=3)
    c = apsw.Connection(str(path))
    as_version_2(c)
    c.execute("DROP TABLE clock; DROP TABLE removals; PRAGMA user_version = 1")
    c.close()
    s = Store(path)
    again = s.open(None, "t")
    assert s.conn.execute("PRAGMA user_version").fetchall()[0][0] == store_mod.SCHEMA_VERSION
    peer = s.load_peer(again, RANGE[0], 30)
    # Its one write is write number 1: the next write must not reuse that stamp.
    assert (peer.replica.seq, peer.replica.vector) == (1, {loaded.peer_id: 1})
    assert sorted(peer.allocator.by_handle) == ["h0", "h1", "h2"]
    s.close()


def test_peer_state_survives_a_restart(tmp_path):
    from appliance.core import messages as m
    path = tmp_path / "ipamd.db"
    loaded = make_db(path)
    s = Store(path)
    s.open(None, "t")
    s.commit([m.ClockWrite(7, ((loaded.peer_id, 7), ("other", 3))), m.PeerSeen("other"),
              m.Removal("gone", "other", "removed", 5.0), m.Standing("member", "")])
    s.close()
    s = Store(path)
    peer = s.load_peer(s.open(None, "t"), RANGE[0], 30)
    assert (peer.replica.seq, peer.replica.vector) == (7, {loaded.peer_id: 7, "other": 3})
    assert "other" in peer.seen and peer.removed == {"gone": "other"}
    s.close()


def test_readable_from_plain_sqlite3(tmp_path):
    sqlite3 = need_tool("sqlite3")
    path = tmp_path / "ipamd.db"
    s = Store(path)
    loaded = s.open([cidr("10.32.0.0/12"), cidr("fd00::/64")], "t")
    a = s.load_peer(loaded, cidr("10.32.0.0/12"), 30).allocator
    s.commit(a.apply(Allocate("web-1"), 1000.0)[1])
    s.commit(a.apply(Allocate("web-1", cidr("fd00::/64")), 1000.0)[1])
    s.commit(a.apply(Allocate("gone"), 1000.0)[1])
    s.commit(a.apply(Release("gone"), 1001.0)[1])
    # The daemon keeps its connection open, as a running daemon does.
    out = subprocess.run([sqlite3, str(path), "SELECT handle, address FROM held ORDER BY address;"
                          "SELECT address FROM freed;"],
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["web-1|10.32.0.1/12", "web-1|fd00::1/64", "10.32.0.2"]
    s.close()


def wal_frames(path) -> int:
    """Frames the WAL file holds (its high-water mark: a WAL started over is not truncated)."""
    return (path.stat().st_size - 32) // (4096 + 24)


def test_checkpoints_elsewhere_copy_then_finish_and_the_wal_starts_over(tmp_path):
    """With checkpoint_elsewhere no commit checkpoints, not even past SQLite's own 1000 pages:
    due() says when. A copy from another thread that cannot take everything (here a reader
    holds an older snapshot; in the daemon, commits made while it copies), then the finish,
    leave the whole WAL in the database file, and the next commit writes it from its start."""
    path, wal = tmp_path / "ipamd.db", tmp_path / "ipamd.db-wal"
    s = Store(path)
    loaded = s.open(RANGE, "t")
    a = s.load_peer(loaded, RANGE[0], 30).allocator
    dues = []
    s.checkpoint_elsewhere(lambda: dues.append(wal_frames(wal)), pages=1100)
    for i in range(1000):
        s.commit(a.apply(Allocate(f"h{i}"), 1000.0 + i)[1])
        if dues:
            break
    assert dues and dues[0] >= 1100, "the WAL was checkpointed by a commit"
    reader = apsw.Connection(str(path))
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM allocations").fetchall() == [(i + 1,)]
    s.commit(a.apply(Allocate("late"), 3000.0)[1])  # past the reader's snapshot
    with ThreadPoolExecutor(1) as pool:
        in_wal, copied = pool.submit(s.checkpoint_copy).result()
    assert copied == dues[0] < in_wal
    reader.execute("COMMIT")
    assert s.checkpoint_finish() == (in_wal, in_wal)
    high = wal_frames(wal)
    s.commit(a.apply(Allocate("next"), 3001.0)[1])
    assert wal_frames(wal) == high, "the WAL did not start over"
    s.close()
    assert reader.execute("SELECT count(*) FROM allocations").fetchall() == [(i + 3,)]


def test_a_wal_that_grew_is_cut_back_once_it_starts_over(tmp_path, monkeypatch):
    """Commits go on while a checkpoint copies, so the WAL can grow well past CHECKPOINT_PAGES;
    journal_size_limit cuts its file back when it starts over (disk use follows the live
    state, not the busiest moment)."""
    monkeypatch.setattr(store_mod, "CHECKPOINT_PAGES", 200)
    path, wal = tmp_path / "ipamd.db", tmp_path / "ipamd.db-wal"
    s = Store(path)
    a = s.load_peer(s.open(RANGE, "t"), RANGE[0], 30).allocator
    s.checkpoint_elsewhere(lambda: None, pages=10**9)  # no checkpoint until the test says
    for i in range(600):
        s.commit(a.apply(Allocate(f"h{i}"), 1000.0 + i)[1])
    assert wal_frames(wal) > 400
    s.checkpoint_copy()
    s.checkpoint_finish()
    s.commit(a.apply(Allocate("next"), 3000.0)[1])
    assert wal.stat().st_size <= 200 * 4096 + 10 * (4096 + 24), wal.stat().st_size
    s.close()


@pytest.mark.parametrize("sql, where", [
    ("INSERT INTO freed VALUES ('10.32.0.2', 900.0)", "table freed"),
    # Its row names no range: still found (the freed row's range is worked out).
    ("UPDATE allocations SET universe = NULL WHERE address = '10.32.0.2'; "
     "INSERT INTO freed VALUES ('10.32.0.2', 900.0)", "table freed"),
    ("INSERT INTO freed_spans VALUES ('10.32.0.4', '10.32.0.9', '10.32.0.0/12'), "
     "('10.32.0.2', '10.32.0.2', '10.32.0.0/12')",
     r"a span of table freed_spans \(10\.32\.0\.2-10\.32\.0\.2\)"),
])
def test_an_address_both_held_and_freed_is_refused(tmp_path, sql, where):
    """A database edited by hand: an address held and free at once would be handed out
    again (before, the core caught it only at that reuse, as a bug, every time). Loading
    refuses, names it, and changes nothing; without the row it loads."""
    path = tmp_path / "ipamd.db"
    make_db(path, allocations=3)
    refused_at_load(path, sql, rf"inconsistent: 10\.32\.0\.2 is held by handle 'h1' and is in "
                    rf"{where} \(an address held is never free\); refusing to start")
    c = apsw.Connection(str(path))
    c.execute("DELETE FROM freed; DELETE FROM freed_spans")
    c.close()
    s = Store(path)
    assert sorted(s.load_peer(s.open(None, "t"), RANGE[0], 30).allocator.by_handle) == \
        ["h0", "h1", "h2"]
    s.close()


def test_an_allocation_outside_the_range_its_row_names_is_refused(tmp_path):
    """A release would free it into a list that cannot hold it (found in review: it raised
    half-way, leaving the address neither held nor free). Loading refuses, names it, and
    changes nothing."""
    path = tmp_path / "ipamd.db"
    s, a, v6 = open_two_ranges(path)
    for i in range(2):
        s.commit(a.apply(Allocate(f"h{i}"), 1000.0)[1])
    s.close()
    refused_at_load(path, "UPDATE allocations SET universe = 'fd00::/64' WHERE address = "
                    "'10.32.0.2'", r"inconsistent: 10\.32\.0\.2 \(handle 'h1'\) is not in "
                    r"fd00::/64, the range its row in table allocations names; refusing to start")


def refused_at_load(path, sql, match):
    """sql run on the database; loading it then refuses with match and changes nothing."""
    c = apsw.Connection(str(path))
    c.execute(sql)
    c.close()
    before = file_digest(path)
    s = Store(path)
    loaded = s.open(None, "t")
    with pytest.raises(StoreError, match=match):
        s.load_peer(loaded, RANGE[0], 30)
    s.close()
    assert file_digest(path) == before
