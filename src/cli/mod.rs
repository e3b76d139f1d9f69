//! The command line: `serve`, `migrate`, `query`, `show`, `stats`, `export`, `verify`,
//! `doctor`, `retention run`, `mask --test`, `risk --test`, `bench`, `worker`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::api::{Application, WorkerApp};
use crate::config::{redact_url, CliOverrides, Config, LogFormat};
use crate::model::id_from_key;
use crate::store::{self, Store};

mod doctor;
mod read;
mod retention;
mod risk;
mod verify;

pub use doctor::{DoctorArgs, DoctorFormat};
pub use read::{ExportArgs, FilterArgs, ListFormat, QueryArgs, StatsArgs, StatsFormat};
pub use retention::{RetentionCommand, RetentionRunArgs};
pub use risk::{RiskArgs, RiskFormat};
pub use verify::VerifyArgs;

/// The audit log for LLM operations agents.
#[derive(Debug, Parser)]
#[command(name = "opsagent-audit", version, about)]
pub struct Cli {
    /// YAML configuration file (its `audit:` section is read).
    #[arg(long, global = true, env = "AUDIT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Database: postgres://… or sqlite://PATH [default: sqlite://opsagent-audit.db].
    #[arg(long, global = true, env = "AUDIT_DATABASE_URL", value_name = "URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Log format.
    #[arg(long, global = true, value_enum, env = "AUDIT_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server (ingest API, reads, health).
    Serve(ServeArgs),
    /// Distributed mode's writer: consume records from RabbitMQ
    /// (`audit.distributed.*`) and write them to the database, acknowledging each only
    /// after its transaction committed. Serves `/metrics`, `/healthz` and `/readyz`.
    Worker(WorkerArgs),
    /// Apply database migrations and exit.
    Migrate,
    /// List interactions, newest first, with filters.
    Query(QueryArgs),
    /// Counts, error rates and latency percentiles by model, user, status, cluster,
    /// provider or tool, optionally per hour or day.
    Stats(StatsArgs),
    /// Write matching interactions to a file: csv, json, ndjson or parquet.
    Export(ExportArgs),
    /// Show what the masking rules replace in a file: the masked text on stdout, the
    /// count per rule on stderr.
    Mask {
        /// The file to try the rules on (`-`: standard input).
        #[arg(long = "test", value_name = "FILE")]
        file: PathBuf,
        /// Also the personal-data rules (e-mail, phone, Chinese ID, IP addresses).
        #[arg(long)]
        pii: bool,
    },
    /// Explain how a tool call is classified: the commands parsed from it, the rules
    /// they trigger and the verdict (`risk --test "kubectl delete pod x"`).
    Risk(RiskArgs),
    /// Check the hash chain: proves no record was edited, removed or added outside
    /// retention. One line per day (with its head hash), exit status 1 if anything is broken.
    Verify(VerifyArgs),
    /// Consistency checks of the database and the spool (orphans, sequence gaps, the hash
    /// chain, migrations, unreadable spool files, disk space); `--repair` fixes what is
    /// safe. Exit status 1 when a check fails.
    Doctor(DoctorArgs),
    /// Retention: delete (and archive, when configured) the days older than
    /// `audit.retention.days`.
    #[command(subcommand)]
    Retention(RetentionCommand),
    /// Print one interaction as JSON.
    Show {
        /// The interaction's id.
        interaction_id: String,
    },
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

/// `serve` options.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:8427].
    #[arg(long, env = "AUDIT_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Do not apply migrations at start-up.
    #[arg(long)]
    pub no_migrate: bool,
    /// Allow listening beyond loopback without API tokens.
    #[arg(long)]
    pub insecure: bool,
    /// Run the auditing proxy in front of the OpsAgent at this URL (`http://host:port`);
    /// overrides `audit.proxy.upstream`.
    #[arg(long, value_name = "URL")]
    pub proxy_upstream: Option<String>,
    /// Address the auditing proxy listens on [default: 127.0.0.1:8428]; overrides
    /// `audit.proxy.listen`.
    #[arg(long, value_name = "ADDR")]
    pub proxy_listen: Option<SocketAddr>,
}

