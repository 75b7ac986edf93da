-- Vendor rate budgets shared by every replica (src/connectors/transport/shared.rs): one row per
-- vendor account and limit. `tat` is GCRA's theoretical arrival time: the next call's place is
-- `tat` minus the burst tolerance. Each call moves it in one UPDATE under the row lock, on
-- PostgreSQL's clock, so replicas never count apart.
CREATE TABLE rate_budgets (
    budget  TEXT        PRIMARY KEY,
    tat     TIMESTAMPTZ NOT NULL,
    -- Whether the last UPDATE granted its caller a place (read back through RETURNING only).
    granted BOOLEAN     NOT NULL DEFAULT false
);
