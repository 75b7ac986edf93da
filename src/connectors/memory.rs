//! An in-memory [`Connector`] for tests and benchmarks of the sync engine: records per entity type,
//! `updated_at` set on every write from a strictly increasing clock, idempotency keys remembered
//! for `find_created`, call counters per operation, and knobs to fail the next call or to "crash"
//! after the vendor's create (the record exists, but the caller sees an error).
//!
//! Owns nothing persistent. Must not call anything outside `connectors`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use tokio::sync::oneshot;

use super::{get_path, ChangePage, ConditionalWrites, Connector, ConnectorError, Record};
use crate::domain::SystemId;

/// An error the next call of one operation returns (ConnectorError is not Clone, so the knob holds
/// the kind and builds the error when it fires).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    RateLimited,
    Timeout,
    Transient,
    Rejected,
    Unauthorized,
    /// The record refuses changes in its state (a closed Zendesk ticket).
    TargetClosed,
}

/// Operation names used by counters and failure knobs.
pub const OPS: [&str; 6] = [
    "fetch",
    "create",
    "find_created",
    "update",
    "list_changed",
    "find_by",
];

#[derive(Default)]
struct State {
    records: HashMap<String, BTreeMap<String, Record>>,
    created_by_key: HashMap<(String, String), String>,
    next_id: u64,
    last_time: Option<DateTime<Utc>>,
    counters: HashMap<&'static str, u64>,
    fail_next: HashMap<&'static str, Failure>,
    crash_after_create: bool,
    read_only_types: Vec<String>,
    final_deletes: bool,
    /// `Exact` once [`MemoryConnector::write_conditionally`] was called; `No` before.
    conditional_writes: ConditionalWrites,
    pause_after_update: Option<(oneshot::Sender<()>, oneshot::Receiver<()>)>,
}

/// Holds the next `update` after it stored its change and before it returns (see
/// [`MemoryConnector::pause_after_next_update`]).
pub struct UpdatePause {
    /// Fires once the update has stored its change.
    pub reached: oneshot::Receiver<()>,
    /// Send (or drop) to let the update return.
    pub release: oneshot::Sender<()>,
}

/// See the module doc.
pub struct MemoryConnector {
    system: SystemId,
    state: Mutex<State>,
}

