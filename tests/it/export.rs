//! Export over HTTP and from the command line, and the read commands (`query`, `stats`),
//! on PostgreSQL and SQLite.
//!
//! The seed is 1,200 records made to trip up encoders and filters (Chinese text, commas,
//! quotes and newlines, formula-like cells, absent fields, thoughts, failed tool calls,
//! metrics, nested attributes, two records at the same instant). Every export is read
//! back whole and compared field by field with what was written; counts are checked
//! against the list endpoint and against the seed itself.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type, TimestampMicrosecondType};
use arrow_array::{Array, RecordBatch};
use arrow_schema::SchemaRef;
use bytes::Bytes;
use chrono::{DateTime, Duration, NaiveDateTime, SecondsFormat, TimeZone, Timelike, Utc};
use opsagent_audit::export::{parquet_schema, Format, CSV_COLUMNS};
use opsagent_audit::model::{Interaction, Status, Thought, ToolCall};
use opsagent_audit::store::Store;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use reqwest::header::{HeaderMap, CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::common::server::{bin, run, Ran};
use crate::common::{spawn_app, TestApp, TestDb};

// ---------------------------------------------------------------------------------------
// The seed.
// ---------------------------------------------------------------------------------------

/// Records in the standard seed.
const SEED: usize = 1_200;
/// Sessions the seed's records share.
const SESSIONS: usize = 40;
const USERS: [&str; 4] = ["alice", "bob", "carol", "张伟"];
const MODELS: [&str; 3] = ["gpt-4o", "claude-3-5-sonnet", "qwen-max"];
const CLUSTERS: [&str; 3] = ["prod-east", "prod-west", "staging"];

/// Records as written, with what is needed to predict what a filter matches.
struct Seed {
    /// When the seed was made; record `i` happened about `10 i + 5` minutes before.
    base: DateTime<Utc>,
    sessions: Vec<Uuid>,
    records: Vec<Interaction>,
}

impl Seed {
    /// The records `keep` selects, oldest first (the export's order, ties aside).
    fn matching(&self, keep: impl Fn(&Interaction) -> bool) -> Vec<&Interaction> {
        let mut out: Vec<&Interaction> = self.records.iter().filter(|r| keep(r)).collect();
        out.sort_by_key(|r| r.created_at);
        out
    }

    fn by_id(&self) -> BTreeMap<Uuid, &Interaction> {
        self.records.iter().map(|r| (r.interaction_id, r)).collect()
    }
}

/// Now, at the microsecond precision both databases keep.
fn now_us() -> DateTime<Utc> {
    let t = Utc::now();
    t.with_nanosecond(t.nanosecond() / 1000 * 1000).expect("whole microseconds")
}

fn question(i: usize) -> String {
    match i % 8 {
        0 => format!("为什么数据库连接超时？集群 prod-east 第{i}次"),
        1 => format!("why is pod \"web-{i}\" crashlooping, again?\nsecond line, \"quoted\""),
        2 => format!("=cmd|' /C calc'!A{i}"),
        3 => format!("-n kube-system get pods {i}"),
        4 => format!("检查集群 staging 的节点 {i}"),
        5 => format!("tabs\tand\r\ncrlf, {i}"),
        _ => format!("why is web-{i} slow?"),
    }
}

/// Record `i` of a seed made at `base`. A session's client address and user agent are
/// the same in all its records (they are stored on the session row).
fn rich_record(i: usize, base: DateTime<Utc>, sessions: &[Uuid]) -> Interaction {
    let mut r = Interaction::new(question(i));
    let s = i % SESSIONS;
    r.session_id = sessions[s];
    r.client_ip = s.is_multiple_of(2).then(|| format!("10.0.{s}.7"));
    r.user_agent = (!s.is_multiple_of(3)).then(|| format!("opsagent/1.{s} (linux; \"quoted\", comma)"));
    // Record 25, 75, … happened at the same instant as the one before it: the export's
    // order among equal times is the storage id's, which only the list reveals.
    let slot = if i % 50 == 25 { i - 1 } else { i } as i64;
    let minutes = slot * 10 + 5;
    r.created_at = base - Duration::minutes(minutes) - Duration::microseconds((minutes * 7_919) % 1_000_000);
    r.user_id = (!i.is_multiple_of(13)).then(|| USERS[i % USERS.len()].to_string());
    r.endpoint = Some(["/api/execute", "/api/diagnose", "/api/analyze"][i % 3].into());
    r.model_name = (!i.is_multiple_of(17)).then(|| MODELS[i % MODELS.len()].to_string());
    r.provider = r.model_name.as_deref().map(|m| {
        match m {
            "gpt-4o" => "openai",
            "qwen-max" => "阿里云 dashscope",
            _ => "anthropic",
        }
        .to_string()
    });
    r.base_url = (!i.is_multiple_of(6)).then(|| "https://api.example.com/v1?x=1,y=2".into());
    r.cluster = (!i.is_multiple_of(19)).then(|| CLUSTERS[(i / 3) % CLUSTERS.len()].to_string());
    r.thoughts = (0..i % 4)
        .map(|t| Thought {
            content: format!("思考 {t}: check \"events\", then logs,\nof web-{i}"),
            sequence_number: t as i32 + 1,
        })
        .collect();
    r.tool_calls = (0..i % 5)
        .map(|c| ToolCall {
            tool_name: ["kubectl", "shell", "trivy"][(i + c) % 3].into(),
            tool_input: format!("get pods -n web-{i} -o wide, \"quoted\""),
            tool_observation: match c % 4 {
                0 => Some(format!("NAME,READY\nweb-{i},0/1\n错误: \"OOMKilled\"")),
                1 => None,
                2 => Some(String::new()),
                _ => Some("ok".into()),
            },
            sequence_number: c as i32 + 1,
            duration_ms: (c % 3 != 1).then_some((i * 3 + c) as i64),
            thought_sequence_number: (c < i % 4).then_some(c as i32 + 1),
            error: (c == 1 || (i + c).is_multiple_of(7)).then(|| format!("exit status {c}: forbidden, \"denied\"")),
            ..ToolCall::new("", "")
        })
        .collect();
    r.final_answer = match i % 11 {
        0 => None,
        1 => Some(format!("数据库连接池耗尽，已扩容 {i}")),
        _ => Some(format!("raise the memory limit, then \"kubectl rollout restart\"\r\nstep 2 for web-{i}")),
    };
    r.status = match i % 10 {
        7 => Status::Error,
        8 => Status::Timeout,
        9 => Status::Cancelled,
        _ => Status::Success,
    };
    r.error = (r.status != Status::Success).then(|| format!("agent failed at step {i}, \"upstream\""));
    r.http_status = match r.status {
        Status::Success => (!i.is_multiple_of(8)).then_some(200),
        Status::Error => Some(500),
        Status::Timeout => Some(504),
        Status::Cancelled => None,
    };
    r.total_duration_ms = (!i.is_multiple_of(29)).then_some(((i * 137) % 9_000 + 50) as i64);
    r.assistant_duration_ms = r.total_duration_ms.map(|t| t * 3 / 4);
    r.parse_duration_ms = i.is_multiple_of(2).then_some((i % 40) as i64);
    if !i.is_multiple_of(3) {
        r.metrics.insert("llm_first_token_ms".into(), (i % 900) as i64);
        if i % 6 == 1 {
            r.metrics.insert("首个工具_ms".into(), i as i64);
        }
    }
    r.input_tokens = (!i.is_multiple_of(5)).then_some(1_000 + i as i64);
    r.output_tokens = (!i.is_multiple_of(7)).then_some(200 + i as i64);
    if !i.is_multiple_of(4) {
        r.attributes.insert("agent_version".into(), json!("1.0.3"));
        r.attributes.insert("tags".into(), json!(["a", "b,c", "引号\""]));
        r.attributes.insert("nested".into(), json!({"键": "值", "n": i, "flag": true, "none": null}));
    }
    r
}

/// Writes `n` rich records through `store`, in batches as the pipeline would.
async fn seed(store: &dyn Store, n: usize) -> Seed {
    let base = now_us();
    let sessions: Vec<Uuid> = (0..SESSIONS).map(|_| Uuid::now_v7()).collect();
    let records: Vec<Interaction> = (0..n).map(|i| rich_record(i, base, &sessions)).collect();
    let mut inserted = 0;
    for batch in records.chunks(300) {
        inserted += store.write_batch(batch).await.expect("write a seed batch").inserted;
    }
    assert_eq!(inserted, n as u64, "every seed record is stored");
    Seed { base, sessions, records }
}

// ---------------------------------------------------------------------------------------
// HTTP helpers.
// ---------------------------------------------------------------------------------------

/// Every interaction id the list endpoint returns for `filter`, paging with the largest
/// page (newest first).
async fn list_ids(app: &TestApp, filter: &[(&str, &str)]) -> Vec<Uuid> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut query: Vec<(&str, &str)> = filter.to_vec();
        query.push(("limit", "500"));
        if let Some(c) = &cursor {
            query.push(("cursor", c));
        }
        let response = app.client.get(app.url("/api/v1/interactions")).query(&query).send().await.expect("list");
        let status = response.status();
        let page: Value = response.json().await.expect("list answer is JSON");
        assert_eq!(status, 200, "{filter:?}: {page}");
        let items = page["items"].as_array().expect("items");
        assert!(items.len() <= 500);
        ids.extend(items.iter().map(|i| i["interaction_id"].as_str().expect("id").parse::<Uuid>().expect("uuid")));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return ids,
        }
    }
}

