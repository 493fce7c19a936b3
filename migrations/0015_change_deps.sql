-- Causal dependencies per capture transaction: how much of every origin
-- this region had applied when capture recorded a batch of its
-- transactions (src/capture/writer.rs, in the same transaction, whose xid
-- is the xid of the batch's rows in meridian.change). A receiver applies
-- those changes only once it has applied as much of every third region
-- (src/replication/gate.rs). Dependencies taken when capture records a
-- change, rather than when a shipper reads it, never form a cycle: a
-- change is shipped only after it is recorded, and it can depend only on
-- changes applied here, so shipped, before that.
CREATE TABLE meridian.change_deps (
    xid     xid8     PRIMARY KEY,
    origins int[]    NOT NULL,
    xids    bigint[] NOT NULL,
    seqs    bigint[] NOT NULL
);

COMMENT ON TABLE meridian.change_deps IS
    'Per capture transaction (meridian.change.xid): meridian.applied as it was when capture recorded it.';
