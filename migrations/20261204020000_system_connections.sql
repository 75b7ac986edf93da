-- When each system was first connected (the first `tether serve` with its section configured).
-- Polling and reconciliation cursors start here: what changed before is the past, which only a
-- reviewed backfill plan writes (README, "First connection").
CREATE TABLE system_connections (
    system text PRIMARY KEY,
    first_connected_at timestamptz NOT NULL
);
