//! One integration-test binary with a module per feature (engineering.md item 3).

mod foundation;
mod intake;
