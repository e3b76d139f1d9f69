//! A trace's spans → one [`Interaction`], by the mapping table of `otlp-genai.md`:
//! OpenTelemetry GenAI conventions (current and older names) and OpenInference, the
//! newest name preferred when several are present.
//!
//! Roles of spans: the *root* (the outermost `invoke_agent`/`invoke_workflow` span, else
//! OpenInference `AGENT`, else the span without a parent, else the earliest), *model
//! calls* (`chat` and its kin, OpenInference `LLM`, or a span with a model and no
//! other role), *tool calls* (`execute_tool`, OpenInference `TOOL`). Everything the table
//! does not name, from the root and a few well-known keys of the model calls, goes to
//! `attributes`, bounded: message arrays already mapped are not copied again.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use serde_json::Value as Json;
use uuid::Uuid;

use super::messages::{self, answer_text, last_user_text, reasoning, Message};
use super::value::{first, get, int_of, text_of, to_json};
use super::OtlpSpan;
use crate::model::{id_from_key, Interaction, Status, Thought, ToolCall};

/// Most attributes copied from spans into the record's `attributes`.
const MAX_ATTRIBUTES: usize = 64;
/// Longest attribute text copied as it is; longer ones are cut (the record's own size
/// limit applies after).
const MAX_ATTRIBUTE_TEXT: usize = 4096;

/// Keys the mapping reads into fields (or deliberately leaves out): never copied into
/// `attributes` again.
const MAPPED: &[&str] = &[
    "gen_ai.operation.name",
    "gen_ai.input.messages",
    "gen_ai.output.messages",
    "gen_ai.prompt",
    "gen_ai.completion",
    "gen_ai.conversation.id",
    "gen_ai.provider.name",
    "gen_ai.system",
    "gen_ai.request.model",
    "gen_ai.response.model",
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "gen_ai.usage.prompt_tokens",
    "gen_ai.usage.completion_tokens",
    "session.id",
    "user.id",
    "enduser.id",
    "input.value",
    "input.mime_type",
    "output.value",
    "output.mime_type",
    "openinference.span.kind",
    "llm.model_name",
    "llm.response.model_name",
    "llm.provider",
    "llm.system",
    "llm.token_count.prompt",
    "llm.token_count.completion",
    "llm.token_count.total",
    "metadata",
    "tag.tags",
    "error.type",
    "http.route",
    "url.path",
];

/// Key prefixes of flattened messages, never copied into `attributes`.
const MAPPED_PREFIXES: &[&str] =
    &["llm.input_messages.", "llm.output_messages.", "gen_ai.prompt.", "gen_ai.completion.", "llm.tools."];

/// What a span is to the interaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// An agent invocation (`invoke_agent`, `invoke_workflow`, OpenInference `AGENT`).
    Agent,
    /// A model call.
    Model,
    /// A tool call.
    Tool,
    /// Anything else (HTTP, retrieval, chains).
    Other,
}

/// The role of a span, from its attributes.
pub fn role_of(attributes: &[KeyValue]) -> Role {
    let operation = text_of(attributes, &["gen_ai.operation.name"]);
    match operation.as_deref() {
        Some("invoke_agent" | "invoke_workflow" | "create_agent") => return Role::Agent,
        Some("chat" | "text_completion" | "generate_content" | "completion" | "responses") => return Role::Model,
        Some("execute_tool") => return Role::Tool,
        Some(_) => return Role::Other,
        None => {}
    }
    match text_of(attributes, &["openinference.span.kind"]).map(|k| k.to_ascii_uppercase()).as_deref() {
        Some("AGENT") => return Role::Agent,
        Some("LLM") => return Role::Model,
        Some("TOOL") => return Role::Tool,
        Some(_) => return Role::Other,
        None => {}
    }
    if get(attributes, "gen_ai.tool.name").is_some() {
        Role::Tool
    } else if first(attributes, &["gen_ai.request.model", "gen_ai.response.model", "gen_ai.usage.input_tokens"])
        .is_some()
    {
        Role::Model
    } else {
        Role::Other
    }
}

/// True when the span may end its trace: an agent invocation, or a span without a parent.
pub fn is_root_candidate(span: &OtlpSpan) -> bool {
    span.span.parent_span_id.is_empty() || role_of(&span.span.attributes) == Role::Agent
}

