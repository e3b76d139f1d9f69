//! The audit record: one interaction of an operations agent, with its thoughts, tool
//! calls and timings.
//!
//! Field names are the seed's column names, so the JSON body of the ingest API, the
//! library type and an export row all read the same. Only `question` is required; ids
//! and `created_at` are filled in when a producer leaves them out.
//!
//! Records pass through [`Interaction::sanitize`] before they reach the pipeline: text a
//! database cannot store (NUL bytes) is replaced and oversized fields are truncated with a
//! visible marker, so neither is ever a reason to lose a record.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Namespace for ids derived from producer keys that are not UUIDs (UUIDv5 of the key).
const PRODUCER_KEY_NAMESPACE: Uuid = Uuid::from_u128(0x6f70_7361_6765_6e74_2d61_7564_6974_0001);

/// Marker appended to a field cut at the configured size limit.
pub const TRUNCATION_MARKER: &str = "…[truncated by opsagent-audit: ";

/// How an interaction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The agent answered.
    #[default]
    Success,
    /// The agent or a tool failed.
    Error,
    /// The request ran out of time.
    Timeout,
    /// The caller went away or cancelled.
    Cancelled,
}

impl Status {
    /// Every status, in the order they are documented.
    pub const ALL: [Status; 4] = [Status::Success, Status::Error, Status::Timeout, Status::Cancelled];

    /// The name stored in the `status` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Success => "success",
            Status::Error => "error",
            Status::Timeout => "timeout",
            Status::Cancelled => "cancelled",
        }
    }

    /// Parses a stored status name.
    pub fn parse(name: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// How much harm a tool call could do, from [`RiskLevel::None`] (read-only) to
/// [`RiskLevel::Critical`] (cluster- or data-wide destruction). Ordered: a higher level
/// compares greater, so an interaction's level is the `max` of its calls'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RiskLevel {
    /// Read-only or harmless (`kubectl get`, `SELECT`, `--dry-run`).
    #[default]
    None,
    /// Changes little or is easily undone (a label, a config context switch).
    Low,
    /// Changes workloads in the normal course of operations (apply, patch, scale, restart).
    Medium,
    /// Destroys, disrupts or exposes something (delete, drain, exec, secret reads).
    High,
    /// Destroys whole namespaces, disks, databases or cluster-wide sets of objects.
    Critical,
}

impl RiskLevel {
    /// Every level, lowest first.
    pub const ALL: [RiskLevel; 5] =
        [RiskLevel::None, RiskLevel::Low, RiskLevel::Medium, RiskLevel::High, RiskLevel::Critical];

    /// The name stored in the `risk_level` columns and used in `min_risk=`.
    pub fn as_str(self) -> &'static str {
        match self {
            RiskLevel::None => "none",
            RiskLevel::Low => "low",
            RiskLevel::Medium => "medium",
            RiskLevel::High => "high",
            RiskLevel::Critical => "critical",
        }
    }

    /// The level's rank, 0 (none) to 4 (critical): what the database stores and compares,
    /// so `min_risk` is one integer comparison on an indexed column.
    pub fn rank(self) -> i16 {
        self as i16
    }

    /// The level of a stored rank; out-of-range ranks are `None` (never written).
    pub fn from_rank(rank: i64) -> Option<RiskLevel> {
        RiskLevel::ALL.into_iter().find(|l| i64::from(l.rank()) == rank)
    }

    /// Parses a level name (`none`, `low`, `medium`, `high`, `critical`).
    pub fn parse(name: &str) -> Option<RiskLevel> {
        RiskLevel::ALL.into_iter().find(|l| l.as_str() == name)
    }
}

impl fmt::Display for RiskLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One step of the model's reasoning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thought {
    /// What the model thought.
    pub content: String,
    /// Position in the interaction's reasoning, starting at 1.
    #[serde(default)]
    pub sequence_number: i32,
}

