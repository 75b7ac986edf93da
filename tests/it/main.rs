//! One integration-test binary with a module per feature (engineering.md item 3).

mod admin;
mod crmoffice;
mod custom;
mod e2e;
mod exactonline;
mod foundation;
mod intake;
mod polling;
mod poweroffice;
mod queue;
mod registry;
mod support;
mod sync;
mod transport;
mod zendesk;
