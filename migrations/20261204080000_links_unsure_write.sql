-- A write whose answer never came (a timeout, or a 5xx that may follow the change): what it sent,
-- kept on the link until the next sync of the pair stores a new snapshot. If the written side then
-- shows those values, the write happened and its values are the merge base, so an edit made on
-- the other side meanwhile is a change and is not overwritten (docs/sync-rules.md, "A write whose
-- answer was lost").
ALTER TABLE links ADD COLUMN unsure_write JSONB;
