//! `bench otlp`: the standard workload as OpenTelemetry traces (per interaction one
//! `invoke_agent` root, one `chat` span, three `execute_tool` spans) posted as protobuf
//! to `POST /v1/traces` of a server started in this process, against the same records
//! posted as JSON to `POST /api/v1/interactions` of the same server in the same run.
//! Both with durable acknowledgements (the default): timed from the first request until
//! every record is committed. The JSON phase goes first, so the OTLP phase writes into
//! the larger table (the ratio errs against OTLP). The last line is machine-readable:
//! `otlp_spans_per_s=… otlp_interactions_per_s=… api_interactions_per_s=… ratio=…`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use futures::StreamExt;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;
use tokio_util::sync::CancellationToken;

use super::{tempfile_dir, Workload};
use crate::api::Application;
use crate::config::Config;
use crate::model::Interaction;
use crate::store::Store;

/// Spans per interaction in the OTLP form.
const SPANS_PER_TRACE: u64 = 5;

/// Options of `bench otlp`.
#[derive(Debug, Clone, clap::Args)]
pub struct OtlpBenchArgs {
    /// Interactions to send (each phase).
    #[arg(long, default_value_t = 10_000)]
    pub records: u64,
    /// Seed of the workload's content.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Interactions per request (an SDK's batch processor sends up to 512 spans).
    #[arg(long, default_value_t = 20)]
    pub per_request: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
}

/// What one phase measured.
struct Phase {
    records: u64,
    spans: u64,
    bytes: u64,
    elapsed: Duration,
}

