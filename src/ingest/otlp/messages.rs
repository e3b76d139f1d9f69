//! Chat messages of a span, whichever way it carries them: the current GenAI attributes
//! (`gen_ai.input.messages`, `gen_ai.output.messages`, structured or JSON strings),
//! OpenInference's flattened `llm.{input,output}_messages.{i}.…`, the older GenAI span
//! events (`gen_ai.user.message`, `gen_ai.choice`, `gen_ai.content.prompt`, …) and the
//! older `gen_ai.prompt`/`gen_ai.completion` attributes (JSON, or indexed
//! `gen_ai.prompt.{i}.content`). The newest form present wins.

use std::collections::BTreeMap;

use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::Value as Json;

use super::value::{self, get, structured, text};

/// One message: who said it and its parts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// `user`, `assistant`, `system`, `tool`, or empty when not said.
    pub role: String,
    /// Its parts, in order.
    pub parts: Vec<Part>,
}

/// One part of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Text said.
    Text(String),
    /// The model's reasoning.
    Reasoning(String),
    /// Anything else (tool calls and their results, media): not used for text.
    Other,
}

impl Message {
    /// Its text parts, joined by new lines; `None` when it has none.
    pub fn text(&self) -> Option<String> {
        let texts: Vec<&str> = self
            .parts
            .iter()
            .filter_map(|p| match p {
                Part::Text(t) if !t.is_empty() => Some(t.as_str()),
                _ => None,
            })
            .collect();
        (!texts.is_empty()).then(|| texts.join("\n"))
    }
}

/// What was asked: the text of the last `user` message.
pub fn last_user_text(messages: &[Message]) -> Option<String> {
    messages.iter().rev().filter(|m| m.role.eq_ignore_ascii_case("user")).find_map(Message::text)
}

/// What was answered: the text parts of the output messages (usually one).
pub fn answer_text(messages: &[Message]) -> Option<String> {
    let texts: Vec<String> = messages.iter().filter_map(Message::text).collect();
    (!texts.is_empty()).then(|| texts.join("\n"))
}

/// The reasoning parts, in order.
pub fn reasoning(messages: &[Message]) -> Vec<String> {
    messages
        .iter()
        .flat_map(|m| &m.parts)
        .filter_map(|p| match p {
            Part::Reasoning(r) if !r.is_empty() => Some(r.clone()),
            _ => None,
        })
        .collect()
}

/// The input messages of a span, from the newest form present.
pub fn input(span: &Span) -> Vec<Message> {
    let a = &span.attributes;
    if let Some(v) = get(a, "gen_ai.input.messages").and_then(structured) {
        return from_json(&v);
    }
    let oi = indexed(a, "llm.input_messages");
    if !oi.is_empty() {
        return oi;
    }
    let events = from_events(
        span,
        &[
            ("gen_ai.system.message", "system"),
            ("gen_ai.user.message", "user"),
            ("gen_ai.assistant.message", "assistant"),
            ("gen_ai.tool.message", "tool"),
        ],
    );
    if !events.is_empty() {
        return events;
    }
    if let Some(v) = event_attribute(span, "gen_ai.content.prompt", "gen_ai.prompt") {
        return v;
    }
    if let Some(v) = get(a, "gen_ai.prompt").and_then(structured) {
        return from_json(&v);
    }
    indexed(a, "gen_ai.prompt")
}

/// The output messages of a span, from the newest form present.
pub fn output(span: &Span) -> Vec<Message> {
    let a = &span.attributes;
    if let Some(v) = get(a, "gen_ai.output.messages").and_then(structured) {
        return from_json(&v);
    }
    let oi = indexed(a, "llm.output_messages");
    if !oi.is_empty() {
        return oi;
    }
    let events = from_events(span, &[("gen_ai.choice", "assistant")]);
    if !events.is_empty() {
        return events;
    }
    if let Some(v) = event_attribute(span, "gen_ai.content.completion", "gen_ai.completion") {
        return v;
    }
    if let Some(v) = get(a, "gen_ai.completion").and_then(structured) {
        return from_json(&v);
    }
    indexed(a, "gen_ai.completion")
}

