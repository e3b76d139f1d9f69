//! Reading the audit log back (issue #8): every list filter alone and combined, full
//! text, keyset pagination (also while rows are being inserted), sessions, dead letters,
//! stats and the overview, and the 400s of bad parameters, on both backends.
//!
//! One deterministic data set ([`seed`]) is written with `write_batch`; every expected
//! answer is computed here in Rust from that data (filters as predicates, percentiles by
//! linear interpolation), never by running the product's SQL again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Timelike, Utc};
use opsagent_audit::model::{Interaction, Status, Thought, ToolCall};
use opsagent_audit::store::{DeadLetter, Filter, Store};
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use crate::common::{spawn_app, TestApp, TestDb};

both_backends! {
    every_filter_returns_exactly_the_matching_rows_newest_first,
    full_text_finds_substrings_in_any_language_and_literally,
    pages_neither_miss_nor_repeat_rows_even_while_rows_are_inserted,
    sessions_in_time_order_and_dead_letters_newest_first,
    stats_match_an_independent_computation,
    overview_ranks_tools_users_clusters_and_questions,
    bad_parameters_are_refused_naming_the_parameter,
    relative_times_count_back_from_now_and_page,
}

// ---------------------------------------------------------------------------------------
// The data set.

/// Records in the seed.
const SEED_SIZE: usize = 480;
/// Records per `write_batch` while seeding.
const SEED_BATCH: usize = 100;
/// The seed's interaction ids are this plus the record's position: ids increase in
/// insertion order, so storage ids do too (a batch is written sorted by interaction id).
const SEED_ID_BASE: u128 = 0x0190_0000_0000_7000_8000_0000_0000_0000;
/// Ids of records inserted later, above every seed id.
const LATE_ID_BASE: u128 = 0x0190_0000_0000_7000_9000_0000_0000_0000;

/// Users by position modulo 12: alice 120, bob/carol/frank 80 each, dave/erin/nobody 40
/// each (ties, one of them with the NULL group, on purpose).
const USERS: [Option<&str>; 12] = [
    Some("alice"),
    Some("alice"),
    Some("alice"),
    Some("bob"),
    Some("bob"),
    Some("carol"),
    Some("carol"),
    Some("dave"),
    Some("erin"),
    None,
    Some("frank"),
    Some("frank"),
];
const MODELS: [(Option<&str>, Option<&str>); 5] = [
    (Some("gpt-4o"), Some("openai")),
    (Some("gpt-4o-mini"), Some("openai")),
    (Some("claude-sonnet-4"), Some("anthropic")),
    (Some("qwen-max"), Some("dashscope")),
    (None, None),
];
const CLUSTERS: [Option<&str>; 4] = [Some("prod-east"), Some("prod-west"), Some("staging"), None];
/// Weighted: kubectl is the most used tool.
const TOOLS: [&str; 8] = ["kubectl", "kubectl", "kubectl", "shell", "shell", "trivy", "prometheus", "helm"];
const ENDPOINTS: [&str; 3] = ["/api/execute", "/api/diagnose", "/api/analyze"];
const SERVICES: [&str; 5] = ["checkout", "payments", "search", "orders", "gateway"];

/// Positions whose question (or answer) is one the full-text checks look for.
const ZH_POOL: usize = 17;
const ZH_BACKUP: usize = 18;
const CRASHLOOP: usize = 42;
const PERCENT: usize = 61;
const HUNDRED: usize = 62;
const UNDERSCORE: usize = 63;
const ANSWER_ONLY: usize = 88;
const CRASHING: [usize; 3] = [120, 121, 122];

/// splitmix64: a small deterministic generator, so the seed is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// The seed's first instant; records spread over the ten days after it.
fn base() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap()
}

/// The seed, in insertion order (position = insertion order).
struct Seed {
    records: Vec<Interaction>,
}

impl Seed {
    /// The ids of the records `keep` accepts, newest first by (created_at, insertion order).
    fn expect(&self, keep: impl Fn(&Interaction) -> bool) -> Vec<Uuid> {
        let mut rows: Vec<(usize, &Interaction)> = self.records.iter().enumerate().filter(|(_, r)| keep(r)).collect();
        rows.sort_by(|a, b| b.1.created_at.cmp(&a.1.created_at).then(b.0.cmp(&a.0)));
        rows.into_iter().map(|(_, r)| r.interaction_id).collect()
    }

    fn at(&self, position: usize) -> &Interaction {
        &self.records[position]
    }

    fn position(&self, id: Uuid) -> usize {
        self.records.iter().position(|r| r.interaction_id == id).expect("a seed id")
    }
}

/// A question from a few templates, with the case and white-space variants people type
/// (which frequent-question counting must fold together).
fn question(rng: &mut Rng) -> String {
    let service = rng.pick(&SERVICES);
    let q = match rng.below(4) {
        0 => format!("why is pod web-{} restarting?", rng.below(4)),
        1 => format!("list the pods of {service}"),
        2 => format!("how much memory does {service} use?"),
        _ => format!("scale {service} to {} replicas", 2 + rng.below(2)),
    };
    match rng.below(8) {
        0 => q.to_uppercase(),
        1 => {
            let mut chars = q.chars();
            let first = chars.next().expect("a question").to_uppercase().collect::<String>();
            first + chars.as_str()
        }
        2 => q.replacen(' ', "  ", 1),
        3 => format!("{q}\n"),
        4 => format!("\t{q} "),
        5 => q.replacen(' ', " \t ", 2),
        _ => q,
    }
}

