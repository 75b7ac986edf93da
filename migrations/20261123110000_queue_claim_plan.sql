-- The claim's per-record ordering check ("is an older or running job of this key unfinished?")
-- probes one index per candidate. As a partial index (state IN ready/running) its size estimate
-- came only from the last VACUUM/ANALYZE: after a burst of enqueues that followed an ANALYZE of an
-- all-finished table, the planner believed it (and `jobs_unfinished`) empty, found a full scan of
-- the "empty" index cheaper than a keyed probe, and ran that scan once per candidate: 7.6 s for one
-- claim of 500 with 100,000 ready jobs (docs/queue.md, "Claim plan after a burst"). A full index's
-- size estimate follows the table's current size, so the keyed probe is always the cheap path.
-- It also holds finished rows until they are pruned: one more index entry per completion, which
-- costs far less than one wrong plan.
--
-- The check says `state NOT IN ('done', 'dead')` (equivalent under the state CHECK) instead of
-- `state IN ('ready', 'running')`, so the planner cannot serve it from `jobs_unfinished`, whose
-- predicate that clause does not imply.
DROP INDEX jobs_unfinished_by_key;
CREATE INDEX jobs_by_key ON jobs (record_key, id) INCLUDE (state);
