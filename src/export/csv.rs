//! CSV: one row per interaction, for spreadsheets and quick `grep`s. Columns are
//! [`CSV_COLUMNS`]; the nested parts (thoughts, tool calls, metrics, attributes) are
//! compact JSON text in one cell each, so nothing of the record is left out.
//!
//! The export is faithful, deliberately: a cell that starts with `=`, `+`, `-` or `@` (a
//! `kubectl` flag, a negative number, a formula an agent was asked about) is written as it
//! was recorded, with no quote or apostrophe prepended against "CSV injection". This is an
//! audit log: a copy that differs from the record, even by one character, is worse than a
//! spreadsheet that evaluates a cell. Whoever opens an export in a spreadsheet should
//! import it as text.

use std::borrow::Cow;
use std::io::{self, Write};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use chrono::SecondsFormat;

use super::ExportError;
use crate::model::Interaction;

/// The CSV header, in column order. Optional values that are absent are empty cells;
/// `created_at` is RFC 3339 in UTC to the microsecond (`2026-11-24T10:00:00.123000Z`);
/// `thoughts`, `tool_calls`, `metrics` and `attributes` are compact JSON (`[]` or `{}`
/// when there are none), in the record's own serde form.
pub const CSV_COLUMNS: &[&str] = &[
    "interaction_id",
    "session_id",
    "created_at",
    "user_id",
    "client_ip",
    "user_agent",
    "endpoint",
    "cluster",
    "model_name",
    "provider",
    "base_url",
    "status",
    "http_status",
    "error",
    "question",
    "final_answer",
    "total_duration_ms",
    "assistant_duration_ms",
    "parse_duration_ms",
    "input_tokens",
    "output_tokens",
    "thoughts",
    "tool_calls",
    "metrics",
    "attributes",
    "risk_level",
    "risk_flagged",
];

/// Encodes records as CSV rows.
pub(super) struct CsvEncoder {
    writer: csv::Writer<SharedBuffer>,
    out: SharedBuffer,
}

impl CsvEncoder {
    /// An encoder that has written the header row.
    pub(super) fn new() -> Result<CsvEncoder, ExportError> {
        let out = SharedBuffer::default();
        let mut writer = csv::WriterBuilder::new().has_headers(false).from_writer(out.clone());
        writer.write_record(CSV_COLUMNS).map_err(|e| ExportError::encode("writing the CSV header", e))?;
        let mut encoder = CsvEncoder { writer, out };
        encoder.flush()?;
        Ok(encoder)
    }

    pub(super) fn push(&mut self, record: &Interaction) -> Result<(), ExportError> {
        let doing = || format!("writing interaction {} as CSV", record.interaction_id);
        let row = row(record).map_err(|e| ExportError::encode(&doing(), e))?;
        self.writer
            .write_record(row.iter().map(|cell| cell.as_bytes()))
            .map_err(|e| ExportError::encode(&doing(), e))?;
        self.flush()
    }

    pub(super) fn take_output(&mut self) -> Bytes {
        Bytes::from(self.out.take())
    }

    pub(super) fn output_len(&self) -> usize {
        self.out.len()
    }

    pub(super) fn finish(mut self) -> Result<Bytes, ExportError> {
        self.flush()?;
        Ok(self.take_output())
    }

    /// Moves the rows out of the CSV writer's own buffer, where they would be out of reach
    /// of [`take_output`](Self::take_output). Writing to a `Vec` cannot fail; the error is
    /// mapped all the same rather than assumed away.
    fn flush(&mut self) -> Result<(), ExportError> {
        self.writer.flush().map_err(|e| ExportError::encode("flushing CSV rows", e))
    }
}

/// One row, in [`CSV_COLUMNS`] order (the array length makes the compiler check the count).
fn row(r: &Interaction) -> Result<[Cow<'_, str>; CSV_COLUMNS.len()], serde_json::Error> {
    Ok([
        r.interaction_id.to_string().into(),
        r.session_id.to_string().into(),
        r.created_at.to_rfc3339_opts(SecondsFormat::Micros, true).into(),
        text(&r.user_id),
        text(&r.client_ip),
        text(&r.user_agent),
        text(&r.endpoint),
        text(&r.cluster),
        text(&r.model_name),
        text(&r.provider),
        text(&r.base_url),
        r.status.as_str().into(),
        number(r.http_status),
        text(&r.error),
        r.question.as_str().into(),
        text(&r.final_answer),
        number(r.total_duration_ms),
        number(r.assistant_duration_ms),
        number(r.parse_duration_ms),
        number(r.input_tokens),
        number(r.output_tokens),
        serde_json::to_string(&r.thoughts)?.into(),
        serde_json::to_string(&r.tool_calls)?.into(),
        serde_json::to_string(&r.metrics)?.into(),
        serde_json::to_string(&r.attributes)?.into(),
        r.risk_level.as_str().into(),
        r.risk_flagged.to_string().into(),
    ])
}

fn text(value: &Option<String>) -> Cow<'_, str> {
    value.as_deref().unwrap_or_default().into()
}

fn number(value: Option<impl ToString>) -> Cow<'static, str> {
    value.map(|n| n.to_string()).unwrap_or_default().into()
}

/// The bytes the CSV writer has produced and not yet been taken.
///
/// `csv::Writer` offers no mutable access to its inner writer, so the encoder keeps a
/// second handle on the buffer. A mutex rather than a `RefCell` because the encoder must
/// be `Send` (it lives in the export stream); it is never contended.
#[derive(Clone, Default)]
struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl SharedBuffer {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // A panic while the lock is held cannot leave a `Vec<u8>` half-updated in a way
        // that matters here, so a poisoned lock is used as it is.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.lock())
    }

    fn len(&self) -> usize {
        self.lock().len()
    }
}

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.lock().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
