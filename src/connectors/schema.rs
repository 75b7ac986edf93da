//! What each system's entity types look like, declared by the connectors: which fields exist,
//! which are required to create a record, which are read-only, and which hold references.
//! The registry is checked against these declarations (`tether registry check`).
//!
//! (Filled in by the registry/connector work; see issue 5.)
