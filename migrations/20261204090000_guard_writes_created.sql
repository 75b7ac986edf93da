-- Whether a counted write created a counterpart. Creates count toward `max_writes` and
-- `max_same_value`, but not toward `max_changed_fraction`: that is the share of the flow's linked
-- records changed, and a create changes none (docs/guard.md). Counted as changes, a burst of new
-- records admitted faster than their links were stored made the share pass 100%.
ALTER TABLE guard_writes ADD COLUMN created BOOLEAN NOT NULL DEFAULT false;
