//! Export: interactions encoded as CSV, JSON, NDJSON or Parquet, streamed in constant
//! memory. Formats only: no HTTP and no database here; `api` and `cli` feed these
//! encoders from a store query and send or write the bytes.
//!
//! # Invariants
//! - Memory is bounded whatever the size of the export: an [`Encoder`] holds, besides the
//!   bytes not yet taken with [`Encoder::take_output`], at most one Arrow batch and one
//!   Parquet row group (about 8 MiB each) for Parquet, and nothing for the text formats.
//!   The whole export is never held.
//! - An export is faithful: every field of every record is written as stored, nothing is
//!   masked, escaped for spreadsheets or dropped (masking already ran at ingest).
//! - A failure mid-export (the store, an encoder) ends the byte stream with an error
//!   rather than a short file that looks complete: the HTTP layer aborts the body, so the
//!   client sees a broken transfer, not a truncated audit log.
//!
//! # Files
//! - `format`: the [`Format`] names, content types and file names.
//! - `json`: JSON (one array, streamed) and NDJSON (one record per line), both in the
//!   record's own serde form.
//! - `csv`: one row per interaction, nested parts as JSON text ([`CSV_COLUMNS`]).
//! - `parquet`: a typed columnar schema ([`parquet_schema`]).
//! - `stream`: [`encode_stream`], records in, byte chunks out.

use bytes::Bytes;

use crate::model::Interaction;
use crate::store::StoreError;

mod csv;
mod format;
mod json;
mod parquet;
mod stream;
#[cfg(test)]
mod tests;

pub use self::csv::CSV_COLUMNS;
pub use self::format::{file_name, Format, UnknownFormat};
pub use self::parquet::parquet_schema;
pub use self::stream::{encode_stream, CHUNK_BYTES};

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Reading the records to export failed.
    #[error("reading the records to export failed: {0}")]
    Store(#[from] StoreError),
    /// A record could not be encoded; the message names the format and the step.
    #[error("encoding the export failed: {0}")]
    Encode(String),
}

impl ExportError {
    /// An encoding failure: what was being done, and the encoder's own error.
    fn encode(doing: &str, cause: impl std::fmt::Display) -> ExportError {
        ExportError::Encode(format!("{doing}: {cause}"))
    }
}

/// Incremental encoder: push records, take the bytes produced so far, finish.
///
/// The bytes of all [`take_output`](Encoder::take_output) calls followed by those of
/// [`finish`](Encoder::finish), concatenated, are the file.
pub struct Encoder {
    format: Format,
    inner: Inner,
    records: u64,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The writers' own state (buffers, builders) says nothing useful in a log line.
        f.debug_struct("Encoder")
            .field("format", &self.format)
            .field("records", &self.records)
            .field("output_len", &self.output_len())
            .finish_non_exhaustive()
    }
}

/// One encoder per family of formats; an enum rather than a trait object because the
/// set is closed and each arm is a few lines.
enum Inner {
    // The CSV and Parquet writers are boxed: each is hundreds of bytes, and the encoder
    // is moved from state to state in the export stream.
    Json(json::JsonEncoder),
    Csv(Box<csv::CsvEncoder>),
    Parquet(Box<parquet::ParquetEncoder>),
}

impl Encoder {
    /// An encoder for `format`, with nothing written yet.
    pub fn new(format: Format) -> Result<Encoder, ExportError> {
        let inner = match format {
            Format::Json => Inner::Json(json::JsonEncoder::array()),
            Format::Ndjson => Inner::Json(json::JsonEncoder::lines()),
            Format::Csv => Inner::Csv(Box::new(csv::CsvEncoder::new()?)),
            Format::Parquet => Inner::Parquet(Box::new(parquet::ParquetEncoder::new()?)),
        };
        Ok(Encoder { format, inner, records: 0 })
    }

    /// Encodes one record.
    pub fn push(&mut self, record: &Interaction) -> Result<(), ExportError> {
        match &mut self.inner {
            Inner::Json(e) => e.push(record)?,
            Inner::Csv(e) => e.push(record)?,
            Inner::Parquet(e) => e.push(record)?,
        }
        self.records += 1;
        Ok(())
    }

    /// Bytes ready to send (may be empty, e.g. Parquet between row groups).
    pub fn take_output(&mut self) -> Bytes {
        match &mut self.inner {
            Inner::Json(e) => e.take_output(),
            Inner::Csv(e) => e.take_output(),
            Inner::Parquet(e) => e.take_output(),
        }
    }

    /// Ends the file; returns the remaining bytes (JSON's closing bracket, Parquet's last
    /// row group and footer).
    pub fn finish(self) -> Result<Bytes, ExportError> {
        match self.inner {
            Inner::Json(e) => Ok(e.finish()),
            Inner::Csv(e) => e.finish(),
            Inner::Parquet(e) => e.finish(),
        }
    }

    /// How many records have been pushed.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// The format being written.
    pub fn format(&self) -> Format {
        self.format
    }

    /// How many bytes [`take_output`](Encoder::take_output) would return now.
    fn output_len(&self) -> usize {
        match &self.inner {
            Inner::Json(e) => e.output_len(),
            Inner::Csv(e) => e.output_len(),
            Inner::Parquet(e) => e.output_len(),
        }
    }
}