/// Which span is the root: the earliest agent invocation, else the earliest span without
/// a parent, else the earliest span. `None` only for no spans.
pub fn root_index(spans: &[OtlpSpan]) -> Option<usize> {
    let earliest = |filter: &dyn Fn(&OtlpSpan) -> bool| {
        spans
            .iter()
            .enumerate()
            .filter(|(_, s)| filter(s))
            .min_by_key(|(_, s)| s.span.start_time_unix_nano)
            .map(|(i, _)| i)
    };
    earliest(&|s| role_of(&s.span.attributes) == Role::Agent)
        .or_else(|| earliest(&|s| s.span.parent_span_id.is_empty()))
        .or_else(|| earliest(&|_| true))
}

/// The record id of a trace: its 16 bytes as a UUID, so the same trace exported twice is
/// the same record (stored once) and the id reads as the trace id.
pub fn interaction_id(trace_id: [u8; 16]) -> Uuid {
    Uuid::from_bytes(trace_id)
}

fn time(nanos: u64) -> Option<DateTime<Utc>> {
    (nanos > 0).then(|| DateTime::from_timestamp_nanos(nanos.min(i64::MAX as u64) as i64))
}

fn duration_ms(span: &OtlpSpan) -> Option<i64> {
    let (start, end) = (span.span.start_time_unix_nano, span.span.end_time_unix_nano);
    (start > 0 && end >= start).then(|| ((end - start) / 1_000_000) as i64)
}

fn is_error(span: &OtlpSpan) -> bool {
    span.span.status.as_ref().is_some_and(|s| s.code == StatusCode::Error as i32)
}

fn error_text(span: &OtlpSpan) -> Option<String> {
    let message = span.span.status.as_ref().map(|s| s.message.clone()).filter(|m| !m.is_empty());
    message.or_else(|| text_of(&span.span.attributes, &["error.type", "exception.message"])).or_else(|| {
        span.span
            .events
            .iter()
            .filter(|e| e.name == "exception")
            .find_map(|e| text_of(&e.attributes, &["exception.message", "exception.type"]))
    })
}

