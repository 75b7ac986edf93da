-- Operations (README, "Operations"): dataflows an operator paused, and the age of what each poll
-- cursor has passed.

-- A paused dataflow: its workers record a `paused` decision instead of syncing (the rest of the
-- event's flows run as usual). `log_from` is the last sync_log id when the pause began: on resume,
-- the events with a `paused` entry after it are put back in the queue (their rows are found by the
-- sync_log primary key from there, never by a scan of the whole log).
CREATE TABLE flow_pauses (
    flow_id    TEXT        PRIMARY KEY,
    paused_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    reason     TEXT,
    log_from   BIGINT      NOT NULL
);

-- The newest change time among the records a cursor has passed: `tether_poll_lag_seconds` is its
-- age. NULL until a page with a timestamped record was committed.
ALTER TABLE poll_cursors ADD COLUMN newest_change_at TIMESTAMPTZ;
