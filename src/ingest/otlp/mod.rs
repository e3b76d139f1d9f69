//! OTLP/HTTP traces → interactions: one trace is one [`Interaction`](crate::model::Interaction).
//!
//! - [`decode`]: content type, gzip, protobuf/JSON, and answers in the request's encoding.
//! - [`value`], [`messages`]: attribute values and chat messages in their many forms.
//! - [`map`]: a complete trace's spans → one record (the mapping table of `otlp-genai.md`).
//! - [`assemble`]: the trace buffer (spans of one trace over several exports).
//! - [`receiver`]: the receiver: spans journaled before the answer, finished traces
//!   handed to the pipeline. No HTTP types; `api::otlp` serves it.

use std::collections::BTreeMap;
use std::sync::Arc;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;

pub mod assemble;
pub mod decode;
pub mod map;
pub mod messages;
pub mod receiver;
pub mod value;

pub use assemble::Assembler;
pub use decode::{DecodeError, Encoding};
pub use receiver::{ExportOutcome, OtlpReceiver, ReceiverError};

/// A trace id: 16 bytes.
pub type TraceId = [u8; 16];
/// A span id: 8 bytes.
pub type SpanId = [u8; 8];

/// A span with the attributes of the resource that emitted it (shared by its siblings).
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpSpan {
    /// The span as received.
    pub span: Span,
    /// Its resource's attributes (`service.name`, `k8s.cluster.name`, …).
    pub resource: Arc<Vec<KeyValue>>,
}

impl OtlpSpan {
    /// Its id (only spans whose ids were checked by [`split`] exist).
    pub fn span_id(&self) -> SpanId {
        self.span.span_id.as_slice().try_into().unwrap_or_default()
    }

    /// Its trace's id.
    pub fn trace_id(&self) -> TraceId {
        self.span.trace_id.as_slice().try_into().unwrap_or_default()
    }
}

/// An export's spans, sorted by trace, and those refused for their ids.
#[derive(Debug, Default)]
pub struct Split {
    /// Spans by trace id.
    pub traces: BTreeMap<TraceId, Vec<OtlpSpan>>,
    /// Spans refused: trace id not 16 bytes, span id not 8 (or all zero), parent id
    /// neither empty nor 8 bytes.
    pub rejected: usize,
    /// Why the first refused span was refused.
    pub first_error: Option<String>,
}

/// Sorts an export's spans by trace and refuses those with bad ids, one by one (the
/// others are kept).
pub fn split(request: ExportTraceServiceRequest) -> Split {
    let mut out = Split::default();
    for resource_spans in request.resource_spans {
        let resource = Arc::new(resource_spans.resource.map(|r| r.attributes).unwrap_or_default());
        for scope_spans in resource_spans.scope_spans {
            for span in scope_spans.spans {
                match check_ids(&span) {
                    Ok(trace_id) => {
                        out.traces.entry(trace_id).or_default().push(OtlpSpan { span, resource: resource.clone() })
                    }
                    Err(why) => {
                        out.rejected += 1;
                        out.first_error.get_or_insert_with(|| format!("span `{}`: {why}", span.name));
                    }
                }
            }
        }
    }
    out
}

fn check_ids(span: &Span) -> Result<TraceId, String> {
    let trace_id: TraceId = span.trace_id.as_slice().try_into().map_err(|_| {
        format!(
            "traceId must be 16 bytes, got {} (is this a log or metric export sent to /v1/traces?)",
            span.trace_id.len()
        )
    })?;
    if trace_id == [0; 16] {
        return Err("traceId is all zeros".into());
    }
    let span_id: Result<SpanId, _> = span.span_id.as_slice().try_into();
    match span_id {
        Err(_) => return Err(format!("spanId must be 8 bytes, got {}", span.span_id.len())),
        Ok([0, 0, 0, 0, 0, 0, 0, 0]) => return Err("spanId is all zeros".into()),
        Ok(_) => {}
    }
    if !span.parent_span_id.is_empty() && span.parent_span_id.len() != 8 {
        return Err(format!("parentSpanId must be empty or 8 bytes, got {}", span.parent_span_id.len()));
    }
    Ok(trace_id)
}