impl Phase {
    fn per_second(&self, n: u64) -> f64 {
        n as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs the benchmark against the configured database and prints its table.
pub async fn run_otlp(config: &Config, args: OtlpBenchArgs) -> anyhow::Result<()> {
    ensure!(args.per_request > 0 && args.clients > 0, "--per-request and --clients must be at least 1");
    let dir = tempfile_dir()?;
    let mut c = config.clone();
    c.server.listen = "127.0.0.1:0".parse()?;
    c.spool.dir = dir.join("spool");
    // Whole traces arrive in one request: no need to wait long for stragglers.
    c.otlp.quiet_period = Duration::from_millis(50);
    c.otlp.max_pending_spans = c.otlp.max_pending_spans.max(args.clients * args.per_request * 5 * 4);
    // A loopback server of this process: no tokens, no rate limit.
    c.auth = Default::default();
    c.limits.max_records_per_request = c.limits.max_records_per_request.max(args.per_request);
    let app = Application::build(c, false).await.context("starting the server")?;
    let base = format!("http://{}", app.local_addr());
    let store = app.store();
    let stop = CancellationToken::new();
    let server = tokio::spawn(app.run_until(stop.clone().cancelled_owned()));
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "opsagent-audit bench otlp: {} interactions per phase ({} spans as traces), {} per request, {} clients, {:?}",
        args.records,
        args.records * SPANS_PER_TRACE,
        args.per_request,
        args.clients,
        store.backend()
    )?;
    out.flush()?;

    let client = reqwest::Client::new();
    let api = run_api(&client, &base, &store, &args).await;
    let otlp = match api {
        Ok(_) => run_traces(&client, &base, &store, &args).await,
        Err(_) => Err(anyhow::anyhow!("skipped")),
    };
    stop.cancel();
    let _ = server.await;
    let _ = std::fs::remove_dir_all(&dir);
    let (api, otlp) = (api?, otlp?);

    let mut table = String::new();
    writeln!(
        table,
        "{:<12} {:>9} {:>9} {:>9} {:>15} {:>9} {:>11}",
        "phase", "records", "spans", "seconds", "interactions/s", "spans/s", "body MB/s"
    )?;
    for (name, p) in [("api (JSON)", &api), ("otlp (pb)", &otlp)] {
        writeln!(
            table,
            "{:<12} {:>9} {:>9} {:>9.2} {:>15.0} {:>9} {:>11.1}",
            name,
            p.records,
            if p.spans > 0 { p.spans.to_string() } else { "-".into() },
            p.elapsed.as_secs_f64(),
            p.per_second(p.records),
            if p.spans > 0 { format!("{:.0}", p.per_second(p.spans)) } else { "-".into() },
            p.bytes as f64 / 1e6 / p.elapsed.as_secs_f64().max(1e-9),
        )?;
    }
    write!(out, "{table}")?;
    writeln!(
        out,
        "otlp_spans_per_s={:.0} otlp_interactions_per_s={:.0} api_interactions_per_s={:.0} ratio={:.2}",
        otlp.per_second(otlp.spans),
        otlp.per_second(otlp.records),
        api.per_second(api.records),
        otlp.per_second(otlp.records) / api.per_second(api.records)
    )?;
    Ok(())
}

/// Posts `bodies` from `clients` concurrent clients; fails on any answer but `expect`.
async fn post_all(
    client: &reqwest::Client,
    url: &str,
    content_type: &str,
    bodies: Vec<Vec<u8>>,
    clients: usize,
    expect: u16,
    check: fn(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut answers = futures::stream::iter(bodies)
        .map(|body| async move {
            let response = client.post(url).header("content-type", content_type).body(body).send().await?;
            let status = response.status().as_u16();
            let bytes = response.bytes().await?;
            if status != expect {
                bail!("{url} answered {status}: {}", String::from_utf8_lossy(&bytes));
            }
            check(&bytes)
        })
        .buffer_unordered(clients);
    while let Some(answer) = answers.next().await {
        answer?;
    }
    Ok(())
}

/// Waits until the store holds `n` interactions.
async fn wait_for(store: &Arc<dyn Store>, n: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while store.count_interactions().await? < n {
        ensure!(Instant::now() < deadline, "records not stored within 10 minutes");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

async fn run_api(
    client: &reqwest::Client,
    base: &str,
    store: &Arc<dyn Store>,
    args: &OtlpBenchArgs,
) -> anyhow::Result<Phase> {
    let before = store.count_interactions().await?;
    let mut workload = Workload::new(args.seed ^ 0x0a91_0000);
    let records: Vec<Interaction> = (0..args.records).map(|i| workload.record(i)).collect();
    let bodies: Vec<Vec<u8>> = records.chunks(args.per_request).map(serde_json::to_vec).collect::<Result<_, _>>()?;
    let bytes = bodies.iter().map(|b| b.len() as u64).sum();
    let started = Instant::now();
    let url = format!("{base}/api/v1/interactions");
    post_all(client, &url, "application/json", bodies, args.clients, 202, |_| Ok(())).await?;
    wait_for(store, before + args.records).await?;
    Ok(Phase { records: args.records, spans: 0, bytes, elapsed: started.elapsed() })
}

async fn run_traces(
    client: &reqwest::Client,
    base: &str,
    store: &Arc<dyn Store>,
    args: &OtlpBenchArgs,
) -> anyhow::Result<Phase> {
    let before = store.count_interactions().await?;
    let mut workload = Workload::new(args.seed);
    let records: Vec<Interaction> = (0..args.records).map(|i| workload.record(i)).collect();
    let bodies: Vec<Vec<u8>> = records.chunks(args.per_request).map(|chunk| export_of(chunk).encode_to_vec()).collect();
    let bytes = bodies.iter().map(|b| b.len() as u64).sum();
    let started = Instant::now();
    let url = format!("{base}/v1/traces");
    post_all(client, &url, "application/x-protobuf", bodies, args.clients, 200, |body| {
        let answer = ExportTraceServiceResponse::decode(body)?;
        match answer.partial_success {
            Some(p) if p.rejected_spans > 0 => bail!("spans refused: {}", p.error_message),
            _ => Ok(()),
        }
    })
    .await?;
    wait_for(store, before + args.records).await?;
    Ok(Phase { records: args.records, spans: args.records * SPANS_PER_TRACE, bytes, elapsed: started.elapsed() })
}

fn kv(key: &str, value: Value) -> KeyValue {
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
}

fn text(key: &str, value: impl Into<String>) -> KeyValue {
    kv(key, Value::StringValue(value.into()))
}

/// One export of `records` as traces, one resource per cluster as an SDK would send.
pub fn export_of(records: &[Interaction]) -> ExportTraceServiceRequest {
    let resource_spans = records
        .iter()
        .map(|r| ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    text("service.name", "ops-agent"),
                    text("k8s.cluster.name", r.cluster.clone().unwrap_or_default()),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans { spans: trace_of(r), ..Default::default() }],
            ..Default::default()
        })
        .collect();
    ExportTraceServiceRequest { resource_spans }
}

/// A record as a trace: root, chat (with the thought as a reasoning part), tools.
pub fn trace_of(r: &Interaction) -> Vec<Span> {
    let trace_id = r.interaction_id.into_bytes().to_vec();
    let start = r.created_at.timestamp_nanos_opt().unwrap_or_default().max(0) as u64;
    let ms = 1_000_000u64;
    let total = r.total_duration_ms.unwrap_or(1000).max(1) as u64 * ms;
    let message =
        |role: &str, parts: serde_json::Value| serde_json::json!([{ "role": role, "parts": parts }]).to_string();
    let span = |id: u64, parent: Option<u64>, name: String, from: u64, to: u64, attributes: Vec<KeyValue>| Span {
        trace_id: trace_id.clone(),
        span_id: id.to_be_bytes().to_vec(),
        parent_span_id: parent.map(|p| p.to_be_bytes().to_vec()).unwrap_or_default(),
        name,
        kind: 1,
        start_time_unix_nano: from,
        end_time_unix_nano: to,
        attributes,
        ..Default::default()
    };
    let mut spans = Vec::with_capacity(SPANS_PER_TRACE as usize);
    spans.push(span(
        1,
        None,
        "invoke_agent ops-agent".into(),
        start,
        start + total,
        vec![
            text("gen_ai.operation.name", "invoke_agent"),
            text("gen_ai.conversation.id", r.session_id.to_string()),
            text("user.id", r.user_id.clone().unwrap_or_default()),
            text(
                "gen_ai.input.messages",
                message("user", serde_json::json!([{ "type": "text", "content": r.question }])),
            ),
            text(
                "gen_ai.output.messages",
                message("assistant", serde_json::json!([{ "type": "text", "content": r.final_answer }])),
            ),
        ],
    ));
    let reasoning: Vec<serde_json::Value> =
        r.thoughts.iter().map(|t| serde_json::json!({ "type": "reasoning", "content": t.content })).collect();
    spans.push(span(
        2,
        Some(1),
        format!("chat {}", r.model_name.as_deref().unwrap_or_default()),
        start + ms,
        start + 300 * ms,
        vec![
            text("gen_ai.operation.name", "chat"),
            text("gen_ai.provider.name", r.provider.clone().unwrap_or_default()),
            text("gen_ai.request.model", r.model_name.clone().unwrap_or_default()),
            kv("gen_ai.usage.input_tokens", Value::IntValue(r.input_tokens.unwrap_or_default())),
            kv("gen_ai.usage.output_tokens", Value::IntValue(r.output_tokens.unwrap_or_default())),
            text("gen_ai.output.messages", message("assistant", serde_json::Value::Array(reasoning))),
        ],
    ));
    let mut at = start + 300 * ms;
    for (n, call) in r.tool_calls.iter().enumerate() {
        let took = call.duration_ms.unwrap_or(1).max(0) as u64 * ms;
        spans.push(span(
            3 + n as u64,
            Some(1),
            format!("execute_tool {}", call.tool_name),
            at,
            at + took,
            vec![
                text("gen_ai.operation.name", "execute_tool"),
                text("gen_ai.tool.name", call.tool_name.clone()),
                text("gen_ai.tool.call.arguments", call.tool_input.clone()),
                text("gen_ai.tool.call.result", call.tool_observation.clone().unwrap_or_default()),
            ],
        ));
        at += took;
    }
    spans
}
