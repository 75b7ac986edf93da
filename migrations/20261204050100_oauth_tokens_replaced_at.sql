-- `tether credentials set <system> --refresh-token` hands a running service a new refresh token
-- without a restart (docs/vendors.md, Exact Online item 5). It writes the token into the row,
-- lifts the stop and sets `replaced_at`: every `serve` watches this column and, when it moves,
-- lifts its own in-memory stop of the system and brings forward the jobs it had put off.
ALTER TABLE oauth_tokens ADD COLUMN replaced_at TIMESTAMPTZ;
