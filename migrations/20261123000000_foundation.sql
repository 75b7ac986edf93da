-- Foundation schema. Later migrations add the queue's own tables, links, tokens and cursors.

-- Every accepted change notification (webhook or poll), normalised. The payload lives here, apart
-- from the small, hot queue table (engineering.md item 12). The unique key on the vendor's delivery
-- id is the deduplication: INSERT ... ON CONFLICT DO NOTHING decides whether a delivery is new.
CREATE TABLE events (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    system        TEXT        NOT NULL,
    entity_type   TEXT        NOT NULL,
    record_id     TEXT        NOT NULL,
    action        TEXT        NOT NULL CHECK (action IN ('created', 'updated', 'deleted')),
    occurred_at   TIMESTAMPTZ,
    delivery_id   TEXT        NOT NULL,
    received_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT events_delivery_once UNIQUE (system, delivery_id)
);

-- The work queue: one row per event to process, kept small (no payload) because it is hot.
-- The queue's own migrations refine it (leases, ordering, retries).
CREATE TABLE jobs (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    BIGINT      NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    -- system/entity_type/record_id: jobs with one key run one at a time, in id order.
    record_key  TEXT        NOT NULL,
    state       TEXT        NOT NULL DEFAULT 'ready',
    attempts    INT         NOT NULL DEFAULT 0,
    run_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error  TEXT
);
