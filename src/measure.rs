//! CPU figures of processes and of the machine from Linux's `/proc`, for the benchmark binaries
//! (`tether-loadgen`, `tether-sync-bench`), which report how the cores were shared between
//! tether, PostgreSQL and whatever drives the load. Not used by the service itself.

use std::time::Duration;

/// Clock ticks per second of `/proc` times (USER_HZ, 100 on every mainstream Linux architecture).
pub const TICKS_PER_SECOND: f64 = 100.0;

/// The fields of `/proc/<pid>/stat` (proc(5)) the figures need.
struct ProcStat {
    ppid: u32,
    /// User + system ticks of the process itself.
    own: u64,
    /// User + system ticks of its exited children it has waited for.
    reaped_children: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields are counted after the last ')'.
    let fields: Vec<&str> = text.get(text.rfind(')')? + 2..)?.split(' ').collect();
    let n = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(ProcStat {
        ppid: n(1)? as u32,
        own: n(11)? + n(12)?,
        reaped_children: n(13)? + n(14)?,
    })
}

/// User + system CPU ticks of process `pid`; `None` if it is gone.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|s| s.own)
}

/// CPU ticks of process `root` and of its children, running or exited (PostgreSQL's backends are
/// the postmaster's children; an exited one's time joins the postmaster's figures once reaped).
pub fn tree_cpu_ticks(root: u32) -> Option<u64> {
    let stat = proc_stat(root)?;
    let mut total = stat.own + stat.reaped_children;
    for pid in process_ids() {
        if pid == root {
            continue;
        }
        if let Some(child) = proc_stat(pid).filter(|s| s.ppid == root) {
            total += child.own;
        }
    }
    Some(total)
}

/// The ids of the machine's processes (the numeric entries of `/proc`); none if it cannot be read.
pub fn process_ids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
}

/// Busy ticks of the whole machine (all CPUs) from `/proc/stat`: everything but idle and iowait.
pub fn machine_busy_ticks() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    Some(total - v.get(3).copied().unwrap_or(0) - v.get(4).copied().unwrap_or(0))
}

/// `ticks` used over `elapsed` as a percentage of one core (the machine has 100 per core).
pub fn percent_of_core(ticks: u64, elapsed: Duration) -> f64 {
    ticks as f64 / TICKS_PER_SECOND / elapsed.as_secs_f64() * 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_and_its_tree_have_figures() {
        let me = std::process::id();
        let own = cpu_ticks(me).expect("this process is in /proc");
        assert!(tree_cpu_ticks(me).expect("and its tree") >= own);
        assert!(machine_busy_ticks().is_some());
        assert_eq!(percent_of_core(200, Duration::from_secs(2)), 100.0);
    }
}
