//! Attribute values: OTLP `AnyValue` as JSON, and lookups by key.

use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use serde_json::Value as Json;

/// Deepest nesting converted; deeper values become a marker string (an attribute nested
/// this deep is not worth a stack overflow). Below `limits.max_attributes_depth`'s
/// default (16) with the record's own `attributes` level on top.
const MAX_DEPTH: usize = 12;

/// An `AnyValue` as JSON: kvlists become objects, bytes become hex text, an empty value
/// becomes `null`.
pub fn to_json(value: &AnyValue) -> Json {
    to_json_at(value, 0)
}

fn to_json_at(value: &AnyValue, depth: usize) -> Json {
    if depth > MAX_DEPTH {
        return Json::String("[nested too deep]".into());
    }
    match &value.value {
        // A string-table index is used by profiles only, never in traces.
        None | Some(Value::StringValueStrindex(_)) => Json::Null,
        Some(Value::StringValue(s)) => Json::String(s.clone()),
        Some(Value::BoolValue(b)) => Json::Bool(*b),
        Some(Value::IntValue(i)) => Json::from(*i),
        Some(Value::DoubleValue(d)) => serde_json::Number::from_f64(*d).map_or(Json::Null, Json::Number),
        Some(Value::BytesValue(b)) => Json::String(hex::encode(b)),
        Some(Value::ArrayValue(a)) => Json::Array(a.values.iter().map(|v| to_json_at(v, depth + 1)).collect()),
        Some(Value::KvlistValue(kv)) => Json::Object(
            kv.values
                .iter()
                .map(|kv| (kv.key.clone(), kv.value.as_ref().map_or(Json::Null, |v| to_json_at(v, depth + 1))))
                .collect(),
        ),
    }
}

/// The value under `key`, if present and not empty.
pub fn get<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a AnyValue> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.as_ref()).filter(|v| v.value.is_some())
}

/// The first of `keys` present (list the newest name first).
pub fn first<'a>(attributes: &'a [KeyValue], keys: &[&str]) -> Option<&'a AnyValue> {
    keys.iter().find_map(|k| get(attributes, k))
}

/// A value as text: strings as they are, anything else as JSON.
pub fn text(value: &AnyValue) -> Option<String> {
    match &value.value {
        None => None,
        Some(Value::StringValue(s)) => Some(s.clone()),
        Some(_) => Some(to_json(value).to_string()),
    }
}

/// The text under the first of `keys` present.
pub fn text_of(attributes: &[KeyValue], keys: &[&str]) -> Option<String> {
    first(attributes, keys).and_then(text).filter(|s| !s.is_empty())
}

/// An integer under the first of `keys` present (ints, doubles, or numeric strings, as
/// emitters vary).
pub fn int_of(attributes: &[KeyValue], keys: &[&str]) -> Option<i64> {
    match &first(attributes, keys)?.value {
        Some(Value::IntValue(i)) => Some(*i),
        Some(Value::DoubleValue(d)) if d.is_finite() => Some(*d as i64),
        Some(Value::StringValue(s)) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A structured value: arrays and kvlists as JSON, strings parsed as JSON when they are
/// (messages are sent either way).
pub fn structured(value: &AnyValue) -> Option<Json> {
    match &value.value {
        Some(Value::StringValue(s)) => serde_json::from_str(s).ok(),
        Some(_) => Some(to_json(value)),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::{ArrayValue, KeyValueList};

    fn s(v: &str) -> AnyValue {
        AnyValue { value: Some(Value::StringValue(v.into())) }
    }

    #[test]
    fn nested_values_become_json() {
        let kv = AnyValue {
            value: Some(Value::KvlistValue(KeyValueList {
                values: vec![KeyValue { key: "role".into(), value: Some(s("user")), ..Default::default() }],
            })),
        };
        let array = AnyValue { value: Some(Value::ArrayValue(ArrayValue { values: vec![kv, AnyValue::default()] })) };
        assert_eq!(to_json(&array), serde_json::json!([{"role": "user"}, null]));
        assert_eq!(structured(&s(r#"[{"role":"user"}]"#)), Some(serde_json::json!([{"role": "user"}])));
        assert_eq!(structured(&s("plain text")), None);
    }
}