/// `GET /api/v1/export` with `format` and `filter`: asserts a 200 and returns the headers
/// and the whole body.
async fn export(app: &TestApp, format: Format, filter: &[(&str, &str)]) -> (HeaderMap, Bytes) {
    let mut query: Vec<(&str, &str)> = filter.to_vec();
    query.push(("format", format.as_str()));
    let response = app.client.get(app.url("/api/v1/export")).query(&query).send().await.expect("export");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.bytes().await.expect("the whole export body");
    assert_eq!(status, 200, "{format} {filter:?}: {}", String::from_utf8_lossy(&body));
    (headers, body)
}

/// Content type and file name of `format`, and a chunked body with no length.
fn assert_export_headers(headers: &HeaderMap, format: Format) {
    let header = |name| headers.get(name).map(|v| v.to_str().expect("ASCII header").to_string());
    assert_eq!(header(CONTENT_TYPE).as_deref(), Some(format.content_type()), "{headers:?}");
    let disposition = header(CONTENT_DISPOSITION).expect("content-disposition");
    let name = disposition
        .strip_prefix("attachment; filename=\"opsagent-audit-interactions-")
        .and_then(|rest| rest.strip_suffix(&format!(".{}\"", format.extension())))
        .unwrap_or_else(|| panic!("{format}: unexpected content-disposition {disposition:?}"));
    let stamp = NaiveDateTime::parse_from_str(name, "%Y%m%dT%H%M%SZ")
        .unwrap_or_else(|e| panic!("{format}: file name stamp {name:?}: {e}"))
        .and_utc();
    assert!((Utc::now() - stamp).num_seconds().abs() < 120, "{format}: stamp {stamp} is not now");
    assert_eq!(header(CONTENT_LENGTH), None, "{format}: a streamed export has no length: {headers:?}");
    assert_eq!(header(TRANSFER_ENCODING).as_deref(), Some("chunked"), "{format}: {headers:?}");
}

