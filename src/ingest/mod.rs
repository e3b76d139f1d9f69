//! Ways records come in. Every one ends in the same [`crate::pipeline::AuditLogger`].
//!
//! - [`http`]: `POST /api/v1/interactions` (one record, a JSON array, or NDJSON).
//! - [`record`]: the wire format and its validation, shared by every JSON entry point.

pub mod http;
pub mod record;