/// `worker` options.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Address of the worker's `/metrics`, `/healthz` and `/readyz` [default:
    /// 127.0.0.1:8429]; overrides `audit.distributed.worker_listen`.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
}

/// `bench` subcommands.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Push the standard workload through the pipeline and compare with plain COPY.
    Ingest(crate::bench::IngestBenchArgs),
    /// A database outage: records arriving while it is down (spooled), then the drain.
    Outage(crate::bench::OutageBenchArgs),
    /// Reads at scale (PostgreSQL): list latency by filter, 7-day stats, and an export
    /// against `COPY … TO STDOUT`, with memory sampled as the export grows.
    Query(crate::bench::QueryBenchArgs),
    /// Masking throughput on the standard workload (no database).
    Mask(crate::bench::MaskBenchArgs),
    /// Bytes per interaction at rest (PostgreSQL, with and without indexes) and in the
    /// Parquet archive.
    Storage(crate::bench::StorageBenchArgs),
    /// Retention at scale (PostgreSQL): a batched cleanup of the oldest half of the
    /// data while a producer inserts, with its insert latency against a baseline.
    Retention(crate::bench::RetentionBenchArgs),
    /// The auditing proxy's overhead: latency calling a stub agent directly and through
    /// the proxy, in the same run.
    Proxy(crate::bench::ProxyBenchArgs),
    /// The standard workload as OpenTelemetry traces to `POST /v1/traces` of a server in
    /// this process, against the same records to `POST /api/v1/interactions`.
    Otlp(crate::bench::OtlpBenchArgs),
    /// Distributed mode (PostgreSQL, RabbitMQ): serve's pipeline → RabbitMQ → 1 and 2
    /// workers, against direct mode and `COPY` in the same run.
    Distributed(crate::bench::DistributedBenchArgs),
}

impl Command {
    /// True for commands whose output is their answer (`query`, `stats`, `export`,
    /// `verify`, `doctor`, `show`), which log only warnings unless `RUST_LOG` says otherwise.
    pub fn is_report(&self) -> bool {
        matches!(
            self,
            Command::Query(_)
                | Command::Stats(_)
                | Command::Export(_)
                | Command::Verify(_)
                | Command::Doctor(_)
                | Command::Retention(_)
                | Command::Show { .. }
                | Command::Mask { .. }
                | Command::Risk(_)
        )
    }
}

impl Cli {
    /// Loads the configuration these arguments point at.
    pub fn load_config(&self) -> anyhow::Result<Config> {
        let (listen, proxy_upstream, proxy_listen) = match &self.command {
            Command::Serve(args) => (args.listen, args.proxy_upstream.clone(), args.proxy_listen),
            _ => (None, None, None),
        };
        let worker_listen = match &self.command {
            Command::Worker(args) => args.listen,
            _ => None,
        };
        let overrides = CliOverrides {
            database_url: self.database_url.clone(),
            listen,
            proxy_upstream,
            proxy_listen,
            worker_listen,
        };
        let mut config = Config::load(self.config.as_deref(), &overrides).context("loading configuration")?;
        if let Some(format) = self.log_format {
            config.server.log_format = format;
        }
        Ok(config)
    }
}

