//! Tamper evidence: the hash chain over committed records (issue #9).
//!
//! # What is chained
//! - **Record hash**: SHA-256 over a versioned, length-prefixed encoding of an
//!   interaction as it is stored and read back ([`record_hash`]): every column of
//!   `interactions` a record carries (ids, texts, status, `created_at` in microseconds,
//!   durations, tokens, attributes with keys sorted and numbers in one canonical form) and
//!   its children (thoughts and tool calls in the order they are read back, metrics by
//!   name). Not the session's `client_ip`/`user_agent` (a session row is shared and the
//!   first writer wins), not `ingested_at` nor surrogate ids.
//! - **Block**: the fresh records of one batch that fall on one UTC day (of
//!   `created_at`). Its *leaves* are `(interaction_id, record hash)` sorted by id, kept
//!   in the block row so `verify` can name the record that differs; its *root* is the
//!   hash of the leaves; its *hash* covers the previous block's hash, the day, its
//!   sequence number, its id, its record count and its root ([`block_hash`]).
//! - **Chain**: per day, from a genesis hash of the day ([`genesis`]). The day's row keeps
//!   the head (last block's hash) and the anchor verification starts from: the genesis
//!   at seq 0, or, after retention removed the day, the last removed block.
//!
//! # Invariants
//! - A record is chained in the transaction that inserts it; a duplicate (already
//!   stored) is not chained again, a batch of duplicates writes no block.
//! - Writers append to a day's chain under the day row's lock, taken as the last step
//!   before commit and in ascending day order, so concurrent writers never deadlock and
//!   hold the lock only for the commit.
//! - The hash computed from the in-memory record at write time equals the one computed
//!   from the record read back: times are bound at the microsecond both databases keep,
//!   children are hashed in the order they are read back, and JSON numbers are hashed by
//!   value (PostgreSQL's `jsonb` rewrites `1e3` as `1000`).
//!
//! Changing the encoding changes every hash: bump the version in the domain strings.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, Timelike, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::model::Interaction;

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// Bytes of one leaf: an interaction id and its record hash.
pub const LEAF_BYTES: usize = 16 + 32;

// Domain separation: a record hash can never be mistaken for a root or a block hash.
const RECORD_DOMAIN: &[u8] = b"opsagent-audit record v1";
const ROOT_DOMAIN: &[u8] = b"opsagent-audit root v1";
const BLOCK_DOMAIN: &[u8] = b"opsagent-audit block v1";
const GENESIS_DOMAIN: &[u8] = b"opsagent-audit chain v1";

/// The time as both databases store it: cut to the microsecond (toward the past, so
/// the day never changes).
pub fn stored_time(t: DateTime<Utc>) -> DateTime<Utc> {
    let nanos = t.nanosecond();
    t.with_nanosecond(nanos - nanos % 1000).unwrap_or(t)
}

/// The UTC day a record belongs to.
pub fn day_of(t: DateTime<Utc>) -> NaiveDate {
    t.date_naive()
}

/// The hash a day's chain starts from.
pub fn genesis(day: NaiveDate) -> Hash {
    let mut h = Sha256::new();
    h.update(GENESIS_DOMAIN);
    h.update(day_text(day).as_bytes());
    h.finalize().into()
}

fn day_text(day: NaiveDate) -> String {
    day.format("%Y-%m-%d").to_string()
}

/// The root of a block: the hash of its leaves.
pub fn root(leaves: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update(ROOT_DOMAIN);
    h.update(((leaves.len() / LEAF_BYTES) as u64).to_be_bytes());
    h.update(leaves);
    h.finalize().into()
}

/// A block's hash, chaining it to the one before.
pub fn block_hash(prev: &[u8], day: NaiveDate, seq: i64, block_id: Uuid, record_count: i64, root: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update(BLOCK_DOMAIN);
    h.update(prev);
    h.update(day_text(day).as_bytes());
    h.update(seq.to_be_bytes());
    h.update(block_id.as_bytes());
    h.update(record_count.to_be_bytes());
    h.update(root);
    h.finalize().into()
}

