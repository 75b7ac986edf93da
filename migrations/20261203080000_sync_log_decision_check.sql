-- The engine's decisions are a closed set (`tether::sync::Decision`). Until now the column took any
-- text, so a typo in the code would have been stored silently and `tether links show`, the sandbox
-- report and the benchmark would have counted it as something else. The constraint makes the
-- database refuse a name the code does not define; a unit test in src/sync/decision.rs checks that
-- this list and the enum are the same.
--
-- Rows written by earlier versions: `flow_disabled` was replaced by `idle` (one entry naming every
-- flow of the event that cannot run); it is renamed so the old rows read like new ones. Every
-- other name ever written is still a decision.
UPDATE sync_log SET decision = 'idle' WHERE decision = 'flow_disabled';

ALTER TABLE sync_log ADD CONSTRAINT sync_log_decision_known
    CHECK (decision IN ('created', 'linked_after_retry', 'linked_by_merge_criteria', 'linked_by_other_flow', 'no_match', 'not_created_back', 'updated', 'converged', 'echo', 'unchanged', 'stale', 'conflict', 'waiting_for_reference', 'waiting_for_create', 'deleted', 'not_found', 'no_dataflow', 'idle', 'not_connected', 'system_stopped', 'paused', 'error'));
