//! Stateful stand-ins for the six vendor APIs, used by the tests and by `tether sandbox`.
//! They are servers, not clients: each one keeps its records in memory, checks auth, pages,
//! rate-limits with 429 and `Retry-After`, injects faults on demand, counts requests per endpoint
//! and, where the vendor does, sends signed webhooks on every change made through its API.
//!
//! Shared machinery lives in [`kit`]; each system has its own module.

pub mod crmoffice;
pub mod custom;
pub mod exactonline;
pub mod kit;
pub mod poweroffice;
pub mod zendesk;