fn make_seed() -> Seed {
    let mut rng = Rng(0x5EED);
    let sessions: Vec<Uuid> =
        (0..37u128).map(|n| Uuid::from_u128(0x5e55_0000_0000_4000_8000_0000_0000_0000 + n)).collect();
    let span_us = Duration::days(10).num_microseconds().unwrap() as u64;
    let mut records: Vec<Interaction> = Vec::with_capacity(SEED_SIZE);
    for i in 0..SEED_SIZE {
        let mut r = Interaction::new(question(&mut rng));
        r.interaction_id = Uuid::from_u128(SEED_ID_BASE + i as u128);
        r.session_id = sessions[(i * 7) % sessions.len()];
        r.created_at = base() + Duration::microseconds(rng.below(span_us) as i64);
        // Equal times, within one batch and across batches (103 and 98), so the order
        // among them is the storage id's.
        if i % 9 == 4 && i >= 5 {
            r.created_at = records[i - 5].created_at;
        }
        r.user_id = USERS[i % USERS.len()].map(str::to_owned);
        let (model, provider) = rng.pick(&MODELS);
        r.model_name = model.map(str::to_owned);
        r.provider = provider.map(str::to_owned);
        r.cluster = rng.pick(&CLUSTERS).map(str::to_owned);
        r.endpoint = Some(rng.pick(&ENDPOINTS).to_owned());
        r.status = match rng.below(20) {
            0..=13 => Status::Success,
            14..=16 => Status::Error,
            17..=18 => Status::Timeout,
            _ => Status::Cancelled,
        };
        if r.status != Status::Success {
            r.error = Some(format!("{} after {} steps", r.status, rng.below(5)));
            r.http_status = Some(if r.status == Status::Timeout { 504 } else { 500 });
        } else {
            r.http_status = Some(200);
        }
        r.total_duration_ms = match rng.below(13) {
            0 => None,
            1 => Some(60_000 + rng.below(60_000) as i64),
            _ => Some(200 + rng.below(30_000) as i64),
        };
        // Equal durations, so percentiles interpolate across repeated values too.
        if i % 11 == 0 && r.total_duration_ms.is_some() {
            r.total_duration_ms = Some(1_500);
        }
        r.input_tokens = (rng.below(10) != 0).then(|| 100 + rng.below(4_000) as i64);
        r.output_tokens = (rng.below(10) != 0).then(|| 20 + rng.below(900) as i64);
        r.thoughts = vec![Thought { content: format!("step one of {i}"), sequence_number: 1 }];
        for n in 0..rng.below(4) as i32 {
            let tool = rng.pick(&TOOLS);
            let duration_ms = match rng.below(12) {
                0 => None,
                1 => Some(20_000 + rng.below(10_000) as i64),
                _ => Some(1 + rng.below(2_500) as i64),
            };
            let error = (rng.below(6) == 0).then(|| "exit status 1".to_owned());
            r.tool_calls.push(ToolCall {
                tool_name: tool.into(),
                tool_input: format!("{tool} step {n}"),
                tool_observation: Some(format!("output {i}/{n}")),
                sequence_number: n + 1,
                duration_ms,
                thought_sequence_number: Some(1),
                error,
                ..ToolCall::new("", "")
            });
        }
        r.final_answer = Some(format!("checked {} and found nothing unusual", rng.pick(&SERVICES)));
        records.push(r);
    }
    let set = |records: &mut Vec<Interaction>, i: usize, q: &str, answer: Option<&str>| {
        records[i].question = q.to_owned();
        if let Some(a) = answer {
            records[i].final_answer = Some(a.to_owned());
        }
    };
    set(&mut records, ZH_POOL, "订单服务的数据库连接池耗尽", Some("连接池已经扩容到 200"));
    set(&mut records, ZH_BACKUP, "数据库备份失败了吗", None);
    set(&mut records, CRASHLOOP, "pod web-1 is in CrashLoopBackOff", Some("the liveness probe fails"));
    set(&mut records, PERCENT, "disk usage is at 100% on node-3", None);
    set(&mut records, HUNDRED, "cpu request is 100 millicores on node-3", None);
    set(&mut records, UNDERSCORE, "pod web_1 was evicted", None);
    set(
        &mut records,
        ANSWER_ONLY,
        "why are connections refused",
        Some("raise max_connections in PgBouncer, then reload"),
    );
    set(&mut records, CRASHING[0], "Why is pod X crashing?", None);
    set(&mut records, CRASHING[1], "why is  pod x crashing?", None);
    set(&mut records, CRASHING[2], "\tWHY is pod x crashing?\n", None);
    Seed { records }
}

/// Writes the seed through the store, in batches, in insertion order.
async fn seed(store: &dyn Store) -> Seed {
    let seed = make_seed();
    for batch in seed.records.chunks(SEED_BATCH) {
        let written = store.write_batch(batch).await.expect("write a seed batch");
        assert_eq!(written.inserted, batch.len() as u64);
    }
    assert_eq!(store.count_interactions().await.unwrap(), SEED_SIZE as u64);
    seed
}

// ---------------------------------------------------------------------------------------
// HTTP helpers.

type Query<'a> = [(&'a str, &'a str)];

/// GETs `path` with `query`; status and JSON body.
async fn get(app: &TestApp, path: &str, query: &Query<'_>) -> (u16, Value) {
    let response = app.client.get(app.url(path)).query(query).send().await.expect("send the GET");
    let status = response.status().as_u16();
    let text = response.text().await.expect("read the answer");
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} {query:?}: not JSON ({e}): {text:?}"));
    (status, body)
}

/// GETs `path`, which must answer 200.
async fn get_ok(app: &TestApp, path: &str, query: &Query<'_>) -> Value {
    let (status, body) = get(app, path, query).await;
    assert_eq!(status, 200, "{path} {query:?}: {body}");
    body
}

fn id_of(item: &Value) -> Uuid {
    item["interaction_id"].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no id in {item}"))
}

fn time_of(item: &Value, field: &str) -> DateTime<Utc> {
    item[field].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no {field} in {item}"))
}

/// Pages through `GET path` with `limit`, following `next_cursor` to the end; every page
/// but the last is full, no item comes twice. Returns every item in order.
async fn page_all(app: &TestApp, path: &str, query: &Query<'_>, limit: usize) -> Vec<Value> {
    let limit_text = limit.to_string();
    let mut items: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut q: Vec<(&str, &str)> = query.to_vec();
        q.push(("limit", &limit_text));
        if let Some(c) = &cursor {
            q.push(("cursor", c));
        }
        let body = get_ok(app, path, &q).await;
        let page = body["items"].as_array().unwrap_or_else(|| panic!("no items: {body}")).clone();
        assert!(page.len() <= limit, "{query:?}: page of {} with limit {limit}", page.len());
        items.extend(page.iter().cloned());
        match body["next_cursor"].as_str() {
            Some(next) => {
                assert_eq!(page.len(), limit, "{query:?}: a page with a next page must be full");
                cursor = Some(next.to_owned());
            }
            None => {
                assert!(body["next_cursor"].is_null(), "{body}");
                break;
            }
        }
        assert!(items.len() <= 10 * SEED_SIZE, "{query:?}: paging does not end");
    }
    items
}

/// Every interaction id a list returns, in order, checked for repeats.
async fn list_ids(app: &TestApp, query: &Query<'_>, limit: usize) -> Vec<Uuid> {
    let ids: Vec<Uuid> = page_all(app, "/api/v1/interactions", query, limit).await.iter().map(id_of).collect();
    let distinct: HashSet<&Uuid> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "{query:?}: an interaction came twice");
    ids
}

