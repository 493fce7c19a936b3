-- meridian's tables, as migrations 0001-0011 left them (gathered into this
-- one file in December 2026). A database that applied those has all of this
-- already and skips the file; a new database starts here. Every later
-- change to a table is a new file, 0012 on. meridian's functions, the view
-- and the event triggers are not here: they are re-applied by every
-- `meridian migrate` from functions/ and wiring.sql (see README.md).

--------------------------------------------------------------------------------
-- This region
--------------------------------------------------------------------------------

-- The region this database belongs to. Exactly one row once configured
-- (enforced by the unique index on a constant below).
CREATE TABLE meridian.node (
    region_id       int    NOT NULL,
    region_name     text   NOT NULL,
    schemas         text[] NOT NULL,   -- schemas whose tables are replicated
    sequence_stride int    NOT NULL,   -- sequences step by this, see align_sequences
    CHECK (region_id >= 1 AND region_id < sequence_stride)
);

CREATE UNIQUE INDEX node_single_row ON meridian.node ((true));

COMMENT ON TABLE meridian.node IS
    'This database''s region: one row, written by meridian.configure().';

-- Persisted high-water mark of the region's HLC, so a restarted meridian
-- never issues a stamp below one it issued before (src/capture/clock_store.rs).
CREATE TABLE meridian.clock (
    region_id  int PRIMARY KEY,
    high_water bigint NOT NULL
);

COMMENT ON TABLE meridian.clock IS
    'Highest HLC the proxy of each region has handed out (written by the proxy).';

-- Per-table replication rules, mirrored from the conflict-rules files, plus
-- whether capture is currently installed on the table. tbl is the table's
-- qualified name as format('%I.%I', schema, table) spells it.
CREATE TABLE meridian.replicated_table (
    tbl         text PRIMARY KEY,
    insert_only bool   NOT NULL DEFAULT false,  -- rows are only ever inserted
    counters    text[] NOT NULL DEFAULT '{}',   -- numeric columns merged as deltas
    captured    bool   NOT NULL DEFAULT false   -- capture installed
);

COMMENT ON TABLE meridian.replicated_table IS
    'Replication rules per table (from the conflict-rules files) and capture state.';

-- Rules recorded by name for tables that did not exist when they were
-- recorded, with where they came from and the columns they name.
CREATE TABLE meridian.rule_ahead (
    tbl      text PRIMARY KEY,
    origin   text   NOT NULL,   -- 'file: table[i]', for messages
    columns  text[] NOT NULL,   -- columns the rule merges
    counters text[] NOT NULL
);

COMMENT ON TABLE meridian.rule_ahead IS
    'Rules recorded before their table existed; checked when the table appears.';

--------------------------------------------------------------------------------
-- Captured changes
--------------------------------------------------------------------------------

-- Orders changes within a transaction. Each session reserves 32 values at a
-- time: values still increase within a transaction, which is the only order
-- seq has to give.
CREATE SEQUENCE meridian.change_seq AS bigint CACHE 32;

-- One row per captured row change (one per TRUNCATE), written by capture.
--   origin    region the change was made in
--   hlc       version given to the row by this change (>= tx_hlc, and above
--             every earlier version of the same row, see row_version)
--   tx_hlc    the stamp of the whole transaction
--   via_proxy kept for the peer format; false for every change capture records
--   op        'I' insert, 'U' update, 'D' delete, 'T' truncate, 'S' schema
--   pk        the row's key as a JSON object {column: value}; null for 'T'
--   row       the new row for 'I' and 'U'; else null
--   old       for 'U' on a table with counter columns, their old values
--             {column: value}; else null
--   base_*    the version the change was made on (NULL: a key new here)
--   gen, tag_*, epoch, cols: the rule engine's row state (row_states.sql)
-- op has no CHECK constraint on purpose: a CHECK is re-read from the
-- catalog for every INSERT statement.
CREATE TABLE meridian.change (
    xid         xid8   NOT NULL DEFAULT pg_current_xact_id(),
    seq         bigint NOT NULL DEFAULT nextval('meridian.change_seq'),
    origin      int    NOT NULL,
    hlc         bigint NOT NULL,
    tx_hlc      bigint NOT NULL,
    via_proxy   bool   NOT NULL,
    tbl         text   COLLATE "C" NOT NULL,
    op          "char" NOT NULL,
    pk          jsonb,
    "row"       jsonb,
    old         jsonb,
    base_hlc    bigint,
    base_origin int,
    gen         int,
    tag_hlc     bigint,
    tag_origin  int,
    epoch       int,
    cols        jsonb,
    PRIMARY KEY (xid, seq)
);

ALTER SEQUENCE meridian.change_seq OWNED BY meridian.change.seq;

COMMENT ON TABLE meridian.change IS
    'Captured row changes, written by capture, read with meridian.read_changes().';

-- The current version of every captured row (tombstones for deleted rows stay,
-- so a re-inserted key still gets a version above the deleted one). Free
-- space is left on each page so that updating a version, which changes no
-- indexed column, can be a HOT update.
CREATE TABLE meridian.row_version (
    tbl           text   COLLATE "C" NOT NULL,
    pk            jsonb  NOT NULL,
    hlc           bigint NOT NULL,
    origin        int    NOT NULL,
    deleted       bool   NOT NULL,
    base_hlc      bigint,
    base_origin   int,
    winner_hlc    bigint,
    winner_origin int,
    gen           int,
    tag_hlc       bigint,
    tag_origin    int,
    epoch         int,
    cols          jsonb,
    PRIMARY KEY (tbl, pk)
) WITH (fillfactor = 70);

COMMENT ON TABLE meridian.row_version IS
    'Current version (HLC) of each captured row, keyed by table and primary key.';

