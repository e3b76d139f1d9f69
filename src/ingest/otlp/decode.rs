//! OTLP/HTTP bodies: content type, gzip, protobuf or JSON, and the answers in the
//! request's own encoding. Bytes and header values in, messages out; no HTTP types.

use std::io::Read;

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

/// How a request (and so its answer) is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `application/x-protobuf`.
    Protobuf,
    /// `application/json` (OTLP/JSON: hex ids, integer enums).
    Json,
}

impl Encoding {
    /// The `Content-Type` of an answer in this encoding.
    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Protobuf => "application/x-protobuf",
            Encoding::Json => "application/json",
        }
    }
}

/// Why a body could not be read as an OTLP request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Neither protobuf nor JSON (`415`).
    #[error("unsupported content type `{0}`: OTLP/HTTP takes `application/x-protobuf` or `application/json`")]
    UnsupportedMediaType(String),
    /// A `Content-Encoding` other than gzip or identity (`415`).
    #[error("unsupported content encoding `{0}`: send `gzip` or no Content-Encoding")]
    UnsupportedEncoding(String),
    /// Over `audit.limits.max_body_bytes`, before or after decompression (`413`).
    #[error("request body exceeds {limit} bytes (audit.limits.max_body_bytes){after}")]
    TooLarge {
        /// The limit.
        limit: usize,
        /// Says when the limit was passed while decompressing.
        after: &'static str,
    },
    /// Not a valid message in the declared encoding (`400`).
    #[error("undecodable {encoding} body: {detail}")]
    Undecodable {
        /// `protobuf`, `JSON` or `gzip`.
        encoding: &'static str,
        /// What the decoder said.
        detail: String,
    },
}

/// The encoding named by a `Content-Type` (parameters such as `charset` are ignored).
pub fn encoding_of(content_type: Option<&str>) -> Result<Encoding, DecodeError> {
    let raw = content_type.unwrap_or("");
    let essence = raw.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match essence.as_str() {
        "application/x-protobuf" | "application/protobuf" => Ok(Encoding::Protobuf),
        "application/json" => Ok(Encoding::Json),
        _ => Err(DecodeError::UnsupportedMediaType(if raw.is_empty() { "(none)".into() } else { raw.into() })),
    }
}

/// The body with its `Content-Encoding` undone, at most `limit` bytes: a gzip bomb is
/// stopped at `limit + 1` decompressed bytes, never inflated whole.
pub fn decompress(body: &[u8], content_encoding: Option<&str>, limit: usize) -> Result<Vec<u8>, DecodeError> {
    let encoding = content_encoding.map(|e| e.trim().to_ascii_lowercase()).unwrap_or_default();
    match encoding.as_str() {
        "" | "identity" => {
            if body.len() > limit {
                return Err(DecodeError::TooLarge { limit, after: "" });
            }
            Ok(body.to_vec())
        }
        "gzip" | "x-gzip" => {
            let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(limit));
            flate2::read::GzDecoder::new(body)
                .take(limit as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| DecodeError::Undecodable { encoding: "gzip", detail: e.to_string() })?;
            if out.len() > limit {
                return Err(DecodeError::TooLarge { limit, after: " once decompressed" });
            }
            Ok(out)
        }
        other => Err(DecodeError::UnsupportedEncoding(other.to_string())),
    }
}

/// Decodes a trace export. An empty body is an empty request (a success, per the spec).
pub fn decode_traces(body: &[u8], encoding: Encoding) -> Result<ExportTraceServiceRequest, DecodeError> {
    decode(body, encoding)
}

/// Decodes a log export. An empty body is an empty request.
pub fn decode_logs(body: &[u8], encoding: Encoding) -> Result<ExportLogsServiceRequest, DecodeError> {
    decode(body, encoding)
}

fn decode<M: Message + Default + serde::de::DeserializeOwned>(
    body: &[u8],
    encoding: Encoding,
) -> Result<M, DecodeError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(M::default());
    }
    match encoding {
        Encoding::Protobuf => {
            M::decode(body).map_err(|e| DecodeError::Undecodable { encoding: "protobuf", detail: e.to_string() })
        }
        Encoding::Json => serde_json::from_slice(body)
            .map_err(|e| DecodeError::Undecodable { encoding: "JSON", detail: e.to_string() }),
    }
}

/// `google.rpc.Status`, the body of an OTLP error answer. Declared here (two of its three
/// fields) because opentelemetry-proto generates it only with its gRPC (tonic) feature,
/// which would bring a gRPC stack in for one message; `details` is never sent.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcStatus {
    /// A `google.rpc.Code` (3 invalid argument, 8 resource exhausted, 14 unavailable).
    #[prost(int32, tag = "1")]
    pub code: i32,
    /// What went wrong.
    #[prost(string, tag = "2")]
    pub message: String,
}