// ---------------------------------------------------------------------------------------
// Reading each format back into records.
// ---------------------------------------------------------------------------------------

fn from_ndjson(body: &[u8]) -> Vec<Interaction> {
    let text = std::str::from_utf8(body).expect("NDJSON is UTF-8");
    assert!(text.is_empty() || text.ends_with('\n'), "NDJSON ends with a newline");
    text.lines().map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))).collect()
}

fn from_json(body: &[u8]) -> Vec<Interaction> {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("JSON export does not parse: {e}"))
}

/// Rebuilds records from CSV rows (an empty cell is an absent value; the seed has no
/// empty top-level text). Checks the header and the documented `created_at` form.
fn from_csv(body: &[u8]) -> Vec<Interaction> {
    let mut reader = csv::Reader::from_reader(body);
    assert_eq!(reader.headers().expect("CSV header"), CSV_COLUMNS, "CSV header");
    let column = |name: &str| CSV_COLUMNS.iter().position(|c| *c == name).expect("known column");
    reader
        .records()
        .map(|row| {
            let row = row.expect("a well-formed CSV row");
            assert_eq!(row.len(), CSV_COLUMNS.len());
            let cell = |name: &str| row.get(column(name)).expect("cell").to_string();
            let opt = |name: &str| Some(cell(name)).filter(|s| !s.is_empty());
            let int = |name: &str| opt(name).map(|s| s.parse::<i64>().unwrap_or_else(|e| panic!("{name}: {e}")));
            let nested = |name: &str| -> Value {
                serde_json::from_str(&cell(name)).unwrap_or_else(|e| panic!("{name} is JSON text: {e}"))
            };
            let created_at: DateTime<Utc> = cell("created_at").parse().expect("created_at is RFC 3339");
            assert_eq!(cell("created_at"), created_at.to_rfc3339_opts(SecondsFormat::Micros, true));
            Interaction {
                interaction_id: cell("interaction_id").parse().expect("interaction_id"),
                session_id: cell("session_id").parse().expect("session_id"),
                user_id: opt("user_id"),
                client_ip: opt("client_ip"),
                user_agent: opt("user_agent"),
                created_at,
                endpoint: opt("endpoint"),
                question: cell("question"),
                model_name: opt("model_name"),
                provider: opt("provider"),
                base_url: opt("base_url"),
                cluster: opt("cluster"),
                thoughts: serde_json::from_value(nested("thoughts")).expect("thoughts"),
                tool_calls: serde_json::from_value(nested("tool_calls")).expect("tool_calls"),
                final_answer: opt("final_answer"),
                status: Status::parse(&cell("status")).expect("status"),
                error: opt("error"),
                http_status: int("http_status").map(|n| n as i32),
                total_duration_ms: int("total_duration_ms"),
                assistant_duration_ms: int("assistant_duration_ms"),
                parse_duration_ms: int("parse_duration_ms"),
                metrics: serde_json::from_value(nested("metrics")).expect("metrics"),
                input_tokens: int("input_tokens"),
                output_tokens: int("output_tokens"),
                attributes: serde_json::from_value(nested("attributes")).expect("attributes"),
                ..Interaction::new("")
            }
        })
        .collect()
}

