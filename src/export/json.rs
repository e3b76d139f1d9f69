//! JSON and NDJSON: each record in its own serde form (the ingest body's shape), so an
//! export can be read back as [`Interaction`]s or re-ingested as it is.

use bytes::Bytes;

use super::ExportError;
use crate::model::Interaction;

/// How records are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// One array: `[` + records separated by `,\n` + `]\n`. The array is written as
    /// records arrive, never built in memory.
    Array,
    /// One record per line.
    Lines,
}

/// Encodes records as a JSON array or as NDJSON.
pub(super) struct JsonEncoder {
    framing: Framing,
    out: Vec<u8>,
    records: u64,
}

impl JsonEncoder {
    /// An encoder of one JSON array.
    pub(super) fn array() -> JsonEncoder {
        JsonEncoder { framing: Framing::Array, out: Vec::new(), records: 0 }
    }

    /// An encoder of NDJSON.
    pub(super) fn lines() -> JsonEncoder {
        JsonEncoder { framing: Framing::Lines, out: Vec::new(), records: 0 }
    }

    pub(super) fn push(&mut self, record: &Interaction) -> Result<(), ExportError> {
        if self.framing == Framing::Array {
            self.out.extend_from_slice(if self.records == 0 { b"[" } else { b",\n" });
        }
        serde_json::to_writer(&mut self.out, record)
            .map_err(|e| ExportError::encode(&format!("writing interaction {} as JSON", record.interaction_id), e))?;
        if self.framing == Framing::Lines {
            self.out.push(b'\n');
        }
        self.records += 1;
        Ok(())
    }

    pub(super) fn take_output(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.out))
    }

    pub(super) fn output_len(&self) -> usize {
        self.out.len()
    }

    pub(super) fn finish(mut self) -> Bytes {
        if self.framing == Framing::Array {
            // An empty export is still a JSON document: `[]`.
            self.out.extend_from_slice(if self.records == 0 { b"[]\n" } else { b"]\n" });
        }
        self.take_output()
    }
}
