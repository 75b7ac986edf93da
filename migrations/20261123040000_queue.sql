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

-- The claim, as a function so that its planner settings travel with it in one round trip. The
-- statistics of this table are stale whenever a burst arrives (it looked empty at the last
-- ANALYZE); the planner then reads every unfinished job through a bitmap scan and sorts them, on
-- every claim (seen: 100,000 rows read per claim of 500). Walking `jobs_unfinished` in id order
-- and stopping at the LIMIT is right at every table size, so the other plans are switched off.
--
-- The CTE selects candidates FOR UPDATE SKIP LOCKED with a LIMIT and the UPDATE touches only
-- those (without the CTE the planner may update more rows than the limit). A candidate is a ready
-- job that is due, or a running job whose lease expired (its worker died), and only if no other
-- unfinished job of the same record key is running or older: one key's jobs run one at a time
-- and in id order, while other keys run in parallel. The check reads the statement's snapshot: a
-- job seen unfinished blocks its successors, and a job only leaves ready/running by being
-- finished, so a successor is never claimed early.
CREATE FUNCTION jobs_claim(p_owner UUID, p_limit INT, p_lease_ms BIGINT)
RETURNS TABLE (job_id BIGINT, job_event_id BIGINT, job_attempts INT, job_deferrals INT,
               job_claims INT, ev_system TEXT, ev_entity_type TEXT, ev_record_id TEXT,
               ev_action TEXT, ev_occurred_at TIMESTAMPTZ, ev_delivery_id TEXT)
LANGUAGE sql
SET enable_seqscan = off
SET enable_bitmapscan = off
SET enable_sort = off
AS $$
    WITH candidates AS (
        SELECT j.id
        FROM jobs j
        WHERE j.state IN ('ready', 'running')
          AND ((j.state = 'ready' AND j.run_at <= now())
               OR (j.state = 'running' AND j.lease_until < now()))
          AND NOT EXISTS (
              SELECT 1 FROM jobs o
              WHERE o.record_key = j.record_key
                AND o.state IN ('ready', 'running')
                AND o.id <> j.id
                AND (o.state = 'running' OR o.id < j.id))
        ORDER BY j.id
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE jobs j
        SET state = 'running',
            lease_owner = p_owner,
            lease_until = now() + p_lease_ms * interval '1 millisecond',
            attempts = j.attempts + 1,
            claims = j.claims + 1
        FROM candidates c
        WHERE j.id = c.id
        RETURNING j.id, j.event_id, j.attempts, j.deferrals, j.claims
    )
    SELECT c.id, c.event_id, c.attempts, c.deferrals, c.claims,
           e.system, e.entity_type, e.record_id, e.action, e.occurred_at, e.delivery_id
    FROM claimed c JOIN events e ON e.id = c.event_id
    ORDER BY c.id
$$;
