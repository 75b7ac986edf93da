//! Tether keeps records in Zendesk and a company's business systems in sync, both ways.
//!
//! Data flows one way through the modules:
//! `http` (axum routes) → `intake` (verify, parse, dedupe, store) → `queue` (claim, lease, retry,
//! dead-letter) → `sync` (registry + links + merge rules) → `connectors` (one per system) → vendor APIs.
//! `registry` is pure data and logic; `db` owns the PostgreSQL pool, migrations and the embedded
//! cluster. `simulators` are servers that play the vendors for tests and `tether sandbox`.
#![forbid(unsafe_code)]

pub mod admin;
pub mod at_rest;
pub mod backfill;
pub mod chaos;
pub mod cli;
pub mod config;
pub mod connectors;
pub mod credentials;
pub mod db;
pub mod domain;
pub mod guard;
pub mod http;
pub mod intake;
pub mod measure;
pub mod ops;
pub mod polling;
pub mod ports;
pub mod queue;
pub mod registry;
pub mod sandbox;
pub mod service;
pub mod shutdown;
pub mod signing;
pub mod simulators;
pub mod sync;
pub mod systems;
pub mod telemetry;
pub mod testing;
pub mod webhooks;