/// Reads a Parquet export: its schema, and every row rebuilt as a record from the typed
/// columns (ids, timestamps, nested lists and the metrics map).
fn from_parquet(body: Bytes) -> (SchemaRef, Vec<Interaction>) {
    let builder = ParquetRecordBatchReaderBuilder::try_new(body).expect("a valid Parquet file");
    let schema = builder.schema().clone();
    let batches: Vec<RecordBatch> =
        builder.build().expect("Parquet reader").collect::<Result<_, _>>().expect("Parquet batches");
    let mut records = Vec::new();
    for batch in &batches {
        let col = |name: &str| batch.column_by_name(name).unwrap_or_else(|| panic!("column {name}")).clone();
        for row in 0..batch.num_rows() {
            let text = |name: &str| {
                let c = col(name);
                let a = c.as_string::<i32>();
                a.is_valid(row).then(|| a.value(row).to_string())
            };
            let int = |name: &str| {
                let c = col(name);
                let a = c.as_primitive::<Int64Type>();
                a.is_valid(row).then(|| a.value(row))
            };
            let thoughts = {
                let list = col("thoughts");
                let items = list.as_list::<i32>().value(row);
                let items = items.as_struct();
                let content = items.column_by_name("content").expect("content").as_string::<i32>().clone();
                let seq = items.column_by_name("sequence_number").expect("seq").as_primitive::<Int32Type>().clone();
                (0..items.len())
                    .map(|k| Thought { content: content.value(k).into(), sequence_number: seq.value(k) })
                    .collect()
            };
            let tool_calls = {
                let list = col("tool_calls");
                let items = list.as_list::<i32>().value(row);
                let items = items.as_struct();
                let field = |name: &str| items.column_by_name(name).unwrap_or_else(|| panic!("tool_calls.{name}"));
                let s = |name: &str, k: usize| {
                    let a = field(name).as_string::<i32>();
                    a.is_valid(k).then(|| a.value(k).to_string())
                };
                let i32_ = |name: &str, k: usize| {
                    let a = field(name).as_primitive::<Int32Type>();
                    a.is_valid(k).then(|| a.value(k))
                };
                (0..items.len())
                    .map(|k| ToolCall {
                        tool_name: s("tool_name", k).expect("tool_name"),
                        tool_input: s("tool_input", k).expect("tool_input"),
                        tool_observation: s("tool_observation", k),
                        sequence_number: i32_("sequence_number", k).expect("sequence_number"),
                        duration_ms: {
                            let a = field("duration_ms").as_primitive::<Int64Type>();
                            a.is_valid(k).then(|| a.value(k))
                        },
                        thought_sequence_number: i32_("thought_sequence_number", k),
                        error: s("error", k),
                        ..ToolCall::new("", "")
                    })
                    .collect()
            };
            let metrics = {
                let map = col("metrics");
                let entries = map.as_map().value(row);
                let keys = entries.column(0).as_string::<i32>().clone();
                let values = entries.column(1).as_primitive::<Int64Type>().clone();
                (0..entries.len()).map(|k| (keys.value(k).to_string(), values.value(k))).collect()
            };
            let created_at = col("created_at").as_primitive::<TimestampMicrosecondType>().value(row);
            let http_status = {
                let c = col("http_status");
                let a = c.as_primitive::<Int32Type>();
                a.is_valid(row).then(|| a.value(row))
            };
            records.push(Interaction {
                interaction_id: text("interaction_id").expect("id").parse().expect("uuid"),
                session_id: text("session_id").expect("session").parse().expect("uuid"),
                user_id: text("user_id"),
                client_ip: text("client_ip"),
                user_agent: text("user_agent"),
                created_at: Utc.timestamp_micros(created_at).single().expect("a valid instant"),
                endpoint: text("endpoint"),
                question: text("question").expect("question"),
                model_name: text("model_name"),
                provider: text("provider"),
                base_url: text("base_url"),
                cluster: text("cluster"),
                thoughts,
                tool_calls,
                final_answer: text("final_answer"),
                status: Status::parse(&text("status").expect("status")).expect("a known status"),
                error: text("error"),
                http_status,
                total_duration_ms: int("total_duration_ms"),
                assistant_duration_ms: int("assistant_duration_ms"),
                parse_duration_ms: int("parse_duration_ms"),
                metrics,
                input_tokens: int("input_tokens"),
                output_tokens: int("output_tokens"),
                attributes: serde_json::from_str(&text("attributes").expect("attributes")).expect("attributes JSON"),
                ..Interaction::new("")
            });
        }
    }
    (schema, records)
}

/// Any export body read back as records, whatever its format.
fn read_back(format: Format, body: Bytes) -> Vec<Interaction> {
    match format {
        Format::Csv => from_csv(&body),
        Format::Json => from_json(&body),
        Format::Ndjson => from_ndjson(&body),
        Format::Parquet => {
            let (schema, records) = from_parquet(body);
            assert_eq!(schema, parquet_schema(), "the file's schema is the documented one");
            records
        }
    }
}

/// `got` is exactly the records the list returned (`listed`, newest first), oldest first,
/// each equal to the record written.
fn assert_export_is(format: Format, got: &[Interaction], listed: &[Uuid], seed: &Seed) {
    let got_ids: Vec<Uuid> = got.iter().map(|r| r.interaction_id).collect();
    let oldest_first: Vec<Uuid> = listed.iter().rev().copied().collect();
    assert_eq!(got_ids.len(), listed.len(), "{format}: the export holds as many rows as the list");
    assert_eq!(got_ids, oldest_first, "{format}: the list's rows, oldest first (created_at, id)");
    let written = seed.by_id();
    for r in got {
        assert_eq!(r, written[&r.interaction_id], "{format}: a record differs from what was written");
    }
}

// ---------------------------------------------------------------------------------------
// HTTP export.
// ---------------------------------------------------------------------------------------

