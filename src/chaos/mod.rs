//! Chaos suite (issue 19): the processes of a run (replicas behind a private nginx) and the
//! vendor simulators with faults. The driver (workload, fault schedule, checks) is not written yet.

pub mod cluster;
pub mod sims;
