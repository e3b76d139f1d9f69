//! Ways records come in, as formats: every one ends in an [`Interaction`](crate::model::Interaction)
//! handed to the [`crate::pipeline::AuditLogger`]. No HTTP here; `api` serves these.
//!
//! - [`body`]: a request body of records (one JSON record, a JSON array, or NDJSON).
//! - [`record`]: the wire format and its validation, shared by every JSON entry point.
//! - [`opsagent`]: one OpsAgent HTTP exchange, as the auditing proxy captured it.
//! - [`otlp`]: OpenTelemetry traces (OTLP/HTTP) → one record per trace. Its receiver
//!   buffers incomplete traces in a journal of the pipeline's (no HTTP types either).

pub mod body;
pub mod opsagent;
pub mod otlp;
pub mod record;

pub use body::{framing_of, parse_body, Framing, IngestError, Parsed};
pub use record::{nesting_depth, parse_record, FieldError};
