//! Removing the agent's trace from an answer the client did not ask it for
//! (`audit.proxy.capture_thoughts`), byte for byte as the agent would have written the
//! answer without it.
//!
//! Re-serialising would not do: the agent (Go's `encoding/json`) escapes `<`, `>` and
//! `&` as `\u003c`… and orders keys its own way. So the top-level object is only
//! tokenised: each member's value is located in the original text (a borrowed
//! [`RawValue`] is a slice of it), and the answer is rebuilt from the original bytes of
//! the members kept.

use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Members the agent adds to its answer for `show-thought=true`.
pub const TRACE_FIELDS: [&str; 5] = ["thought", "question", "action", "observation", "tools_history"];

/// `body` without the [`TRACE_FIELDS`] members; `None` when it is not a JSON object
/// (then it is forwarded as it is). A body without any of them comes back unchanged.
pub fn without_trace(body: &[u8]) -> Option<Vec<u8>> {
    let members = members(body)?;
    if members.is_empty() {
        return Some(body.to_vec());
    }
    let open = body.iter().position(|b| !b.is_ascii_whitespace()).filter(|&i| body[i] == b'{')?;
    let base = body.as_ptr() as usize;
    // Where each member ends: the end of its value in `body`.
    let ends: Vec<usize> = members.iter().map(|(_, v)| v.get().as_ptr() as usize - base + v.get().len()).collect();
    let mut out = Vec::with_capacity(body.len());
    out.extend_from_slice(&body[..=open]);
    let mut kept = 0;
    for (i, (key, _)) in members.iter().enumerate() {
        if TRACE_FIELDS.contains(&key.as_str()) {
            continue;
        }
        let start = if i == 0 { open + 1 } else { ends[i - 1] };
        let mut segment = &body[start..ends[i]];
        if i > 0 {
            // Between two members there is only white space and the comma.
            let comma = segment.iter().position(|&b| b == b',')?;
            segment = &segment[comma + 1..];
        }
        if kept > 0 {
            out.push(b',');
        }
        out.extend_from_slice(segment);
        kept += 1;
    }
    let last_end = ends.last().copied().unwrap_or(open + 1);
    out.extend_from_slice(&body[last_end..]);
    Some(out)
}

/// The top-level members of a JSON object, in order, values unparsed.
fn members(body: &[u8]) -> Option<Vec<(String, &RawValue)>> {
    struct Members;
    impl<'de> Visitor<'de> for Members {
        type Value = Vec<(String, &'de RawValue)>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(key) = map.next_key::<String>()? {
                out.push((key, map.next_value::<&'de RawValue>()?));
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let members = de.deserialize_map(Members).ok()?;
    de.end().ok()?;
    Some(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strip(s: &str) -> Option<String> {
        without_trace(s.as_bytes()).map(|b| String::from_utf8(b).unwrap())
    }

    #[test]
    fn trace_members_are_removed_and_every_other_byte_kept() {
        // Go's encoding/json: sorted keys, HTML characters escaped.
        let full = r#"{"action":{"input":"get pods","name":"kubectl"},"message":"pods \u003cnone\u003e \u0026 ok","observation":"x","question":"q","status":"success","thought":"t","tools_history":[{"name":"kubectl"}]}"#;
        assert_eq!(strip(full).unwrap(), r#"{"message":"pods \u003cnone\u003e \u0026 ok","status":"success"}"#);
        // Removing the first and the last member, white space and a trailing newline.
        let spaced = "{ \"thought\" : \"t\" ,\n \"message\": \"m\" , \"status\":\"ok\", \"tools_history\": [] }\n";
        assert_eq!(strip(spaced).unwrap(), "{\n \"message\": \"m\", \"status\":\"ok\" }\n");
        let plain = r#"{"message":"m","status":"success"}"#;
        assert_eq!(strip(plain).unwrap(), plain);
        assert_eq!(strip("{}").unwrap(), "{}");
        assert_eq!(strip(r#"{"thought":"only"}"#).unwrap(), "{}");
    }

    #[test]
    fn anything_but_a_json_object_is_left_alone() {
        assert_eq!(strip("[1,2]"), None);
        assert_eq!(strip("<html>"), None);
        assert_eq!(strip(r#"{"message":"cut"#), None);
        assert_eq!(strip(r#"{"a":1} trailing"#), None);
    }
}
