-- A new decision: `private_comment`, a Zendesk ticket comment that is private (made private after
-- it was synced, or private from the start) is not synced onwards by a flow whose
-- `sync_private_comments` switch is off (the default; docs/sync-rules.md). The CHECK is replaced
-- with the same list plus the new name; a unit test in src/sync/decision.rs checks that this list
-- and the enum are the same.
ALTER TABLE sync_log DROP CONSTRAINT sync_log_decision_known;

ALTER TABLE sync_log ADD CONSTRAINT sync_log_decision_known
    CHECK (decision IN ('created', 'linked_after_retry', 'linked_by_merge_criteria', 'linked_by_other_flow', 'no_match', 'not_created_back', 'updated', 'converged', 'echo', 'unchanged', 'stale', 'conflict', 'waiting_for_reference', 'waiting_for_create', 'deleted', 'not_found', 'no_dataflow', 'idle', 'not_connected', 'system_stopped', 'paused', 'target_closed', 'private_comment', 'error'));
