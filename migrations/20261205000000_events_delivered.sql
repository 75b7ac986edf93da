-- What a delivery says about its record's state, where that lets the sync engine settle the event
-- without reading the record (docs/sync-rules.md, "An echo without a read"). Today: Zendesk
-- events that name one changed property, as {"property", "current", "updated_at"} (the property's
-- new value and the record's `updated_at` from the event's `detail`). Null for every other
-- delivery. On the events table, not the jobs table, so the queue's hot rows stay small; a value
-- longer than intake's bound is not kept (such an event is read as before).
ALTER TABLE events ADD COLUMN delivered JSONB;
