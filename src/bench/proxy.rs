//! `bench proxy`: what the auditing proxy adds to an agent call. A stub agent runs in
//! process (answering `/api/execute` as OpsAgent does, trace included); the same
//! requests are sent to it directly and through the proxy, `--concurrency` at a time,
//! in the same run, and the latency percentiles compared. Every proxied request is an
//! audited one, recorded through the real pipeline into the configured database.
//!
//! Two measurements, because they answer different questions:
//! - **Overhead**: the stub takes `--agent-delay-ms` to answer, as an agent that asks a
//!   model does (OpsAgent takes seconds). With `--concurrency` calls in flight the load
//!   is then paced, `concurrency / delay` calls a second, and the difference between
//!   the two latency distributions is what the proxy adds to one call.
//! - **Capacity**: the stub answers at once and the clients send as fast as answers
//!   come. This measures requests per second, not overhead: in a closed loop at
//!   saturation latency is concurrency ÷ throughput (Little's law), so the proxied
//!   phase's latency is mostly its lower throughput — each proxied call also writes an
//!   audit record, on the same cores.
//!
//! The last line printed is machine-readable:
//! `proxy_p50_overhead_ms=… proxy_p99_overhead_ms=… direct_p99_ms=… proxy_p99_ms=… proxy_per_s=… direct_capacity_per_s=… proxy_capacity_per_s=… recorded=…`.

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
    /// How long the stub agent takes to answer in the overhead phases, milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub agent_delay_ms: u64,
    /// Requests per phase of the capacity measurement (0: skip it).
    #[arg(long, default_value_t = 5_000)]
    pub capacity_requests: u64,
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

    fn per_s(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs the benchmark and prints its table to stdout.
pub async fn run_proxy(config: &Config, args: ProxyBenchArgs) -> anyhow::Result<()> {
    ensure!(args.requests > 0 && args.concurrency > 0, "--requests and --concurrency must be greater than 0");
    let stop = CancellationToken::new();
    let delay = Arc::new(AtomicU64::new(args.agent_delay_ms));
    let agent = start_stub(stop.clone(), delay.clone()).await?;
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
    // The load's connections must all fit under the limit the proxy enforces.
    proxy_config.limits.max_connections = proxy_config.limits.max_connections.max(args.concurrency as usize * 2);
    let proxy = Proxy::bind(&proxy_config, logger.clone(), |var| std::env::var(var).ok())
        .await?
        .context("the proxy did not start")?;
    let proxied = proxy.local_addr();
    let proxy_task = tokio::spawn(proxy.run_until(stop.clone().cancelled_owned(), Duration::from_secs(10)));

    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "opsagent-audit bench proxy: {} requests per phase, {} concurrent, the agent answering after {} ms \
         (capacity: {} requests, at once), POST /api/execute ({} B answer), {:?}",
        args.requests,
        args.concurrency,
        args.agent_delay_ms,
        args.capacity_requests,
        ANSWER.len(),
        store.backend()
    )?;
    out.flush()?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).pool_max_idle_per_host(args.concurrency as usize).build(connector);
    let warmup = WARMUP.min(args.requests);
    let think = Duration::from_millis(args.agent_delay_ms);
    load(&client, agent, warmup, args.concurrency, think).await?;
    load(&client, proxied, warmup, args.concurrency, think).await?;
    let direct = load(&client, agent, args.requests, args.concurrency, think).await?;
    let through = load(&client, proxied, args.requests, args.concurrency, think).await?;
    let capacity = if args.capacity_requests > 0 {
        delay.store(0, Ordering::Relaxed);
        let direct = load(&client, agent, args.capacity_requests, args.concurrency, Duration::ZERO).await?;
        let through = load(&client, proxied, args.capacity_requests, args.concurrency, Duration::ZERO).await?;
        Some((direct, through))
    } else {
        None
    };

    stop.cancel();
    proxy_task.await.context("the proxy task failed")?;
    let report = logger.shutdown(Duration::from_secs(600)).await;
    let recorded = store.count_interactions().await? - before;
    store.close().await;

    writeln!(
        out,
        "{:<16} {:>9} {:>9} {:>10} {:>8} {:>8} {:>8}",
        "phase", "requests", "seconds", "req/s", "p50 ms", "p99 ms", "max ms"
    )?;
    let mut phases = vec![("direct", &direct), ("proxy", &through)];
    if let Some((direct, through)) = &capacity {
        phases.extend([("capacity direct", direct), ("capacity proxy", through)]);
    }
    for (name, phase) in phases {
        writeln!(
            out,
            "{:<16} {:>9} {:>9.2} {:>10.0} {:>8.2} {:>8.2} {:>8.2}",
            name,
            phase.requests,
            phase.elapsed.as_secs_f64(),
            phase.per_s(),
            phase.ms(0.5),
            phase.ms(0.99),
            phase.latency_us.max() as f64 / 1000.0,
        )?;
    }
    let expected = args.requests + warmup + capacity.as_ref().map_or(0, |(_, through)| through.requests);
    writeln!(
        out,
        "overhead at {} concurrent, agent {} ms: p50 {:+.2} ms, p99 {:+.2} ms; {} of {} proxied requests recorded, {} dropped",
        args.concurrency,
        args.agent_delay_ms,
        through.ms(0.5) - direct.ms(0.5),
        through.ms(0.99) - direct.ms(0.99),
        recorded,
        expected,
        report.stats.dropped_total()
    )?;
    let (direct_capacity, proxy_capacity) =
        capacity.as_ref().map_or((0.0, 0.0), |(direct, through)| (direct.per_s(), through.per_s()));
    writeln!(
        out,
        "proxy_p50_overhead_ms={:.2} proxy_p99_overhead_ms={:.2} direct_p99_ms={:.2} proxy_p99_ms={:.2} proxy_per_s={:.0} \
         direct_capacity_per_s={:.0} proxy_capacity_per_s={:.0} recorded={}",
        through.ms(0.5) - direct.ms(0.5),
        through.ms(0.99) - direct.ms(0.99),
        direct.ms(0.99),
        through.ms(0.99),
        through.per_s(),
        direct_capacity,
        proxy_capacity,
        recorded
    )?;
    ensure!(recorded == expected, "the proxy recorded {recorded} of {expected} audited requests");
    Ok(())
}

