//! The record as producers send it (JSON), validated into an [`Interaction`].
//!
//! Every problem is reported with the path of the field it is about
//! (`tool_calls[1].duration_ms`), so a producer can fix its code from the message alone.
//! A record over one of the per-record limits (`audit.limits.max_thoughts_per_record`,
//! `max_tool_calls_per_record`, `max_attributes_depth`) is refused the same way, the
//! message naming the limit's key.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Number, Value};
use uuid::Uuid;

use crate::config::LimitsConfig;
use crate::model::{id_from_key, Interaction, RiskLevel, Status, Thought, ToolCall};

/// A record that cannot be accepted, and which field is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", if field.is_empty() { String::new() } else { format!("{field}: ") })]
pub struct FieldError {
    /// Path of the field (`question`, `tool_calls[0].duration_ms`); empty for the record.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl FieldError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError { field: field.into(), message: message.into() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireRecord {
    interaction_id: Option<String>,
    session_id: Option<String>,
    user_id: Option<String>,
    client_ip: Option<String>,
    user_agent: Option<String>,
    created_at: Option<String>,
    endpoint: Option<String>,
    question: Option<String>,
    model_name: Option<String>,
    provider: Option<String>,
    base_url: Option<String>,
    cluster: Option<String>,
    /// The seed's single `Thought` string, accepted as the first thought.
    thought: Option<String>,
    thoughts: Option<Vec<WireThought>>,
    tool_calls: Option<Vec<WireToolCall>>,
    final_answer: Option<String>,
    status: Option<String>,
    error: Option<String>,
    http_status: Option<Number>,
    total_duration_ms: Option<Number>,
    assistant_duration_ms: Option<Number>,
    parse_duration_ms: Option<Number>,
    metrics: Option<BTreeMap<String, Number>>,
    input_tokens: Option<Number>,
    output_tokens: Option<Number>,
    attributes: Option<Map<String, Value>>,
    /// Accepted so a record read back can be sent again; the roll-up is always
    /// recomputed from the tool calls.
    #[allow(dead_code)]
    risk_level: Option<String>,
    /// Accepted and recomputed, like `risk_level`.
    #[allow(dead_code)]
    risk_flagged: Option<Number>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireThought {
    content: String,
    sequence_number: Option<Number>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireToolCall {
    tool_name: String,
    tool_input: Option<String>,
    tool_observation: Option<String>,
    sequence_number: Option<Number>,
    duration_ms: Option<Number>,
    thought_sequence_number: Option<Number>,
    error: Option<String>,
    /// A producer's own verdict; overwritten by the classifier when `audit.risk.enabled`.
    risk_level: Option<String>,
    risk_rule: Option<String>,
}

/// Validates one JSON value as a record, within the per-record `limits`. `received_at`
/// fills a missing `created_at`.
pub fn parse_record(
    value: Value,
    received_at: DateTime<Utc>,
    limits: &LimitsConfig,
) -> Result<Interaction, FieldError> {
    if !value.is_object() {
        return Err(FieldError::new("", "a record must be a JSON object"));
    }
    let wire: WireRecord = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        let prefix = if path == "." { String::new() } else { format!("{path}.") };
        // Name the missing or unknown field itself, not its parent.
        let named = ["missing field `", "unknown field `"]
            .iter()
            .find_map(|p| message.strip_prefix(p).and_then(|rest| rest.split('`').next()));
        let path = path.trim_start_matches('.');
        match named {
            // Some versions of the path already end at the named field.
            Some(name) if path == name || path.ends_with(&format!(".{name}")) => FieldError::new(path, message),
            Some(name) => FieldError::new(format!("{prefix}{name}"), message),
            None => FieldError::new(path, message),
        }
    })?;

    check_limits(&wire, limits)?;