async fn every_format_round_trips_what_the_list_holds(db: &TestDb) {
    let app = spawn_app(db).await;
    let seed = seed(app.store.as_ref(), SEED).await;
    let listed = list_ids(&app, &[]).await;
    assert_eq!(listed.len(), SEED, "the list pages through every record");
    assert_eq!(listed.iter().collect::<BTreeSet<_>>().len(), SEED, "no record listed twice");
    // Spot-check against the store itself, for the record with most parts.
    let richest = seed.records.iter().max_by_key(|r| r.tool_calls.len() + r.thoughts.len() + r.metrics.len());
    let richest = richest.expect("a record");
    assert_eq!(&app.store.get_interaction(richest.interaction_id).await.expect("get"), richest);

    for format in Format::ALL {
        let (headers, body) = export(&app, format, &[]).await;
        assert_export_headers(&headers, format);
        let got = read_back(format, body.clone());
        assert_export_is(format, &got, &listed, &seed);
        match format {
            Format::Json => assert!(body.starts_with(b"[{") && body.ends_with(b"}]\n"), "one JSON array"),
            Format::Ndjson => assert_eq!(body.iter().filter(|b| **b == b'\n').count(), SEED, "a line per record"),
            Format::Csv => {
                // Quoted newlines in cells: more physical lines than rows, yet a row each.
                assert!(body.iter().filter(|b| **b == b'\n').count() > SEED + 1);
                let text = std::str::from_utf8(&body).expect("UTF-8 CSV");
                assert!(text.contains("\"=cmd|' /C calc'!A2\"") || text.contains("=cmd|' /C calc'!A2,"));
                assert!(!text.contains("'=cmd"), "no apostrophe is prepended to formula-like cells");
            }
            Format::Parquet => {
                assert!(body.starts_with(b"PAR1") && body.ends_with(b"PAR1"), "Parquet magic at both ends");
            }
        }
    }
    // The default format is NDJSON.
    let response = app.client.get(app.url("/api/v1/export")).send().await.expect("export");
    assert_eq!(response.status(), 200);
    assert_export_headers(response.headers(), Format::Ndjson);
    let default = from_ndjson(&response.bytes().await.expect("body"));
    assert_eq!(default.len(), SEED);
    // Format names ignore ASCII case.
    let response = app.client.get(app.url("/api/v1/export?format=CSV&user_id=bob")).send().await.expect("export");
    assert_eq!(response.status(), 200);
    assert_export_headers(response.headers(), Format::Csv);
    let got = from_csv(&response.bytes().await.expect("body"));
    assert_eq!(got.len(), seed.matching(|r| r.user_id.as_deref() == Some("bob")).len());
}

async fn filters_apply_to_the_export(db: &TestDb) {
    let app = spawn_app(db).await;
    let seed = seed(app.store.as_ref(), SEED).await;
    let (base, session) = (seed.base, seed.sessions[3]);
    let session_text = session.to_string();
    let from = (base - Duration::hours(100)).to_rfc3339();
    let to = (base - Duration::hours(40)).to_rfc3339();
    let has = |r: &Interaction, term: &str| {
        r.question.contains(term) || r.final_answer.as_deref().is_some_and(|a| a.contains(term))
    };
    type Keep<'a> = Box<dyn Fn(&Interaction) -> bool + 'a>;
    let cases: Vec<(Vec<(&str, &str)>, Keep)> = vec![
        // Records are 5 minutes away from any `since` boundary, so the seconds between
        // the requests and `base` cannot move one across it.
        (
            vec![("user_id", "alice"), ("since", "72h")],
            Box::new(|r| r.user_id.as_deref() == Some("alice") && r.created_at >= base - Duration::hours(72)),
        ),
        // Chinese terms: three characters (SQLite's trigram index) and two (its LIKE path).
        (vec![("q", "数据库")], Box::new(|r| has(r, "数据库"))),
        (vec![("q", "集群")], Box::new(|r| has(r, "集群"))),
        (vec![("q", "\"QUOTED\"")], Box::new(|r| has(&lower(r), "\"quoted\""))),
        (
            vec![("status", "error,timeout"), ("tool_name", "kubectl")],
            Box::new(|r| {
                matches!(r.status, Status::Error | Status::Timeout)
                    && r.tool_calls.iter().any(|t| t.tool_name == "kubectl")
            }),
        ),
        (
            vec![("min_duration_ms", "1000"), ("max_duration_ms", "5000"), ("cluster", "prod-west")],
            Box::new(|r| {
                r.cluster.as_deref() == Some("prod-west")
                    && r.total_duration_ms.is_some_and(|d| (1_000..=5_000).contains(&d))
            }),
        ),
        (vec![("session_id", &session_text)], Box::new(|r| r.session_id == session)),
        (
            vec![("from", &from), ("to", &to), ("model_name", "qwen-max"), ("provider", "阿里云 dashscope")],
            Box::new(|r| {
                r.created_at >= base - Duration::hours(100)
                    && r.created_at < base - Duration::hours(40)
                    && r.model_name.as_deref() == Some("qwen-max")
            }),
        ),
    ];
    for (filter, keep) in &cases {
        let expected = seed.matching(keep);
        assert!(!expected.is_empty() && expected.len() < SEED, "{filter:?} selects some records: {}", expected.len());
        let listed = list_ids(&app, filter).await;
        assert_eq!(listed.len(), expected.len(), "{filter:?}: the list matches the seed");
        let expected_ids: BTreeSet<Uuid> = expected.iter().map(|r| r.interaction_id).collect();
        assert_eq!(listed.iter().copied().collect::<BTreeSet<_>>(), expected_ids, "{filter:?}");
        for format in Format::ALL {
            let (headers, body) = export(&app, format, filter).await;
            assert_export_headers(&headers, format);
            let got = read_back(format, body);
            assert_export_is(format, &got, &listed, &seed);
        }
    }
}

/// The record with its question and answer in lower case (for case-insensitive search).
fn lower(r: &Interaction) -> Interaction {
    let mut r = r.clone();
    r.question = r.question.to_lowercase();
    r.final_answer = r.final_answer.map(|a| a.to_lowercase());
    r
}