impl MemoryConnector {
    pub fn new(system: SystemId) -> MemoryConnector {
        MemoryConnector {
            system,
            state: Mutex::new(State {
                // Each system numbers from its own range, so a foreign id written by mistake
                // never happens to be a valid id on the other side.
                next_id: 100_000
                    * (SystemId::ALL.iter().position(|s| *s == system).unwrap_or(0) as u64 + 1),
                ..State::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panicking test thread must not hide the state from the others.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Inserts a record natively (as a user of the vendor would), not counted as an API call.
    pub fn insert(&self, entity_type: &str, fields: Map<String, Value>) -> Record {
        let mut st = self.lock();
        st.next_id += 1;
        let id = st.next_id.to_string();
        let record = Record {
            id: id.clone(),
            updated_at: Some(tick(&mut st)),
            fields,
        };
        st.records
            .entry(entity_type.to_owned())
            .or_default()
            .insert(id, record.clone());
        record
    }

    /// Edits a record natively: merges the fields and moves `updated_at` forward.
    pub fn edit(&self, entity_type: &str, id: &str, fields: Map<String, Value>) -> Record {
        let mut st = self.lock();
        let now = tick(&mut st);
        let record = st
            .records
            .get_mut(entity_type)
            .and_then(|m| m.get_mut(id))
            .unwrap_or_else(|| panic!("no {entity_type} {id} in the memory connector"));
        for (k, v) in fields {
            record.fields.insert(k, v);
        }
        record.updated_at = Some(now);
        record.clone()
    }

    /// Deletes a record natively.
    pub fn delete(&self, entity_type: &str, id: &str) {
        let mut st = self.lock();
        if let Some(m) = st.records.get_mut(entity_type) {
            m.remove(id);
        }
    }

    /// The record as stored, without counting a call.
    pub fn get(&self, entity_type: &str, id: &str) -> Option<Record> {
        self.lock()
            .records
            .get(entity_type)
            .and_then(|m| m.get(id))
            .cloned()
    }

    /// Every record of a type, without counting a call.
    pub fn all(&self, entity_type: &str) -> Vec<Record> {
        self.lock()
            .records
            .get(entity_type)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Declares this system's delete notifications final, as Exact Online's are
    /// ([`Connector::deletes_are_final`]).
    pub fn declare_final_deletes(&self) {
        self.lock().final_deletes = true;
    }

    /// How many calls of `op` ("fetch", "create", ...) were made.
    pub fn count(&self, op: &str) -> u64 {
        self.lock().counters.get(op).copied().unwrap_or(0)
    }

    pub fn reset_counters(&self) {
        self.lock().counters.clear();
    }

    /// The next call of `op` fails with `failure` (once).
    pub fn fail_next(&self, op: &'static str, failure: Failure) {
        assert!(OPS.contains(&op), "unknown operation {op}");
        self.lock().fail_next.insert(op, failure);
    }

    /// The next `create` stores the record and then fails, as if the process died (or the
    /// response was lost) after the vendor created it.
    pub fn crash_after_next_create(&self) {
        self.lock().crash_after_create = true;
    }

    /// The next `update` stores its change, then waits for the test to release it: lets a test
    /// run another event while the engine has written but not yet stored its snapshot.
    pub fn pause_after_next_update(&self) -> UpdatePause {
        let (reached_tx, reached) = oneshot::channel();
        let (release, release_rx) = oneshot::channel();
        self.lock().pause_after_update = Some((reached_tx, release_rx));
        UpdatePause { reached, release }
    }

    /// Offers conditional writes, as a custom system with `conditional_writes` does: an update
    /// naming a stamp the record no longer has is refused ([`ConnectorError::Changed`]).
    pub fn write_conditionally(&self) {
        self.lock().conditional_writes = ConditionalWrites::Exact;
    }

    /// Updates of this type return `Unsupported` (like Zendesk's immutable comments).
    pub fn make_read_only(&self, entity_type: &str) {
        self.lock().read_only_types.push(entity_type.to_owned());
    }

    fn begin(&self, op: &'static str) -> Result<std::sync::MutexGuard<'_, State>, ConnectorError> {
        let mut st = self.lock();
        *st.counters.entry(op).or_default() += 1;
        if let Some(failure) = st.fail_next.remove(op) {
            return Err(self.error(failure));
        }
        Ok(st)
    }

    /// An update; with `seen`, refused unless the record's stamp is still `seen`.
    async fn update_checked(
        &self,
        entity_type: &str,
        id: &str,
        changed: &Map<String, Value>,
        seen: Option<DateTime<Utc>>,
    ) -> Result<Record, ConnectorError> {
        let (stored, pause) = {
            let mut st = self.begin("update")?;
            if st.read_only_types.iter().any(|t| t == entity_type) {
                return Err(ConnectorError::Unsupported {
                    system: self.system,
                    entity_type: entity_type.to_owned(),
                    operation: "update",
                });
            }
            let now = tick(&mut st);
            let Some(record) = st.records.get_mut(entity_type).and_then(|m| m.get_mut(id)) else {
                return Err(ConnectorError::Rejected {
                    system: self.system,
                    status: 404,
                    message: format!("no {entity_type} {id}"),
                });
            };
            // Compared at microseconds, as the contract says (Tether keeps no finer stamp).
            let micros = |t: DateTime<Utc>| t.timestamp_micros();
            if seen.is_some_and(|seen| record.updated_at.map(micros) != Some(micros(seen))) {
                return Err(ConnectorError::Changed {
                    system: self.system,
                    entity_type: entity_type.to_owned(),
                    id: id.to_owned(),
                });
            }
            merge_into(&mut record.fields, changed);
            record.updated_at = Some(now);
            let stored = record.clone();
            (stored, st.pause_after_update.take())
        };
        if let Some((reached, release)) = pause {
            let _ = reached.send(());
            let _ = release.await;
        }
        Ok(stored)
    }

    fn error(&self, failure: Failure) -> ConnectorError {
        let system = self.system;
        match failure {
            Failure::RateLimited => ConnectorError::RateLimited {
                system,
                retry_after: Some(Duration::from_secs(7)),
            },
            Failure::Timeout => ConnectorError::Timeout { system },
            Failure::Transient => ConnectorError::Transient {
                system,
                message: "injected failure".into(),
            },
            Failure::Rejected => ConnectorError::Rejected {
                system,
                status: 422,
                message: "injected rejection".into(),
            },
            Failure::Unauthorized => ConnectorError::Unauthorized {
                system,
                message: "injected credential failure".into(),
            },
            Failure::TargetClosed => ConnectorError::TargetClosed {
                system,
                entity_type: "injected".into(),
                id: "injected".into(),
            },
        }
    }
}

/// A strictly increasing clock, so "the later change wins" is deterministic in tests.
fn tick(st: &mut State) -> DateTime<Utc> {
    let mut now = Utc::now();
    if let Some(last) = st.last_time {
        if now <= last {
            now = last + chrono::Duration::microseconds(1);
        }
    }
    st.last_time = Some(now);
    now
}

fn merge_into(target: &mut Map<String, Value>, changes: &Map<String, Value>) {
    for (k, v) in changes {
        match (target.get_mut(k), v) {
            (Some(Value::Object(existing)), Value::Object(sub)) => merge_into(existing, sub),
            _ => {
                target.insert(k.clone(), v.clone());
            }
        }
    }
}

#[async_trait]
impl Connector for MemoryConnector {
    fn system(&self) -> SystemId {
        self.system
    }

    /// The cursor is the last `updated_at` handed out (exclusive): just before `at`.
    fn start_cursor(&self, _entity_type: &str, at: DateTime<Utc>) -> Option<String> {
        Some((at - chrono::Duration::microseconds(1)).to_rfc3339())
    }

    fn deletes_are_final(&self) -> bool {
        self.lock().final_deletes
    }

    async fn fetch(&self, entity_type: &str, id: &str) -> Result<Option<Record>, ConnectorError> {
        let st = self.begin("fetch")?;
        Ok(st.records.get(entity_type).and_then(|m| m.get(id)).cloned())
    }

    async fn create(
        &self,
        entity_type: &str,
        fields: &Map<String, Value>,
        idempotency_key: &str,
    ) -> Result<Record, ConnectorError> {
        let mut st = self.begin("create")?;
        st.next_id += 1;
        let id = st.next_id.to_string();
        let record = Record {
            id: id.clone(),
            updated_at: Some(tick(&mut st)),
            fields: fields.clone(),
        };
        st.records
            .entry(entity_type.to_owned())
            .or_default()
            .insert(id.clone(), record.clone());
        st.created_by_key
            .insert((entity_type.to_owned(), idempotency_key.to_owned()), id);
        if std::mem::take(&mut st.crash_after_create) {
            return Err(ConnectorError::Timeout {
                system: self.system,
            });
        }
        Ok(record)
    }

    async fn find_created(
        &self,
        entity_type: &str,
        idempotency_key: &str,
    ) -> Result<Option<Record>, ConnectorError> {
        let st = self.begin("find_created")?;
        let id = st
            .created_by_key
            .get(&(entity_type.to_owned(), idempotency_key.to_owned()));
        Ok(id.and_then(|id| st.records.get(entity_type)?.get(id).cloned()))
    }

    async fn update(
        &self,
        entity_type: &str,
        id: &str,
        changed: &Map<String, Value>,
    ) -> Result<Record, ConnectorError> {
        self.update_checked(entity_type, id, changed, None).await
    }

    fn conditional_writes(&self, _entity_type: &str) -> ConditionalWrites {
        self.lock().conditional_writes
    }

    async fn update_if_unchanged(
        &self,
        entity_type: &str,
        id: &str,
        changed: &Map<String, Value>,
        seen: DateTime<Utc>,
    ) -> Result<Record, ConnectorError> {
        if self.conditional_writes(entity_type) == ConditionalWrites::No {
            return Err(ConnectorError::no_conditional_update(
                self.system,
                entity_type,
            ));
        }
        self.update_checked(entity_type, id, changed, Some(seen))
            .await
    }

    async fn list_changed(
        &self,
        entity_type: &str,
        cursor: Option<&str>,
    ) -> Result<ChangePage, ConnectorError> {
        let st = self.begin("list_changed")?;
        // The cursor is the last updated_at handed out, in RFC 3339.
        let after = cursor
            .map(|c| {
                DateTime::parse_from_rfc3339(c)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| ConnectorError::Rejected {
                        system: self.system,
                        status: 400,
                        message: format!("bad cursor {c:?}: {e}"),
                    })
            })
            .transpose()?;
        let mut records: Vec<Record> = st
            .records
            .get(entity_type)
            .map(|m| {
                m.values()
                    .filter(|r| match (after, r.updated_at) {
                        (Some(a), Some(u)) => u > a,
                        _ => true,
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        records.sort_by_key(|r| r.updated_at);
        let next_cursor = records
            .last()
            .and_then(|r| r.updated_at)
            .map(|t| t.to_rfc3339())
            .or_else(|| cursor.map(str::to_owned));
        Ok(ChangePage {
            records,
            next_cursor,
            has_more: false,
        })
    }

    async fn find_by(
        &self,
        entity_type: &str,
        criteria: &Map<String, Value>,
    ) -> Result<Vec<Record>, ConnectorError> {
        let st = self.begin("find_by")?;
        let flat = flatten(criteria);
        Ok(st
            .records
            .get(entity_type)
            .map(|m| {
                m.values()
                    .filter(|r| {
                        flat.iter()
                            .all(|(path, v)| get_path(&r.fields, path) == Some(v))
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// `{"company": {"id": 1}}` -> `[("company.id", 1)]`.
fn flatten(map: &Map<String, Value>) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for (k, v) in map {
        match v {
            Value::Object(sub) => {
                for (path, leaf) in flatten(sub) {
                    out.push((format!("{k}.{path}"), leaf));
                }
            }
            other => out.push((k.clone(), other.clone())),
        }
    }
    out
}