/// One tool the agent ran (kubectl, shell, trivy, …) and what it returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolCall {
    /// Tool name, e.g. `kubectl`.
    pub tool_name: String,
    /// The command or arguments given to the tool.
    #[serde(default)]
    pub tool_input: String,
    /// What the tool printed.
    #[serde(default)]
    pub tool_observation: Option<String>,
    /// Position among the interaction's tool calls, starting at 1.
    #[serde(default)]
    pub sequence_number: i32,
    /// How long the tool ran.
    #[serde(default)]
    pub duration_ms: Option<i64>,
    /// The thought that led to this call, by its sequence number.
    #[serde(default)]
    pub thought_sequence_number: Option<i32>,
    /// The tool's error, when it failed.
    #[serde(default)]
    pub error: Option<String>,
    /// How much harm the call could do, set by the risk classifier at ingest (a level
    /// sent by a producer is overwritten when `audit.risk.enabled`).
    #[serde(default)]
    pub risk_level: RiskLevel,
    /// The rule that set `risk_level` (`kubectl_delete`, `sql_drop`, …); `None` when no
    /// rule matched.
    #[serde(default)]
    pub risk_rule: Option<String>,
}

impl Thought {
    /// A thought with the given text; its `sequence_number` (0 = not given) is set
    /// from its position when the record enters the pipeline.
    pub fn new(content: impl Into<String>) -> Self {
        Thought { content: content.into(), sequence_number: 0 }
    }
}

impl ToolCall {
    /// A call of `tool_name` with `tool_input` and nothing else set; its
    /// `sequence_number` (0) is set from its position when the record enters the
    /// pipeline. Capture code builds
    /// tool calls through this (and sets fields after), so a field added to the record
    /// later does not break every place that makes one.
    pub fn new(tool_name: impl Into<String>, tool_input: impl Into<String>) -> Self {
        ToolCall {
            tool_name: tool_name.into(),
            tool_input: tool_input.into(),
            tool_observation: None,
            sequence_number: 0,
            duration_ms: None,
            thought_sequence_number: None,
            error: None,
            risk_level: RiskLevel::None,
            risk_rule: None,
        }
    }
}

/// One audited interaction: a question, how the agent worked on it, and its answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interaction {
    /// Producer's id and the idempotency key: a record delivered twice is stored once.
    pub interaction_id: Uuid,
    /// The conversation this interaction belongs to.
    pub session_id: Uuid,
    /// Who asked.
    pub user_id: Option<String>,
    /// Address of the client that asked.
    pub client_ip: Option<String>,
    /// The client's `User-Agent`.
    pub user_agent: Option<String>,
    /// When the interaction happened (not when it was written).
    pub created_at: DateTime<Utc>,
    /// The agent endpoint that was called, e.g. `/api/diagnose`.
    pub endpoint: Option<String>,
    /// What was asked.
    pub question: String,
    /// The model that answered.
    pub model_name: Option<String>,
    /// The model's provider, e.g. `openai`.
    pub provider: Option<String>,
    /// The provider endpoint used.
    pub base_url: Option<String>,
    /// The Kubernetes cluster worked on.
    pub cluster: Option<String>,
    /// The model's reasoning steps, in order.
    pub thoughts: Vec<Thought>,
    /// The tools run, in order.
    pub tool_calls: Vec<ToolCall>,
    /// What the agent answered.
    pub final_answer: Option<String>,
    /// How the interaction ended.
    pub status: Status,
    /// The error, when it failed.
    pub error: Option<String>,
    /// HTTP status the agent answered with, where there is one.
    pub http_status: Option<i32>,
    /// Whole request, in milliseconds.
    pub total_duration_ms: Option<i64>,
    /// Time spent in the model/agent loop.
    pub assistant_duration_ms: Option<i64>,
    /// Time spent parsing the model's answer.
    pub parse_duration_ms: Option<i64>,
    /// Other named timings (`performance_metrics` rows), in milliseconds.
    pub metrics: BTreeMap<String, i64>,
    /// Prompt tokens used.
    pub input_tokens: Option<i64>,
    /// Completion tokens used.
    pub output_tokens: Option<i64>,
    /// Anything else, as a JSON object.
    pub attributes: serde_json::Map<String, serde_json::Value>,
    /// The highest `risk_level` of the tool calls (roll-up set with them at ingest).
    #[serde(default)]
    pub risk_level: RiskLevel,
    /// How many tool calls are above [`RiskLevel::None`].
    #[serde(default)]
    pub risk_flagged: i32,
}