    let question = match wire.question {
        Some(q) if !q.trim().is_empty() => q,
        Some(_) => return Err(FieldError::new("question", "must not be empty")),
        None => return Err(FieldError::new("question", "missing required field `question`")),
    };
    let mut record = Interaction::new(question);
    let mut attributes = wire.attributes.unwrap_or_default();
    if let Some(key) = wire.interaction_id.filter(|k| !k.trim().is_empty()) {
        record.interaction_id = producer_id(&key, "source_interaction_id", &mut attributes);
    }
    if let Some(key) = wire.session_id.filter(|k| !k.trim().is_empty()) {
        record.session_id = producer_id(&key, "source_session_id", &mut attributes);
    }
    if let Some(text) = wire.created_at {
        record.created_at = DateTime::parse_from_rfc3339(text.trim()).map(|t| t.with_timezone(&Utc)).map_err(|e| {
            FieldError::new(
                "created_at",
                format!("`{text}` is not an RFC 3339 date-time such as 2026-11-24T10:00:00.123Z ({e})"),
            )
        })?;
    } else {
        record.created_at = received_at;
    }
    record.user_id = wire.user_id;
    record.client_ip = wire.client_ip;
    record.user_agent = wire.user_agent;
    record.endpoint = wire.endpoint;
    record.model_name = wire.model_name;
    record.provider = wire.provider;
    record.base_url = wire.base_url;
    record.cluster = wire.cluster;
    record.final_answer = wire.final_answer;
    record.error = wire.error;
    record.status = match wire.status.as_deref() {
        Some(name) => Status::parse(name).ok_or_else(|| {
            FieldError::new(
                "status",
                format!("unknown status `{name}`, expected one of: {}", Status::ALL.map(Status::as_str).join(", ")),
            )
        })?,
        None if record.error.is_some() => Status::Error,
        None => Status::Success,
    };
    record.http_status = wire
        .http_status
        .map(|n| {
            let v = integer("http_status", &n)?;
            if (100..=599).contains(&v) {
                Ok(v as i32)
            } else {
                Err(FieldError::new("http_status", format!("{v} is not an HTTP status (100–599)")))
            }
        })
        .transpose()?;
    record.total_duration_ms = non_negative("total_duration_ms", wire.total_duration_ms)?;
    record.assistant_duration_ms = non_negative("assistant_duration_ms", wire.assistant_duration_ms)?;
    record.parse_duration_ms = non_negative("parse_duration_ms", wire.parse_duration_ms)?;
    record.input_tokens = non_negative("input_tokens", wire.input_tokens)?;
    record.output_tokens = non_negative("output_tokens", wire.output_tokens)?;
    for (name, n) in wire.metrics.unwrap_or_default() {
        let v = non_negative(&format!("metrics.{name}"), Some(n))?.unwrap_or_default();
        record.metrics.insert(name, v);
    }

    if let Some(content) = wire.thought.filter(|t| !t.is_empty()) {
        record.thoughts.push(Thought { content, sequence_number: 1 });
    }
    for (i, t) in wire.thoughts.unwrap_or_default().into_iter().enumerate() {
        let field = format!("thoughts[{i}].sequence_number");
        let position = (record.thoughts.len() + 1) as i32;
        record.thoughts.push(Thought {
            content: t.content,
            sequence_number: sequence(&field, t.sequence_number)?.unwrap_or(position),
        });
    }
    for (i, c) in wire.tool_calls.unwrap_or_default().into_iter().enumerate() {
        let mut call = ToolCall::new(c.tool_name, c.tool_input.unwrap_or_default());
        call.tool_observation = c.tool_observation;
        call.sequence_number =
            sequence(&format!("tool_calls[{i}].sequence_number"), c.sequence_number)?.unwrap_or(i as i32 + 1);
        call.duration_ms = non_negative(&format!("tool_calls[{i}].duration_ms"), c.duration_ms)?;
        call.thought_sequence_number =
            sequence(&format!("tool_calls[{i}].thought_sequence_number"), c.thought_sequence_number)?;
        call.error = c.error;
        call.risk_level = risk_level(&format!("tool_calls[{i}].risk_level"), c.risk_level.as_deref())?;
        call.risk_rule = c.risk_rule;
        record.tool_calls.push(call);
    }
    record.attributes = attributes;
    Ok(record)
}

/// A producer-sent risk level; absent is `none`.
fn risk_level(field: &str, name: Option<&str>) -> Result<RiskLevel, FieldError> {
    match name {
        None => Ok(RiskLevel::None),
        Some(name) => RiskLevel::parse(name).ok_or_else(|| {
            FieldError::new(
                field,
                format!(
                    "unknown risk level `{name}`, expected one of: {}",
                    RiskLevel::ALL.map(RiskLevel::as_str).join(", ")
                ),
            )
        }),
    }
}