/// Asserts a 400 `invalid_parameter` naming `field`.
async fn assert_bad(app: &TestApp, path: &str, query: &Query<'_>, field: &str) {
    let (status, body) = get(app, path, query).await;
    assert_eq!(status, 400, "{path} {query:?}: {body}");
    assert_eq!(body["error"]["code"], "invalid_parameter", "{path} {query:?}: {body}");
    assert_eq!(body["error"]["field"], field, "{path} {query:?}: {body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
}

// ---------------------------------------------------------------------------------------
// Predicates, written from the record's fields (the SPEC's meaning of each filter).

fn text_matches(r: &Interaction, q: &str) -> bool {
    let q = q.to_lowercase();
    r.question.to_lowercase().contains(&q) || r.final_answer.as_deref().is_some_and(|a| a.to_lowercase().contains(&q))
}

fn ran(r: &Interaction, tool: &str) -> bool {
    r.tool_calls.iter().any(|c| c.tool_name == tool)
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

// ---------------------------------------------------------------------------------------
// 1. Filters.

async fn every_filter_returns_exactly_the_matching_rows_newest_first(db: &TestDb) {
    let app = spawn_app(db).await;
    let seed = seed(&*app.store).await;

    // The seed has the ties the order must break by insertion (storage id).
    let distinct: HashSet<DateTime<Utc>> = seed.records.iter().map(|r| r.created_at).collect();
    assert!(distinct.len() < SEED_SIZE - 40, "the seed should hold equal created_at values");

    // Bounds taken from the data, so `from` (inclusive) and `to` (exclusive) land exactly
    // on rows.
    let mut times: Vec<DateTime<Utc>> = seed.records.iter().map(|r| r.created_at).collect();
    times.sort_unstable();
    let (from, to) = (times[120], times[360]);
    let (from_text, to_text) = (rfc3339(from), rfc3339(to));
    let mut durations: Vec<i64> = seed.records.iter().filter_map(|r| r.total_duration_ms).collect();
    durations.sort_unstable();
    // Values that occur in the data, so the inclusive bounds are exercised.
    let (min, max) = (durations[durations.len() / 4], durations[durations.len() * 3 / 4]);
    let (min_text, max_text) = (min.to_string(), max.to_string());
    let session = seed.at(10).session_id;
    let session_text = session.to_string();

    type Keep = Box<dyn Fn(&Interaction) -> bool>;
    let s = |v: &str| Some(v.to_owned());
    let cases: Vec<(Vec<(&str, &str)>, Keep)> = vec![
        (vec![], Box::new(|_| true)),
        (vec![("from", &from_text)], Box::new(move |r| r.created_at >= from)),
        (vec![("to", &to_text)], Box::new(move |r| r.created_at < to)),
        (vec![("from", &from_text), ("to", &to_text)], Box::new(move |r| r.created_at >= from && r.created_at < to)),
        (
            vec![("from", "2026-03-04"), ("to", "2026-03-06T12:00")],
            Box::new(|r| {
                r.created_at >= Utc.with_ymd_and_hms(2026, 3, 4, 0, 0, 0).unwrap()
                    && r.created_at < Utc.with_ymd_and_hms(2026, 3, 6, 12, 0, 0).unwrap()
            }),
        ),
        (vec![("user_id", "alice")], Box::new(move |r| r.user_id == s("alice"))),
        (vec![("user_id", "dave")], Box::new(move |r| r.user_id == s("dave"))),
        (vec![("user_id", "nobody")], Box::new(|_| false)),
        (vec![("session_id", &session_text)], Box::new(move |r| r.session_id == session)),
        (vec![("model_name", "gpt-4o")], Box::new(move |r| r.model_name == s("gpt-4o"))),
        (vec![("provider", "openai")], Box::new(move |r| r.provider == s("openai"))),
        (vec![("cluster", "staging")], Box::new(move |r| r.cluster == s("staging"))),
        (vec![("status", "success")], Box::new(|r| r.status == Status::Success)),
        (vec![("status", "error,timeout")], Box::new(|r| matches!(r.status, Status::Error | Status::Timeout))),
        (vec![("status", "cancelled")], Box::new(|r| r.status == Status::Cancelled)),
        (vec![("tool_name", "helm")], Box::new(|r| ran(r, "helm"))),
        (vec![("tool_name", "kubectl")], Box::new(|r| ran(r, "kubectl"))),
        (vec![("min_duration_ms", &min_text)], Box::new(move |r| r.total_duration_ms.is_some_and(|d| d >= min))),
        (vec![("max_duration_ms", &max_text)], Box::new(move |r| r.total_duration_ms.is_some_and(|d| d <= max))),
        (
            vec![("min_duration_ms", &min_text), ("max_duration_ms", &max_text)],
            Box::new(move |r| r.total_duration_ms.is_some_and(|d| d >= min && d <= max)),
        ),
        (vec![("q", "payments")], Box::new(|r| text_matches(r, "payments"))),
        // Combinations.
        (
            vec![("user_id", "alice"), ("status", "success"), ("cluster", "prod-east")],
            Box::new(move |r| r.user_id == s("alice") && r.status == Status::Success && r.cluster == s("prod-east")),
        ),
        (
            vec![("model_name", "gpt-4o-mini"), ("provider", "openai"), ("from", &from_text)],
            Box::new(move |r| r.model_name == s("gpt-4o-mini") && r.provider == s("openai") && r.created_at >= from),
        ),
        (
            vec![("tool_name", "shell"), ("min_duration_ms", "10000"), ("status", "success,cancelled")],
            Box::new(|r| {
                ran(r, "shell")
                    && r.total_duration_ms.is_some_and(|d| d >= 10_000)
                    && matches!(r.status, Status::Success | Status::Cancelled)
            }),
        ),
        (
            vec![("q", "restarting"), ("user_id", "bob"), ("to", &to_text)],
            Box::new(move |r| text_matches(r, "restarting") && r.user_id == s("bob") && r.created_at < to),
        ),
        (
            vec![("provider", "anthropic"), ("model_name", "gpt-4o")],
            Box::new(|_| false), // no such pair in the seed
        ),
    ];
    let mut limits = [50usize, 13, 500, 7, 31].into_iter().cycle();
    for (query, keep) in &cases {
        let expected = seed.expect(keep);
        let limit = limits.next().unwrap();
        let got = list_ids(&app, query, limit).await;
        if got != expected {
            let missing: Vec<usize> =
                expected.iter().filter(|id| !got.contains(id)).map(|id| seed.position(*id)).collect();
            let extra: Vec<Uuid> = got.iter().filter(|id| !expected.contains(id)).copied().collect();
            panic!(
                "{query:?} (limit {limit}): {} rows, expected {}; missing positions {missing:?}, extra {extra:?}",
                got.len(),
                expected.len()
            );
        }
        // Filters narrow: only the empty filter and the known-empty ones are all or nothing.
        if !query.is_empty() && !matches!(query[0].1, "nobody" | "anthropic") {
            assert!(!expected.is_empty() && expected.len() < SEED_SIZE, "{query:?}: {} rows", expected.len());
        }
    }

    // The list's rows carry the summary fields.
    let body = get_ok(&app, "/api/v1/interactions", &[("limit", "500")]).await;
    let items = body["items"].as_array().unwrap();
    assert_eq!(items.len(), SEED_SIZE);
    for item in items {
        let r = seed.at(seed.position(id_of(item)));
        assert_eq!(time_of(item, "created_at"), r.created_at);
        assert_eq!(item["question"], r.question.as_str());
        assert_eq!(item["status"], r.status.as_str());
        assert_eq!(item["total_duration_ms"].as_i64(), r.total_duration_ms);
        assert_eq!(item["tool_call_count"], r.tool_calls.len());
        assert_eq!(item["thought_count"], 1);
    }

    // One interaction in full, as written.
    for position in [0, CRASHLOOP, 103, SEED_SIZE - 1] {
        let r = seed.at(position);
        let body = get_ok(&app, &format!("/api/v1/interactions/{}", r.interaction_id), &[]).await;
        let back: Interaction = serde_json::from_value(body).expect("a full record");
        assert_eq!(&back, r);
    }
    let (status, body) = get(&app, &format!("/api/v1/interactions/{}", Uuid::now_v7()), &[]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")), "{body}");

    // The same through the Store trait, one page of everything and keyset by hand.
    let filter = Filter { cluster: Some("prod-west".into()), status: vec![Status::Success], ..Filter::default() };
    let expected = seed.expect(|r| r.cluster.as_deref() == Some("prod-west") && r.status == Status::Success);
    let mut got = Vec::new();
    let mut after = None;
    loop {
        let page = app.store.list_interactions(&filter, after, 9).await.unwrap();
        got.extend(page.items.iter().map(|s| s.interaction_id));
        match page.next {
            Some(k) => after = Some(k),
            None => break,
        }
    }
    assert_eq!(got, expected);
}

// ---------------------------------------------------------------------------------------
// 2. Full text.

async fn full_text_finds_substrings_in_any_language_and_literally(db: &TestDb) {
    let app = spawn_app(db).await;
    let seed = seed(&*app.store).await;
    let id = |position: usize| seed.at(position).interaction_id;
    let search = |q: &'static str| {
        let app = &app;
        async move { list_ids(app, &[("q", q)], 500).await }
    };

    // Chinese: no spaces between words, so a substring must be found.
    assert_eq!(search("数据库").await, seed.expect(|r| text_matches(r, "数据库")));
    let found: HashSet<Uuid> = search("数据库").await.into_iter().collect();
    assert_eq!(found, HashSet::from([id(ZH_POOL), id(ZH_BACKUP)]));
    // Two characters (no trigram to look up) still work.
    assert_eq!(search("池耗").await, vec![id(ZH_POOL)]);
    assert_eq!(search("扩容").await, vec![id(ZH_POOL)], "a term only in the answer");

    // Case-insensitive, and a term inside a longer word.
    assert_eq!(search("crashloop").await, vec![id(CRASHLOOP)]);
    assert_eq!(search("CRASHLOOPBACKOFF").await, vec![id(CRASHLOOP)]);
    // A term found in the final answer only.
    assert!(!seed.at(ANSWER_ONLY).question.to_lowercase().contains("pgbouncer"));
    assert_eq!(search("pgbouncer").await, vec![id(ANSWER_ONLY)]);
    assert_eq!(search("max_connections").await, vec![id(ANSWER_ONLY)]);

    // `%` and `_` are literal, not LIKE wildcards (long and short terms take different
    // paths on SQLite).
    assert_eq!(search("100%").await, vec![id(PERCENT)]);
    assert_eq!(search("0%").await, vec![id(PERCENT)]);
    let hundred: HashSet<Uuid> = search("100").await.into_iter().collect();
    assert!(hundred.contains(&id(PERCENT)) && hundred.contains(&id(HUNDRED)), "{hundred:?}");
    assert_eq!(search("web_1").await, vec![id(UNDERSCORE)]);
    assert_eq!(search("b_").await, vec![id(UNDERSCORE)]);
    assert!(search("web-1").await.contains(&id(CRASHLOOP)));
    assert!(search("%").await.contains(&id(PERCENT)));
    assert_eq!(search("%").await, seed.expect(|r| text_matches(r, "%")));
    assert_eq!(search("\\").await, Vec::<Uuid>::new(), "a backslash is literal too");
    assert_eq!(search("\"liveness\"").await, Vec::<Uuid>::new(), "quotes are literal");
    assert_eq!(search("no such text anywhere").await, Vec::<Uuid>::new());

    // Every template word, compared with the Rust substring answer.
    for q in ["memory", "Pods Of", "scale", "web-2", "d\u{00e9}j\u{00e0}", "on node-3", "  restarting  "] {
        let got = list_ids(&app, &[("q", q)], 500).await;
        assert_eq!(got, seed.expect(|r| text_matches(r, q.trim())), "q={q:?}");
    }
}

// ---------------------------------------------------------------------------------------
// 3. Pagination.

async fn pages_neither_miss_nor_repeat_rows_even_while_rows_are_inserted(db: &TestDb) {
    let app = spawn_app(db).await;
    let seed = seed(&*app.store).await;

    // Limit 7 over everything: exactly the seed, newest first, ties by insertion order.
    let everything = seed.expect(|_| true);
    assert_eq!(list_ids(&app, &[], 7).await, everything);
    // Page boundaries fall inside runs of equal times too.
    assert_eq!(list_ids(&app, &[], 1).await, everything);

    // Now page again while a task inserts rows between the pages: newer ones (which a
    // newest-first list that has started must not show), ones at exactly the time of the
    // row the cursor stands on (inserted after it, so after it in the list order), and
    // older ones (which later pages must show, once).
    let newest = seed.records.iter().map(|r| r.created_at).max().unwrap();
    let oldest = seed.records.iter().map(|r| r.created_at).min().unwrap();
    let (to_inserter, mut inserts) = tokio::sync::mpsc::channel::<DateTime<Utc>>(1);
    let (inserted_tx, mut inserted) = tokio::sync::mpsc::channel::<Vec<Interaction>>(1);
    let store: Arc<dyn Store> = app.store.clone();
    let inserter = tokio::spawn(async move {
        let mut rng = Rng(7);
        let mut n: u128 = 0;
        while let Some(cursor_at) = inserts.recv().await {
            let mut batch = Vec::new();
            for kind in 0..4 {
                let mut r = Interaction::new(format!("late question {n}"));
                r.interaction_id = Uuid::from_u128(LATE_ID_BASE + n);
                r.user_id = Some("late".into());
                r.created_at = match kind {
                    0 => newest + Duration::seconds(n as i64 + 1),
                    1 => cursor_at,
                    _ => {
                        oldest
                            + Duration::microseconds(
                                rng.below((newest - oldest).num_microseconds().unwrap() as u64) as i64
                            )
                    }
                };
                n += 1;
                batch.push(r);
            }
            store.write_batch(&batch).await.expect("insert while paging");
            if inserted_tx.send(batch).await.is_err() {
                return;
            }
        }
    });

    let mut seen: Vec<Value> = Vec::new();
    let mut must_see: HashSet<Uuid> = HashSet::new();
    let mut must_not_see: HashSet<Uuid> = HashSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut q = vec![("limit", "7")];
        if let Some(c) = &cursor {
            q.push(("cursor", c.as_str()));
        }
        let body = get_ok(&app, "/api/v1/interactions", &q).await;
        let page = body["items"].as_array().unwrap().clone();
        seen.extend(page.iter().cloned());
        let Some(next) = body["next_cursor"].as_str() else { break };
        cursor = Some(next.to_owned());
        to_inserter.send(time_of(page.last().unwrap(), "created_at")).await.unwrap();
        let cursor_at = time_of(page.last().unwrap(), "created_at");
        for r in inserted.recv().await.expect("the inserter's batch") {
            if r.created_at < cursor_at {
                must_see.insert(r.interaction_id);
            } else {
                must_not_see.insert(r.interaction_id);
            }
        }
    }
    drop(to_inserter);
    inserter.await.unwrap();
    assert!(must_see.len() > 20 && must_not_see.len() > 100, "{} / {}", must_see.len(), must_not_see.len());

    let ids: Vec<Uuid> = seen.iter().map(id_of).collect();
    let mut counts: HashMap<Uuid, usize> = HashMap::new();
    for id in &ids {
        *counts.entry(*id).or_default() += 1;
    }
    let repeated: Vec<&Uuid> = counts.iter().filter(|(_, n)| **n > 1).map(|(id, _)| id).collect();
    assert!(repeated.is_empty(), "rows repeated across pages: {repeated:?}");
    for r in &seed.records {
        assert!(counts.contains_key(&r.interaction_id), "seed row {} missed", seed.position(r.interaction_id));
    }
    for id in &must_see {
        assert!(counts.contains_key(id), "older row {id} inserted ahead of the cursor missed");
    }
    for id in &must_not_see {
        assert!(!counts.contains_key(id), "row {id} inserted behind the cursor shown");
    }
    assert_eq!(ids.len(), SEED_SIZE + must_see.len());
    // The seed rows keep their relative order, and the whole list is newest first.
    let seed_ids: HashSet<Uuid> = everything.iter().copied().collect();
    let seed_order: Vec<Uuid> = ids.iter().filter(|id| seed_ids.contains(id)).copied().collect();
    assert_eq!(seed_order, everything);
    let times: Vec<DateTime<Utc>> = seen.iter().map(|item| time_of(item, "created_at")).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "not newest first");

    // A cursor belongs to its query.
    let body = get_ok(&app, "/api/v1/interactions", &[("user_id", "alice"), ("limit", "5")]).await;
    let alice_cursor = body["next_cursor"].as_str().expect("alice has more than 5 rows").to_owned();
    let (status, page) = get(&app, "/api/v1/interactions", &[("user_id", "alice"), ("cursor", &alice_cursor)]).await;
    assert_eq!(status, 200, "{page}");
    assert_bad(&app, "/api/v1/interactions", &[("user_id", "bob"), ("cursor", &alice_cursor)], "cursor").await;
    assert_bad(&app, "/api/v1/interactions", &[("cursor", &alice_cursor)], "cursor").await;
    assert_bad(&app, "/api/v1/interactions", &[("user_id", "alice"), ("cursor", "garbage!")], "cursor").await;
    assert_bad(&app, "/api/v1/interactions", &[("cursor", "bm90IGEgY3Vyc29y")], "cursor").await;
}

