-- What a create sent, kept with its intent. When a retry finds the record an earlier attempt
-- created (the create timed out, or the process died before the link was stored), these values
-- are the new link's merge base: the base is what Tether wrote, so a change made to the new
-- record since then (an agent renaming it) counts as a change and is kept, and a change to the
-- source since then is written. Taking the base from the record as found instead made such an
-- edit look unchanged, and the older source value was written over it.
-- Shaped like `links.snapshot`; NULL on intents recorded before this column existed, whose retry
-- falls back to the record as found.
ALTER TABLE link_intents ADD COLUMN written JSONB;