/// Messages from JSON: an array of `{role, parts}` (current), `{role, content}` (older and
/// OpenAI-style, content a string or an array of typed parts), or one such object.
pub fn from_json(value: &Json) -> Vec<Message> {
    match value {
        Json::Array(items) => items.iter().filter_map(message_from_json).collect(),
        Json::Object(_) => message_from_json(value).into_iter().collect(),
        _ => Vec::new(),
    }
}

fn message_from_json(value: &Json) -> Option<Message> {
    let object = value.as_object()?;
    // `gen_ai.choice` bodies wrap the message: `{index, finish_reason, message: {…}}`.
    if let Some(inner) = object.get("message").filter(|m| m.is_object()) {
        return message_from_json(inner);
    }
    let role = object.get("role").and_then(Json::as_str).unwrap_or_default().to_string();
    let mut parts = Vec::new();
    for key in ["parts", "content", "contents"] {
        match object.get(key) {
            Some(Json::String(s)) => parts.push(Part::Text(s.clone())),
            Some(Json::Array(items)) => parts.extend(items.iter().map(part_from_json)),
            _ => continue,
        }
        break;
    }
    Some(Message { role, parts })
}

fn part_from_json(value: &Json) -> Part {
    let Some(object) = value.as_object() else {
        return value.as_str().map_or(Part::Other, |s| Part::Text(s.to_string()));
    };
    let body = || {
        ["content", "text", "reasoning"].iter().find_map(|k| object.get(*k).and_then(Json::as_str)).map(str::to_string)
    };
    match object.get("type").and_then(Json::as_str) {
        Some("text") | Some("input_text") | Some("output_text") | None => body().map_or(Part::Other, Part::Text),
        Some("reasoning") | Some("thinking") => body().map_or(Part::Other, Part::Reasoning),
        Some(_) => Part::Other,
    }
}

/// Messages from older span events, one per event named in `names` (with the role it
/// implies when the event does not say).
fn from_events(span: &Span, names: &[(&str, &str)]) -> Vec<Message> {
    let mut out = Vec::new();
    for event in &span.events {
        let Some((_, role)) = names.iter().find(|(n, _)| *n == event.name) else { continue };
        let body =
            ["content", "gen_ai.event.content", "message", "body"].iter().find_map(|k| get(&event.attributes, k));
        let Some(body) = body else { continue };
        let mut message = match structured(body) {
            Some(json) => message_from_json(&json).unwrap_or_default(),
            None => Message { role: String::new(), parts: text(body).map(Part::Text).into_iter().collect() },
        };
        if message.role.is_empty() {
            message.role = (*role).to_string();
        }
        out.push(message);
    }
    out
}

/// Messages in a JSON attribute `key` of the event `name` (`gen_ai.content.prompt`).
fn event_attribute(span: &Span, name: &str, key: &str) -> Option<Vec<Message>> {
    let event = span.events.iter().find(|e| e.name == name)?;
    let v = get(&event.attributes, key)?;
    Some(match structured(v) {
        Some(json) => from_json(&json),
        None => vec![Message { role: String::new(), parts: text(v).map(Part::Text).into_iter().collect() }],
    })
}

