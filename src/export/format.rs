//! The export formats: their names (the `format` query parameter and CLI flag), content
//! types and file names.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};

/// Export file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Comma-separated values with a header row; nested parts as JSON text.
    Csv,
    /// One JSON array of records.
    Json,
    /// One JSON record per line.
    Ndjson,
    /// Apache Parquet, typed columns, zstd-compressed.
    Parquet,
}

impl Format {
    /// Every format, in the order they are documented.
    pub const ALL: [Format; 4] = [Format::Csv, Format::Json, Format::Ndjson, Format::Parquet];

    /// The format's name: `csv`, `json`, `ndjson` or `parquet`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Json => "json",
            Format::Ndjson => "ndjson",
            Format::Parquet => "parquet",
        }
    }

    /// The HTTP `Content-Type` of an export in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Csv => "text/csv; charset=utf-8",
            Format::Json => "application/json",
            Format::Ndjson => "application/x-ndjson",
            Format::Parquet => "application/vnd.apache.parquet",
        }
    }

    /// The file name extension, without the dot.
    pub fn extension(self) -> &'static str {
        // The names were chosen to be the usual extensions.
        self.as_str()
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A format name that is none of [`Format::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown format `{0}`: expected csv, json, ndjson or parquet")]
pub struct UnknownFormat(pub String);

impl FromStr for Format {
    type Err = UnknownFormat;

    /// Parses a format name, ignoring ASCII case (`CSV` from a hand-typed URL is `csv`).
    fn from_str(name: &str) -> Result<Format, UnknownFormat> {
        Format::ALL
            .into_iter()
            .find(|f| f.as_str().eq_ignore_ascii_case(name))
            .ok_or_else(|| UnknownFormat(name.to_string()))
    }
}

/// A file name for an export made at `at`: `opsagent-audit-interactions-20261125T163000Z.csv`.
///
/// Basic ISO 8601 (no `:`) so the name is valid on every file system and sorts by time.
pub fn file_name(format: Format, at: DateTime<Utc>) -> String {
    format!("opsagent-audit-interactions-{}.{}", at.format("%Y%m%dT%H%M%SZ"), format.extension())
}
