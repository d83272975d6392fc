"""The durable state: one SQLite file in WAL mode, written through apsw.

Opening checks before it writes anything: a file that is not SQLite, an SQLite file of another
application, a schema newer than this program knows, or a corrupt file is refused with a message
naming the problem, and left byte-for-byte as it was.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path

import apsw

from .core.addr import Cidr, cidr
from .core.durable import Durable
from .core.messages import (AddUniverse, ClockWrite, DropFreedSpan, ForgetFreed, FreeAddress, FreedSpan,
                            PeerSeen, PutAllocation, Removal, Reserve, RingWrite, Row, SeedIds,
                            Standing, Unreserve, Vote)
from .core.peer import Peer
from .core.spare import SPARE
from .resources import schema_path

APPLICATION_ID = 0x69706D64  # "ipmd": marks the file as ours for `file`, sqlite3 and us
SCHEMA_VERSION = 7
# MIGRATIONS[n] brings a database at user_version n to n + 1; applied in one transaction.
MIGRATIONS: dict[int, str] = {
    # 2: the peer protocol's state. A version-1 database is a single host whose ring entries
    # are all its write number 1.
    1: """
    CREATE TABLE clock (
        id     INTEGER PRIMARY KEY CHECK (id = 1),
        seq    INTEGER NOT NULL CHECK (seq >= 0),
        vector TEXT NOT NULL
    ) STRICT;
    CREATE TABLE removals (
        target TEXT PRIMARY KEY,
        by     TEXT NOT NULL,
        state  TEXT NOT NULL CHECK (state IN ('promised', 'removed')),
        at     REAL NOT NULL
    ) STRICT;
    INSERT INTO clock SELECT 1, coalesce(max(stamp_seq), 0),
        json_object((SELECT value FROM meta WHERE key = 'peer_id'), coalesce(max(stamp_seq), 0))
        FROM ring WHERE stamp_peer = (SELECT value FROM meta WHERE key = 'peer_id');
    """,
    # 3: a gateway is reserved while it has holders. Reservations made before were for good:
    # their holder is "kept". Universes have a kind: a range, or static (claim-only) space.
    2: """
    ALTER TABLE universes ADD COLUMN kind TEXT NOT NULL DEFAULT 'range'
        CHECK (kind IN ('range', 'static'));
    CREATE TABLE reserved_3 (
        address  TEXT NOT NULL,
        holder   TEXT NOT NULL,
        universe TEXT NOT NULL REFERENCES universes (cidr),
        note     TEXT NOT NULL,
        PRIMARY KEY (address, holder)
    ) STRICT;
    INSERT INTO reserved_3 SELECT address, 'kept', universe, note FROM reserved;
    DROP TABLE reserved;
    ALTER TABLE reserved_3 RENAME TO reserved;
    """,
    # 4: freed addresses cost what the live state needs, not what history left: the most
    # recently freed stay one row each (now without a rowid: one b-tree, not two), the rest
    # fold into spans (allocator.py, freelist.py). The rows a version-3 database has are all
    # kept, in their order; the first address freed afterwards folds the excess.
    3: """
    CREATE TABLE freed_4 (
        address  TEXT PRIMARY KEY,
        universe TEXT NOT NULL REFERENCES universes (cidr),
        freed_at REAL NOT NULL
    ) STRICT, WITHOUT ROWID;
    INSERT INTO freed_4 SELECT address, universe, freed_at FROM freed;
    DROP TABLE freed;
    ALTER TABLE freed_4 RENAME TO freed;
    CREATE TABLE freed_spans (
        start    TEXT PRIMARY KEY,
        last     TEXT NOT NULL,
        universe TEXT NOT NULL REFERENCES universes (cidr)
    ) STRICT, WITHOUT ROWID;
    """,
    # 5: ranges online. Universes gain the kind 'spare' (SQLite cannot change a CHECK, so the
    # table is rebuilt; the tables that refer to it name it, and keep doing so once the new
    # one takes its name) and `added`. The spare universes get no ring rows: a cluster made
    # before has no owner of its spare space, so it cannot add ranges (the core says so).
    4: """
    CREATE TABLE universes_5 (
        cidr   TEXT PRIMARY KEY,
        family INTEGER NOT NULL CHECK (family IN (4, 6)),
        kind   TEXT NOT NULL DEFAULT 'range' CHECK (kind IN (
        'range', 'static', 'spare', 'blocks', 'block', 'lease', 'tenant', 'names')),
        added  INTEGER NOT NULL DEFAULT 0 CHECK (added IN (0, 1))
    ) STRICT;
    INSERT INTO universes_5 (cidr, family, kind) SELECT cidr, family, kind FROM universes
        ORDER BY rowid;
    DROP TABLE universes;
    ALTER TABLE universes_5 RENAME TO universes;
    INSERT INTO universes (cidr, family, kind) VALUES ('0.0.0.0/0', 4, 'spare'),
        ('::/0', 6, 'spare');
    -- What the carve markers in the rings say (core/spare.py): each carved universe, its state
    -- (range, retired, static, blocks, block, lease, tenant, names) and what it is for.
    CREATE VIEW IF NOT EXISTS carved AS
        SELECT DISTINCT substr(owner, 2, instr(owner, ' ') - 2) AS state,
               CASE WHEN instr(rest, ' ') > 0 THEN substr(rest, 1, instr(rest, ' ') - 1)
                    ELSE rest END AS cidr,
               CASE WHEN instr(rest, ' ') > 0 THEN substr(rest, instr(rest, ' ') + 1)
                    ELSE '' END AS args,
               universe AS parent
        FROM (SELECT owner, universe, substr(owner, instr(owner, ' ') + 1) AS rest FROM ring
              WHERE owner LIKE '@%' AND owner NOT LIKE '@dissolved %');
    CREATE VIEW IF NOT EXISTS tenants AS
        SELECT substr(args, 1, instr(args, ' ') - 1) AS tenant, cidr AS key,
               (SELECT group_concat(b.cidr, ' ') FROM carved b WHERE b.state = 'block'
                AND b.args = substr(t.args, 1, instr(t.args, ' ') - 1)) AS blocks
        FROM carved t WHERE state = 'tenant';
    CREATE VIEW IF NOT EXISTS blocks AS
        SELECT cidr AS block, CASE state WHEN 'block' THEN 'tenant' ELSE 'handle' END AS leased_to,
               args AS name FROM carved WHERE state IN ('block', 'lease');
    """,
    # 6: allocations in one b-tree keyed by address (without a rowid), and no index on
    # handle: a commit writes about half the pages (schema.sql says why). The view that reads
    # the table is made again: SQLite will not rename a table over a view's reference.
    5: """
    DROP VIEW IF EXISTS held;
    DROP INDEX IF EXISTS allocations_handle;
    CREATE TABLE allocations_6 (
        address      TEXT PRIMARY KEY,
        universe     TEXT REFERENCES universes (cidr),
        subnet       TEXT NOT NULL,
        handle       TEXT NOT NULL,
        anchor       TEXT,
        allocated_at REAL NOT NULL
    ) STRICT, WITHOUT ROWID;
    INSERT INTO allocations_6 SELECT address, universe, subnet, handle, anchor, allocated_at
        FROM allocations;
    DROP TABLE allocations;
    ALTER TABLE allocations_6 RENAME TO allocations;
    CREATE VIEW held AS
        SELECT handle, address || '/' || substr(subnet, instr(subnet, '/') + 1) AS address,
               subnet, anchor, datetime(allocated_at, 'unixepoch') AS allocated
        FROM allocations ORDER BY handle;
    """,
    # 7: freed rows without their universe (the innermost one holding the address, as the
    # core finds it for every other row): a third of each row, and the quarantine has a row
    # per address freed in the last --reuse-delay seconds (schema.sql).
    6: """
    CREATE TABLE freed_7 (
        address  TEXT PRIMARY KEY,
        freed_at REAL NOT NULL
    ) STRICT, WITHOUT ROWID;
    INSERT INTO freed_7 SELECT address, freed_at FROM freed;
    DROP TABLE freed;
    ALTER TABLE freed_7 RENAME TO freed;
    """,
}
SYNCHRONOUS = {"process": "NORMAL", "power": "FULL"}
# WAL pages (4 KiB each) that make a checkpoint due. SQLite's default is 1000; each checkpoint
# ends with fsyncs on the event loop (Store.checkpoint_finish), so fewer, larger ones cost the
# loop less. The WAL is read through at start: 16 MiB of it costs milliseconds.
CHECKPOINT_PAGES = 4000


class StoreError(Exception):
    """The database cannot be used; the message says why. Nothing was written."""


@dataclass
class Loaded:
    peer_id: str
    cluster_id: str  # for a quorum, the base identity; the core derives the decided one
    universes: list[Cidr]  # ranges, static (claim-only) and spare ones, as _universes orders them
    created: bool
    mode: str = "single"
    meta: dict | None = None
    static: list[Cidr] = field(default_factory=list)
    note: str = ""  # something the operator should hear at start
    spare: list[Cidr] = field(default_factory=list)
    # The ranges and static universes the database was made with, not those added online: what
    # the peer hello compares (hosts learn added ranges at different times).
    founding: list[Cidr] = field(default_factory=list)

    @property
    def ranges(self) -> list[Cidr]:
        return [u for u in self.universes if u not in self.static and u not in self.spare]


def cluster_id_for(universes: list[Cidr], bootstrap: str) -> str:
    text = "\0".join(["ipamd-cluster", *sorted(map(str, universes)), bootstrap])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Store:
    def __init__(self, path: Path, durability: str = "process"):
        self.path = Path(path)
        self.durability = durability
        self.conn: apsw.Connection | None = None
        self._checkpointer: apsw.Connection | None = None  # checkpoint()'s own connection
        self.wal_pages = 0  # pages in the WAL after the last commit (checkpoint_elsewhere)

    # -- opening -------------------------------------------------------------------------------

    def open(self, universes: list[Cidr] | None, nickname: str,
             migrations: dict[int, str] | None = None, mode: str = "single",
             bootstrap_meta: dict[str, str] | None = None,
             static: list[Cidr] | None = None, on_new=None) -> Loaded:
        """Open or create; `universes` None means "whatever the database has". A new database
        owns everything (mode "single"), or nothing yet: "join" (no cluster until its first
        peer says), "seeds" or "quorum" (the cluster named from the flags every first host
        shares; the split comes later). bootstrap_meta (the seed list, the quorum size) is
        kept in meta so a restart needs no flags to carry on. `static`: the claim-only
        universes (--subnet outside the ranges) a new database gets; None: as it has.
        on_new(ranges): called with a new database's ranges (static ones too) before anything
        is written; what it raises refuses them."""
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
                if on_new is not None:
                    on_new([*universes, *(static or [])])
                loaded = self._create(conn, universes, static or [], nickname, mode,
                                      bootstrap_meta or {})
            else:
                if version < SCHEMA_VERSION:
                    self._migrate(conn, version, migrations)
                self._check_handles(conn)
                loaded = self._meta(conn, universes, static)
            conn.execute(f"PRAGMA synchronous = {SYNCHRONOUS[self.durability]}")
            # A WAL that grew while a checkpoint was copying is cut back to this once it starts
            # over, so the files on disk follow the live state, not the busiest moment.
            conn.execute(f"PRAGMA journal_size_limit = {CHECKPOINT_PAGES * 4096}")
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

    def _check_handles(self, conn: apsw.Connection) -> None:
        """A handle holds at most one address in a subnet. The core keeps that; the schema
        no longer does (no index on handle: schema.sql), so a database edited by hand or
        from elsewhere is checked here, before the core would refuse to load such a pair.
        Subnets are compared as blocks, as the core does: text the daemon did not write
        ('10.32.0.5/12', 'FD00::/64') names the same subnet as its canonical form."""
        blocks: dict[str, object] = {}  # subnet text -> block: each distinct text parsed once
        held: dict[tuple, list[str]] = {}
        for handle, subnet, address in conn.execute(
                "SELECT handle, subnet, address FROM allocations ORDER BY address"):
            block = blocks.get(subnet)
            if block is None:
                try:
                    block = blocks[subnet] = cidr(subnet)
                except ValueError:
                    block = blocks[subnet] = subnet
            held.setdefault((handle, block), []).append(address)
        twice = [(h, b, a) for (h, b), a in held.items() if len(a) > 1][:3]
        if twice:
            listed = "; ".join(f"handle {h!r} holds {' '.join(a)} in {b}" for h, b, a in twice)
            raise StoreError(f"{self.path} is inconsistent: {listed} (one address per handle "
                             "and subnet); refusing to start. Release the extra rows with "
                             "sqlite3, or restore a backup.")

    def _create(self, conn: apsw.Connection, ranges: list[Cidr], static: list[Cidr],
                nickname: str, mode: str, bootstrap_meta: dict[str, str]) -> Loaded:
        universes = list(ranges) + list(static)
        conn.execute("PRAGMA journal_mode = WAL")
        peer_id = secrets.token_hex(8)
        # A single host owning everything is its own cluster (peers that join it take its
        # identity); a joiner learns the identity from its first peer; seeds and voters name
        # it from what they all are given.
        cluster = {"single": cluster_id_for(universes, "single:" + peer_id), "join": "",
                   "seeds": cluster_id_for(universes, "seeds:" + bootstrap_meta.get(
                       "seed_addresses", "")),
                   "quorum": cluster_id_for(universes, "quorum:" + bootstrap_meta.get(
                       "quorum", ""))}[mode]
        with conn:
            conn.execute(schema_path().read_text())
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("peer_id", peer_id), ("cluster_id", cluster), ("bootstrap", mode),
                *sorted(bootstrap_meta.items())])
            for u in [*universes, *SPARE]:
                kind = "spare" if u in SPARE else "static" if u in static else "range"
                conn.execute("INSERT INTO universes (cidr, family, kind) VALUES (?, ?, ?)",
                             (str(u), u.family, kind))
            conn.execute("INSERT INTO clock VALUES (1, 0, '{}')")
            conn.execute("INSERT INTO peers (id, nickname) VALUES (?, ?)", (peer_id, nickname))
            meta = {"peer_id": peer_id, "cluster_id": cluster, "bootstrap": mode,
                    **bootstrap_meta}
            self._apply(conn, _durable(peer_id, cluster, [*universes, *SPARE], static, meta,
                                       SPARE).first_rows())
        return Loaded(peer_id, cluster, [*universes, *SPARE], True, mode, meta, list(static),
                      spare=list(SPARE), founding=universes)

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

    def _meta(self, conn: apsw.Connection, universes: list[Cidr] | None,
              static: list[Cidr] | None) -> Loaded:
        conn.execute("PRAGMA journal_mode = WAL")
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        every, have_static, spare, founding = _universes(conn)
        have = [u for u in every if u not in have_static and u not in spare]
        # The database is the truth: every --iprange must be one of its ranges, and ranges it
        # has beyond them (added online) are kept.
        lacking = [u for u in universes or [] if u not in have]
        if lacking:
            raise StoreError(
                f"{self.path} belongs to a cluster with ranges {', '.join(map(str, have))}, but "
                f"this launch asked for {', '.join(map(str, lacking))} too; add a range to the "
                f"cluster with `ipamd range add {lacking[0]}` on a running host, or use another "
                "--data-dir for a new cluster")
        note = ""
        if static and sorted(static) != sorted(have_static):
            if have_static:
                raise StoreError(
                    f"{self.path} belongs to a cluster whose --subnet leaves "
                    f"{', '.join(map(str, have_static))} for static addresses, but this launch "
                    f"leaves {', '.join(map(str, static))}; give the same --subnet")
            # Made before claim-only space (or without --subnet): its universes are fixed.
            note = (f"this database has no claim-only space for --subnet: static addresses "
                    f"outside the ranges ({', '.join(map(str, static))}) are refused while "
                    "the host has peers")
        return Loaded(meta["peer_id"], meta["cluster_id"], every, False,
                      meta.get("bootstrap", "single"), meta, have_static, note, spare, founding)

    # -- reading -------------------------------------------------------------------------------

    def load_peer(self, loaded: Loaded, default_subnet: Cidr, reuse_delay: float,
                  gateways: frozenset = frozenset(), **kw) -> Peer:
        """The peer as the database has it: the same rebuild a restart in the simulator does
        (core/durable.py), from rows read here."""
        conn = self.conn
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        # Read again, not taken from `loaded`: a range added online since start has rows too.
        universes, static, spare, _ = _universes(conn)
        d = _durable(loaded.peer_id, loaded.cluster_id, universes, static, meta, spare)
        for row in conn.execute("SELECT universe, start, last, owner, version, free_hint, "
                                "stamp_peer, stamp_seq FROM ring"):
            d.ring[(row[0], row[1])] = RingWrite(*row)
        for seq, vector in conn.execute("SELECT seq, vector FROM clock"):
            d.clock = ClockWrite(seq, tuple(sorted(json.loads(vector).items())))
        for row in conn.execute("SELECT address, universe, subnet, handle, anchor, allocated_at "
                                "FROM allocations"):
            d.allocations[row[0]] = PutAllocation(*row)
        for start, last, universe in conn.execute("SELECT start, last, universe FROM freed_spans"):
            d.freed_spans[start] = FreedSpan(universe, start, last)
        for address, holder, universe, note in conn.execute(
                "SELECT address, holder, universe, note FROM reserved"):
            d.reserved[(address, holder)] = Reserve(address, holder, universe, note)
        for target, by, state, at in conn.execute("SELECT target, by, state, at FROM removals"):
            d.removals[target] = Removal(target, by, state, at)
        # Members are peers heard from (authenticated); addresses others told us of are only
        # candidates to dial: they never count as members (and never block rmpeer).
        d.seen = {p for (p,) in conn.execute("SELECT id FROM peers WHERE state != 'candidate'")
                  if p != loaded.peer_id}
        if "standing" in meta:
            d.standing = Standing(meta["standing"], meta.get("standing_note", ""))
        if "vote" in meta:
            promised, accepted, decided = json.loads(meta["vote"])
            d.vote = Vote(tuple(promised) if promised else None,
                          (tuple(accepted[0]), tuple(accepted[1])) if accepted else None,
                          tuple(decided) if decided else None)
        peer = d.load(default_subnet, reuse_delay, gateways=gateways, **kw)
        # The freed rows (a quarantine's worth: tens of thousands at a high rate) go straight
        # in, in the order Durable.load would give them, not through a row object each.
        a = peer.allocator
        a.load_freed([(*_address_key(address), freed_at)
                      for address, freed_at in conn.execute(
                          "SELECT address, freed_at FROM freed ORDER BY freed_at, address")])
        wrong = list(itertools.islice(a.misplaced(), 3))
        if wrong:
            listed = "; ".join(f"{h.text} (handle {h.handle!r}) is not in {h.universe}"
                               for h in wrong)
            raise StoreError(f"{self.path} is inconsistent: {listed}, the range its row in "
                             "table allocations names; refusing to start. Correct the row's "
                             "universe with sqlite3, or restore a backup.")
        both = list(itertools.islice(a.held_and_free(), 3))
        if both:
            listed = "; ".join(f"{h.text} is held by handle {h.handle!r} and is in {where}"
                               for h, where in both)
            raise StoreError(f"{self.path} is inconsistent: {listed} (an address held is "
                             "never free); refusing to start: it would be handed out again. "
                             "Delete the freed row (or span) or the allocation with sqlite3, "
                             "or restore a backup.")
        return peer

    def candidates(self, now: float) -> dict[str, float]:
        """Peers that are only candidates (addresses others told us of, never heard from by
        the core): id -> last_seen, the wall time it was learned or last completed a
        handshake. A candidate kept by an ipamd that recorded no time gets `now`."""
        with self.conn:
            self.conn.execute("UPDATE peers SET last_seen = ? WHERE state = 'candidate' AND "
                              "last_seen IS NULL", (now,))
        return dict(self.conn.execute("SELECT id, last_seen FROM peers "
                                      "WHERE state = 'candidate'"))

    def peer_addresses(self) -> dict[str, str]:
        """Where each peer was last reached: dialled again after a restart."""
        out = {}
        for peer, addresses in self.conn.execute("SELECT id, addresses FROM peers"):
            try:
                known = json.loads(addresses)
            except ValueError:
                continue
            if isinstance(known, list) and known and isinstance(known[-1], str):
                out[peer] = known[-1]
        return out

    # -- writing -------------------------------------------------------------------------------

    def save_peer_address(self, peer: str, address: str, at: float | None = None) -> None:
        """Where peer listens. A peer new to us is a candidate, learned `at` (wall time)."""
        with self.conn:
            self.conn.execute("INSERT OR IGNORE INTO peers (id, nickname, state, last_seen) "
                              "VALUES (?, '', 'candidate', ?)", (peer, at))
            self.conn.execute("UPDATE peers SET addresses = ? WHERE id = ?",
                              (json.dumps([address]), peer))

    def set_nickname(self, peer: str, nickname: str) -> None:
        """The nickname of a peer we keep a row for (this one's own, from --nickname)."""
        with self.conn:
            self.conn.execute("UPDATE peers SET nickname = ? WHERE id = ?", (nickname, peer))

    def peer_nicknames(self) -> dict[str, str]:
        """Peer id -> nickname, for the peers whose nickname is known."""
        return dict(self.conn.execute("SELECT id, nickname FROM peers WHERE nickname != ''"))

    def peer_heard(self, peer: str, at: float) -> None:
        """peer completed a handshake with us (it knows the secret) at `at`: last_seen."""
        with self.conn:
            self.conn.execute("UPDATE peers SET last_seen = ? WHERE id = ?", (at, peer))

    def forget_candidates(self, peers: list[str]) -> None:
        """Expired candidates: their rows go. A peer heard from meanwhile (state 'alive') is
        kept."""
        with self.conn:
            self.conn.executemany("DELETE FROM peers WHERE id = ? AND state = 'candidate'",
                                  [(p,) for p in peers])

    def set_cluster(self, cluster: str) -> None:
        """A joiner's identity, learned from its first peer; set once."""
        with self.conn:
            self.conn.execute("UPDATE meta SET value = ? WHERE key = 'cluster_id' AND value = ''",
                              (cluster,))

    def commit(self, rows: list[Row]) -> None:
        """All rows in one transaction: either every one is durable or none is."""
        self._apply(self.conn, rows)

    @staticmethod
    def _apply(conn: apsw.Connection, rows: list[Row]) -> None:
        with conn:
            # One cursor for the batch: Connection.execute makes (and drops) one per
            # statement, which costs about what executing a small statement does.
            execute = conn.cursor().execute
            for r in rows:
                if isinstance(r, AddUniverse):
                    execute("INSERT OR IGNORE INTO universes (cidr, family, kind, added) "
                            "VALUES (?, ?, ?, 1)", (r.cidr, r.family, r.kind))
                elif isinstance(r, PutAllocation):
                    if not r.fresh:
                        execute("DELETE FROM freed WHERE address = ?", (r.address,))
                    execute("INSERT INTO allocations VALUES (?, ?, ?, ?, ?, ?)",
                            (r.address, r.universe, r.subnet, r.handle, r.anchor,
                             r.allocated_at))
                elif isinstance(r, FreeAddress):
                    execute("DELETE FROM allocations WHERE address = ?", (r.address,))
                    if r.universe is not None:
                        execute("INSERT OR REPLACE INTO freed VALUES (?, ?)",
                                (r.address, r.freed_at))
                elif isinstance(r, Reserve):
                    execute("DELETE FROM freed WHERE address = ?", (r.address,))
                    execute("INSERT OR IGNORE INTO reserved (address, holder, universe, "
                            "note) VALUES (?, ?, ?, ?)",
                            (r.address, r.holder, r.universe, r.note))
                elif isinstance(r, Unreserve):
                    execute("DELETE FROM reserved WHERE address = ? AND holder = ?",
                            (r.address, r.holder))
                elif isinstance(r, ForgetFreed):
                    execute("DELETE FROM freed WHERE address = ?", (r.address,))
                elif isinstance(r, FreedSpan):
                    execute("INSERT OR REPLACE INTO freed_spans VALUES (?, ?, ?)",
                            (r.start, r.last, r.universe))
                elif isinstance(r, DropFreedSpan):
                    execute("DELETE FROM freed_spans WHERE start = ?", (r.start,))
                elif isinstance(r, RingWrite):
                    execute("INSERT OR REPLACE INTO ring VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (r.universe, r.start, r.last, r.owner, r.version, r.free_hint,
                             r.stamp_peer, r.stamp_seq))
                elif isinstance(r, ClockWrite):
                    execute("INSERT OR REPLACE INTO clock VALUES (1, ?, ?)",
                            (r.seq, json.dumps(dict(r.vector), sort_keys=True)))
                elif isinstance(r, Removal):
                    if r.state == "released":
                        execute("DELETE FROM removals WHERE target = ?", (r.target,))
                    else:
                        execute("INSERT OR REPLACE INTO removals VALUES (?, ?, ?, ?)",
                                (r.target, r.by, r.state, r.at))
                elif isinstance(r, PeerSeen):
                    execute("INSERT OR IGNORE INTO peers (id, nickname) VALUES (?, '')",
                            (r.peer,))
                    execute("UPDATE peers SET state = 'alive' WHERE id = ? AND "
                            "state = 'candidate'", (r.peer,))
                elif isinstance(r, Standing):
                    execute("INSERT OR REPLACE INTO meta VALUES ('standing', ?), "
                            "('standing_note', ?)", (r.state, r.note))
                elif isinstance(r, Vote):
                    execute("INSERT OR REPLACE INTO meta VALUES ('vote', ?)",
                            (json.dumps([r.promised, r.accepted, r.decided]),))
                elif isinstance(r, SeedIds):
                    execute("INSERT OR REPLACE INTO meta VALUES ('seeds', ?)",
                            (json.dumps(list(r.ids)),))
                else:
                    raise TypeError(f"not a row: {r!r}")

    # -- checkpoints -----------------------------------------------------------------------------

    def checkpoint_elsewhere(self, due, pages: int = CHECKPOINT_PAGES) -> None:
        """Commits stop checkpointing: due() is called after a commit that leaves the WAL with
        `pages` pages or more, and the caller runs checkpoint_copy() in a thread, then
        checkpoint_finish(). SQLite's own checkpoint runs inside the commit that crosses 1000
        pages, fsyncs included: measured under the hook benchmark, three quarters of all commit
        time, all of it on the event loop. What a commit makes durable is the same either way
        (a checkpoint only copies committed pages from the WAL into the database file).
        wal_pages is the WAL's length after the last commit, for the caller's backpressure."""
        def hook(_conn, _db, in_wal):
            self.wal_pages = in_wal
            if in_wal >= pages:
                due()
            return apsw.SQLITE_OK
        self.conn.set_wal_hook(hook)  # a WAL hook replaces SQLite's automatic checkpoints

    def checkpoint_copy(self) -> tuple[int, int]:
        """Copy the WAL into the database file; for another thread, while commits go on. Its
        own connection, at the same synchronous level: a checkpoint's fsyncs are what let the
        WAL be overwritten safely. PASSIVE: it neither waits for nor blocks the writer.
        Returns (pages in the WAL, pages copied)."""
        if self._checkpointer is None:
            c = apsw.Connection(str(self.path), flags=apsw.SQLITE_OPEN_READWRITE)
            c.execute(f"PRAGMA synchronous = {SYNCHRONOUS[self.durability]}")
            self._checkpointer = c
        return self._checkpointer.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)

    def checkpoint_finish(self) -> tuple[int, int]:
        """After checkpoint_copy, with no commit running: copy what commits added meanwhile
        (a few pages, often none). The WAL is then wholly in the database file, and the next
        commit writes it from its start; without this step, under steady commits no copy
        would ever catch up, and the WAL would grow without end. Returns (pages in the WAL,
        pages copied): fewer copied means a reader's open transaction holds the WAL."""
        return self.conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _universes(conn: apsw.Connection) -> tuple[list[Cidr], list[Cidr], list[Cidr], list[Cidr]]:
    """The database's universes in the order this peer made or learned them (as its rings
    were ordered before a restart: the ring digest in `status` follows that order), then its
    static and spare ones, and the ranges and static universes it was made with. The first
    is a range the database was made with (--iprange's first), the default subnet's."""
    rows = [(cidr(c), k, added) for c, k, added in
            conn.execute("SELECT cidr, kind, added FROM universes ORDER BY rowid")]
    return ([u for u, _, _ in rows], [u for u, k, _ in rows if k == "static"],
            [u for u, k, _ in rows if k == "spare"],
            [u for u, k, added in rows if k != "spare" and not added])


def _durable(peer_id: str, cluster: str, universes: list[Cidr], static, meta: dict,
             spare) -> Durable:
    """The Durable (core/durable.py) of this database, its bootstrap mode read from meta."""
    mode = meta.get("bootstrap", "single")
    boot: dict = {}
    if mode == "seeds":
        boot["seeds"] = tuple(json.loads(meta["seeds"])) if "seeds" in meta else ()
        boot["seed_addresses"] = tuple(a for a in meta.get("seed_addresses", "").split(",") if a)
    elif mode == "quorum":
        boot["quorum"] = int(meta["quorum"])
    return Durable(peer_id, cluster, list(universes), tuple(static), tuple(spare), mode=mode,
                   **boot)


def _address_key(text: str) -> tuple[int, int]:
    """An address as the store writes it (canonical text) as (family, number): several times
    faster than ipaddress, which matters for the tens of thousands of quarantine rows read at
    start."""
    if ":" in text:
        return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
    return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