COMMENT ON COLUMN meridian.row_version.base_hlc IS
    'Set by capture only: the version this row had before the last local write (returned to the capture statement).';

COMMENT ON COLUMN meridian.row_version.winner_hlc IS
    'After a conflict decided by the rule engine: the version whose row was kept (NULL: hlc/origin itself).';

COMMENT ON COLUMN meridian.row_version.cols IS
    'Rule-engine tables: per merged column, its version (last-writer-wins) or per-region totals (counter).';

-- Low 22 bits of stamps made inside Postgres (db_stamp).
CREATE SEQUENCE meridian.stamp_counter AS bigint CACHE 32;

-- Where capture is, written in the same transaction as what it records.
CREATE TABLE meridian.capture_progress (
    single bool PRIMARY KEY DEFAULT true CHECK (single),
    lsn    pg_lsn NOT NULL,
    done   bigint NOT NULL,
    committed_at timestamptz
);

-- Nothing older than now can reach capture: the slot is made after this.
INSERT INTO meridian.capture_progress (lsn, done, committed_at) VALUES ('0/0', 0, now());

COMMENT ON TABLE meridian.capture_progress IS
    'Where capture is, written with the changes it recorded: the end LSN of the last whole '
    'transaction recorded (done = 0), or the commit LSN of one recorded in parts and how many '
    'of its changes are in; committed_at: when the last of them committed (bounds the floor).';

-- Schema changes, written by on_ddl_replicate in the writing transaction.
CREATE TABLE meridian.ddl_out (
    id    bigserial PRIMARY KEY,
    "row" jsonb NOT NULL
);

COMMENT ON TABLE meridian.ddl_out IS
    'Schema changes made here, in the WAL so capture sees them in commit order; pruned by housekeeping.';

-- What capture reads: the replicated tables (added by enable_capture) and
-- ddl_out. A partitioned table's changes are published as its own.
CREATE PUBLICATION meridian WITH (publish_via_partition_root = true);

ALTER PUBLICATION meridian ADD TABLE meridian.ddl_out;

--------------------------------------------------------------------------------
-- Replication between regions
--------------------------------------------------------------------------------

CREATE TABLE meridian.applied (
    origin     int         PRIMARY KEY,
    xid        bigint      NOT NULL,
    seq        bigint      NOT NULL,
    changes    bigint      NOT NULL DEFAULT 0,
    applied_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE meridian.applied IS
    'Per origin region: the last change applied here (its xid and seq in the origin), updated in the same transaction as the changes.';

CREATE TABLE meridian.held (
    origin   int         NOT NULL,
    xid      bigint      NOT NULL,
    seq      bigint      NOT NULL,
    tbl      text        NOT NULL,
    change   jsonb       NOT NULL,
    error    text        NOT NULL,
    sqlstate text        NOT NULL,
    held_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (origin, xid, seq)
);

COMMENT ON TABLE meridian.held IS
    'Changes from other regions that could not be applied yet, with the reason; never dropped.';

-- On the origin side: how far each peer has acknowledged this region's
-- changes (written by the shipper after each acknowledgement). A captured
-- change is pruned once every configured peer has applied it.
CREATE TABLE meridian.shipped (
    peer     int         PRIMARY KEY,
    xid      bigint      NOT NULL,
    seq      bigint      NOT NULL,
    acked_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE meridian.shipped IS
    'Per peer region: the last of this region''s changes it acknowledged as applied.';

CREATE TABLE meridian.floor (
    origin   int         PRIMARY KEY,
    hlc      bigint      NOT NULL,
    noted_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE meridian.floor IS
    'Per origin region: every change it ships after those applied here has a row version above hlc.';

--------------------------------------------------------------------------------
-- The rule engine
--------------------------------------------------------------------------------

-- (A table of its own rather than a column of meridian.replicated_table:
-- enable_capture builds that table's row type with a fixed column list.)
CREATE TABLE meridian.engine_table (
    tbl     text PRIMARY KEY,
    columns jsonb NOT NULL DEFAULT '{}'
);

COMMENT ON TABLE meridian.engine_table IS
    'Tables whose conflicts the rule engine (meridian) decides, rather than last-writer-wins in SQL.';

COMMENT ON COLUMN meridian.engine_table.columns IS
    'Merged columns and their rules, e.g. {"n": "counter", "st": {"states": [...]}} (from the conflict-rules files).';

-- Every conflict the engine detected here.
CREATE TABLE meridian.conflict (
    id            bigserial   PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT now(),
    tbl           text        NOT NULL,
    pk            jsonb       NOT NULL,
    rule          text        NOT NULL,   -- what decided the row: the policy, delete-wins or update-wins
    kept          text        NOT NULL,   -- 'local' or 'remote': whose row was kept
    merged        text[]      NOT NULL DEFAULT '{}',  -- columns whose differing values were merged
    local_row     jsonb,                  -- NULL: deleted here
    local_hlc     bigint      NOT NULL,
    local_origin  int         NOT NULL,
    remote_row    jsonb,                  -- NULL: a delete
    remote_hlc    bigint      NOT NULL,
    remote_origin int         NOT NULL,
    result_row    jsonb                   -- what this region holds now (NULL: deleted)
);

CREATE INDEX conflict_at ON meridian.conflict (at);

CREATE INDEX conflict_tbl_at ON meridian.conflict (tbl, at);

COMMENT ON TABLE meridian.conflict IS
    'Conflicts decided by the rule engine in this region: both versions, the rule that decided, and the outcome.';

-- Per child table: what happens to a row whose parent was deleted in
-- another region (handle_orphans).
CREATE TABLE meridian.orphan_rule (
    tbl    text PRIMARY KEY,
    action text NOT NULL CHECK (action IN ('keep', 'delete'))
);