// ---------------------------------------------------------------------------------------
// 4. Sessions and dead letters.

async fn sessions_in_time_order_and_dead_letters_newest_first(db: &TestDb) {
    let app = spawn_app(db).await;
    let seed = seed(&*app.store).await;

    let mut by_session: BTreeMap<Uuid, Vec<usize>> = BTreeMap::new();
    for (position, r) in seed.records.iter().enumerate() {
        by_session.entry(r.session_id).or_default().push(position);
    }
    for (session, positions) in by_session.iter().take(5) {
        let mut expected: Vec<usize> = positions.clone();
        expected.sort_by(|a, b| seed.at(*a).created_at.cmp(&seed.at(*b).created_at).then(a.cmp(b)));
        let expected: Vec<Uuid> = expected.iter().map(|p| seed.at(*p).interaction_id).collect();
        let body = get_ok(&app, &format!("/api/v1/sessions/{session}"), &[]).await;
        assert_eq!(body["session_id"], session.to_string());
        assert_eq!(body["interaction_count"], positions.len());
        let got: Vec<Uuid> = body["interactions"].as_array().unwrap().iter().map(id_of).collect();
        assert_eq!(got, expected, "session {session} in time order");
        // Full records, with their tool calls.
        let first: Interaction = serde_json::from_value(body["interactions"][0].clone()).unwrap();
        assert_eq!(&first, seed.at(seed.position(expected[0])));
        // A limit keeps the oldest; the count is still the session's.
        let body = get_ok(&app, &format!("/api/v1/sessions/{session}"), &[("limit", "3")]).await;
        assert_eq!(body["interaction_count"], positions.len());
        let got: Vec<Uuid> = body["interactions"].as_array().unwrap().iter().map(id_of).collect();
        assert_eq!(got, expected[..3]);
    }
    for unknown in [Uuid::now_v7().to_string(), "no-such-session".to_owned()] {
        let (status, body) = get(&app, &format!("/api/v1/sessions/{unknown}"), &[]).await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(body["error"]["code"], "not_found", "{body}");
    }

    // Dead letters: newest first by failed_at, equal times by insertion (each written in
    // its own call, so insertion order is known).
    let at = |minute: i64| base() + Duration::minutes(minute) + Duration::microseconds(123_456);
    let minutes = [5, 1, 9, 3, 3, 7, 0, 9, 2, 8, 3, 6];
    let mut letters = Vec::new();
    for (n, minute) in minutes.iter().enumerate() {
        let mut letter = DeadLetter::new(seed.at(n), format!("refused #{n}"));
        letter.interaction_id = Uuid::from_u128(LATE_ID_BASE + n as u128);
        letter.failed_at = at(*minute);
        app.store.write_dead_letters(std::slice::from_ref(&letter)).await.unwrap();
        letters.push(letter);
    }
    let mut expected: Vec<usize> = (0..letters.len()).collect();
    expected.sort_by(|a, b| letters[*b].failed_at.cmp(&letters[*a].failed_at).then(b.cmp(a)));
    let expected: Vec<Uuid> = expected.iter().map(|n| letters[*n].interaction_id).collect();
    for limit in [1, 3, 5, 500] {
        let items = page_all(&app, "/api/v1/dead-letters", &[], limit).await;
        let got: Vec<Uuid> = items.iter().map(id_of).collect();
        assert_eq!(got, expected, "dead letters with limit {limit}");
        for item in &items {
            let n = letters.iter().position(|l| l.interaction_id == id_of(item)).unwrap();
            assert_eq!(item["error"], format!("refused #{n}"));
            assert_eq!(time_of(item, "failed_at"), letters[n].failed_at);
            assert_eq!(item["attempts"], 1);
        }
    }
    assert_bad(&app, "/api/v1/dead-letters", &[("cursor", "garbage")], "cursor").await;
    assert_bad(&app, "/api/v1/dead-letters", &[("limit", "0")], "limit").await;
}

