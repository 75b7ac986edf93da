//! One integration-test binary with a module per feature; what they share is in [`support`]
//! (docs/architecture.md, "Tests and documents").

mod admin;
mod at_rest;
mod backfill;
mod console;
mod crmoffice;
mod custom;
mod deploy;
mod e2e;
mod exact_webhooks;
mod exactonline;
mod foundation;
mod guard;
mod intake;
mod lost_answer;
mod metrics;
mod polling;
mod poweroffice;
mod private_comments;
mod queue;
mod queue_takeover;
mod reconcile;
mod registry;
mod support;
mod sync;
mod transport;
mod webhooks;
mod zendesk;