/// `google.rpc.Code` values used in error answers.
pub mod rpc_code {
    /// The request is invalid (`400`, `413`, `415`).
    pub const INVALID_ARGUMENT: i32 = 3;
    /// Out of room (`429`).
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    /// Try again later (`503`).
    pub const UNAVAILABLE: i32 = 14;
}

/// An error answer's body in `encoding`.
pub fn encode_status(code: i32, message: &str, encoding: Encoding) -> Vec<u8> {
    match encoding {
        Encoding::Protobuf => RpcStatus { code, message: message.to_string() }.encode_to_vec(),
        Encoding::Json => serde_json::json!({ "code": code, "message": message }).to_string().into_bytes(),
    }
}

/// A success answer (`Export{Trace,Logs}ServiceResponse`) in `encoding`: empty, or with a
/// partial success naming how many items were refused and why. `field` is the
/// partial success's count field (`rejected_spans`, `rejected_log_records`).
pub fn encode_export_response(rejected: i64, error_message: &str, logs: bool, encoding: Encoding) -> Vec<u8> {
    use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsPartialSuccess, ExportLogsServiceResponse};
    use opentelemetry_proto::tonic::collector::trace::v1::{ExportTracePartialSuccess, ExportTraceServiceResponse};
    let partial = rejected > 0 || !error_message.is_empty();
    match encoding {
        Encoding::Protobuf if logs => ExportLogsServiceResponse {
            partial_success: partial.then(|| ExportLogsPartialSuccess {
                rejected_log_records: rejected,
                error_message: error_message.to_string(),
            }),
        }
        .encode_to_vec(),
        Encoding::Protobuf => ExportTraceServiceResponse {
            partial_success: partial.then(|| ExportTracePartialSuccess {
                rejected_spans: rejected,
                error_message: error_message.to_string(),
            }),
        }
        .encode_to_vec(),
        Encoding::Json if !partial => b"{}".to_vec(),
        Encoding::Json => {
            let count = if logs { "rejectedLogRecords" } else { "rejectedSpans" };
            // int64 as a string, as the protobuf JSON mapping writes it.
            serde_json::json!({ "partialSuccess": { count: rejected.to_string(), "errorMessage": error_message } })
                .to_string()
                .into_bytes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn content_type_parameters_are_ignored() {
        assert_eq!(encoding_of(Some("application/json; charset=utf-8")), Ok(Encoding::Json));
        assert_eq!(encoding_of(Some("Application/X-Protobuf")), Ok(Encoding::Protobuf));
        assert!(matches!(encoding_of(Some("text/plain")), Err(DecodeError::UnsupportedMediaType(_))));
        assert!(matches!(encoding_of(None), Err(DecodeError::UnsupportedMediaType(_))));
    }

    #[test]
    fn empty_bodies_and_empty_objects_are_empty_requests() {
        assert_eq!(decode_traces(b"", Encoding::Json).unwrap().resource_spans.len(), 0);
        assert_eq!(decode_traces(b"", Encoding::Protobuf).unwrap().resource_spans.len(), 0);
        assert_eq!(decode_traces(b"{}", Encoding::Json).unwrap().resource_spans.len(), 0);
        assert_eq!(decode_logs(b"{}", Encoding::Json).unwrap().resource_logs.len(), 0);
    }

    #[test]
    fn an_empty_any_value_decodes_as_no_value() {
        let body = br#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"5b8efff798038103d269b633813fc60c",
            "spanId":"eee19b7ec3c1b174","name":"x","attributes":[{"key":"empty","value":{}}]}]}]}]}"#;
        let request = decode_traces(body, Encoding::Json).unwrap();
        let span = &request.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(span.trace_id.len(), 16);
        assert_eq!(span.attributes[0].value.as_ref().unwrap().value, None);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let body = br#"{"resourceSpans":[{"futureField":1,"scopeSpans":[{"spans":[{"traceId":"5b8efff798038103d269b633813fc60c",
            "spanId":"eee19b7ec3c1b174","name":"x","newThing":{"a":[1]},"attributes":[{"key":"k","value":{"futureValue":{"x":1},"stringValue":"v"}}]}]}]}]}"#;
        let request = decode_traces(body, Encoding::Json).unwrap();
        let span = &request.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(span.name, "x");
        assert_eq!(crate::ingest::otlp::value::text_of(&span.attributes, &["k"]).as_deref(), Some("v"));
    }

    #[test]
    fn gzip_is_undone_within_the_limit() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&[b'a'; 10_000]).unwrap();
        let compressed = gz.finish().unwrap();
        assert_eq!(decompress(&compressed, Some("gzip"), 10_000).unwrap().len(), 10_000);
        assert!(matches!(decompress(&compressed, Some("gzip"), 9_999), Err(DecodeError::TooLarge { .. })));
        assert!(matches!(decompress(b"not gzip", Some("gzip"), 100), Err(DecodeError::Undecodable { .. })));
        assert!(matches!(decompress(b"x", Some("br"), 100), Err(DecodeError::UnsupportedEncoding(_))));
    }
}