/// Leaves of `(interaction_id, record hash)` pairs, sorted by id.
pub fn leaves(mut records: Vec<(Uuid, Hash)>) -> Vec<u8> {
    records.sort_by_key(|(id, _)| *id);
    let mut out = Vec::with_capacity(records.len() * LEAF_BYTES);
    for (id, hash) in records {
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(&hash);
    }
    out
}

/// The `(interaction_id, record hash)` pairs of leaves, or `None` if the bytes are not
/// a whole number of leaves.
pub fn parse_leaves(leaves: &[u8]) -> Option<Vec<(Uuid, Hash)>> {
    if !leaves.len().is_multiple_of(LEAF_BYTES) {
        return None;
    }
    leaves
        .chunks_exact(LEAF_BYTES)
        .map(|leaf| {
            let id = Uuid::from_slice(&leaf[..16]).ok()?;
            let hash: Hash = leaf[16..].try_into().ok()?;
            Some((id, hash))
        })
        .collect()
}

/// Feeds values into a hash with an encoding that cannot be shifted: every text is
/// length-prefixed, every optional value tagged, every list counted.
struct Encoder(Sha256);

impl Encoder {
    fn bytes(&mut self, b: &[u8]) {
        self.0.update((b.len() as u64).to_be_bytes());
        self.0.update(b);
    }

    fn text(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    fn opt_text(&mut self, s: Option<&str>) {
        match s {
            None => self.0.update([0]),
            Some(s) => {
                self.0.update([1]);
                self.text(s);
            }
        }
    }

    fn int(&mut self, v: i64) {
        self.0.update(v.to_be_bytes());
    }

    fn opt_int(&mut self, v: Option<i64>) {
        match v {
            None => self.0.update([0]),
            Some(v) => {
                self.0.update([1]);
                self.int(v);
            }
        }
    }

    fn count(&mut self, n: usize) {
        self.0.update((n as u64).to_be_bytes());
    }

    fn json(&mut self, value: &Value) {
        match value {
            Value::Null => self.0.update(b"n"),
            Value::Bool(false) => self.0.update(b"f"),
            Value::Bool(true) => self.0.update(b"t"),
            Value::Number(n) => {
                self.0.update(b"N");
                self.text(&canonical_number(n));
            }
            Value::String(s) => {
                self.0.update(b"S");
                self.text(s);
            }
            Value::Array(items) => {
                self.0.update(b"A");
                self.count(items.len());
                for item in items {
                    self.json(item);
                }
            }
            Value::Object(map) => self.object(map),
        }
    }

    fn object(&mut self, map: &serde_json::Map<String, Value>) {
        self.0.update(b"O");
        self.count(map.len());
        // Sorted here, whatever order the map keeps (jsonb reorders keys).
        let mut entries: Vec<(&String, &Value)> = map.iter().collect();
        entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        for (key, value) in entries {
            self.text(key);
            self.json(value);
        }
    }
}

/// A JSON number by its value, whatever its spelling: PostgreSQL's `jsonb` keeps numbers
/// as `numeric` and prints them back its own way (`1e3` → `1000`, `-0.0` → `0.0`), and
/// serde_json then reads an integral value as an integer or a float depending on the
/// spelling. Integral values up to 2^64 are written as integers, others as the shortest
/// float text that reads back to the same `f64`.
fn canonical_number(n: &serde_json::Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    match n.as_f64() {
        // 2^64: beyond it an f64 is printed in exponent form either way.
        Some(f) if f.fract() == 0.0 && f.abs() < 18_446_744_073_709_551_616.0 => (f as i128).to_string(),
        Some(f) => serde_json::Number::from_f64(f).map_or_else(|| n.to_string(), |n| n.to_string()),
        None => n.to_string(),
    }
}

/// The hash of one record as it is stored (see the module documentation).
pub fn record_hash(r: &Interaction) -> Hash {
    let mut e = Encoder(Sha256::new());
    e.0.update(RECORD_DOMAIN);
    e.0.update(r.interaction_id.as_bytes());
    e.0.update(r.session_id.as_bytes());
    for text in [&r.user_id, &r.endpoint] {
        e.opt_text(text.as_deref());
    }
    e.text(&r.question);
    for text in [&r.model_name, &r.provider, &r.base_url, &r.cluster, &r.final_answer] {
        e.opt_text(text.as_deref());
    }
    e.text(r.status.as_str());
    e.opt_text(r.error.as_deref());
    e.opt_int(r.http_status.map(i64::from));
    e.int(stored_time(r.created_at).timestamp_micros());
    for n in [r.total_duration_ms, r.assistant_duration_ms, r.parse_duration_ms, r.input_tokens, r.output_tokens] {
        e.opt_int(n);
    }
    e.object(&r.attributes);

    // Children are read back by sequence number, ties in the order they were written:
    // a stable sort of the record's own order.
    let mut thoughts: Vec<_> = r.thoughts.iter().collect();
    thoughts.sort_by_key(|t| t.sequence_number);
    e.count(thoughts.len());
    for t in thoughts {
        e.int(t.sequence_number.into());
        e.text(&t.content);
    }
    let mut calls: Vec<_> = r.tool_calls.iter().collect();
    calls.sort_by_key(|c| c.sequence_number);
    e.count(calls.len());
    for c in calls {
        e.int(c.sequence_number.into());
        e.text(&c.tool_name);
        e.text(&c.tool_input);
        e.opt_text(c.tool_observation.as_deref());
        e.opt_int(c.duration_ms);
        e.opt_int(c.thought_sequence_number.map(i64::from));
        e.opt_text(c.error.as_deref());
    }
    e.count(r.metrics.len());
    for (name, ms) in &r.metrics {
        e.text(name);
        e.int(*ms);
    }
    e.0.finalize().into()
}

/// What a batch will chain, worked out before its transaction starts (hashing is the
/// costly part and needs no database): a block id per day, each record's day and hash.
#[derive(Debug)]
pub(crate) struct ChainPlan {
    block_ids: BTreeMap<NaiveDate, Uuid>,
    /// Per record of the batch (same order): its day and hash.
    records: Vec<(NaiveDate, Uuid, Hash)>,
}

impl ChainPlan {
    /// Plans the chaining of `records` (deduplicated, in the order they are written).
    pub fn new(records: &[&Interaction]) -> ChainPlan {
        let mut block_ids = BTreeMap::new();
        let records = records
            .iter()
            .map(|r| {
                let day = day_of(r.created_at);
                // UUIDv7: the ids of successive blocks sort by time, so the index on
                // `interactions.chain_block` grows at its end.
                block_ids.entry(day).or_insert_with(Uuid::now_v7);
                (day, r.interaction_id, record_hash(r))
            })
            .collect();
        ChainPlan { block_ids, records }
    }

