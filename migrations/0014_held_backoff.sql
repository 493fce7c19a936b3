-- Held changes are retried with back-off (functions/apply.sql retry_held,
-- src/replication/resolve.rs retry_held): after each failed retry the next
-- waits twice as long, from 1 s up to 5 minutes, so a change that cannot
-- apply for hours costs a retry every 5 minutes, not every second.
ALTER TABLE meridian.held
    ADD COLUMN attempts int NOT NULL DEFAULT 0,
    ADD COLUMN next_try timestamptz NOT NULL DEFAULT now();

COMMENT ON COLUMN meridian.held.attempts IS 'Retries that failed so far.';
COMMENT ON COLUMN meridian.held.next_try IS 'Not retried before this (back-off: 1 s doubling up to 5 minutes).';
