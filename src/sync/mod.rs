//! The sync engine: for each event, read the registry, the links and both sides, decide what to
//! write (three-way merge, references through links, no echoes), write it and record why.
//!
//! Owns: the `links` and link-history tables. Implements [`crate::queue::JobHandler`].
//! May call: `registry`, `connectors`, `queue::enqueue` (fan-out), `db`.
