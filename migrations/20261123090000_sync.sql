-- The sync engine's state: links between records, create intents, and the decision log.

-- One row per linked pair of a dataflow. A link is never deleted: when either record is deleted
-- (or the counterpart disappears) it is ended, so its history stays queryable (rule 9, rule 10).
CREATE TABLE links (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    flow_id         TEXT        NOT NULL,
    source_system   TEXT        NOT NULL,
    source_type     TEXT        NOT NULL,
    source_id       TEXT        NOT NULL,
    target_system   TEXT        NOT NULL,
    target_type     TEXT        NOT NULL,
    target_id       TEXT        NOT NULL,
    -- The last synced value of every mapped property, keyed "source_path>target_path". Plain values
    -- are stored as they are on both sides; a reference is stored as {"s": source id, "t": target id}
    -- so either side's value can be compared with it without translating (the three-way merge's base).
    snapshot        JSONB       NOT NULL DEFAULT '{}'::jsonb,
    -- Each side's updated_at as last read: a fetched state older than this is a stale read (rule 7).
    source_seen_at  TIMESTAMPTZ,
    target_seen_at  TIMESTAMPTZ,
    -- Which side Tether last wrote to ('source'/'target'), to tell an echo from an unchanged record.
    last_write_side TEXT CHECK (last_write_side IN ('source', 'target')),
    -- Optimistic concurrency: a snapshot is only replaced by a writer that read this version, so an
    -- echo processed while the engine is still writing cannot be overwritten by a stale snapshot.
    version         BIGINT      NOT NULL DEFAULT 0,
    state           TEXT        NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'ended')),
    end_reason      TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    ended_at        TIMESTAMPTZ,
    CHECK ((state = 'ended') = (ended_at IS NOT NULL))
);

-- At most one active counterpart per record and flow, on either side (rule 8). The record columns
-- lead so the same indexes serve "links of this record" (events, CLI) and reference translation.
CREATE UNIQUE INDEX links_active_by_source
    ON links (source_system, source_type, source_id, flow_id) WHERE state = 'active';
CREATE UNIQUE INDEX links_active_by_target
    ON links (target_system, target_type, target_id, flow_id) WHERE state = 'active';
-- Ended links are only read by `tether links show`, per record.
CREATE INDEX links_by_source_all ON links (source_system, source_type, source_id);
CREATE INDEX links_by_target_all ON links (target_system, target_type, target_id);

-- An intent to create a counterpart, committed BEFORE the vendor call. If the process dies after the
-- vendor created the record but before the link committed, the retry finds this row and asks the
-- vendor for the record made with the same idempotency key instead of creating a second one.
CREATE TABLE link_intents (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    flow_id         TEXT        NOT NULL,
    source_system   TEXT        NOT NULL,
    source_type     TEXT        NOT NULL,
    source_id       TEXT        NOT NULL,
    idempotency_key UUID        NOT NULL UNIQUE,
    state           TEXT        NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done')),
    -- The job that holds the intent, and until when: another job seeing a live lease waits instead
    -- of creating concurrently; a retry of the same job (or anyone after expiry) takes it over.
    owner_job_id    BIGINT,
    lease_until     TIMESTAMPTZ NOT NULL DEFAULT now(),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    done_at         TIMESTAMPTZ
);
-- One open intent per source record and flow.
CREATE UNIQUE INDEX link_intents_one_pending
    ON link_intents (source_system, source_type, source_id, flow_id) WHERE state = 'pending';

-- Every decision the engine takes, per event and flow (rule 10): what was read, what was written or
-- why nothing was, and the error. Append-only.
CREATE TABLE sync_log (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    event_id     BIGINT,
    job_id       BIGINT,
    attempt      INT,
    system       TEXT        NOT NULL,
    entity_type  TEXT        NOT NULL,
    record_id    TEXT        NOT NULL,
    flow_id      TEXT,
    link_id      BIGINT,
    -- created, linked, updated, echo, unchanged, converged, waiting_for_reference, deleted,
    -- link_ended, flow_disabled, not_connected, not_created_back, no_match, stale, error, ...
    decision     TEXT        NOT NULL,
    read         JSONB,
    written      JSONB,
    detail       TEXT,
    error        TEXT
);
-- `tether links show` reads a record's history and the history of its links.
CREATE INDEX sync_log_by_record ON sync_log (system, entity_type, record_id, id);
CREATE INDEX sync_log_by_link ON sync_log (link_id, id) WHERE link_id IS NOT NULL;
