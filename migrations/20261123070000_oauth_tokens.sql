-- OAuth tokens of systems whose refresh tokens rotate (Exact Online). They must live in the
-- database, not in memory or the config file: every refresh returns a new refresh token and
-- invalidates the old one, so all replicas have to share the current one, and only one of them may
-- use it at a time. A refresh happens under `SELECT ... FOR UPDATE` on the row.
CREATE TABLE oauth_tokens (
    system            TEXT        NOT NULL,
    -- The account the tokens are for (Exact: the division), so two divisions never share a row.
    account           TEXT        NOT NULL,
    access_token      TEXT,
    access_expires_at TIMESTAMPTZ,
    -- The current refresh token. Only the replica holding the row lock may use it.
    refresh_token     TEXT        NOT NULL,
    -- When the last access token was obtained: Exact refuses a new one sooner than 570 s later.
    refreshed_at      TIMESTAMPTZ,
    -- SHA-256 (hex) of the configured refresh token that seeded this row. When the system is stopped,
    -- a configured token with a different hash means the operator re-authorised: the row is reseeded.
    seed_sha256       TEXT        NOT NULL,
    -- Set when the vendor rejected the refresh token: the system stays stopped (no token calls)
    -- until the operator configures a new refresh token.
    stopped_reason    TEXT,
    stopped_at        TIMESTAMPTZ,
    PRIMARY KEY (system, account)
);