/// Sends `requests` requests to `target`, `concurrency` at a time; their latencies.
///
/// The workers start `stagger / concurrency` apart: with an agent that takes `stagger`
/// to answer, calls then arrive evenly spread, as independent users' do, rather than in
/// bursts of `concurrency` at once that would measure a burst's queueing.
async fn load(
    client: &Client<HttpConnector, Full<Bytes>>,
    target: SocketAddr,
    requests: u64,
    concurrency: u64,
    stagger: Duration,
) -> anyhow::Result<Phase> {
    let next = Arc::new(AtomicU64::new(0));
    let uri: hyper::Uri = format!("http://{target}/api/execute").parse()?;
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..concurrency {
        let (client, next, uri) = (client.clone(), next.clone(), uri.clone());
        let start_after = stagger.mul_f64(worker as f64 / concurrency as f64);
        workers.push(tokio::spawn(async move {
            tokio::time::sleep(start_after).await;
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

/// The stub agent: answers every request with [`ANSWER`], as gin does, after `delay`
/// milliseconds (read per request, so phases can change it).
async fn start_stub(stop: CancellationToken, delay: Arc<AtomicU64>) -> anyhow::Result<SocketAddr> {
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
            let delay = delay.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let delay = Duration::from_millis(delay.load(Ordering::Relaxed));
                    async move {
                        // Read the request as the agent would before answering.
                        let _ = request.into_body().collect().await;
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        let mut response = hyper::Response::new(Full::new(Bytes::from_static(ANSWER.as_bytes())));
                        response.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            "application/json; charset=utf-8".parse().expect("valid"),
                        );
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Ok(address)
}