async fn bad_parameters_are_refused_naming_them(db: &TestDb) {
    let app = spawn_app(db).await;
    let cases = [
        ("format=xml", "format", "xml"),
        ("format=csv&user=alice", "user", "user"),
        ("format=csv&bogus=1", "bogus", "bogus"),
        ("format=csv&format=json", "format", "more than once"),
        ("format=json&limit=5", "limit", "limit"),
        ("format=json&since=yesterday-ish", "since", "yesterday-ish"),
        ("format=json&status=exploded", "status", "exploded"),
        ("format=json&from=2026-11-02&to=2026-11-01", "to", "after"),
    ];
    for (query, field, said) in cases {
        let response = app.client.get(app.url(&format!("/api/v1/export?{query}"))).send().await.expect("export");
        let status = response.status();
        let content_type = response.headers().get(CONTENT_TYPE).cloned();
        let body: Value = response.json().await.expect("a JSON error");
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(content_type.as_ref().and_then(|v| v.to_str().ok()), Some("application/json"), "{query}");
        assert_eq!(body["error"]["code"], "invalid_parameter", "{query}: {body}");
        assert_eq!(body["error"]["field"], field, "{query}: {body}");
        let message = body["error"]["message"].as_str().expect("message");
        assert!(message.contains(said), "{query}: {message}");
    }
}

async fn an_empty_export_is_a_valid_empty_file(db: &TestDb) {
    let app = spawn_app(db).await;
    seed(app.store.as_ref(), 20).await;
    let nobody = [("user_id", "nobody")];
    assert!(list_ids(&app, &nobody).await.is_empty());
    for format in Format::ALL {
        let (headers, body) = export(&app, format, &nobody).await;
        assert_export_headers(&headers, format);
        match format {
            Format::Csv => {
                assert_eq!(body, format!("{}\n", CSV_COLUMNS.join(",")).as_bytes(), "CSV: the header alone");
            }
            Format::Json => assert_eq!(serde_json::from_slice::<Value>(&body).expect("JSON"), json!([])),
            Format::Ndjson => assert!(body.is_empty(), "NDJSON: no line at all"),
            Format::Parquet => {
                let (schema, records) = from_parquet(body);
                assert_eq!(schema, parquet_schema(), "an empty Parquet file still has the schema");
                assert!(records.is_empty());
            }
        }
        assert!(read_back(format, export(&app, format, &nobody).await.1).is_empty(), "{format}");
    }
}

both_backends!(
    every_format_round_trips_what_the_list_holds,
    filters_apply_to_the_export,
    bad_parameters_are_refused_naming_them,
    an_empty_export_is_a_valid_empty_file,
    cli_export_writes_a_complete_file_or_stdout,
    cli_query_and_stats_match_the_seed,
);

/// 20,000 small records: the export must reach the client in many chunks as it is read,
/// not as one body built in memory.
/// Each export holds a database connection for its whole download, so two run at once;
/// a third is refused with `429` and `Retry-After`, and a slot comes back as soon as a
/// client goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_concurrent_export_waits_for_a_slot() {
    let db = TestDb::sqlite();
    let app = spawn_app(&db).await;
    // Far more than loopback socket buffers hold, so an unread download stays open.
    let big = "x".repeat(16 * 1024);
    let records: Vec<Interaction> = (0..2_000)
        .map(|i| {
            let mut r = Interaction::new(format!("export slot {i}"));
            r.final_answer = Some(big.clone());
            r
        })
        .collect();
    for chunk in records.chunks(500) {
        app.store.write_batch(chunk).await.expect("seed");
    }
    let url = app.url("/api/v1/export?format=ndjson");
    let first = app.client.get(&url).send().await.expect("first export");
    let second = app.client.get(&url).send().await.expect("second export");
    assert_eq!((first.status().as_u16(), second.status().as_u16()), (200, 200));

    let third = app.client.get(&url).send().await.expect("third export");
    assert_eq!(third.status().as_u16(), 429);
    assert_eq!(third.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("10"));
    let body: Value = third.json().await.expect("json error");
    assert_eq!(body["error"]["code"], "too_many_exports");

    drop(first);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let again = app.client.get(&url).send().await.expect("export after a slot is freed");
        if again.status().as_u16() == 200 {
            let lines =
                again.bytes().await.expect("whole export").split(|&b| b == b'\n').filter(|l| !l.is_empty()).count();
            assert_eq!(lines, 2_000);
            break;
        }
        assert_eq!(again.status().as_u16(), 429);
        assert!(std::time::Instant::now() < deadline, "the first export's slot never came back");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_large_export_streams_in_many_chunks() {
    const N: usize = 20_000;
    let db = TestDb::postgres().await;
    let app = spawn_app(&db).await;
    let base = now_us();
    let session = Uuid::now_v7();
    let records: Vec<Interaction> = (0..N)
        .map(|i| {
            let mut r = Interaction::new(format!("question {i}: why is web-{} down?", i % 97));
            r.session_id = session;
            r.user_id = Some(USERS[i % USERS.len()].into());
            r.created_at = base - Duration::milliseconds(i as i64);
            r.final_answer = Some(format!("answer {i}"));
            r.tool_calls.push(ToolCall {
                tool_name: "kubectl".into(),
                tool_input: format!("get pod web-{i}"),
                tool_observation: Some("Running".into()),
                sequence_number: 1,
                duration_ms: Some(i as i64 % 300),
                thought_sequence_number: None,
                error: None,
                ..ToolCall::new("", "")
            });
            r
        })
        .collect();
    for batch in records.chunks(2_000) {
        app.store.write_batch(batch).await.expect("write a batch");
    }

    let mut response = app.client.get(app.url("/api/v1/export?format=ndjson")).send().await.expect("start the export");
    assert_eq!(response.status(), 200);
    assert_export_headers(response.headers(), Format::Ndjson);
    let (mut chunks, mut bytes, mut lines) = (0usize, 0usize, 0usize);
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.expect("read a chunk") {
        chunks += 1;
        bytes += chunk.len();
        lines += chunk.iter().filter(|b| **b == b'\n').count();
        body.extend_from_slice(&chunk);
    }
    assert!(chunks > 10, "{bytes} bytes came in only {chunks} chunks");
    assert_eq!(lines, N, "one line per record");
    let got = from_ndjson(&body);
    // Oldest first: record N-1 happened first.
    assert_eq!(got.first().map(|r| r.interaction_id), Some(records[N - 1].interaction_id));
    assert_eq!(got.last().map(|r| r.interaction_id), Some(records[0].interaction_id));
    assert_eq!(got.iter().map(|r| r.interaction_id).collect::<BTreeSet<_>>().len(), N, "each record once");
}

