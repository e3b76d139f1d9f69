//! `bench proxy`: what the auditing proxy adds to an agent call. A stub agent runs in
//! process (answering `/api/execute` as OpsAgent does, trace included); the same
//! requests are sent to it directly and through the proxy, `--concurrency` at a time,
//! in the same run, and the latency percentiles compared. Every proxied request is an
//! audited one, recorded through the real pipeline into the configured database. The
//! last line printed is machine-readable:
//! `proxy_p50_overhead_ms=… proxy_p99_overhead_ms=… direct_p99_ms=… proxy_p99_ms=… proxy_per_s=… recorded=…`.

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::mask::Masker;
use crate::pipeline::AuditLogger;
use crate::proxy::Proxy;
use crate::store;

/// Options of `bench proxy`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProxyBenchArgs {
    /// Requests per phase (direct, then through the proxy).
    #[arg(long, default_value_t = 20_000)]
    pub requests: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 100)]
    pub concurrency: u64,
}

/// The stub agent's answer: what OpsAgent sends for `show-thought=true`, as Go writes it.
const ANSWER: &str = r#"{"action":{"input":"get configmap nginx -n web -o yaml","name":"kubectl"},"message":"The pod \u003cnginx-7d9\u003e lacks its config \u0026 crashes","observation":"data: {}","question":"why does nginx crash?","status":"success","thought":"I have the answer","tools_history":[{"input":"get pods -n web","name":"kubectl","observation":"nginx-7d9 0/1 CrashLoopBackOff","thought":"look at the pods"},{"input":"logs nginx-7d9 -n web","name":"kubectl","observation":"open /etc/nginx/conf.d: no such file","thought":"read its logs"},{"input":"get configmap nginx -n web -o yaml","name":"kubectl","observation":"data: {}","thought":"check the config map"}]}"#;
/// The request every call sends.
const REQUEST: &str = r#"{"instructions":"why does nginx crash?","args":"","provider":"openai","baseUrl":"https://api.openai.com/v1","currentModel":"gpt-4o-mini","cluster":"prod","selectedModels":["gpt-4o-mini"]}"#;
/// Requests sent to each target before measuring (connections, caches).
const WARMUP: u64 = 200;

/// What one phase measured.
struct Phase {
    requests: u64,
    elapsed: Duration,
    latency_us: Histogram<u64>,
}

impl Phase {
    fn ms(&self, quantile: f64) -> f64 {
        self.latency_us.value_at_quantile(quantile) as f64 / 1000.0
    }
}

