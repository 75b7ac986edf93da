-- The guard against mass changes (docs/guard.md): a flow whose writes pass a threshold within a
-- window pauses itself and holds its writes for the operator to release or discard.

-- New decisions: `held` (a write the guard holds), `discarded` (a held write the operator dropped),
-- `undone` (`tether undo` wrote a value from before back). The CHECK is replaced with the same
-- list plus these; a unit test in src/sync/decision.rs checks that this list and the enum agree.
ALTER TABLE sync_log DROP CONSTRAINT sync_log_decision_known;

ALTER TABLE sync_log ADD CONSTRAINT sync_log_decision_known
    CHECK (decision IN ('created', 'linked_after_retry', 'linked_by_merge_criteria', 'linked_by_other_flow', 'no_match', 'not_created_back', 'updated', 'converged', 'echo', 'unchanged', 'stale', 'conflict', 'waiting_for_reference', 'waiting_for_create', 'deleted', 'not_found', 'no_dataflow', 'idle', 'not_connected', 'system_stopped', 'paused', 'target_closed', 'private_comment', 'held', 'discarded', 'undone', 'error'));

-- A flow the guard paused, and why. Deleted by `tether guard release` or `discard`.
CREATE TABLE guard_trips (
    flow_id    TEXT PRIMARY KEY,
    tripped_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    reason     TEXT        NOT NULL
);

-- Every write the guard let through, counted over the window: stored, so the count holds across
-- restarts and replicas. `record` is the record written (for a create, the source record);
-- `vals` the new values, keyed `<side>.<field>`.
CREATE TABLE guard_writes (
    id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    flow_id TEXT        NOT NULL,
    at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    record  TEXT        NOT NULL,
    vals    JSONB       NOT NULL
);
CREATE INDEX guard_writes_window ON guard_writes (flow_id, at);

-- The writes a paused flow holds, one row per property, in the order they were planned. The
-- event is kept so that a release re-plans it against the records as they are then.
CREATE TABLE guard_held (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    flow_id         TEXT        NOT NULL,
    held_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    event_id        BIGINT      NOT NULL,
    event_system    TEXT        NOT NULL,
    event_type      TEXT        NOT NULL,
    event_record_id TEXT        NOT NULL,
    link_id         BIGINT,
    record          TEXT        NOT NULL,
    property        TEXT        NOT NULL,
    old             JSONB,
    new             JSONB,
    is_create       BOOLEAN     NOT NULL DEFAULT false
);
CREATE INDEX guard_held_by_flow ON guard_held (flow_id, id);

-- Events a release put back in the queue: their writes are not held again (the operator approved
-- them). Pruned a day after the release.
CREATE TABLE guard_released (
    flow_id     TEXT        NOT NULL,
    event_id    BIGINT      NOT NULL,
    released_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (flow_id, event_id)
);

-- `max_changed_fraction` divides by a flow's active links.
CREATE INDEX links_active_by_flow ON links (flow_id) WHERE state = 'active';