    /// The block the `index`-th record is written into.
    pub fn block_of(&self, index: usize) -> Option<Uuid> {
        self.records.get(index).and_then(|(day, _, _)| self.block_ids.get(day).copied())
    }

    /// The blocks to append once the insert said which records are fresh (`fresh(i)`
    /// of the `i`-th record), in ascending day order; days without a fresh record have
    /// none.
    pub fn blocks(&self, fresh: impl Fn(usize) -> bool) -> Vec<PendingBlock> {
        let mut per_day: BTreeMap<NaiveDate, Vec<(Uuid, Hash)>> = BTreeMap::new();
        for (i, (day, id, hash)) in self.records.iter().enumerate() {
            if fresh(i) {
                per_day.entry(*day).or_default().push((*id, *hash));
            }
        }
        per_day
            .into_iter()
            .filter_map(|(day, records)| {
                let block_id = *self.block_ids.get(&day)?;
                let record_count = records.len() as i64;
                let leaves = leaves(records);
                Some(PendingBlock { day, block_id, record_count, root: root(&leaves), leaves })
            })
            .collect()
    }
}

/// A block about to be appended to its day's chain.
#[derive(Debug, Clone)]
pub(crate) struct PendingBlock {
    pub day: NaiveDate,
    pub block_id: Uuid,
    pub record_count: i64,
    pub leaves: Vec<u8>,
    pub root: Hash,
}

impl PendingBlock {
    /// The block's hash once its place in the chain is known.
    pub fn hash(&self, prev: &[u8], seq: i64) -> Hash {
        block_hash(prev, self.day, seq, self.block_id, self.record_count, &self.root)
    }
}

/// A day's chain bookkeeping, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainDay {
    /// The UTC day.
    pub day: NaiveDate,
    /// Hash of the day's last block.
    pub head: Vec<u8>,
    /// Blocks ever appended.
    pub blocks: i64,
    /// Records ever chained.
    pub records: i64,
    /// Seq of the last block removed by retention (0: none).
    pub anchor_seq: i64,
    /// Hash verification starts from: the genesis, or the last removed block's.
    pub anchor_hash: Vec<u8>,
    /// When retention removed the day's records.
    pub retired_at: Option<DateTime<Utc>>,
    /// Records of the day stored before the hash chain existed (migration 0004): that
    /// many unchained records are expected on the day, no more.
    pub legacy_records: i64,
}