/// Runs a parsed command line.
pub async fn run(cli: Cli, config: Config) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(config, args).await,
        Command::Worker(_) => worker(config).await,
        Command::Migrate => {
            let store = open_store(&config).await?;
            store.migrate().await.context("applying migrations")?;
            tracing::info!("migrations applied");
            store.close().await;
            Ok(())
        }
        Command::Query(args) => with_store(&config, |store| read::run_query(store, args)).await,
        Command::Stats(args) => with_store(&config, |store| read::run_stats(store, args)).await,
        Command::Export(args) => with_store(&config, |store| read::run_export(store, args)).await,
        Command::Verify(args) => with_store(&config, |store| verify::run_verify(store, args)).await,
        Command::Doctor(args) => with_store(&config, |store| doctor::run_doctor(store, &config.spool, args)).await,
        Command::Retention(RetentionCommand::Run(args)) => {
            with_store(&config, |store| retention::run_retention(store, &config, args)).await
        }
        Command::Mask { file, pii } => mask_test(&file, pii, &config.masking),
        Command::Risk(args) => risk::run_risk_test(&config.risk, args),
        Command::Show { interaction_id } => {
            let store = open_store(&config).await?;
            let record = store
                .get_interaction(id_from_key(&interaction_id))
                .await
                .with_context(|| format!("reading interaction {interaction_id}"))?;
            let mut out = std::io::stdout().lock();
            serde_json::to_writer_pretty(&mut out, &record)?;
            writeln!(out)?;
            Ok(())
        }
        Command::Bench(BenchCommand::Ingest(args)) => crate::bench::run_ingest(&config, args).await,
        Command::Bench(BenchCommand::Outage(args)) => crate::bench::run_outage(&config, args).await,
        Command::Bench(BenchCommand::Query(args)) => crate::bench::run_query(&config, args).await,
        Command::Bench(BenchCommand::Mask(args)) => crate::bench::run_mask(args),
        Command::Bench(BenchCommand::Storage(args)) => crate::bench::run_storage(&config, args).await,
        Command::Bench(BenchCommand::Retention(args)) => crate::bench::run_retention(&config, args).await,
        Command::Bench(BenchCommand::Proxy(args)) => crate::bench::run_proxy(&config, args).await,
        Command::Bench(BenchCommand::Otlp(args)) => crate::bench::run_otlp(&config, args).await,
        Command::Bench(BenchCommand::Distributed(args)) => crate::bench::run_distributed(&config, args).await,
    }
}

/// `mask --test FILE`: the configured rules (custom ones included; PII rules when
/// configured or asked for), whether or not masking is enabled.
fn mask_test(file: &std::path::Path, pii: bool, config: &crate::config::MaskingConfig) -> anyhow::Result<()> {
    use std::io::Read as _;
    let mut text = String::new();
    if file.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut text).context("reading standard input")?;
    } else {
        text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    }
    let masker = crate::mask::Masker::new(pii || config.pii, &config.rules)?;
    let masked = masker.mask(&text);
    std::io::stdout().lock().write_all(masked.as_bytes())?;
    let mut err = std::io::stderr().lock();
    let counts: Vec<String> =
        masker.counts().into_iter().filter(|(_, n)| *n > 0).map(|(rule, n)| format!("{rule}: {n}")).collect();
    if counts.is_empty() {
        writeln!(err, "nothing masked")?;
    } else {
        writeln!(err, "masked: {}", counts.join(", "))?;
    }
    Ok(())
}

/// Runs `command` against the configured store, closed afterwards whatever happened.
async fn with_store<F, Fut>(config: &Config, command: F) -> anyhow::Result<()>
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let store = open_store(config).await?;
    let result = command(store.clone()).await;
    store.close().await;
    result
}

/// Opens the configured store.
async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let url = config.database.resolved_url()?;
    // The URL is resolved once (it may read a password file) and named in the error.
    store::connect(&url, &config.database).await.with_context(|| format!("opening database {}", redact_url(&url)))
}

async fn serve(mut config: Config, args: ServeArgs) -> anyhow::Result<()> {
    if args.no_migrate {
        config.database.migrate_on_start = false;
    }
    let app = Application::build(config, args.insecure).await?;
    app.run_until(shutdown_signal()).await?;
    Ok(())
}

async fn worker(config: Config) -> anyhow::Result<()> {
    let app = WorkerApp::build(&config).await?;
    if let Some(address) = app.local_addr() {
        tracing::info!(address = %address, "worker's /metrics, /healthz and /readyz listening");
    }
    let report = app.run_until(shutdown_signal()).await?;
    if report.left_in_queue > 0 {
        tracing::warn!(
            deliveries = report.left_in_queue,
            "the batch in hand was not written before the shutdown deadline; the broker gives it to another worker"
        );
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = terminate => tracing::info!("SIGTERM received"),
    }
}
