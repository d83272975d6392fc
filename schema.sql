-- ipamd database, schema version 7 (PRAGMA user_version). Readable from a plain sqlite3 shell:
-- every address is stored as text in its canonical form.
-- The daemon sets PRAGMA application_id and user_version after applying this file.

-- Facts about this peer and its cluster: peer_id, cluster_id, created_at, durability.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

-- The universes: the allocation ranges (kind 'range'), the part of --subnet outside them
-- (kind 'static': in the ring, so that every static address has one owner, but only ever
-- claimed, never handed out by allocate), and the spare space (kind 'spare': 0.0.0.0/0 and
-- ::/0, whose ring says who may carve a new range out of it, `ipamd range add`). Carved since
-- (core/spare.py): 'blocks' (block space, `range add --blocks`), 'block' (a tenant's),
-- 'lease' (a block leased to a handle), 'tenant' (a tenant's key), 'names' (a name pool).
-- added: 0 for the universes the database was made with, 1 for one added online (here or on
-- a peer). What each carved universe is for is in its parent's ring: the views below.
CREATE TABLE universes (
    cidr   TEXT PRIMARY KEY,
    family INTEGER NOT NULL CHECK (family IN (4, 6)),
    kind   TEXT NOT NULL DEFAULT 'range' CHECK (kind IN (
        'range', 'static', 'spare', 'blocks', 'block', 'lease', 'tenant', 'names')),
    added  INTEGER NOT NULL DEFAULT 0 CHECK (added IN (0, 1))
) STRICT;

-- The ring of each universe: an entry owns [start, last]. Only its owner changes an entry, each
-- time at a higher version; (stamp_peer, stamp_seq) says who wrote that version.
CREATE TABLE ring (
    universe   TEXT NOT NULL REFERENCES universes (cidr),
    start      TEXT NOT NULL,
    last       TEXT NOT NULL,
    owner      TEXT NOT NULL,
    version    INTEGER NOT NULL CHECK (version > 0),
    free_hint  INTEGER NOT NULL DEFAULT 0,
    stamp_peer TEXT NOT NULL DEFAULT '',
    stamp_seq  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (universe, start)
) STRICT;

-- This peer's write counter and version vector ({"peer": seq} as JSON): durable before any
-- ring write leaves the host, so a restart never reuses a stamp.
CREATE TABLE clock (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    seq    INTEGER NOT NULL CHECK (seq >= 0),
    vector TEXT NOT NULL
) STRICT;

-- Peers being removed (state 'promised': this peer promised `by` to take nothing more from
-- them, since `at`) or removed for good ('removed'): never to return.
CREATE TABLE removals (
    target TEXT PRIMARY KEY,
    by     TEXT NOT NULL,
    state  TEXT NOT NULL CHECK (state IN ('promised', 'removed')),
    at     REAL NOT NULL
) STRICT;

-- Peers this one knows of (itself included), with the address they listen on for peers.
-- state 'alive': heard from (authenticated), a member; 'candidate': an address another peer
-- told us of, dialled but not a member until it answers.
CREATE TABLE peers (
    id        TEXT PRIMARY KEY,
    nickname  TEXT NOT NULL,
    addresses TEXT NOT NULL DEFAULT '[]',
    last_seen REAL,
    state     TEXT NOT NULL DEFAULT 'alive'
) STRICT;

-- Addresses held now. universe is NULL for a static address outside every range.
-- One b-tree, keyed by address: a commit writes the pages its addresses fall in, and
-- addresses handed out together are neighbours. No index on handle: handles are random
-- (container ids), so such an index cost a page of its own per request in every commit.
-- The core keeps each handle's addresses; opening the database refuses a handle holding two
-- addresses in one subnet (Store.open).
CREATE TABLE allocations (
    address      TEXT PRIMARY KEY,
    universe     TEXT REFERENCES universes (cidr),
    subnet       TEXT NOT NULL,
    handle       TEXT NOT NULL,
    anchor       TEXT,
    allocated_at REAL NOT NULL
) STRICT, WITHOUT ROWID;

-- Addresses given back: reused least-recently-freed first once their quarantine is over. The
-- quarantined and the most recently freed after them (4096 per range) have a row each; the
-- rest, less recently freed than all of these, are folded into freed_spans ([start, last],
-- freed once and free), which are reused first, lowest first. A row's universe is the
-- innermost one holding its address (a block rather than its block space), as for
-- `reserved`: not stored, since the quarantine has a row per address freed in the last
-- --reuse-delay seconds (hundreds of thousands at a high rate), and the name was a third of it.
CREATE TABLE freed (
    address  TEXT PRIMARY KEY,
    freed_at REAL NOT NULL
) STRICT, WITHOUT ROWID;
CREATE TABLE freed_spans (
    start    TEXT PRIMARY KEY,
    last     TEXT NOT NULL,
    universe TEXT NOT NULL REFERENCES universes (cidr)
) STRICT, WITHOUT ROWID;

-- Addresses not handed out while they have a holder: gateways that requests named (CNI). A
-- holder is "handle H" (a handle here that named it), "peer P" (this host owns the address and
-- reserved it for peer P), "kept" (for good) or "releasing" (no holder left here; the owner,
-- another peer, is still to be told).
CREATE TABLE reserved (
    address  TEXT NOT NULL,
    holder   TEXT NOT NULL,
    universe TEXT NOT NULL REFERENCES universes (cidr),
    note     TEXT NOT NULL,
    PRIMARY KEY (address, holder)
) STRICT;

-- What the carve markers in the rings say (core/spare.py): each carved universe, its state
-- (range, retired, static, blocks, block, lease, tenant, names) and what it is for.
CREATE VIEW carved AS
    SELECT DISTINCT substr(owner, 2, instr(owner, ' ') - 2) AS state,
           CASE WHEN instr(rest, ' ') > 0 THEN substr(rest, 1, instr(rest, ' ') - 1)
                ELSE rest END AS cidr,
           CASE WHEN instr(rest, ' ') > 0 THEN substr(rest, instr(rest, ' ') + 1)
                ELSE '' END AS args,
           universe AS parent
    FROM (SELECT owner, universe, substr(owner, instr(owner, ' ') + 1) AS rest FROM ring
          WHERE owner LIKE '@%' AND owner NOT LIKE '@dissolved %');
CREATE VIEW tenants AS
    SELECT substr(args, 1, instr(args, ' ') - 1) AS tenant, cidr AS key,
           (SELECT group_concat(b.cidr, ' ') FROM carved b WHERE b.state = 'block'
            AND b.args = substr(t.args, 1, instr(t.args, ' ') - 1)) AS blocks
    FROM carved t WHERE state = 'tenant';
CREATE VIEW blocks AS
    SELECT cidr AS block, CASE state WHEN 'block' THEN 'tenant' ELSE 'handle' END AS leased_to,
           args AS name FROM carved WHERE state IN ('block', 'lease');

-- For people at a sqlite3 prompt.
CREATE VIEW held AS
    SELECT handle, address || '/' || substr(subnet, instr(subnet, '/') + 1) AS address, subnet,
           anchor, datetime(allocated_at, 'unixepoch') AS allocated
    FROM allocations ORDER BY handle;
