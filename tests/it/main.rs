//! One integration-test binary with a module per feature (engineering.md item 3).

mod admin;
mod at_rest;
mod console;
mod crmoffice;
mod custom;
mod deploy;
mod e2e;
mod exactonline;
mod foundation;
mod intake;
mod metrics;
mod polling;
mod poweroffice;
mod queue;
mod registry;
mod support;
mod sync;
mod transport;
mod zendesk;
