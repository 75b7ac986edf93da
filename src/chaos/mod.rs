//! Chaos suite (issue 19): three `tether serve` replicas behind a private nginx, the vendor
//! simulators with faults, a steady workload across four dataflows in both directions, replicas
//! SIGKILLed, PostgreSQL restarted and a rolling SIGTERM restart, then the properties checked
//! against the simulators' state. `tether-chaos` (src/bin/) and `scripts/chaos.sh` run it.

pub mod checks;
pub mod cluster;
pub mod faults;
pub mod model;
pub mod run;
pub mod sims;
pub mod workload;