/// Messages flattened into indexed attributes: `PREFIX.{i}.message.role`,
/// `PREFIX.{i}.message.content`, `PREFIX.{i}.message.contents.{j}.message_content.{type,text}`
/// (OpenInference), or `PREFIX.{i}.role` / `PREFIX.{i}.content` (older GenAI).
pub fn indexed(attributes: &[KeyValue], prefix: &str) -> Vec<Message> {
    let mut by_index: BTreeMap<u32, BTreeMap<&str, &KeyValue>> = BTreeMap::new();
    for kv in attributes {
        let Some(rest) = kv.key.strip_prefix(prefix).and_then(|r| r.strip_prefix('.')) else { continue };
        let Some((i, path)) = rest.split_once('.') else { continue };
        let Ok(i) = i.parse::<u32>() else { continue };
        by_index.entry(i).or_default().insert(path, kv);
    }
    let get_text = |fields: &BTreeMap<&str, &KeyValue>, path: &str| {
        fields.get(path).and_then(|kv| kv.value.as_ref()).and_then(text)
    };
    by_index
        .values()
        .map(|fields| {
            let role = get_text(fields, "message.role").or_else(|| get_text(fields, "role")).unwrap_or_default();
            let mut parts = Vec::new();
            if let Some(content) = get_text(fields, "message.content").or_else(|| get_text(fields, "content")) {
                parts.push(Part::Text(content));
            }
            let mut contents: BTreeMap<u32, (Option<String>, Option<String>)> = BTreeMap::new();
            for (path, kv) in fields {
                let Some(rest) = path.strip_prefix("message.contents.") else { continue };
                let Some((j, field)) = rest.split_once('.') else { continue };
                let Ok(j) = j.parse::<u32>() else { continue };
                let entry = contents.entry(j).or_default();
                let v = kv.value.as_ref().and_then(text);
                match field {
                    "message_content.type" => entry.0 = v,
                    "message_content.text" => entry.1 = v,
                    _ => {}
                }
            }
            for (kind, body) in contents.into_values() {
                let Some(body) = body else { continue };
                parts.push(match kind.as_deref() {
                    Some("reasoning") => Part::Reasoning(body),
                    Some("text") | None => Part::Text(body),
                    Some(_) => Part::Other,
                });
            }
            Message { role, parts }
        })
        .collect()
}

/// The text of a plain value attribute (OpenInference `input.value`): JSON values are
/// searched for their messages' text, plain text is taken as it is.
pub fn value_text(attributes: &[KeyValue], key: &str) -> Option<String> {
    let v = get(attributes, key)?;
    let raw = text(v)?;
    match value::structured(v) {
        Some(json @ (Json::Object(_) | Json::Array(_))) => {
            let messages = from_json(&json);
            last_user_text(&messages).or_else(|| answer_text(&messages)).or(Some(raw))
        }
        _ => Some(raw),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use opentelemetry_proto::tonic::common::v1::AnyValue;

    fn kv(key: &str, v: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(Value::StringValue(v.into())) }),
            ..Default::default()
        }
    }

    #[test]
    fn current_messages_as_json_strings() {
        let span = Span {
            attributes: vec![kv(
                "gen_ai.output.messages",
                r#"[{"role":"assistant","parts":[{"type":"reasoning","content":"think"},{"type":"text","content":"done"}]}]"#,
            )],
            ..Default::default()
        };
        let out = output(&span);
        assert_eq!(answer_text(&out).as_deref(), Some("done"));
        assert_eq!(reasoning(&out), vec!["think".to_string()]);
    }

    #[test]
    fn openinference_flattened_messages() {
        let attrs = vec![
            kv("llm.input_messages.0.message.role", "system"),
            kv("llm.input_messages.0.message.content", "be brief"),
            kv("llm.input_messages.1.message.role", "user"),
            kv("llm.input_messages.1.message.content", "why?"),
        ];
        assert_eq!(last_user_text(&indexed(&attrs, "llm.input_messages")).as_deref(), Some("why?"));
        let out = vec![
            kv("llm.output_messages.0.message.role", "assistant"),
            kv("llm.output_messages.0.message.contents.0.message_content.type", "reasoning"),
            kv("llm.output_messages.0.message.contents.0.message_content.text", "hmm"),
            kv("llm.output_messages.0.message.contents.1.message_content.type", "text"),
            kv("llm.output_messages.0.message.contents.1.message_content.text", "because"),
        ];
        let messages = indexed(&out, "llm.output_messages");
        assert_eq!(reasoning(&messages), vec!["hmm".to_string()]);
        assert_eq!(answer_text(&messages).as_deref(), Some("because"));
    }
}