// ---------------------------------------------------------------------------------------
// The command line.
// ---------------------------------------------------------------------------------------

/// Runs the binary in `dir` against the test database.
fn cli(dir: &Path, db: &TestDb, args: &[&str]) -> Ran {
    let mut command = bin(dir);
    command.args(["--database-url", &db.url]).args(args);
    tokio::task::block_in_place(|| run(&mut command))
}

fn ok(ran: Ran, what: &str) -> Ran {
    assert_eq!(ran.code, Some(0), "{what}: {ran:?}");
    ran
}

async fn cli_export_writes_a_complete_file_or_stdout(db: &TestDb) {
    let store: Arc<dyn Store> = db.store().await;
    let seed = seed(store.as_ref(), SEED).await;
    let dir = tempfile::tempdir().expect("temp dir");

    // A Parquet file, filtered: the right rows, and nothing left under the partial name.
    let alice =
        seed.matching(|r| r.user_id.as_deref() == Some("alice") && r.created_at >= seed.base - Duration::days(5));
    let file = dir.path().join("alice.parquet");
    let ran = ok(
        cli(
            dir.path(),
            db,
            &["export", "--format", "parquet", "--output", "alice.parquet", "--user", "alice", "--since", "5d"],
        ),
        "export parquet",
    );
    assert!(ran.stdout.is_empty(), "a file export prints nothing on stdout: {ran:?}");
    assert!(!ran.stderr.contains('\r') && !ran.stderr.contains("eta"), "no progress bar off a terminal: {ran:?}");
    assert!(!dir.path().join("alice.parquet.partial").exists(), "the partial file was renamed");
    let (schema, got) = from_parquet(Bytes::from(std::fs::read(&file).expect("the export file")));
    assert_eq!(schema, parquet_schema());
    assert_eq!(got.len(), alice.len(), "rows in the Parquet file");
    let written = seed.by_id();
    for r in &got {
        assert_eq!(r, written[&r.interaction_id]);
    }
    let got_ids: BTreeSet<Uuid> = got.iter().map(|r| r.interaction_id).collect();
    assert_eq!(got_ids, alice.iter().map(|r| r.interaction_id).collect(), "the filter's records");
    assert!(got.windows(2).all(|w| w[0].created_at <= w[1].created_at), "oldest first");

    // Every record as CSV on stdout, nothing written to disk.
    let ran = ok(cli(dir.path(), db, &["export", "--format", "csv", "-o", "-"]), "export csv to stdout");
    let got = from_csv(ran.stdout.as_bytes());
    assert_eq!(got.len(), SEED);
    for r in &got {
        assert_eq!(r, written[&r.interaction_id]);
    }
    assert!(!dir.path().join("-").exists() && !dir.path().join("-.partial").exists(), "stdout is not a file");

    // NDJSON of a model (through the option's alias) to a file.
    let gpt = seed.matching(|r| r.model_name.as_deref() == Some("gpt-4o"));
    ok(cli(dir.path(), db, &["export", "--format", "ndjson", "--output", "gpt.ndjson", "--model", "gpt-4o"]), "ndjson");
    let got = from_ndjson(&std::fs::read(dir.path().join("gpt.ndjson")).expect("the NDJSON file"));
    assert_eq!(got.len(), gpt.len());

    // Refused options: nothing is created, the option is named.
    for (args, named) in [
        (vec!["export", "--format", "xml", "--output", "bad.out"], "--format"),
        (vec!["export", "--format", "csv", "--output", "bad.out", "--from", "yesterday-ish"], "--from"),
        (vec!["export", "--format", "csv", "--output", "bad.out", "--min-duration-ms=-5"], "--min-duration-ms"),
    ] {
        let ran = cli(dir.path(), db, &args);
        assert_eq!(ran.code, Some(1), "{args:?}: {ran:?}");
        assert!(ran.stderr.contains(&format!("error: {named}")), "{args:?} names {named}: {ran:?}");
        assert!(!dir.path().join("bad.out").exists() && !dir.path().join("bad.out.partial").exists(), "{args:?}");
    }
}

