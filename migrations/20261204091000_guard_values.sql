-- The new values of the guard's counted writes, one row per property, so that `max_same_value`
-- is counted from the rows holding this write's own values (an index range) instead of from every
-- write of the window (docs/guard.md). Counting the whole window per write cost 5 ms at 1,200
-- writes, under the flow's lock, and grew with the window. A value is compared by a 64-bit hash of
-- its JSON text: a collision could only make two values count as one (a hold too early), never
-- let a write through.
CREATE TABLE guard_values (
    flow_id    TEXT        NOT NULL,
    at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    key        TEXT        NOT NULL,
    value_hash BIGINT      NOT NULL,
    record     TEXT        NOT NULL
);
CREATE INDEX guard_values_by_value ON guard_values (flow_id, key, value_hash, at);
CREATE INDEX guard_values_window ON guard_values (flow_id, at);

INSERT INTO guard_values (flow_id, at, key, value_hash, record)
SELECT w.flow_id, w.at, e.key, hashtextextended(e.value::text, 0), w.record
FROM guard_writes w, jsonb_each(w.vals) e;

-- The window's writes and distinct records are counted from this index alone.
CREATE INDEX guard_writes_window_records ON guard_writes (flow_id, at) INCLUDE (record, created);
DROP INDEX guard_writes_window;
