"""The durable state: one SQLite file in WAL mode, written through apsw.

Opening checks before it writes anything: a file that is not SQLite, an SQLite file of another
application, a schema newer than this program knows, or a corrupt file is refused with a message
naming the problem, and left byte-for-byte as it was.
"""
from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path

import apsw

from .core.addr import Cidr, cidr, parse_addr
from .core.allocator import Allocator, Held
from .core.messages import FreeAddress, PutAllocation, Reserve, Row
from .core.ring import Entry, Ring
from .resources import schema_path

APPLICATION_ID = 0x69706D64  # "ipmd": marks the file as ours for `file`, sqlite3 and us
SCHEMA_VERSION = 1
# MIGRATIONS[n] brings a database at user_version n to n + 1; applied in one transaction.
MIGRATIONS: dict[int, str] = {}
SYNCHRONOUS = {"process": "NORMAL", "power": "FULL"}


class StoreError(Exception):
    """The database cannot be used; the message says why. Nothing was written."""


@dataclass
class Loaded:
    peer_id: str
    cluster_id: str
    universes: list[Cidr]
    created: bool


def cluster_id_for(universes: list[Cidr], bootstrap: str) -> str:
    text = "\0".join(["ipamd-cluster", *sorted(map(str, universes)), bootstrap])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Store:
    def __init__(self, path: Path, durability: str = "process"):
        self.path = Path(path)
        self.durability = durability
        self.conn: apsw.Connection | None = None

    # -- opening -------------------------------------------------------------------------------

    def open(self, universes: list[Cidr] | None, nickname: str,
             migrations: dict[int, str] | None = None) -> Loaded:
        """Open or create; `universes` None means "whatever the database has"."""
        migrations = MIGRATIONS if migrations is None else migrations
        exists = self.path.exists()
        flags = apsw.SQLITE_OPEN_READWRITE | (0 if exists else apsw.SQLITE_OPEN_CREATE)
        try:
            conn = apsw.Connection(str(self.path), flags=flags)
        except apsw.Error as e:
            raise StoreError(f"cannot open database {self.path}: {e}") from None
        self.conn = conn
        try:
            conn.set_busy_timeout(5000)
            version = self._check(conn, exists)
            if version is None:
                if not universes:
                    raise StoreError(f"{self.path} is new: name its ranges with --iprange")
                loaded = self._create(conn, universes, nickname)
            else:
                if version < SCHEMA_VERSION:
                    self._migrate(conn, version, migrations)
                loaded = self._meta(conn, universes)
            conn.execute(f"PRAGMA synchronous = {SYNCHRONOUS[self.durability]}")
            return loaded
        except BaseException:
            conn.close()
            self.conn = None
            raise

    def _check(self, conn: apsw.Connection, exists: bool) -> int | None:
        """Refuse what is not ours; None for a new (empty) database, else its schema version."""
        try:
            app_id = conn.execute("PRAGMA application_id").fetchall()[0][0]
            version = conn.execute("PRAGMA user_version").fetchall()[0][0]
            tables = conn.execute("SELECT count(*) FROM sqlite_schema").fetchall()[0][0]
        except (apsw.NotADBError, apsw.CorruptError) as e:
            raise StoreError(f"{self.path} is not a usable SQLite database ({e}); refusing to "
                             "start. Move it away or point --data-dir elsewhere.") from None
        if app_id == 0 and version == 0 and tables == 0:
            return None
        if app_id != APPLICATION_ID:
            raise StoreError(f"{self.path} is an SQLite database of another application "
                             f"(application_id {app_id:#x}); refusing to touch it")
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema version {version}, newer than the {SCHEMA_VERSION} "
                             "this ipamd knows; run the newer ipamd, or restore a backup")
        try:
            problems = [r[0] for r in conn.execute("PRAGMA quick_check")]
        except (apsw.CorruptError, apsw.NotADBError) as e:
            problems = [str(e)]
        if problems != ["ok"]:
            raise StoreError(f"{self.path} is corrupt: {'; '.join(problems[:5])}; refusing to "
                             "start. Restore a backup, or remove it and rejoin as a new peer.")
        return version

    def _create(self, conn: apsw.Connection, universes: list[Cidr], nickname: str) -> Loaded:
        conn.execute("PRAGMA journal_mode = WAL")
        peer_id = secrets.token_hex(8)
        # A single host owning everything is its own cluster; issue #3 adds seed and quorum
        # bootstrap, which derive the identity from their decision instead.
        cluster = cluster_id_for(universes, "single:" + peer_id)
        with conn:
            conn.execute(schema_path().read_text())
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("peer_id", peer_id), ("cluster_id", cluster), ("bootstrap", "single")])
            for u in universes:
                conn.execute("INSERT INTO universes VALUES (?, ?)", (str(u), u.family))
                e = Ring.single_owner(u, peer_id, (peer_id, 1)).entries[0]
                conn.execute("INSERT INTO ring VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (str(u), u.addr(e.start), u.addr(e.end - 1), e.owner, e.version,
                              e.free_hint, *e.stamp))
            conn.execute("INSERT INTO peers (id, nickname) VALUES (?, ?)", (peer_id, nickname))
        return Loaded(peer_id, cluster, list(universes), True)

    def _migrate(self, conn: apsw.Connection, version: int, migrations: dict[int, str]) -> None:
        missing = [v for v in range(version, SCHEMA_VERSION) if v not in migrations]
        if missing:
            raise StoreError(f"{self.path} has schema version {version} and this ipamd has no "
                             f"migration from version {missing[0]}")
        conn.execute("PRAGMA journal_mode = WAL")
        try:
            with conn:
                for v in range(version, SCHEMA_VERSION):
                    conn.execute(migrations[v])
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except apsw.Error as e:
            raise StoreError(f"migrating {self.path} from schema {version} failed ({e}); "
                             "the database was left as it was") from None

    def _meta(self, conn: apsw.Connection, universes: list[Cidr] | None) -> Loaded:
        conn.execute("PRAGMA journal_mode = WAL")
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        have = [cidr(r[0]) for r in conn.execute("SELECT cidr FROM universes")]
        if universes is not None and sorted(universes) != sorted(have):
            raise StoreError(
                f"{self.path} belongs to a cluster with ranges {', '.join(map(str, have))}, but "
                f"this launch asked for {', '.join(map(str, universes))}; give the same "
                "--iprange, or use another --data-dir for a new cluster")
        return Loaded(meta["peer_id"], meta["cluster_id"], have, False)

    # -- reading -------------------------------------------------------------------------------

    def load_allocator(self, loaded: Loaded, default_subnet: Cidr, reuse_delay: float,
                       gateways: frozenset = frozenset()) -> Allocator:
        conn = self.conn
        by_text = {str(u): u for u in loaded.universes}
        entries: dict[str, list[Entry]] = {str(u): [] for u in loaded.universes}
        for universe, start, last, owner, version, hint, sp, sq in conn.execute(
                "SELECT universe, start, last, owner, version, free_hint, stamp_peer, stamp_seq "
                "FROM ring"):
            entries[universe].append(Entry(parse_addr(start)[1], parse_addr(last)[1] + 1, owner,
                                           version, hint, (sp, sq)))
        rings = [Ring(u, entries[str(u)]) for u in loaded.universes]
        alloc = Allocator(loaded.peer_id, rings, default_subnet, reuse_delay, gateways)
        subnets: dict[str, Cidr] = {}
        for address, universe, subnet, handle, anchor, at in conn.execute(
                "SELECT address, universe, subnet, handle, anchor, allocated_at FROM allocations"):
            family, value = parse_addr(address)
            s = subnets.get(subnet) or subnets.setdefault(subnet, cidr(subnet))
            alloc.load_allocation(Held(family, value, by_text.get(universe), s, handle, anchor, at,
                                       address))
        for address, universe, freed_at in conn.execute(
                "SELECT address, universe, freed_at FROM freed ORDER BY freed_at, address"):
            alloc.load_freed(by_text[universe], parse_addr(address)[1], freed_at)
        for (address,) in conn.execute("SELECT address FROM reserved"):
            alloc.load_reserved(parse_addr(address))
        return alloc

    # -- writing -------------------------------------------------------------------------------

    def commit(self, rows: list[Row]) -> None:
        """All rows in one transaction: either every one is durable or none is."""
        conn = self.conn
        with conn:
            for r in rows:
                if isinstance(r, PutAllocation):
                    conn.execute("DELETE FROM freed WHERE address = ?", (r.address,))
                    conn.execute("INSERT INTO allocations VALUES (?, ?, ?, ?, ?, ?)",
                                 (r.address, r.universe, r.subnet, r.handle, r.anchor,
                                  r.allocated_at))
                elif isinstance(r, FreeAddress):
                    conn.execute("DELETE FROM allocations WHERE address = ?", (r.address,))
                    if r.universe is not None:
                        conn.execute("INSERT OR REPLACE INTO freed VALUES (?, ?, ?)",
                                     (r.address, r.universe, r.freed_at))
                elif isinstance(r, Reserve):
                    conn.execute("DELETE FROM freed WHERE address = ?", (r.address,))
                    conn.execute("INSERT OR IGNORE INTO reserved VALUES (?, ?, ?)",
                                 (r.address, r.universe, r.note))
                else:
                    raise TypeError(f"not a row: {r!r}")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def file_digest(path: Path) -> str:
    """For tests and refusal checks: the bytes of a file and its WAL companions."""
    h = hashlib.sha256()
    for p in (Path(path), Path(f"{path}-wal"), Path(f"{path}-shm")):
        h.update(p.name.encode())
        h.update(p.read_bytes() if p.exists() else b"<none>")
    return h.hexdigest()