async fn cli_query_and_stats_match_the_seed(db: &TestDb) {
    let store: Arc<dyn Store> = db.store().await;
    let seed = seed(store.as_ref(), SEED).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ids = |text: &str| -> Vec<Uuid> {
        text.lines()
            .map(|line| {
                let item: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
                item["interaction_id"].as_str().expect("id").parse().expect("uuid")
            })
            .collect()
    };

    // --all follows the cursors: every record once.
    let ran = ok(cli(dir.path(), db, &["query", "--format", "ndjson", "--all"]), "query --all");
    let all = ids(&ran.stdout);
    assert_eq!(all.len(), SEED, "every record");
    let all_set: BTreeSet<Uuid> = all.iter().copied().collect();
    assert_eq!(all_set.len(), SEED, "each record once");
    assert_eq!(all_set, seed.records.iter().map(|r| r.interaction_id).collect(), "the records written");

    // The same with filters, across several pages of the default size.
    let expected =
        seed.matching(|r| r.status != Status::Success && r.tool_calls.iter().any(|t| t.tool_name == "shell"));
    let ran = ok(
        cli(
            dir.path(),
            db,
            &["query", "--format", "ndjson", "--all", "--status", "error,timeout,cancelled", "--tool", "shell"],
        ),
        "query --all filtered",
    );
    let got = ids(&ran.stdout);
    assert!(expected.len() > 50, "more than one page: {}", expected.len());
    assert_eq!(got.len(), expected.len());
    assert_eq!(got.into_iter().collect::<BTreeSet<_>>(), expected.iter().map(|r| r.interaction_id).collect());

    // Pages of 5, newest first; the cursor continues where the first page ended. Records
    // 0–9 are the newest, at distinct times.
    let newest: Vec<Uuid> = seed.records[..10].iter().map(|r| r.interaction_id).collect();
    let page = |args: &[&str]| -> (Vec<Uuid>, Option<String>, Ran) {
        let ran = ok(cli(dir.path(), db, args), "query --format json");
        let page: Value = serde_json::from_str(&ran.stdout).unwrap_or_else(|e| panic!("{e}: {ran:?}"));
        let items = page["items"].as_array().expect("items");
        let got = items.iter().map(|i| i["interaction_id"].as_str().expect("id").parse().expect("uuid")).collect();
        (got, page["next_cursor"].as_str().map(String::from), ran)
    };
    let (first, cursor, ran) = page(&["query", "--format", "json", "--limit", "5"]);
    assert_eq!(first, newest[..5], "the 5 newest");
    let cursor = cursor.expect("a next cursor");
    assert!(ran.stderr.contains(&format!("--cursor {cursor}")), "the hint names the cursor: {ran:?}");
    let (second, cursor2, _) = page(&["query", "--format", "json", "--limit", "5", "--cursor", &cursor]);
    assert_eq!(second, newest[5..], "the next 5");
    assert!(cursor2.is_some_and(|c| c != cursor));

    // Stats by model: the database's counts are ours.
    let mut counts: BTreeMap<Option<String>, i64> = BTreeMap::new();
    for r in &seed.records {
        *counts.entry(r.model_name.clone()).or_default() += 1;
    }
    let ran = ok(cli(dir.path(), db, &["stats", "--group-by", "model_name", "--format", "json"]), "stats");
    let stats: Value = serde_json::from_str(&ran.stdout).unwrap_or_else(|e| panic!("{e}: {ran:?}"));
    assert_eq!(stats["group_by"], "model_name");
    let rows = stats["rows"].as_array().expect("rows");
    let got: BTreeMap<Option<String>, i64> =
        rows.iter().map(|row| (row["key"].as_str().map(String::from), row["count"].as_i64().expect("count"))).collect();
    assert_eq!(got, counts, "{stats}");
    let errors =
        seed.records.iter().filter(|r| r.model_name.as_deref() == Some("qwen-max") && r.status != Status::Success);
    let qwen = rows.iter().find(|row| row["key"] == "qwen-max").expect("a qwen-max row");
    assert_eq!(qwen["error_count"].as_i64(), Some(errors.count() as i64), "{qwen}");

    // A bad time names the option, exits 1 and prints nothing on stdout.
    let ran = cli(dir.path(), db, &["query", "--from", "yesterday-ish"]);
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stderr.contains("error: --from:") && ran.stderr.contains("yesterday-ish"), "{ran:?}");
    assert!(ran.stdout.is_empty(), "{ran:?}");

    // The table (default), off a terminal: a header, one line per row, 160 columns at most.
    let ran = ok(cli(dir.path(), db, &["query", "--limit", "20"]), "query as a table");
    let lines: Vec<&str> = ran.stdout.lines().collect();
    for line in &lines {
        assert!(line.chars().count() <= 160, "a line of {} characters:\n{line}", line.chars().count());
    }
    let header: Vec<&&str> = lines.iter().filter(|l| l.contains("created_at (UTC)")).collect();
    assert_eq!(header.len(), 1, "one header line:\n{}", ran.stdout);
    assert!(header[0].contains("question") && header[0].contains("id"), "{}", header[0]);
    let by_id = seed.by_id();
    let row_lines: Vec<&&str> = lines.iter().filter(|l| by_id.keys().any(|id| l.contains(&id.to_string()))).collect();
    assert_eq!(row_lines.len(), 20, "one line per row, its id whole:\n{}", ran.stdout);
    for (line, id) in row_lines.iter().zip(&seed.records[..20]) {
        assert!(line.contains(&id.interaction_id.to_string()), "newest first:\n{}", ran.stdout);
    }
    assert!(ran.stderr.contains("more: --cursor"), "{ran:?}");
}