/// Refuses a record over a per-record limit. Checked before anything is built from the
/// record, so an oversized one costs no more work than its parse.
fn check_limits(wire: &WireRecord, limits: &LimitsConfig) -> Result<(), FieldError> {
    // The seed's single `thought` becomes a thought too, so it counts.
    let thoughts = wire.thoughts.as_ref().map_or(0, Vec::len) + usize::from(wire.thought.is_some());
    if thoughts > limits.max_thoughts_per_record {
        return Err(FieldError::new(
            "thoughts",
            format!(
                "{thoughts} thoughts; at most {} (audit.limits.max_thoughts_per_record)",
                limits.max_thoughts_per_record
            ),
        ));
    }
    let tool_calls = wire.tool_calls.as_ref().map_or(0, Vec::len);
    if tool_calls > limits.max_tool_calls_per_record {
        return Err(FieldError::new(
            "tool_calls",
            format!(
                "{tool_calls} tool calls; at most {} (audit.limits.max_tool_calls_per_record)",
                limits.max_tool_calls_per_record
            ),
        ));
    }
    if let Some(attributes) = &wire.attributes {
        let depth = map_depth(attributes);
        if depth > limits.max_attributes_depth {
            return Err(FieldError::new(
                "attributes",
                format!(
                    "nested {depth} levels deep; at most {} (audit.limits.max_attributes_depth)",
                    limits.max_attributes_depth
                ),
            ));
        }
    }
    Ok(())
}

/// How deeply objects and arrays nest in `value`: a scalar is 0, `{"a": 1}` and `[1]`
/// are 1, `{"a": [1]}` is 2. Iterative, so no input can exhaust the stack.
pub fn nesting_depth(value: &Value) -> usize {
    let mut deepest = 0;
    let mut pending = vec![(value, 1)];
    while let Some((value, level)) = pending.pop() {
        match value {
            Value::Object(map) => {
                deepest = deepest.max(level);
                pending.extend(map.values().map(|v| (v, level + 1)));
            }
            Value::Array(items) => {
                deepest = deepest.max(level);
                pending.extend(items.iter().map(|v| (v, level + 1)));
            }
            _ => {}
        }
    }
    deepest
}

/// [`nesting_depth`] of a map (an `attributes` map): 1 when flat, even when empty.
fn map_depth(map: &Map<String, Value>) -> usize {
    1 + map.values().map(nesting_depth).max().unwrap_or(0)
}

/// A producer's id: kept if it is a UUID, else mapped to a stable UUID with the original
/// text kept in `attributes[keep_as]`, so nothing the producer sent is lost.
fn producer_id(key: &str, keep_as: &str, attributes: &mut Map<String, Value>) -> Uuid {
    let id = id_from_key(key);
    if Uuid::parse_str(key.trim()).is_err() {
        attributes.insert(keep_as.to_string(), Value::String(key.to_string()));
    }
    id
}

/// A JSON number as a whole number; fractions of a millisecond are rounded.
fn integer(field: &str, n: &Number) -> Result<i64, FieldError> {
    if let Some(v) = n.as_i64() {
        return Ok(v);
    }
    match n.as_f64() {
        Some(f) if f.is_finite() && f.abs() < 9.0e15 => Ok(f.round() as i64),
        _ => Err(FieldError::new(field, format!("{n} is out of range"))),
    }
}

fn non_negative(field: &str, n: Option<Number>) -> Result<Option<i64>, FieldError> {
    let Some(n) = n else { return Ok(None) };
    let v = integer(field, &n)?;
    if v < 0 {
        return Err(FieldError::new(field, format!("must not be negative (got {n})")));
    }
    Ok(Some(v))
}

