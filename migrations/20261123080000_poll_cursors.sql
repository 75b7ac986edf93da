-- Durable poll cursors: one row per (system, entity type) that Tether polls because the system
-- sends no webhooks for it (PowerOffice, CRMOffice, Exact types without a topic).
--
-- The cursor is opaque text owned by the connector (a timestamp plus the ids already seen at it,
-- a vendor page token, ...). It is updated in the SAME transaction that stores the page's events
-- and enqueues their jobs, so a crash either keeps the page and the new cursor or neither:
-- nothing is missed and nothing is stored twice.
--
-- Replicas poll a cursor one at a time by taking this row with `FOR UPDATE SKIP LOCKED` for the
-- duration of one page: a replica that finds the row locked skips this round instead of waiting.
CREATE TABLE poll_cursors (
    system        TEXT        NOT NULL,
    entity_type   TEXT        NOT NULL,
    -- NULL: poll from the beginning.
    cursor        TEXT,
    -- Bookkeeping for operators: when the last page was committed, and the last failure if any.
    polled_at     TIMESTAMPTZ,
    last_error    TEXT,
    PRIMARY KEY (system, entity_type)
);
