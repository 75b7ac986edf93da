-- Whether the side Tether wrote last answered its write with every synced property as the link's
-- snapshot has it (docs/sync-rules.md, "An echo without a read"). With it, a webhook that carries
-- the record's `updated_at` equal to the stamp of that write is the echo, settled without reading
-- the record again. False whenever a sync stores the link without such a write, so it never
-- vouches for a snapshot or stamp it did not see.
ALTER TABLE links ADD COLUMN last_write_settled BOOLEAN NOT NULL DEFAULT false;