fn sequence(field: &str, n: Option<Number>) -> Result<Option<i32>, FieldError> {
    non_negative(field, n)?
        .map(|v| i32::try_from(v).map_err(|_| FieldError::new(field, format!("{v} is too large"))))
        .transpose()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(v: Value) -> Result<Interaction, FieldError> {
        parse_record(v, Utc::now(), &LimitsConfig::default())
    }

    fn err(v: Value) -> FieldError {
        parse(v).unwrap_err()
    }

    #[test]
    fn only_question_is_required() {
        let r = parse(json!({"question": "why?"})).unwrap();
        assert_eq!(r.question, "why?");
        assert_eq!(r.status, Status::Success);
        assert_eq!(err(json!({"model_name": "x"})).field, "question");
    }

    #[test]
    fn errors_name_the_nested_field() {
        let e = err(json!({"question": "q", "tool_calls": [{"tool_name": "k", "duration_ms": -3}]}));
        assert_eq!(e.field, "tool_calls[0].duration_ms");
        let e = err(json!({"question": "q", "tool_calls": [{"tool_input": "x"}]}));
        assert_eq!(e.field, "tool_calls[0].tool_name");
        let e = err(json!({"question": "q", "total_duration_ms": "slow"}));
        assert_eq!(e.field, "total_duration_ms");
        let e = err(json!({"question": "q", "qestion": "typo"}));
        assert_eq!(e.field, "qestion");
        let e = err(json!({"question": "q", "status": "ok"}));
        assert_eq!(e.field, "status");
        assert!(e.message.contains("success, error, timeout, cancelled"), "{}", e.message);
        let e = err(json!({"question": "q", "created_at": "yesterday"}));
        assert_eq!(e.field, "created_at");
    }

    #[test]
    fn non_uuid_ids_map_to_stable_uuids_and_keep_the_original() {
        let r = parse(json!({"question": "q", "session_id": "conv-7"})).unwrap();
        assert_eq!(r.session_id, id_from_key("conv-7"));
        assert_eq!(r.attributes["source_session_id"], json!("conv-7"));
    }

    #[test]
    fn seed_single_thought_and_missing_sequence_numbers_are_filled() {
        let r = parse(json!({"question": "q", "thought": "first", "thoughts": [{"content": "second"}],
                             "tool_calls": [{"tool_name": "a"}, {"tool_name": "b"}]}))
        .unwrap();
        assert_eq!(r.thoughts.iter().map(|t| t.sequence_number).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(r.tool_calls.iter().map(|t| t.sequence_number).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn nesting_depth_counts_objects_and_arrays() {
        assert_eq!(nesting_depth(&json!(1)), 0);
        assert_eq!(nesting_depth(&json!("text")), 0);
        assert_eq!(nesting_depth(&json!({})), 1);
        assert_eq!(nesting_depth(&json!([])), 1);
        assert_eq!(nesting_depth(&json!({"a": 1, "b": "x"})), 1);
        assert_eq!(nesting_depth(&json!({"a": [1, 2]})), 2);
        assert_eq!(nesting_depth(&json!({"a": {"b": {"c": 1}}, "d": [1]})), 3);
        // The deepest branch counts, wherever it is.
        assert_eq!(nesting_depth(&json!([1, [2, [3, [4]]], {"x": 1}])), 4);
        assert_eq!(map_depth(&Map::new()), 1);
    }

    #[test]
    fn nesting_depth_of_a_very_deep_value_does_not_overflow_the_stack() {
        let mut value = json!(1);
        for _ in 0..100_000 {
            value = Value::Array(vec![value]);
        }
        assert_eq!(nesting_depth(&value), 100_000);
        // serde_json drops nested values recursively: take it apart level by level.
        while let Value::Array(mut items) = value {
            value = items.pop().unwrap_or(Value::Null);
        }
    }

    /// `{"l": {"l": … 1 …}}` nested `depth` objects deep.
    fn nested(depth: usize) -> Value {
        (0..depth).fold(json!(1), |inner, _| json!({ "l": inner }))
    }

    #[test]
    fn per_record_limits_name_the_field_and_the_limit() {
        let limits = LimitsConfig {
            max_thoughts_per_record: 2,
            max_tool_calls_per_record: 3,
            max_attributes_depth: 4,
            ..LimitsConfig::default()
        };
        let check = |v: Value| parse_record(v, Utc::now(), &limits);
        let thoughts = |n: usize| (0..n).map(|i| json!({"content": format!("t{i}")})).collect::<Vec<_>>();
        let calls = |n: usize| (0..n).map(|_| json!({"tool_name": "kubectl"})).collect::<Vec<_>>();

        assert!(check(json!({"question": "q", "thoughts": thoughts(2)})).is_ok());
        let e = check(json!({"question": "q", "thoughts": thoughts(3)})).unwrap_err();
        assert_eq!(e.to_string(), "thoughts: 3 thoughts; at most 2 (audit.limits.max_thoughts_per_record)");
        // The seed's single `thought` counts as one.
        let e = check(json!({"question": "q", "thought": "t", "thoughts": thoughts(2)})).unwrap_err();
        assert_eq!(e.field, "thoughts");

        assert!(check(json!({"question": "q", "tool_calls": calls(3)})).is_ok());
        let e = check(json!({"question": "q", "tool_calls": calls(4)})).unwrap_err();
        assert_eq!(e.to_string(), "tool_calls: 4 tool calls; at most 3 (audit.limits.max_tool_calls_per_record)");

        // The attributes map itself is level 1.
        assert!(check(json!({"question": "q", "attributes": nested(4)})).is_ok());
        let e = check(json!({"question": "q", "attributes": nested(5)})).unwrap_err();
        assert_eq!(e.to_string(), "attributes: nested 5 levels deep; at most 4 (audit.limits.max_attributes_depth)");
        let e = check(json!({"question": "q", "attributes": {"a": [[[{"b": 1}]]]}})).unwrap_err();
        assert_eq!(e.field, "attributes");
    }
}