/// One block of a day's chain, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBlock {
    /// The UTC day.
    pub day: NaiveDate,
    /// Position in the day's chain, from 1.
    pub seq: i64,
    /// The id its records carry in `interactions.chain_block`.
    pub block_id: Uuid,
    /// The previous block's hash (the anchor's for the first).
    pub prev_hash: Vec<u8>,
    /// Hash of the leaves.
    pub root: Vec<u8>,
    /// This block's hash.
    pub hash: Vec<u8>,
    /// Records in the block.
    pub record_count: i64,
    /// `(interaction_id, record hash)` per record, sorted by id.
    pub leaves: Vec<u8>,
}

/// Which block a stored record says it was committed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordLink {
    /// The record.
    pub interaction_id: Uuid,
    /// Its `chain_block` (None: unchained).
    pub chain_block: Option<Uuid>,
}

/// How many interactions fall on a day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DayCount {
    /// The UTC day.
    pub day: NaiveDate,
    /// Interactions stored for it.
    pub records: u64,
}

/// What removing a day did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExpiredDay {
    /// Interactions deleted (with their children).
    pub records: u64,
    /// Blocks deleted.
    pub blocks: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Thought, ToolCall};
    use serde_json::json;

    fn record() -> Interaction {
        let mut r = Interaction::new("ab");
        r.final_answer = Some("c".into());
        r.created_at = "2026-11-20T10:00:00.123456789Z".parse().unwrap();
        r
    }

    #[test]
    fn a_shifted_field_boundary_changes_the_hash() {
        let a = record();
        let mut b = a.clone();
        b.question = "a".into();
        b.final_answer = Some("bc".into());
        assert_ne!(record_hash(&a), record_hash(&b));
        // None and an empty text are different values.
        let mut c = a.clone();
        c.user_id = Some(String::new());
        assert_ne!(record_hash(&a), record_hash(&c));
        // Text moved between adjacent optional fields.
        let (mut d, mut e) = (a.clone(), a.clone());
        d.model_name = Some("gpt-4".into());
        d.provider = Some("o".into());
        e.model_name = Some("gpt-4o".into());
        e.provider = Some(String::new());
        assert_ne!(record_hash(&d), record_hash(&e));
    }

    #[test]
    fn every_hashed_field_counts() {
        let base = record();
        type Change = Box<dyn Fn(&mut Interaction)>;
        let changes: Vec<Change> = vec![
            Box::new(|r| r.session_id = Uuid::nil()),
            Box::new(|r| r.created_at += chrono::Duration::microseconds(1)),
            Box::new(|r| r.http_status = Some(200)),
            Box::new(|r| r.output_tokens = Some(1)),
            Box::new(|r| r.status = crate::model::Status::Error),
            Box::new(|r| {
                r.attributes.insert("k".into(), json!(1));
            }),
            Box::new(|r| r.thoughts.push(Thought { content: String::new(), sequence_number: 0 })),
            Box::new(|r| {
                r.metrics.insert("m".into(), 0);
            }),
            Box::new(|r| {
                r.tool_calls.push(ToolCall {
                    tool_name: "kubectl".into(),
                    tool_input: String::new(),
                    tool_observation: None,
                    sequence_number: 1,
                    duration_ms: None,
                    thought_sequence_number: None,
                    error: None,
                    ..ToolCall::new("", "")
                })
            }),
        ];
        for (n, change) in changes.iter().enumerate() {
            let mut r = base.clone();
            change(&mut r);
            assert_ne!(record_hash(&base), record_hash(&r), "change {n} is not hashed");
        }
    }

    #[test]
    fn what_the_database_does_not_keep_does_not_count() {
        let a = record();
        let mut b = a.clone();
        // Nanoseconds below the microsecond, session-level fields.
        b.created_at = stored_time(b.created_at);
        b.client_ip = Some("10.0.0.1".into());
        b.user_agent = Some("curl".into());
        assert_eq!(record_hash(&a), record_hash(&b));
    }

    #[test]
    fn attribute_key_order_and_number_spelling_do_not_count() {
        let mut a = record();
        let mut b = a.clone();
        a.attributes = serde_json::from_str(r#"{"x": 1, "y": {"b": [1.0, 1e3, -0.0], "a": 2.5}}"#).unwrap();
        b.attributes = serde_json::from_str(r#"{"y": {"a": 2.5, "b": [1, 1000, 0]}, "x": 1.0}"#).unwrap();
        assert_eq!(record_hash(&a), record_hash(&b));
        b.attributes.insert("x".into(), json!("1"));
        assert_ne!(record_hash(&a), record_hash(&b), "a string is not a number");
    }

    #[test]
    fn children_count_in_the_order_they_are_read_back() {
        let mut a = record();
        a.thoughts = vec![
            Thought { content: "second".into(), sequence_number: 2 },
            Thought { content: "first".into(), sequence_number: 1 },
        ];
        let mut b = a.clone();
        b.thoughts.reverse();
        assert_eq!(record_hash(&a), record_hash(&b));
        b.thoughts[0].sequence_number = 3;
        assert_ne!(record_hash(&a), record_hash(&b));
    }

    #[test]
    fn leaves_round_trip_and_blocks_chain() {
        let ids = [Uuid::now_v7(), Uuid::now_v7()];
        let leaves = leaves(vec![(ids[1], [2; 32]), (ids[0], [1; 32])]);
        assert_eq!(parse_leaves(&leaves).unwrap(), vec![(ids[0], [1; 32]), (ids[1], [2; 32])]);
        assert!(parse_leaves(&leaves[1..]).is_none());
        let day = NaiveDate::from_ymd_opt(2026, 11, 20).unwrap();
        let r = root(&leaves);
        let first = block_hash(&genesis(day), day, 1, ids[0], 2, &r);
        assert_ne!(first, block_hash(&genesis(day), day, 2, ids[0], 2, &r));
        assert_ne!(first, block_hash(&genesis(day.succ_opt().unwrap()), day, 1, ids[0], 2, &r));
        assert_ne!(genesis(day), genesis(day.succ_opt().unwrap()));
    }

    #[test]
    fn a_plan_has_one_block_per_day_of_fresh_records() {
        let mut a = record();
        let mut b = record();
        let mut c = record();
        a.created_at = "2026-11-20T23:59:59.999999999Z".parse().unwrap();
        b.created_at = "2026-11-21T00:00:00Z".parse().unwrap();
        c.created_at = "2026-11-21T08:00:00Z".parse().unwrap();
        let plan = ChainPlan::new(&[&a, &b, &c]);
        assert_ne!(plan.block_of(0), plan.block_of(1));
        assert_eq!(plan.block_of(1), plan.block_of(2));
        let blocks = plan.blocks(|i| i != 2);
        assert_eq!(
            blocks.iter().map(|b| (b.day.to_string(), b.record_count)).collect::<Vec<_>>(),
            [("2026-11-20".to_string(), 1), ("2026-11-21".to_string(), 1)]
        );
        assert!(plan.blocks(|i| i == 5).is_empty());
    }
}