impl Interaction {
    /// A record with the given question, fresh ids, `created_at` now and nothing else set.
    pub fn new(question: impl Into<String>) -> Self {
        Interaction {
            interaction_id: Uuid::now_v7(),
            session_id: Uuid::now_v7(),
            user_id: None,
            client_ip: None,
            user_agent: None,
            created_at: Utc::now(),
            endpoint: None,
            question: question.into(),
            model_name: None,
            provider: None,
            base_url: None,
            cluster: None,
            thoughts: Vec::new(),
            tool_calls: Vec::new(),
            final_answer: None,
            status: Status::Success,
            error: None,
            http_status: None,
            total_duration_ms: None,
            assistant_duration_ms: None,
            parse_duration_ms: None,
            metrics: BTreeMap::new(),
            input_tokens: None,
            output_tokens: None,
            attributes: serde_json::Map::new(),
            risk_level: RiskLevel::None,
            risk_flagged: 0,
        }
    }

    /// Recomputes [`risk_level`](Interaction::risk_level) and
    /// [`risk_flagged`](Interaction::risk_flagged) from the tool calls.
    pub fn roll_up_risk(&mut self) {
        self.risk_level = self.tool_calls.iter().map(|c| c.risk_level).max().unwrap_or_default();
        self.risk_flagged = self.tool_calls.iter().filter(|c| c.risk_level > RiskLevel::None).count() as i32;
    }

    /// Makes the record storable whatever it holds: NUL bytes become U+FFFD and every text
    /// field longer than `max_field_bytes` is cut at a character boundary with a marker
    /// saying how much was removed; thoughts and tool calls left at position 0 are
    /// numbered in order; the risk roll-up is recomputed from the tool calls, so it
    /// always agrees with them whoever set their levels. Returns how many text fields
    /// were changed.
    pub fn sanitize(&mut self, max_field_bytes: usize) -> usize {
        self.roll_up_risk();
        let mut changed = 0;
        let mut fix = |s: &mut String| changed += usize::from(sanitize_text(s, max_field_bytes));
        for s in [&mut self.question].into_iter().chain(
            [
                &mut self.user_id,
                &mut self.client_ip,
                &mut self.user_agent,
                &mut self.endpoint,
                &mut self.model_name,
                &mut self.provider,
                &mut self.base_url,
                &mut self.cluster,
                &mut self.final_answer,
                &mut self.error,
            ]
            .into_iter()
            .flatten(),
        ) {
            fix(s);
        }
        // Capture code that builds records with `Thought::new`/`ToolCall::new` leaves
        // positions at 0: the order they were pushed in is their order.
        for (position, t) in (1..).zip(&mut self.thoughts) {
            if t.sequence_number == 0 {
                t.sequence_number = position;
            }
            fix(&mut t.content);
        }
        for (position, c) in (1..).zip(&mut self.tool_calls) {
            if c.sequence_number == 0 {
                c.sequence_number = position;
            }
            fix(&mut c.tool_name);
            fix(&mut c.tool_input);
            if let Some(o) = &mut c.tool_observation {
                fix(o);
            }
            if let Some(e) = &mut c.error {
                fix(e);
            }
        }
        if self.metrics.keys().any(|k| needs_sanitizing(k, max_field_bytes)) {
            let metrics = std::mem::take(&mut self.metrics);
            for (mut name, value) in metrics {
                fix(&mut name);
                self.metrics.insert(name, value);
            }
        }
        // JSON text may carry NULs inside strings (`\u0000`), which PostgreSQL's jsonb
        // refuses; the map is rewritten only when it actually holds one.
        let mut attributes = serde_json::Value::Object(std::mem::take(&mut self.attributes));
        sanitize_json(&mut attributes, max_field_bytes, &mut fix);
        if let serde_json::Value::Object(map) = attributes {
            self.attributes = map;
        }
        changed
    }
}

