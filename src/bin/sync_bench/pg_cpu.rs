//! PostgreSQL's CPU split by kind of process (client backends, autovacuum, the WAL writer, the
//! checkpointer, the background writer, the rest), from `/proc`: which of them takes PostgreSQL's
//! CPU beyond executing statements decides what to cut.
//!
//! A sampler thread reads the postmaster's children every [`PERIOD`]. A process alive at a round's
//! start counts from its figure then; one started during the round counts whole. A process that
//! exits between two samples keeps its last sample; what it used after that (and a process that
//! lived and died between two samples) is in PostgreSQL's total only, reported as `unsampled`,
//! with the postmaster's own time.
//! The sampler's own CPU is reported too: it runs in the benchmark's process, whose CPU the bench
//! prints as the simulators'.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often the postmaster's children are read.
const PERIOD: Duration = Duration::from_millis(50);

/// A kind of PostgreSQL process, from the title it shows in `/proc/<pid>/cmdline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// A connection's backend (tether's, the benchmark's).
    Client,
    /// The autovacuum launcher and its workers (VACUUM and ANALYZE).
    Autovacuum,
    WalWriter,
    Checkpointer,
    BgWriter,
    /// The postmaster itself and any other background process.
    Other,
}

impl Kind {
    /// The kind of a process titled `title` (`postgres: <what>`, PostgreSQL's process titles).
    pub fn of_title(title: &str) -> Kind {
        let what = title.trim_start_matches("postgres: ");
        if what.starts_with("autovacuum") {
            Kind::Autovacuum
        } else if what.starts_with("walwriter") {
            Kind::WalWriter
        } else if what.starts_with("checkpointer") {
            Kind::Checkpointer
        } else if what.starts_with("background writer") {
            Kind::BgWriter
        } else if [
            "logical replication",
            "stats collector",
            "archiver",
            "walsummarizer",
            "io worker",
            "walreceiver",
            "walsender",
        ]
        .iter()
        .any(|p| what.starts_with(p))
            || !title.starts_with("postgres: ")
        {
            Kind::Other
        } else {
            Kind::Client
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Kind::Client => "client backends",
            Kind::Autovacuum => "autovacuum",
            Kind::WalWriter => "walwriter",
            Kind::Checkpointer => "checkpointer",
            Kind::BgWriter => "bgwriter",
            Kind::Other => "other",
        }
    }
}

/// One process as last sampled.
struct Seen {
    kind: Kind,
    /// Its CPU ticks (user + system) when the round started (0 if it started during the round).
    at_start: u64,
    last: u64,
    /// The same of system time alone (the kernel's work for it: sockets, WAL writes and flushes).
    sys_at_start: u64,
    sys_last: u64,
}

#[derive(Default)]
struct State {
    /// By (pid, start time), so a reused pid is a new process.
    procs: HashMap<(u32, u64), Seen>,
}

/// The sampler; stops when dropped.
pub struct PgCpu {
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    postmaster: u32,
    /// The sampler thread's own CPU ticks, read by the thread itself.
    sampler_ticks: Arc<std::sync::atomic::AtomicU64>,
}

/// A round's figures: ticks per kind (all, and system time alone), the ticks no sample saw, and
/// the sampler's own ticks.
pub struct Split {
    pub by_kind: BTreeMap<Kind, (u64, u64)>,
    pub unsampled: u64,
    pub sampler: u64,
}