/// Runs the benchmark and prints its table to stdout.
pub async fn run_proxy(config: &Config, args: ProxyBenchArgs) -> anyhow::Result<()> {
    ensure!(args.requests > 0 && args.concurrency > 0, "--requests and --concurrency must be greater than 0");
    let stop = CancellationToken::new();
    let agent = start_stub(stop.clone()).await?;
    let store = store::open(&config.database).await.context("opening the benchmark database")?;
    store.migrate().await.context("migrating the benchmark database")?;
    let before = store.count_interactions().await?;
    let mut builder = AuditLogger::builder(store.clone(), &config.pipeline, &config.limits);
    if let Some(masker) = Masker::from_config(&config.masking)? {
        builder = builder.stage(Arc::new(masker));
    }
    let logger = builder.start();
    let mut proxy_config = config.clone();
    proxy_config.proxy.upstream = Some(format!("http://{agent}"));
    proxy_config.proxy.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let proxy = Proxy::bind(&proxy_config, logger.clone(), |var| std::env::var(var).ok())
        .await?
        .context("the proxy did not start")?;
    let proxied = proxy.local_addr();
    let proxy_task = tokio::spawn(proxy.run_until(stop.clone().cancelled_owned(), Duration::from_secs(10)));

    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "opsagent-audit bench proxy: {} requests per phase, {} concurrent, POST /api/execute ({} B answer), {:?}",
        args.requests,
        args.concurrency,
        ANSWER.len(),
        store.backend()
    )?;
    out.flush()?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).pool_max_idle_per_host(args.concurrency as usize).build(connector);
    load(&client, agent, WARMUP, args.concurrency).await?;
    load(&client, proxied, WARMUP, args.concurrency).await?;
    let direct = load(&client, agent, args.requests, args.concurrency).await?;
    let through = load(&client, proxied, args.requests, args.concurrency).await?;

    stop.cancel();
    proxy_task.await.context("the proxy task failed")?;
    let report = logger.shutdown(Duration::from_secs(600)).await;
    let recorded = store.count_interactions().await? - before;
    store.close().await;

    writeln!(
        out,
        "{:<8} {:>9} {:>9} {:>10} {:>8} {:>8} {:>8}",
        "phase", "requests", "seconds", "req/s", "p50 ms", "p99 ms", "max ms"
    )?;
    for (name, phase) in [("direct", &direct), ("proxy", &through)] {
        writeln!(
            out,
            "{:<8} {:>9} {:>9.2} {:>10.0} {:>8.2} {:>8.2} {:>8.2}",
            name,
            phase.requests,
            phase.elapsed.as_secs_f64(),
            phase.requests as f64 / phase.elapsed.as_secs_f64().max(1e-9),
            phase.ms(0.5),
            phase.ms(0.99),
            phase.latency_us.max() as f64 / 1000.0,
        )?;
    }
    let expected = args.requests + WARMUP;
    writeln!(
        out,
        "overhead: p50 {:+.2} ms, p99 {:+.2} ms; {} of {} proxied requests recorded, {} dropped",
        through.ms(0.5) - direct.ms(0.5),
        through.ms(0.99) - direct.ms(0.99),
        recorded,
        expected,
        report.stats.dropped_total()
    )?;
    writeln!(
        out,
        "proxy_p50_overhead_ms={:.2} proxy_p99_overhead_ms={:.2} direct_p99_ms={:.2} proxy_p99_ms={:.2} proxy_per_s={:.0} recorded={}",
        through.ms(0.5) - direct.ms(0.5),
        through.ms(0.99) - direct.ms(0.99),
        direct.ms(0.99),
        through.ms(0.99),
        through.requests as f64 / through.elapsed.as_secs_f64().max(1e-9),
        recorded
    )?;
    ensure!(recorded == expected, "the proxy recorded {recorded} of {expected} audited requests");
    Ok(())
}

/// Sends `requests` requests to `target`, `concurrency` at a time; their latencies.
async fn load(
    client: &Client<HttpConnector, Full<Bytes>>,
    target: SocketAddr,
    requests: u64,
    concurrency: u64,
) -> anyhow::Result<Phase> {
    let next = Arc::new(AtomicU64::new(0));
    let uri: hyper::Uri = format!("http://{target}/api/execute").parse()?;
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, next, uri) = (client.clone(), next.clone(), uri.clone());
        workers.push(tokio::spawn(async move {
            let mut latency = Histogram::<u64>::new(3)?;
            while next.fetch_add(1, Ordering::Relaxed) < requests {
                let request = hyper::Request::post(uri.clone())
                    .header(hyper::header::CONTENT_TYPE, "application/json")
                    .header("x-api-key", "sk-bench-not-a-real-key")
                    .body(Full::new(Bytes::from_static(REQUEST.as_bytes())))?;
                let sent = Instant::now();
                let response = client.request(request).await?;
                ensure!(response.status() == 200, "answered {}", response.status());
                let body = response.into_body().collect().await?.to_bytes();
                ensure!(body.len() == ANSWER.len(), "a short answer ({} bytes)", body.len());
                latency.record(sent.elapsed().as_micros() as u64)?;
            }
            anyhow::Ok(latency)
        }));
    }
    let mut latency_us = Histogram::<u64>::new(3)?;
    for worker in workers {
        latency_us.add(worker.await.context("a load worker panicked")??)?;
    }
    Ok(Phase { requests, elapsed: started.elapsed(), latency_us })
}

/// The stub agent: answers every request with [`ANSWER`], as gin does.
async fn start_stub(stop: CancellationToken) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding the stub agent")?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => continue,
                },
                () = stop.cancelled() => return,
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|request: hyper::Request<hyper::body::Incoming>| async move {
                    // Read the request as the agent would before answering.
                    let _ = request.into_body().collect().await;
                    let mut response = hyper::Response::new(Full::new(Bytes::from_static(ANSWER.as_bytes())));
                    response
                        .headers_mut()
                        .insert(hyper::header::CONTENT_TYPE, "application/json; charset=utf-8".parse().expect("valid"));
                    Ok::<_, Infallible>(response)
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Ok(address)
}