fn needs_sanitizing(s: &str, max_bytes: usize) -> bool {
    s.len() > max_bytes || s.contains('\0')
}

/// Replaces NUL bytes and truncates `s` to `max_bytes` (plus marker). True if changed.
pub fn sanitize_text(s: &mut String, max_bytes: usize) -> bool {
    if !needs_sanitizing(s, max_bytes) {
        return false;
    }
    if s.contains('\0') {
        *s = s.replace('\0', "\u{FFFD}");
    }
    if s.len() > max_bytes {
        let mut cut = max_bytes;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        let removed = s.len() - cut;
        s.truncate(cut);
        s.push_str(TRUNCATION_MARKER);
        s.push_str(&removed.to_string());
        s.push_str(" bytes]");
    }
    true
}

fn sanitize_json(value: &mut serde_json::Value, max_bytes: usize, fix: &mut impl FnMut(&mut String)) {
    match value {
        serde_json::Value::String(s) => fix(s),
        serde_json::Value::Array(items) => {
            for item in items {
                sanitize_json(item, max_bytes, fix);
            }
        }
        serde_json::Value::Object(map) => {
            if map.keys().any(|k| needs_sanitizing(k, max_bytes)) {
                let old = std::mem::take(map);
                for (mut k, v) in old {
                    fix(&mut k);
                    map.insert(k, v);
                }
            }
            for (_, v) in map.iter_mut() {
                sanitize_json(v, max_bytes, fix);
            }
        }
        _ => {}
    }
}

/// Turns a producer's key into an id: a UUID is used as it is, anything else becomes the
/// UUIDv5 of the text, so the same key always maps to the same id.
pub fn id_from_key(key: &str) -> Uuid {
    Uuid::parse_str(key.trim()).unwrap_or_else(|_| Uuid::new_v5(&PRODUCER_KEY_NAMESPACE, key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_bytes_are_replaced_not_rejected() {
        let mut r = Interaction::new("why\0 is it broken");
        r.tool_calls.push(ToolCall {
            tool_name: "kubectl".into(),
            tool_input: "get\0pods".into(),
            tool_observation: Some("a\0b".into()),
            sequence_number: 1,
            duration_ms: None,
            thought_sequence_number: None,
            error: None,
            ..ToolCall::new("", "")
        });
        r.attributes.insert("k\0".into(), serde_json::json!(["x\0y"]));
        assert_eq!(r.sanitize(1024), 5);
        assert_eq!(r.question, "why\u{FFFD} is it broken");
        assert_eq!(r.tool_calls[0].tool_input, "get\u{FFFD}pods");
        assert_eq!(r.attributes["k\u{FFFD}"], serde_json::json!(["x\u{FFFD}y"]));
    }

    #[test]
    fn oversized_fields_are_truncated_at_a_char_boundary_with_a_marker() {
        let mut s = "é".repeat(10); // 20 bytes
        assert!(sanitize_text(&mut s, 5));
        assert!(s.starts_with("éé"), "{s}");
        assert!(s.ends_with("…[truncated by opsagent-audit: 16 bytes]"), "{s}");
        let mut short = "ok".to_string();
        assert!(!sanitize_text(&mut short, 5));
    }

    #[test]
    fn producer_keys_map_to_stable_ids() {
        let u = Uuid::now_v7();
        assert_eq!(id_from_key(&u.to_string()), u);
        assert_eq!(id_from_key("conv-42"), id_from_key("conv-42"));
        assert_ne!(id_from_key("conv-42"), id_from_key("conv-43"));
    }
}
