//! A request body of records: its framing (one JSON record, a JSON array, NDJSON), its
//! text, and the records in it, each parsed or refused on its own. No HTTP here: callers
//! pass the content type and the bytes, and map [`IngestError`] to their own answers.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::record::{parse_record, FieldError};
use crate::config::LimitsConfig;
use crate::model::Interaction;

/// How a body of records is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// One JSON record, or a JSON array of records.
    Json,
    /// One JSON record per line.
    NdJson,
}

/// Why a whole body is refused (a single bad record is a [`FieldError`] instead).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    /// The content type is not one of the accepted ones.
    #[error("content type `{0}` is not accepted; send application/json or application/x-ndjson")]
    UnsupportedMediaType(String),
    /// The body is not JSON.
    #[error("body is not valid JSON: {0}")]
    Malformed(String),
    /// The body is JSON, but neither a record nor an array of records.
    #[error("body must be a record (JSON object) or an array of records")]
    NotRecords,
    /// The body holds no record.
    #[error("the request holds no records")]
    Empty,
    /// More records than one request may carry.
    #[error("{count} records in one request; at most {max} (audit.limits.max_records_per_request)")]
    TooManyRecords {
        /// Records in the body.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The body is larger than allowed.
    #[error("request body exceeds {limit} bytes (audit.limits.max_body_bytes)")]
    BodyTooLarge {
        /// The limit.
        limit: usize,
    },
}

impl IngestError {
    /// A fixed machine-readable code, for API answers.
    pub fn code(&self) -> &'static str {
        match self {
            IngestError::UnsupportedMediaType(_) => "unsupported_media_type",
            IngestError::Malformed(_) | IngestError::NotRecords => "malformed_json",
            IngestError::Empty => "empty_body",
            IngestError::TooManyRecords { .. } => "too_many_records",
            IngestError::BodyTooLarge { .. } => "body_too_large",
        }
    }
}

/// The framing a content type announces (`None`: no content type given).
pub fn framing_of(content_type: Option<&str>) -> Result<Framing, IngestError> {
    let Some(text) = content_type else {
        return Err(IngestError::UnsupportedMediaType("(none)".into()));
    };
    let essence = text.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => Ok(Framing::Json),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" | "application/x-jsonlines" => {
            Ok(Framing::NdJson)
        }
        _ => Err(IngestError::UnsupportedMediaType(text.to_string())),
    }
}

/// The records of one request, each validated on its own.
#[derive(Debug)]
pub struct Parsed {
    /// The body was one JSON object (not an array, not NDJSON): its error is the
    /// request's error.
    pub single: bool,
    /// Each record, in request order, or why it was refused.
    pub records: Vec<Result<Interaction, FieldError>>,
}

/// Parses a body of records within `limits` (records per request, and the per-record
/// limits of [`parse_record`]). Invalid UTF-8 and unpaired surrogate escapes are
/// replaced, not refused: a record with a mangled byte is still evidence. `received_at`
/// fills a missing `created_at`.
pub fn parse_body(
    framing: Framing,
    bytes: &[u8],
    received_at: DateTime<Utc>,
    limits: &LimitsConfig,
) -> Result<Parsed, IngestError> {
    let max_records = limits.max_records_per_request;
    let text = String::from_utf8_lossy(bytes);
    let text = replace_lone_surrogates(&text);
    let values = split(framing, &text)?;
    if values.is_empty() {
        return Err(IngestError::Empty);
    }
    if values.len() > max_records {
        return Err(IngestError::TooManyRecords { count: values.len(), max: max_records });
    }
    let single = framing == Framing::Json && values.len() == 1 && text.trim_start().starts_with('{');
    let records = values.into_iter().map(|v| v.and_then(|v| parse_record(v, received_at, limits))).collect();
    Ok(Parsed { single, records })
}

/// Splits a body into JSON values, one per record; an NDJSON line that is not JSON is
/// that record's error.
fn split(framing: Framing, body: &str) -> Result<Vec<Result<Value, FieldError>>, IngestError> {
    match framing {
        Framing::Json => {
            match serde_json::from_str::<Value>(body).map_err(|e| IngestError::Malformed(e.to_string()))? {
                Value::Array(items) => Ok(items.into_iter().map(Ok).collect()),
                one @ Value::Object(_) => Ok(vec![Ok(one)]),
                _ => Err(IngestError::NotRecords),
            }
        }
        Framing::NdJson => Ok(body
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(n, line)| {
                serde_json::from_str::<Value>(line).map_err(|e| FieldError {
                    field: String::new(),
                    message: format!("line {}: not valid JSON: {e}", n + 1),
                })
            })
            .collect()),
    }
}

/// Replaces `\uD800`–`\uDFFF` escapes that are not a valid surrogate pair with
/// `\uFFFD`. JSON parsers refuse them, yet Python's `json.dumps` writes them for bytes
/// it could not decode (tool output often has some); like invalid UTF-8, they are
/// replaced rather than costing the record. serde_json has no lenient mode for this.
fn replace_lone_surrogates(text: &str) -> Cow<'_, str> {
    fn hex4(b: &[u8]) -> Option<u16> {
        let s = std::str::from_utf8(b.get(..4)?).ok()?;
        u16::from_str_radix(s, 16).ok()
    }
    let is_high = |u: u16| (0xD800..0xDC00).contains(&u);
    let is_low = |u: u16| (0xDC00..0xE000).contains(&u);
    let bytes = text.as_bytes();
    if !text.contains("\\u") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let (mut copied, mut i, mut in_string) = (0, 0, false);
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                in_string = !in_string;
                i += 1;
            }
            b'\\' if in_string => {
                if bytes.get(i + 1) == Some(&b'u') {
                    if let Some(unit) = hex4(&bytes[i + 2..]) {
                        let paired = is_high(unit)
                            && bytes.get(i + 6) == Some(&b'\\')
                            && bytes.get(i + 7) == Some(&b'u')
                            && hex4(&bytes[(i + 8).min(bytes.len())..]).is_some_and(is_low);
                        if paired {
                            i += 12;
                            continue;
                        }
                        if is_high(unit) || is_low(unit) {
                            out.push_str(&text[copied..i]);
                            out.push_str("\\uFFFD");
                            i += 6;
                            copied = i;
                            continue;
                        }
                    }
                }
                // Any other escape: skip the backslash and the escaped character.
                i += 2;
            }
            _ => i += 1,
        }
    }
    out.push_str(&text[copied.min(text.len())..]);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_name_their_framing() {
        assert_eq!(framing_of(Some("application/json; charset=utf-8")), Ok(Framing::Json));
        assert_eq!(framing_of(Some("application/x-ndjson")), Ok(Framing::NdJson));
        assert!(matches!(framing_of(Some("text/plain")), Err(IngestError::UnsupportedMediaType(_))));
        assert!(matches!(framing_of(None), Err(IngestError::UnsupportedMediaType(_))));
    }

    #[test]
    fn lone_surrogates_are_replaced_and_pairs_kept() {
        assert_eq!(replace_lone_surrogates(r#"{"q":"a\udcffb"}"#), r#"{"q":"a\uFFFDb"}"#);
        let pair = r#"{"q":"\ud83d\ude00"}"#;
        assert_eq!(replace_lone_surrogates(pair), pair);
    }
}