impl PgCpu {
    pub fn start(postmaster: u32) -> PgCpu {
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let sampler_ticks = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (s, halt, own) = (state.clone(), stop.clone(), sampler_ticks.clone());
        std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                sample(&s, postmaster);
                if let Some(t) = thread_ticks() {
                    own.store(t, Ordering::Relaxed);
                }
                std::thread::sleep(PERIOD);
            }
        });
        PgCpu {
            state,
            stop,
            postmaster,
            sampler_ticks,
        }
    }

    /// The sampler's CPU ticks so far.
    pub fn sampler_ticks(&self) -> u64 {
        self.sampler_ticks.load(Ordering::Relaxed)
    }

    /// Starts a round: forgets exited processes and counts the live ones from now.
    pub fn start_round(&self) {
        sample(&self.state, self.postmaster);
        let mut st = self.state.lock().expect("sampler state");
        let live = children(self.postmaster);
        st.procs.retain(|key, _| live.contains_key(key));
        for seen in st.procs.values_mut() {
            seen.at_start = seen.last;
            seen.sys_at_start = seen.sys_last;
        }
    }

    /// The round's split of `total` (PostgreSQL's whole tree over the round, from
    /// `measure::tree_cpu_ticks`), `sampler_before` the sampler's ticks at the round's start.
    pub fn finish_round(&self, total: u64, sampler_before: u64) -> Split {
        sample(&self.state, self.postmaster);
        let st = self.state.lock().expect("sampler state");
        let mut by_kind = BTreeMap::new();
        for seen in st.procs.values() {
            let kind = by_kind.entry(seen.kind).or_insert((0, 0));
            kind.0 += seen.last.saturating_sub(seen.at_start);
            kind.1 += seen.sys_last.saturating_sub(seen.sys_at_start);
        }
        let seen: u64 = by_kind.values().map(|k| k.0).sum();
        Split {
            by_kind,
            unsampled: total.saturating_sub(seen),
            sampler: self.sampler_ticks().saturating_sub(sampler_before),
        }
    }
}

impl Drop for PgCpu {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads every child of the postmaster once.
fn sample(state: &Mutex<State>, postmaster: u32) {
    let live = children(postmaster);
    let mut st = state.lock().expect("sampler state");
    for (key, (ticks, sys)) in live {
        let seen = st.procs.entry(key).or_insert_with(|| Seen {
            kind: Kind::of_title(&title(key.0)),
            at_start: 0,
            last: 0,
            sys_at_start: 0,
            sys_last: 0,
        });
        seen.last = ticks;
        seen.sys_last = sys;
        // A child just forked may not have set its title yet: read it again until it has.
        if seen.kind == Kind::Other {
            seen.kind = Kind::of_title(&title(key.0));
        }
    }
}

/// The postmaster's children: (pid, start time) to CPU ticks (all, system).
fn children(postmaster: u32) -> HashMap<(u32, u64), (u64, u64)> {
    let mut out = HashMap::new();
    for pid in tether::measure::process_ids() {
        if let Some(s) = stat(&format!("/proc/{pid}/stat")) {
            if s.ppid == postmaster {
                out.insert((pid, s.start), (s.ticks, s.sys));
            }
        }
    }
    out
}

/// What the sampler reads of a process's `stat` file (proc(5)).
struct Stat {
    ppid: u32,
    start: u64,
    /// User + system ticks.
    ticks: u64,
    sys: u64,
}

/// Fields are counted after the command name's last ')'.
fn stat(path: &str) -> Option<Stat> {
    let text = std::fs::read_to_string(path).ok()?;
    let fields: Vec<&str> = text.get(text.rfind(')')? + 2..)?.split(' ').collect();
    let n = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(Stat {
        ppid: n(1)? as u32,
        start: n(19)?,
        ticks: n(11)? + n(12)?,
        sys: n(12)?,
    })
}

/// The process title PostgreSQL set (`/proc/<pid>/cmdline`, arguments separated by NULs).
fn title(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .replace('\0', " ")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

/// The calling thread's own CPU ticks.
fn thread_ticks() -> Option<u64> {
    stat("/proc/thread-self/stat").map(|s| s.ticks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_name_their_kind() {
        let cases = [
            ("postgres: tether tether 127.0.0.1(5432) idle", Kind::Client),
            ("postgres: autovacuum worker tether", Kind::Autovacuum),
            ("postgres: autovacuum launcher", Kind::Autovacuum),
            ("postgres: walwriter", Kind::WalWriter),
            ("postgres: checkpointer", Kind::Checkpointer),
            ("postgres: background writer", Kind::BgWriter),
            ("postgres: logical replication launcher", Kind::Other),
            ("/usr/lib/postgresql/16/bin/postgres -D x", Kind::Other),
        ];
        for (title, kind) in cases {
            assert_eq!(Kind::of_title(title), kind, "{title}");
        }
    }
}
