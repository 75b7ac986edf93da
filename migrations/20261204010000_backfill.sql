-- Backfill (issue 17): job priorities, and plans the operator reviews before they run.

-- Live events come before reconciliation, which comes before backfill (`queue::JobPriority`:
-- 0 live, 1 reconcile, 2 backfill). Every existing and every intake/polling job is live (the
-- default). Small numbers rather than names so that the claim can walk an index in priority
-- order; the CHECK keeps the set closed, as the enum is.
ALTER TABLE jobs ADD COLUMN priority SMALLINT NOT NULL DEFAULT 0
    CONSTRAINT jobs_priority_known CHECK (priority IN (0, 1, 2));

-- The claim walks unfinished jobs in (priority, id) order and stops at its LIMIT, so a live job
-- is claimed before any backfill job that was enqueued earlier. Same name and predicate as
-- before: the claim's plan (docs/queue.md, "Claim plan after a burst") and the gauges keep
-- using it; only the key gained the priority in front.
DROP INDEX jobs_unfinished;
CREATE INDEX jobs_unfinished ON jobs (priority, id) WHERE state IN ('ready', 'running');

-- A plan: what `tether backfill plan` found and what running it will cost. The summary is kept
-- as the command printed it (JSON), so `tether backfill status` shows the reviewed figures.
CREATE TABLE backfill_plans (
    id                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- The flows it covers, with their counts; vendor calls per system; the estimate.
    summary           JSONB       NOT NULL,
    estimated_seconds BIGINT      NOT NULL,
    -- Set by the first `tether backfill run`; a plan is enqueued once (running it again only
    -- follows it).
    started_at        TIMESTAMPTZ,
    enqueued_at       TIMESTAMPTZ
);

-- One row per source record and flow: what the plan says about it, and what became of it.
CREATE TABLE backfill_items (
    id                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    plan_id           BIGINT      NOT NULL REFERENCES backfill_plans (id) ON DELETE CASCADE,
    flow_id           TEXT        NOT NULL,
    -- Parents before children: items of flows whose records others reference run first.
    stage             INT         NOT NULL,
    source_system     TEXT        NOT NULL,
    source_type       TEXT        NOT NULL,
    source_id         TEXT        NOT NULL,
    -- The source record's last change as planned: a record changed since is planned again by
    -- the engine (its own merge criteria) instead of following the plan.
    source_updated_at TIMESTAMPTZ,
    verdict           TEXT        NOT NULL
                      CHECK (verdict IN ('linked', 'link', 'create', 'conflict', 'skip')),
    -- linked: the counterpart; link: the record to link; conflict: a candidate.
    target_id         TEXT,
    -- link: the criterion that matched (`Name=name`); conflict/skip: the reason's code.
    reason            TEXT,
    detail            TEXT,
    -- link: source values the link writes to the target (properties that differ).
    writes            INT         NOT NULL DEFAULT 0,
    -- Set when the item's record was enqueued (one event per source record of the plan).
    event_id          BIGINT,
    -- Set by the engine when it has carried the item out: as planned, planned again by the
    -- engine (the record changed since, or the match no longer fits), found linked already, or
    -- gone (the record no longer exists).
    done_at           TIMESTAMPTZ,
    result            TEXT CHECK (result IN ('followed', 'replanned', 'already_linked', 'gone')),
    CONSTRAINT backfill_items_once UNIQUE (plan_id, flow_id, source_id)
);
-- The engine finds a job's items by its event.
CREATE INDEX backfill_items_by_event ON backfill_items (event_id) WHERE event_id IS NOT NULL;
CREATE INDEX backfill_items_by_plan ON backfill_items (plan_id, stage, id);