// ---------------------------------------------------------------------------------------
// 5. Stats.

/// One stats row as the API answers it.
#[derive(Debug, Clone, Deserialize)]
struct Row {
    key: Option<String>,
    bucket: Option<DateTime<Utc>>,
    count: i64,
    error_count: i64,
    error_rate: f64,
    p50_ms: Option<f64>,
    p95_ms: Option<f64>,
    p99_ms: Option<f64>,
    mean_ms: Option<f64>,
    input_tokens: Option<i64>,
    output_tokens: Option<i64>,
}

/// What is aggregated: one interaction, or one tool call.
struct Obs {
    key: Option<String>,
    at: DateTime<Utc>,
    duration: Option<i64>,
    failed: bool,
    input_tokens: Option<i64>,
    output_tokens: Option<i64>,
}

fn observations(records: &[&Interaction], group_by: &str, tool: Option<&str>) -> Vec<Obs> {
    if group_by == "tool_name" {
        return records
            .iter()
            .flat_map(|r| {
                r.tool_calls.iter().filter(|c| tool.is_none_or(|t| c.tool_name == t)).map(|c| Obs {
                    key: Some(c.tool_name.clone()),
                    at: r.created_at,
                    duration: c.duration_ms,
                    failed: c.error.is_some(),
                    input_tokens: None,
                    output_tokens: None,
                })
            })
            .collect();
    }
    records
        .iter()
        .map(|r| Obs {
            key: match group_by {
                "model_name" => r.model_name.clone(),
                "user_id" => r.user_id.clone(),
                "status" => Some(r.status.as_str().to_owned()),
                "cluster" => r.cluster.clone(),
                "provider" => r.provider.clone(),
                other => panic!("no grouping {other}"),
            },
            at: r.created_at,
            duration: r.total_duration_ms,
            failed: r.status != Status::Success,
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
        })
        .collect()
}

