-- The work queue proper (issue 4). Replaces the foundation's first `jobs` table outright: nothing
-- is deployed yet, and a fresh definition reads better than a stack of ALTERs.
DROP TABLE jobs;

CREATE TABLE jobs (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The payload stays in `events`; this row is small because it is rewritten on every claim and
    -- completion (engineering.md item 12).
    event_id     BIGINT      NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    -- system/entity_type/record_id. Jobs with one key never run at once and run in id order: a
    -- job is claimable only while no other unfinished job of its key is running or older.
    record_key   TEXT        NOT NULL,
    -- ready: waiting for run_at (a retry or deferral is a ready row with attempts/deferrals > 0);
    -- running: leased to lease_owner until lease_until; done / dead: finished.
    state        TEXT        NOT NULL DEFAULT 'ready'
                 CHECK (state IN ('ready', 'running', 'done', 'dead')),
    -- Runs that counted (a claim counts one; a back-pressure deferral gives it back).
    attempts     INT         NOT NULL DEFAULT 0,
    -- Back-pressure reschedules (429, timeout, reference not synced yet), bounded separately.
    deferrals    INT         NOT NULL DEFAULT 0,
    -- Incremented by every claim: (id, claims) names one lease, so a worker whose lease expired
    -- and was taken over can no longer complete, fail or extend the job, even if the new holder
    -- is its own process.
    claims       INT         NOT NULL DEFAULT 0,
    run_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    lease_owner  UUID,
    lease_until  TIMESTAMPTZ,
    last_error   TEXT,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at  TIMESTAMPTZ
) WITH (
    -- The table churns constantly: vacuum after 1% dead rows instead of the default 20%, and
    -- without cost-based sleeping, so dead tuples never pile up behind a slow autovacuum
    -- (Oban's scaling guide).
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);

-- The claim scan: unfinished jobs in id order. Partial, so finished rows waiting for pruning and
-- dead letters cost the claim nothing.
CREATE INDEX jobs_unfinished ON jobs (id) WHERE state IN ('ready', 'running');

-- The per-record ordering check ("is an older or running job of this key unfinished?"), a
-- handful of entries per key at most.
CREATE INDEX jobs_unfinished_by_key ON jobs (record_key, id) INCLUDE (state)
    WHERE state IN ('ready', 'running');

-- Pruning finished jobs by age, and listing dead letters.
CREATE INDEX jobs_done_at ON jobs (finished_at) WHERE state = 'done';
CREATE INDEX jobs_dead ON jobs (id) WHERE state = 'dead';

-- Event pruning asks whether an event still has a live job.
CREATE INDEX jobs_event ON jobs (event_id);
CREATE INDEX events_received_at ON events (received_at);

-- Wake-up. One NOTIFY per INSERT statement (not per row), and PostgreSQL folds identical
-- notifications of one transaction into one, so an enqueueing transaction pays for at most one
-- NOTIFY at commit however many jobs it adds (engineering.md item 13: NOTIFY takes a global lock
-- at commit). Workers poll as well, so a lost notification only costs latency.
CREATE FUNCTION jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tether_jobs', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_notify AFTER INSERT ON jobs
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_notify();