/// Builds the interaction of one trace. `complete` is false when the root never came
/// (the trace timed out): the record says so in `attributes.otlp.incomplete`.
pub fn to_interaction(trace_id: [u8; 16], spans: &[OtlpSpan], complete: bool) -> Interaction {
    let mut ordered: Vec<&OtlpSpan> = spans.iter().collect();
    ordered.sort_by_key(|s| (s.span.start_time_unix_nano, s.span.end_time_unix_nano));
    let root = root_index(spans).map(|i| &spans[i]);
    let root_attrs: &[KeyValue] = root.map_or(&[], |s| &s.span.attributes);
    let is_root = |s: &OtlpSpan| root.is_some_and(|r| std::ptr::eq(r, s));
    let models: Vec<&OtlpSpan> =
        ordered.iter().copied().filter(|s| !is_root(s) && role_of(&s.span.attributes) == Role::Model).collect();
    let tools: Vec<&OtlpSpan> =
        ordered.iter().copied().filter(|s| !is_root(s) && role_of(&s.span.attributes) == Role::Tool).collect();
    // Looks a key up on the root, then the model calls (last first), then any span.
    let find = |keys: &[&str]| -> Option<String> {
        text_of(root_attrs, keys)
            .or_else(|| models.iter().rev().find_map(|s| text_of(&s.span.attributes, keys)))
            .or_else(|| ordered.iter().find_map(|s| text_of(&s.span.attributes, keys)))
    };

    // The question: the root's input, else the first model call's.
    let root_input: Vec<Message> = root.map(|r| messages::input(&r.span)).unwrap_or_default();
    let question = last_user_text(&root_input)
        .or_else(|| root.and_then(|r| messages::value_text(&r.span.attributes, "input.value")))
        .or_else(|| models.iter().find_map(|s| last_user_text(&messages::input(&s.span))))
        .or_else(|| models.iter().find_map(|s| messages::value_text(&s.span.attributes, "input.value")));
    let mut record = Interaction::new(question.clone().unwrap_or_default());
    record.interaction_id = interaction_id(trace_id);
    let trace_hex = hex::encode(trace_id);
    record.session_id = match find(&["gen_ai.conversation.id", "session.id"]) {
        Some(key) => id_from_key(&key),
        None => id_from_key(&format!("otlp-trace:{trace_hex}")),
    };
    if let Some(t) = root
        .and_then(|r| time(r.span.start_time_unix_nano))
        .or_else(|| ordered.first().and_then(|s| time(s.span.start_time_unix_nano)))
    {
        record.created_at = t;
    }
    record.user_id = find(&["user.id", "enduser.id"]);
    record.endpoint = text_of(root_attrs, &["http.route", "url.path"]);

    // The answer: the root's output, else the last model call's.
    let root_output: Vec<Message> = root.map(|r| messages::output(&r.span)).unwrap_or_default();
    record.final_answer = answer_text(&root_output)
        .or_else(|| root.and_then(|r| messages::value_text(&r.span.attributes, "output.value")))
        .or_else(|| {
            let mut by_end = models.clone();
            by_end.sort_by_key(|s| s.span.end_time_unix_nano);
            by_end.iter().rev().find_map(|s| {
                answer_text(&messages::output(&s.span))
                    .or_else(|| messages::value_text(&s.span.attributes, "output.value"))
            })
        });

    // Model, provider, endpoint: from the model calls (the last one that says), else
    // the root.
    let from_models = |keys: &[&str]| {
        models.iter().rev().find_map(|s| text_of(&s.span.attributes, keys)).or_else(|| text_of(root_attrs, keys))
    };
    record.model_name = from_models(&["gen_ai.response.model", "llm.response.model_name"])
        .or_else(|| from_models(&["gen_ai.request.model", "llm.model_name"]));
    record.provider = from_models(&["gen_ai.provider.name", "gen_ai.system", "llm.provider", "llm.system"]);
    record.base_url = base_url(spans, &models);
    record.cluster = root
        .and_then(|r| text_of(&r.resource, &["k8s.cluster.name"]))
        .or_else(|| ordered.iter().find_map(|s| text_of(&s.resource, &["k8s.cluster.name"])))
        .or_else(|| {
            metadata(root_attrs)
                .and_then(|m| m.get("k8s.cluster.name").or(m.get("cluster")).and_then(Json::as_str).map(str::to_string))
        });

    // Reasoning of the model calls, by span start then part index.
    for s in &models {
        for thought in reasoning(&messages::output(&s.span)) {
            record.thoughts.push(Thought::new(thought));
        }
    }
    for s in &tools {
        record.tool_calls.push(tool_call(s));
    }

    // Tokens over the model calls, not the root (which may repeat the total).
    let sum = |keys: &[&str]| -> Option<i64> {
        let values: Vec<i64> = models.iter().filter_map(|s| int_of(&s.span.attributes, keys)).collect();
        if values.is_empty() {
            int_of(root_attrs, keys)
        } else {
            Some(values.iter().sum())
        }
    };
    record.input_tokens = sum(&["gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens", "llm.token_count.prompt"]);
    record.output_tokens =
        sum(&["gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens", "llm.token_count.completion"]);

    if let Some(r) = root {
        record.total_duration_ms = duration_ms(r);
        if is_error(r) || get(&r.span.attributes, "error.type").is_some() {
            record.status = Status::Error;
            record.error = error_text(r);
        }
    }
    let model_ms: i64 = models.iter().filter_map(|s| duration_ms(s)).sum();
    let tool_ms: i64 = tools.iter().filter_map(|s| duration_ms(s)).sum();
    if !models.is_empty() {
        record.metrics.insert("llm_total_ms".into(), model_ms);
    }
    if !tools.is_empty() {
        record.metrics.insert("tool_total_ms".into(), tool_ms);
    }

    record.attributes = attributes(trace_hex, root, &models, spans.len(), complete, question.is_none());
    record
}

fn tool_call(s: &OtlpSpan) -> ToolCall {
    let a = &s.span.attributes;
    let name = text_of(a, &["gen_ai.tool.name", "tool.name"]).unwrap_or_else(|| {
        s.span
            .name
            .strip_prefix("execute_tool")
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .unwrap_or(&s.span.name)
            .to_string()
    });
    let input = text_of(a, &["gen_ai.tool.call.arguments", "input.value", "tool.parameters"]).unwrap_or_default();
    let mut call = ToolCall::new(name, input);
    call.tool_observation = text_of(a, &["gen_ai.tool.call.result", "output.value"]);
    call.duration_ms = duration_ms(s);
    if is_error(s) || get(a, "error.type").is_some() {
        call.error = error_text(s).or_else(|| Some("error".into()));
    }
    call
}