/// The start of `t`'s bucket (UTC).
fn bucket_of(t: DateTime<Utc>, bucket: Option<&str>) -> Option<DateTime<Utc>> {
    let seconds = match bucket? {
        "hour" => 3_600,
        "day" => 86_400,
        other => panic!("no bucket {other}"),
    };
    DateTime::from_timestamp(t.timestamp().div_euclid(seconds) * seconds, 0)
}

/// PostgreSQL's `percentile_cont`: linear interpolation at p·(n−1) over sorted values.
fn percentile(sorted: &[i64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let position = p * (sorted.len() - 1) as f64;
    let lower = position.floor() as usize;
    let upper = (lower + 1).min(sorted.len() - 1);
    let (a, b) = (sorted[lower] as f64, sorted[upper] as f64);
    Some(a + (position - lower as f64) * (b - a))
}

fn sum(values: impl Iterator<Item = Option<i64>>) -> Option<i64> {
    values.flatten().fold(None, |total, v| Some(total.unwrap_or(0) + v))
}

/// A stats group: its bucket and its key.
type GroupKey = (Option<DateTime<Utc>>, Option<String>);

/// The rows a stats query must answer, in its order: bucket, then biggest group, then
/// key (the NULL group last).
fn expected_stats(obs: &[Obs], bucket: Option<&str>) -> Vec<Row> {
    let mut groups: BTreeMap<GroupKey, Vec<&Obs>> = BTreeMap::new();
    for o in obs {
        groups.entry((bucket_of(o.at, bucket), o.key.clone())).or_default().push(o);
    }
    let mut rows: Vec<Row> = groups
        .into_iter()
        .map(|((bucket, key), members)| {
            let mut durations: Vec<i64> = members.iter().filter_map(|o| o.duration).collect();
            durations.sort_unstable();
            let count = members.len() as i64;
            let error_count = members.iter().filter(|o| o.failed).count() as i64;
            Row {
                key,
                bucket,
                count,
                error_count,
                error_rate: error_count as f64 / count as f64,
                p50_ms: percentile(&durations, 0.5),
                p95_ms: percentile(&durations, 0.95),
                p99_ms: percentile(&durations, 0.99),
                mean_ms: (!durations.is_empty()).then(|| durations.iter().sum::<i64>() as f64 / durations.len() as f64),
                input_tokens: sum(members.iter().map(|o| o.input_tokens)),
                output_tokens: sum(members.iter().map(|o| o.output_tokens)),
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        a.bucket.cmp(&b.bucket).then(b.count.cmp(&a.count)).then_with(|| match (&a.key, &b.key) {
            (Some(x), Some(y)) => x.cmp(y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        })
    });
    rows
}

fn close(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => (a - b).abs() <= 1e-6 * b.abs().max(1.0),
        (None, None) => true,
        _ => false,
    }
}

fn assert_rows(what: &str, got: &[Row], expected: &[Row]) {
    let keys = |rows: &[Row]| rows.iter().map(|r| (r.bucket, r.key.clone(), r.count)).collect::<Vec<_>>();
    assert_eq!(keys(got), keys(expected), "{what}: groups (bucket, key, count) in order");
    for (g, e) in got.iter().zip(expected) {
        let at = format!("{what}: group {:?} bucket {:?}", e.key, e.bucket);
        assert_eq!(g.error_count, e.error_count, "{at}: error_count");
        assert!(close(Some(g.error_rate), Some(e.error_rate)), "{at}: error_rate {} vs {}", g.error_rate, e.error_rate);
        assert!(close(g.p50_ms, e.p50_ms), "{at}: p50 {:?} vs {:?}", g.p50_ms, e.p50_ms);
        assert!(close(g.p95_ms, e.p95_ms), "{at}: p95 {:?} vs {:?}", g.p95_ms, e.p95_ms);
        assert!(close(g.p99_ms, e.p99_ms), "{at}: p99 {:?} vs {:?}", g.p99_ms, e.p99_ms);
        assert!(close(g.mean_ms, e.mean_ms), "{at}: mean {:?} vs {:?}", g.mean_ms, e.mean_ms);
        assert_eq!((g.input_tokens, g.output_tokens), (e.input_tokens, e.output_tokens), "{at}: tokens");
    }
}

async fn stats_rows(app: &TestApp, query: &Query<'_>) -> Vec<Row> {
    let body = get_ok(app, "/api/v1/stats", query).await;
    serde_json::from_value(body["rows"].clone()).unwrap_or_else(|e| panic!("{query:?}: rows ({e}): {body}"))
}

async fn stats_match_an_independent_computation(db: &TestDb) {
    let app = spawn_app(db).await;
    let seed = seed(&*app.store).await;
    let all: Vec<&Interaction> = seed.records.iter().collect();

    // The percentile reference itself, on a known case (PostgreSQL's documented answer).
    assert_eq!(percentile(&[1, 2, 3, 4], 0.5), Some(2.5));
    assert!(close(percentile(&[10, 20, 30, 40, 50], 0.95), Some(48.0)));
    assert_eq!(percentile(&[7], 0.99), Some(7.0));

    for group_by in ["model_name", "user_id", "status", "cluster", "provider", "tool_name"] {
        let obs = observations(&all, group_by, None);
        for bucket in [None, Some("day"), Some("hour")] {
            let mut query = vec![("group_by", group_by)];
            if let Some(b) = bucket {
                query.push(("bucket", b));
            }
            let body = get_ok(&app, "/api/v1/stats", &query).await;
            assert_eq!(body["group_by"], group_by);
            assert_eq!(body["bucket"].as_str(), bucket);
            let got: Vec<Row> = serde_json::from_value(body["rows"].clone()).unwrap();
            let expected = expected_stats(&obs, bucket);
            assert_rows(&format!("{query:?}"), &got, &expected);
            if bucket.is_none() {
                let total: i64 = got.iter().map(|r| r.count).sum();
                assert_eq!(total as usize, obs.len(), "{query:?}: every row counted once");
            }
        }
    }
    // The default grouping is the model.
    let expected = expected_stats(&observations(&all, "model_name", None), None);
    assert_rows("default group_by", &stats_rows(&app, &[]).await, &expected);

    // `top` keeps the biggest groups; the tie at the cut (dave, erin and no user have 40
    // each) is broken by key with the NULL group last, on both databases.
    let expected = expected_stats(&observations(&all, "user_id", None), None);
    assert_eq!(expected.iter().map(|r| r.count).collect::<Vec<_>>(), [120, 80, 80, 80, 40, 40, 40]);
    for top in [1usize, 4, 6, 7, 100] {
        let top_text = top.to_string();
        let got = stats_rows(&app, &[("group_by", "user_id"), ("top", &top_text)]).await;
        assert_rows(&format!("user_id top {top}"), &got, &expected[..top.min(expected.len())]);
    }

    // Stats honour the filters.
    let from = seed.at(150).created_at;
    let to = from + Duration::days(4);
    let (from_text, to_text) = (rfc3339(from), rfc3339(to));
    let window: Vec<&Interaction> = all
        .iter()
        .copied()
        .filter(|r| r.created_at >= from && r.created_at < to && r.cluster.as_deref() == Some("prod-east"))
        .collect();
    assert!(window.len() > 20 && window.len() < 200, "{}", window.len());
    for group_by in ["user_id", "status", "tool_name"] {
        for bucket in [None, Some("day")] {
            let mut query =
                vec![("group_by", group_by), ("from", &from_text), ("to", &to_text), ("cluster", "prod-east")];
            if let Some(b) = bucket {
                query.push(("bucket", b));
            }
            let expected = expected_stats(&observations(&window, group_by, None), bucket);
            assert_rows(&format!("{query:?}"), &stats_rows(&app, &query).await, &expected);
        }
    }
    // By tool, filtered by a tool: that tool's calls only; by model, filtered by a tool:
    // the interactions that ran it.
    let ran_shell: Vec<&Interaction> = all.iter().copied().filter(|r| ran(r, "shell")).collect();
    let expected = expected_stats(&observations(&ran_shell, "tool_name", Some("shell")), None);
    assert_eq!(expected.len(), 1);
    assert_rows("tool shell", &stats_rows(&app, &[("group_by", "tool_name"), ("tool_name", "shell")]).await, &expected);
    let expected = expected_stats(&observations(&ran_shell, "model_name", None), Some("day"));
    let got = stats_rows(&app, &[("group_by", "model_name"), ("tool_name", "shell"), ("bucket", "day")]).await;
    assert_rows("model_name of shell runs", &got, &expected);
    let failing: Vec<&Interaction> = all.iter().copied().filter(|r| r.status != Status::Success).collect();
    let expected = expected_stats(&observations(&failing, "provider", None), None);
    let got = stats_rows(&app, &[("group_by", "provider"), ("status", "error,timeout,cancelled")]).await;
    assert_rows("provider of failures", &got, &expected);
    assert!(got.iter().all(|r| r.error_rate == 1.0));
    // Nothing matches: no rows.
    assert!(stats_rows(&app, &[("user_id", "nobody")]).await.is_empty());
}

// ---------------------------------------------------------------------------------------
// 6. Overview.

/// A question folded as the overview counts it: lower case, white space runs as one space.
fn normalise(question: &str) -> String {
    question.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

async fn overview_ranks_tools_users_clusters_and_questions(db: &TestDb) {
    let app = spawn_app(db).await;
    let seed = seed(&*app.store).await;
    let all: Vec<&Interaction> = seed.records.iter().collect();

    let check = |body: &Value, records: &[&Interaction], top: usize| {
        let tools = expected_stats(&observations(records, "tool_name", None), None);
        let keys = |view: &str| -> Vec<(String, i64)> {
            body[view]
                .as_array()
                .unwrap_or_else(|| panic!("no {view}: {body}"))
                .iter()
                .map(|r| (r["key"].as_str().unwrap_or("<null>").to_owned(), r["count"].as_i64().unwrap()))
                .collect()
        };
        let ranked = |score: &dyn Fn(&Row) -> Option<f64>| -> Vec<(String, i64)> {
            let mut rows: Vec<&Row> = tools.iter().filter(|r| score(r).is_some()).collect();
            rows.sort_by(|a, b| score(b).unwrap().total_cmp(&score(a).unwrap()).then(a.key.cmp(&b.key)));
            rows.iter().take(top).map(|r| (r.key.clone().unwrap(), r.count)).collect()
        };
        assert_eq!(keys("most_used_tools"), ranked(&|r| Some(r.count as f64)), "most_used_tools");
        assert_eq!(
            keys("most_failing_tools"),
            ranked(&|r| (r.error_count > 0).then_some(r.error_count as f64)),
            "most_failing_tools"
        );
        assert_eq!(keys("slowest_tools"), ranked(&|r| r.p95_ms), "slowest_tools");
        for row in body["most_failing_tools"].as_array().unwrap() {
            let tool = tools.iter().find(|t| t.key.as_deref() == row["key"].as_str()).unwrap();
            assert_eq!(row["error_count"], tool.error_count);
        }
        for (view, group_by) in [("busiest_users", "user_id"), ("busiest_clusters", "cluster")] {
            let expected: Vec<(String, i64)> = expected_stats(&observations(records, group_by, None), None)
                .into_iter()
                .take(top)
                .map(|r| (r.key.unwrap_or_else(|| "<null>".into()), r.count))
                .collect();
            assert_eq!(keys(view), expected, "{view}");
        }
        let mut questions: BTreeMap<String, (i64, DateTime<Utc>)> = BTreeMap::new();
        for r in records {
            let entry = questions.entry(normalise(&r.question)).or_insert((0, r.created_at));
            entry.0 += 1;
            entry.1 = entry.1.max(r.created_at);
        }
        let mut questions: Vec<(String, (i64, DateTime<Utc>))> = questions.into_iter().collect();
        questions.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then(a.0.cmp(&b.0)));
        questions.truncate(top);
        let got: Vec<(String, (i64, DateTime<Utc>))> = body["frequent_questions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|q| {
                (q["question"].as_str().unwrap().to_owned(), (q["count"].as_i64().unwrap(), time_of(q, "last_asked")))
            })
            .collect();
        assert_eq!(got, questions, "frequent_questions");
    };

    let body = get_ok(&app, "/api/v1/stats/overview", &[]).await;
    check(&body, &all, 10);
    // The tied users at the cut of six: dave and erin before the NULL user.
    let body = get_ok(&app, "/api/v1/stats/overview", &[("top", "6")]).await;
    check(&body, &all, 6);
    let users: Vec<&str> =
        body["busiest_users"].as_array().unwrap().iter().map(|r| r["key"].as_str().unwrap_or("<null>")).collect();
    assert_eq!(users, ["alice", "bob", "carol", "frank", "dave", "erin"]);
    // Everything, to see the rare questions too.
    let body = get_ok(&app, "/api/v1/stats/overview", &[("top", "1000")]).await;
    check(&body, &all, 1000);
    let crashing = body["frequent_questions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["question"] == "why is pod x crashing?")
        .unwrap_or_else(|| panic!("the crashing question is missing: {body}"));
    assert_eq!(crashing["count"], 3, "three spellings of one question: {crashing}");
    // With filters.
    let query = [("cluster", "prod-west"), ("status", "success"), ("top", "3")];
    let body = get_ok(&app, "/api/v1/stats/overview", &query).await;
    let filtered: Vec<&Interaction> = all
        .iter()
        .copied()
        .filter(|r| r.cluster.as_deref() == Some("prod-west") && r.status == Status::Success)
        .collect();
    check(&body, &filtered, 3);
    let body = get_ok(&app, "/api/v1/stats/overview", &[("user_id", "nobody")]).await;
    for view in ["most_used_tools", "most_failing_tools", "slowest_tools", "busiest_users", "frequent_questions"] {
        assert_eq!(body[view], Value::Array(vec![]), "{view}");
    }
}

// ---------------------------------------------------------------------------------------
// 7. Bad parameters, relative times.

async fn bad_parameters_are_refused_naming_the_parameter(db: &TestDb) {
    let app = spawn_app(db).await;
    let list = "/api/v1/interactions";
    for (query, field) in [
        (&[("user", "alice")][..], "user"),
        (&[("user_id", "alice"), ("colour", "red")], "colour"),
        (&[("from", "yesterday-ish")], "from"),
        (&[("to", "2026-02-30")], "to"),
        (&[("since", "soon")], "since"),
        (&[("from", "2026-03-02"), ("to", "2026-03-01")], "to"),
        (&[("from", "2026-03-02"), ("since", "24h")], "since"),
        (&[("limit", "0")], "limit"),
        (&[("limit", "501")], "limit"),
        (&[("limit", "ten")], "limit"),
        (&[("status", "exploded")], "status"),
        (&[("status", "success,exploded")], "status"),
        (&[("min_duration_ms", "10"), ("max_duration_ms", "5")], "max_duration_ms"),
        (&[("min_duration_ms", "-1")], "min_duration_ms"),
        (&[("max_duration_ms", "fast")], "max_duration_ms"),
        (&[("user_id", "alice"), ("user_id", "bob")], "user_id"),
        (&[("cursor", "zzz")], "cursor"),
    ] {
        assert_bad(&app, list, query, field).await;
    }
    let long_q = "x".repeat(201);
    assert_bad(&app, list, &[("q", &long_q)], "q").await;
    assert!(get_ok(&app, list, &[("limit", "500")]).await["items"].as_array().unwrap().is_empty());
    assert!(get_ok(&app, list, &[("limit", "1")]).await["next_cursor"].is_null());

    let stats = "/api/v1/stats";
    for (query, field) in [
        (&[("group_by", "colour")][..], "group_by"),
        (&[("group_by", "tool")], "group_by"),
        (&[("bucket", "week")], "bucket"),
        (&[("bucket", "day"), ("top", "5")], "top"),
        (&[("top", "0")], "top"),
        (&[("user", "alice")], "user"),
        (&[("from", "yesterday-ish")], "from"),
        (&[("status", "fine")], "status"),
        (&[("group_by", "user_id"), ("group_by", "cluster")], "group_by"),
    ] {
        assert_bad(&app, stats, query, field).await;
    }
    assert_bad(&app, "/api/v1/stats/overview", &[("top", "0")], "top").await;
    assert_bad(&app, "/api/v1/stats/overview", &[("group_by", "user_id")], "group_by").await;
    assert_bad(
        &app,
        "/api/v1/stats/overview",
        &[("min_duration_ms", "9"), ("max_duration_ms", "1")],
        "max_duration_ms",
    )
    .await;
    assert_bad(&app, "/api/v1/sessions/abc", &[("limit", "0")], "limit").await;
    assert_bad(&app, "/api/v1/sessions/abc", &[("user_id", "alice")], "user_id").await;
    assert_bad(&app, "/api/v1/dead-letters", &[("limit", "501")], "limit").await;
    assert_bad(&app, "/api/v1/dead-letters", &[("user_id", "alice")], "user_id").await;
    assert_bad(&app, &format!("/api/v1/interactions/{}", Uuid::now_v7()), &[("pretty", "1")], "pretty").await;
}

async fn relative_times_count_back_from_now_and_page(db: &TestDb) {
    let app = spawn_app(db).await;
    let now = Utc::now();
    let now = now.with_nanosecond(now.nanosecond() / 1_000 * 1_000).unwrap();
    // Hours ago of each record; none near the 24 h or 2 d boundaries.
    let hours_ago = [1, 5, 23, 25, 47, 72, 2_400];
    let records: Vec<Interaction> = hours_ago
        .iter()
        .enumerate()
        .map(|(n, h)| {
            let mut r = Interaction::new(format!("asked {h} hours ago"));
            r.interaction_id = Uuid::from_u128(SEED_ID_BASE + n as u128);
            r.created_at = now - Duration::hours(*h);
            r
        })
        .collect();
    app.store.write_batch(&records).await.unwrap();
    let ids = |hours: &[i64]| -> Vec<Uuid> {
        hours.iter().map(|h| records[hours_ago.iter().position(|x| x == h).unwrap()].interaction_id).collect()
    };

    assert_eq!(list_ids(&app, &[("since", "24h")], 50).await, ids(&[1, 5, 23]));
    assert_eq!(list_ids(&app, &[("since", "7d")], 50).await, ids(&[1, 5, 23, 25, 47, 72]));
    assert_eq!(list_ids(&app, &[("from", "2d"), ("to", "2h")], 50).await, ids(&[5, 23, 25, 47]));
    assert_eq!(list_ids(&app, &[("to", "30m")], 50).await, ids(&[1, 5, 23, 25, 47, 72, 2_400]));
    // A relative window pages like any other filter: the cursor of the first page is
    // still good on the next request, although `now` has moved on.
    assert_eq!(list_ids(&app, &[("since", "24h")], 1).await, ids(&[1, 5, 23]));
    assert_eq!(list_ids(&app, &[("from", "2d"), ("to", "2h")], 2).await, ids(&[5, 23, 25, 47]));
    // Stats take the same relative times.
    let rows = stats_rows(&app, &[("since", "24h"), ("group_by", "status")]).await;
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].key.as_deref(), rows[0].count), (Some("success"), 3));
}
