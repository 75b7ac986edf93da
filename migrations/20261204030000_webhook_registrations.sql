-- Webhooks Tether registered at a vendor (`tether webhooks install`), so that `status` can ask the
-- vendor about them, `uninstall` removes only these, and intake accepts their signing secrets.
-- `signing_secret` is sealed with `secrets.key` (src/at_rest.rs) when a key is configured; the
-- associated data is `webhook_registrations/<system>/<vendor_id>/signing_secret`.
CREATE TABLE webhook_registrations (
    system          TEXT        NOT NULL,
    vendor_id       TEXT        NOT NULL,
    endpoint        TEXT        NOT NULL,
    topics          TEXT[]      NOT NULL,
    signing_secret  TEXT,
    -- false: the webhook existed with Tether's endpoint before and install took it over;
    -- uninstall then leaves it at the vendor.
    created_by_tether BOOLEAN   NOT NULL,
    installed_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (system, vendor_id)
);