/// The provider endpoint: `url.full` of an HTTP span under a model call, else the model
/// call's `server.address` (and port).
fn base_url(spans: &[OtlpSpan], models: &[&OtlpSpan]) -> Option<String> {
    let model_ids: HashSet<&[u8]> = models.iter().map(|s| s.span.span_id.as_slice()).collect();
    spans
        .iter()
        .filter(|s| model_ids.contains(s.span.parent_span_id.as_slice()))
        .find_map(|s| text_of(&s.span.attributes, &["url.full"]))
        .or_else(|| {
            models.iter().rev().find_map(|s| {
                let host = text_of(&s.span.attributes, &["server.address"])?;
                Some(match int_of(&s.span.attributes, &["server.port"]) {
                    Some(port) => format!("{host}:{port}"),
                    None => host,
                })
            })
        })
}

/// OpenInference `metadata`: a JSON object in a string.
fn metadata(attributes: &[KeyValue]) -> Option<serde_json::Map<String, Json>> {
    let v = get(attributes, "metadata")?;
    match super::value::structured(v)? {
        Json::Object(map) => Some(map),
        _ => None,
    }
}

fn bounded(value: Json) -> Json {
    match value {
        Json::String(mut s) if s.len() > MAX_ATTRIBUTE_TEXT => {
            crate::model::sanitize_text(&mut s, MAX_ATTRIBUTE_TEXT);
            Json::String(s)
        }
        other => other,
    }
}

/// The record's `attributes`: where it came from, and what the root (and the model
/// calls' request parameters) carry beyond the mapped fields.
fn attributes(
    trace_hex: String,
    root: Option<&OtlpSpan>,
    models: &[&OtlpSpan],
    span_count: usize,
    complete: bool,
    question_missing: bool,
) -> serde_json::Map<String, Json> {
    let mut out = serde_json::Map::new();
    out.insert("otlp.trace_id".into(), Json::String(trace_hex));
    out.insert("otlp.span_count".into(), Json::from(span_count));
    if !complete {
        out.insert("otlp.incomplete".into(), Json::Bool(true));
    }
    if question_missing {
        out.insert("otlp.question_missing".into(), Json::Bool(true));
    }
    let Some(root) = root else { return out };
    out.insert("otlp.root_span_id".into(), Json::String(hex::encode(&root.span.span_id)));
    out.insert("otlp.root_span_name".into(), Json::String(root.span.name.clone()));
    if let Some(service) = text_of(&root.resource, &["service.name"]) {
        out.insert("service.name".into(), Json::String(service));
    }
    if let Some(meta) = metadata(&root.span.attributes) {
        out.insert("metadata".into(), Json::Object(meta));
    }
    if let Some(tags) = get(&root.span.attributes, "tag.tags") {
        out.insert("tag.tags".into(), to_json(tags));
    }
    let copyable = |key: &str| !MAPPED.contains(&key) && !MAPPED_PREFIXES.iter().any(|p| key.starts_with(p));
    for kv in &root.span.attributes {
        if out.len() >= MAX_ATTRIBUTES {
            break;
        }
        if copyable(&kv.key) {
            if let Some(v) = kv.value.as_ref().filter(|v| v.value.is_some()) {
                out.entry(kv.key.clone()).or_insert_with(|| bounded(to_json(v)));
            }
        }
    }
    // Request parameters and finish reasons of the model calls (the last one's).
    for s in models.iter().rev() {
        for kv in &s.span.attributes {
            if out.len() >= MAX_ATTRIBUTES {
                break;
            }
            let wanted = (kv.key.starts_with("gen_ai.request.") && kv.key != "gen_ai.request.model")
                || kv.key == "gen_ai.response.finish_reasons"
                || kv.key == "gen_ai.response.id"
                || kv.key == "llm.invocation_parameters";
            if wanted {
                if let Some(v) = kv.value.as_ref().and_then(|v| v.value.as_ref().map(|_| v)) {
                    out.entry(kv.key.clone()).or_insert_with(|| bounded(to_json(v)));
                }
            }
        }
    }
    out
}
