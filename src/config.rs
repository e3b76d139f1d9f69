//! Configuration: the seed's `audit:` YAML section, read unchanged, plus the keys this
//! product adds, `AUDIT_…` environment overrides and command-line flags.
//!
//! Precedence, lowest first: built-in defaults, the YAML file, environment variables, CLI
//! flags. The YAML file may be a whole OpsAgent `config.yaml`: only its `audit:` section is
//! read, but inside it every key must be known, so a typo is a start-up error naming the
//! key instead of a setting silently ignored.
//!
//! Every leaf key `audit.a.b_c` can be set from the environment as `AUDIT_A_B_C`; values
//! are read as YAML scalars, so `AUDIT_ASYNC_WORKERS=4` is a number. Secrets (the database
//! password) may come from the environment or a file and are redacted in every `Debug`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value;

/// The database used when nothing is configured: an embedded SQLite file.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://opsagent-audit.db";
/// The address `serve` listens on when nothing is configured.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8427";
/// The address the auditing proxy listens on when nothing is configured.
pub const DEFAULT_PROXY_LISTEN: &str = "127.0.0.1:8428";
/// The OpsAgent endpoints the proxy audits when nothing is configured.
pub const DEFAULT_PROXY_PATHS: [&str; 3] = ["/api/execute", "/api/diagnose", "/api/analyze"];

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {cause}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong (in the message, not a separate `source()`, so a chain
        /// printer shows it once).
        cause: std::io::Error,
    },
    /// The file is not YAML.
    #[error("config file {path} is not valid YAML: {cause}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        cause: serde_yaml_ng::Error,
    },
    /// A key is unknown or its value has the wrong type.
    #[error("invalid configuration key `{key}`{origin}: {message}")]
    Key {
        /// Dotted path of the key, e.g. `audit.async.workers`.
        key: String,
        /// Where the value came from, e.g. ` (from AUDIT_ASYNC_WORKERS)`.
        origin: String,
        /// What is wrong with it.
        message: String,
    },
    /// A secret file could not be read.
    #[error("cannot read {what} from {path}: {cause}")]
    SecretFile {
        /// Which secret.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong (in the message, not a separate `source()`, so a chain
        /// printer shows it once).
        cause: std::io::Error,
    },
}

/// The whole configuration file; only `audit:` is ours, everything else is ignored.
#[derive(Debug, Default, Deserialize)]
struct FileRoot {
    #[serde(default)]
    audit: Option<Value>,
}

/// The `audit:` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// When false, capture is a cheap no-op and the ingest API refuses records.
    pub enabled: bool,
    /// Where records are stored.
    pub database: DatabaseConfig,
    /// The asynchronous pipeline.
    #[serde(rename = "async")]
    pub pipeline: AsyncConfig,
    /// How long records are kept.
    pub retention: RetentionConfig,
    /// The HTTP server.
    pub server: ServerConfig,
    /// Size limits on what is accepted.
    pub limits: LimitsConfig,
    /// The disk spool records go to when the database is down or slow.
    pub spool: SpoolConfig,
    /// Secrets (and optionally personal data) replaced before a record is kept.
    pub masking: MaskingConfig,
    /// API tokens and their roles.
    pub auth: AuthConfig,
    /// Risk classification of tool calls at ingest.
    pub risk: RiskConfig,
    /// Background detection of unusual behaviour.
    pub anomalies: AnomaliesConfig,
    /// Where detected anomalies are sent.
    pub alerts: AlertsConfig,
    /// The auditing reverse proxy in front of an OpsAgent.
    pub proxy: ProxyConfig,
    /// The OpenTelemetry trace receiver (`POST /v1/traces`).
    pub otlp: OtlpConfig,
    /// Distributed mode: publish to RabbitMQ instead of writing the database.
    pub distributed: DistributedConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            enabled: true,
            database: DatabaseConfig::default(),
            pipeline: AsyncConfig::default(),
            retention: RetentionConfig::default(),
            server: ServerConfig::default(),
            limits: LimitsConfig::default(),
            spool: SpoolConfig::default(),
            masking: MaskingConfig::default(),
            auth: AuthConfig::default(),
            risk: RiskConfig::default(),
            anomalies: AnomaliesConfig::default(),
            alerts: AlertsConfig::default(),
            proxy: ProxyConfig::default(),
            otlp: OtlpConfig::default(),
            distributed: DistributedConfig::default(),
        }
    }
}

/// `audit.database`: the seed's connection keys, or one `url`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Full URL (`postgres://…` or `sqlite://PATH`); wins over the separate keys.
    pub url: Option<String>,
    /// `postgres` or `sqlite` (the seed's key).
    pub driver: Option<String>,
    /// PostgreSQL host.
    pub host: Option<String>,
    /// PostgreSQL port.
    pub port: Option<u16>,
    /// PostgreSQL user.
    pub user: Option<String>,
    /// Password. Prefer `AUDIT_DATABASE_PASSWORD` or `password_file`.
    pub password: Option<String>,
    /// File holding the password (e.g. a mounted Kubernetes Secret).
    pub password_file: Option<PathBuf>,
    /// Database name.
    pub dbname: Option<String>,
    /// `disable`, `prefer`, `require`, `verify-ca` or `verify-full`.
    pub sslmode: Option<String>,
    /// Largest number of open connections.
    pub max_open_conns: u32,
    /// Accepted for the seed's configs; sqlx's pool closes idle connections by timeout.
    pub max_idle_conns: u32,
    /// Connections are recycled after this long (`1h`, `30m`, …).
    #[serde(with = "humantime_serde_opt")]
    pub conn_max_lifetime: Option<Duration>,
    /// Apply migrations when `serve` starts.
    pub migrate_on_start: bool,
    /// Hash-chain committed records so `verify` can prove nothing was edited or removed
    /// outside retention (`AUDIT_DATABASE_HASH_CHAIN`). Off, records are written unchained
    /// and `verify` cannot vouch for them.
    pub hash_chain: bool,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: None,
            driver: None,
            host: None,
            port: None,
            user: None,
            password: None,
            password_file: None,
            dbname: None,
            sslmode: None,
            max_open_conns: 10,
            max_idle_conns: 5,
            conn_max_lifetime: Some(Duration::from_secs(3600)),
            migrate_on_start: true,
            hash_chain: true,
        }
    }
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("driver", &self.driver)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .field("password_file", &self.password_file)
            .field("dbname", &self.dbname)
            .field("sslmode", &self.sslmode)
            .field("max_open_conns", &self.max_open_conns)
            .field("max_idle_conns", &self.max_idle_conns)
            .field("conn_max_lifetime", &self.conn_max_lifetime)
            .field("migrate_on_start", &self.migrate_on_start)
            .field("hash_chain", &self.hash_chain)
            .finish()
    }
}

impl DatabaseConfig {
    /// The URL to connect to: `url` if set, else one built from the seed's keys, else the
    /// embedded SQLite default. The password comes from `password`, else `password_file`.
    pub fn resolved_url(&self) -> Result<String, ConfigError> {
        if let Some(url) = &self.url {
            return Ok(url.clone());
        }
        let driver = self.driver.as_deref().unwrap_or(if self.host.is_some() { "postgres" } else { "sqlite" });
        match driver {
            "postgres" | "postgresql" | "pgx" => {
                let password = match (&self.password, &self.password_file) {
                    (Some(p), _) => Some(p.clone()),
                    (None, Some(path)) => Some(
                        std::fs::read_to_string(path)
                            .map_err(|cause| ConfigError::SecretFile {
                                what: "database password",
                                path: path.clone(),
                                cause,
                            })?
                            .trim_end_matches(['\r', '\n'])
                            .to_string(),
                    ),
                    (None, None) => None,
                };
                let user = self.user.as_deref().unwrap_or("postgres");
                let auth = match password {
                    Some(p) => format!("{}:{}@", percent_encode(user), percent_encode(&p)),
                    None => format!("{}@", percent_encode(user)),
                };
                Ok(format!(
                    "postgres://{auth}{}:{}/{}?sslmode={}",
                    self.host.as_deref().unwrap_or("localhost"),
                    self.port.unwrap_or(5432),
                    self.dbname.as_deref().unwrap_or("opsagent"),
                    self.sslmode.as_deref().unwrap_or("prefer"),
                ))
            }
            "sqlite" | "sqlite3" => Ok(match &self.dbname {
                Some(name) => format!("sqlite://{name}"),
                None => DEFAULT_DATABASE_URL.to_string(),
            }),
            other => Err(ConfigError::Key {
                key: "audit.database.driver".into(),
                origin: String::new(),
                message: format!("unknown driver `{other}`, expected `postgres` or `sqlite`"),
            }),
        }
    }
}

/// `audit.async`: the pipeline between capture and the database.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AsyncConfig {
    /// Concurrent batch writers.
    pub workers: usize,
    /// Records held in memory before the oldest is dropped.
    pub queue_size: usize,
    /// Records per database transaction.
    pub batch_size: usize,
    /// A partial batch is written after this long.
    pub batch_interval_ms: u64,
    /// How long shutdown may take to drain the queue into the database; what is left
    /// then goes to the spool.
    #[serde(with = "humantime_serde_req")]
    pub shutdown_timeout: Duration,
    /// When the HTTP ingest API answers `202`: `durable` (on disk or committed) or
    /// `queued` (taken into memory).
    pub ack: AckMode,
    /// How long a durable acknowledgement may take before the request fails with `503`.
    #[serde(with = "humantime_serde_req")]
    pub ack_timeout: Duration,
}

/// When a producer's record counts as taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckMode {
    /// Once it is in the memory queue (fire and forget, as the seed's library).
    Queued,
    /// Once it is fsync'd in the spool or committed to the database.
    Durable,
}

/// `audit.spool`: the disk spool (write-ahead log and overflow of the memory queue).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Without a spool, records live only in memory until committed.
    pub enabled: bool,
    /// Directory of the segment files; one process at a time (it is locked).
    pub dir: PathBuf,
    /// Most bytes the segment files may take; then `full_policy` applies.
    pub max_bytes: u64,
    /// What to do when the spool is full.
    pub full_policy: FullPolicy,
    /// A segment file is closed and a new one started past this size.
    pub segment_bytes: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            enabled: true,
            dir: PathBuf::from("opsagent-audit-spool"),
            max_bytes: 1024 * 1024 * 1024,
            full_policy: FullPolicy::DropOldest,
            segment_bytes: 16 * 1024 * 1024,
        }
    }
}

/// What a full spool gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FullPolicy {
    /// Delete the oldest segment (the seed's choice: recent records matter most).
    DropOldest,
    /// Refuse the new record.
    DropNewest,
    /// Durable producers wait for room; fire-and-forget records beyond a bounded
    /// backlog are dropped, since `log` never blocks.
    Block,
}

impl Default for AsyncConfig {
    fn default() -> Self {
        AsyncConfig {
            workers: 2,
            queue_size: 50_000,
            batch_size: 500,
            batch_interval_ms: 200,
            shutdown_timeout: Duration::from_secs(30),
            ack: AckMode::Durable,
            ack_timeout: Duration::from_secs(30),
        }
    }
}

/// `audit.retention`: the seed's keys (`days`, `auto_cleanup`, `cleanup_time`) and where
/// and how expired days go (`archive_dir`, `time_zone`, `batch_size`). Applied by
/// `retention run` and, with `auto_cleanup`, by `serve` once a day.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Days to keep records; 0 keeps them forever.
    pub days: u32,
    /// Delete expired records automatically (`serve` runs retention daily).
    pub auto_cleanup: bool,
    /// Time of day (`HH:MM`) for the automatic clean-up, in `time_zone`.
    pub cleanup_time: String,
    /// IANA zone of `cleanup_time` (`Europe/Berlin`, `Asia/Shanghai`); absent: the
    /// machine's local time.
    pub time_zone: Option<String>,
    /// When set, each expiring day is written to `interactions-YYYY-MM-DD.parquet` here
    /// and read back before it is deleted.
    pub archive_dir: Option<PathBuf>,
    /// Interactions deleted per statement (each its own short transaction), so ingest
    /// is never blocked for long.
    pub batch_size: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            days: 90,
            auto_cleanup: false,
            cleanup_time: "03:00".into(),
            time_zone: None,
            archive_dir: None,
            batch_size: 5000,
        }
    }
}

impl RetentionConfig {
    /// `cleanup_time` as a time of day (validated at load).
    pub fn cleanup_time_of_day(&self) -> Result<chrono::NaiveTime, ConfigError> {
        let t = &self.cleanup_time;
        t.split_once(':')
            .and_then(|(h, m)| Some((h.parse::<u32>().ok()?, m.parse::<u32>().ok()?)))
            .filter(|_| t.len() == 5)
            .and_then(|(h, m)| chrono::NaiveTime::from_hms_opt(h, m, 0))
            .ok_or_else(|| {
                invalid("audit.retention.cleanup_time".into(), format!("`{t}` is not a time of day as HH:MM"))
            })
    }

    /// `time_zone` parsed (validated at load); `None`: the machine's local time.
    pub fn zone(&self) -> Result<Option<chrono_tz::Tz>, ConfigError> {
        match &self.time_zone {
            None => Ok(None),
            Some(name) => name.parse::<chrono_tz::Tz>().map(Some).map_err(|_| {
                invalid(
                    "audit.retention.time_zone".into(),
                    format!("`{name}` is not an IANA time zone name (such as `Europe/Berlin` or `UTC`)"),
                )
            }),
        }
    }
}

/// `audit.server`: the HTTP server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Log format: `text` or `json`.
    pub log_format: LogFormat,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: DEFAULT_LISTEN.parse().expect("default listen address is valid"),
            log_format: LogFormat::Text,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `audit.limits`: bounds on what one request or record may carry, and on what one
/// client may hold of the server (time, connections).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request body accepted by the ingest API (413 beyond).
    pub max_body_bytes: usize,
    /// Most records in one ingest request.
    pub max_records_per_request: usize,
    /// Text fields longer than this are truncated with a visible marker.
    pub max_field_bytes: usize,
    /// Most thoughts one record may carry (the record is rejected, 422, beyond).
    pub max_thoughts_per_record: usize,
    /// Most tool calls one record may carry (the record is rejected, 422, beyond).
    pub max_tool_calls_per_record: usize,
    /// Deepest nesting of objects and arrays inside a record's `attributes`; a flat map
    /// is depth 1 (the record is rejected, 422, beyond).
    pub max_attributes_depth: usize,
    /// Longest a request may take from its headers being read to its answer being
    /// ready, reading the body included (408 beyond). A response body that is already
    /// streaming (an export download) is not cut.
    #[serde(with = "humantime_serde_req")]
    pub request_timeout: Duration,
    /// Longest a client may take to send a request's headers, and the longest an idle
    /// keep-alive connection waits for the next request; the connection is closed then.
    #[serde(with = "humantime_serde_req")]
    pub header_read_timeout: Duration,
    /// Most TCP connections served at once; one more is answered `503` and closed.
    pub max_connections: usize,
    /// Requests per second one API token may make (`429` beyond); `0`: unlimited.
    /// Applies only when tokens are configured.
    pub requests_per_second: u32,
    /// Requests a token may make in a burst above that rate; `0`: the same as the rate.
    pub request_burst: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_body_bytes: 16 * 1024 * 1024,
            max_records_per_request: 10_000,
            max_field_bytes: 1024 * 1024,
            max_thoughts_per_record: 1000,
            max_tool_calls_per_record: 1000,
            max_attributes_depth: 16,
            request_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            max_connections: 1024,
            requests_per_second: 200,
            request_burst: 400,
        }
    }
}

/// `audit.otlp`: the OTLP/HTTP receiver, which assembles the spans of one trace into one
/// interaction.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpConfig {
    /// Serve `POST /v1/traces` and `POST /v1/logs` (404 when off).
    pub enabled: bool,
    /// A trace is audited once its root span has arrived and no span of it came for this
    /// long (children and the root of one trace often arrive in separate exports).
    #[serde(with = "humantime_serde_req")]
    pub quiet_period: Duration,
    /// A trace whose root never comes is audited this long after its first span, marked
    /// incomplete (`attributes.otlp.incomplete`).
    #[serde(with = "humantime_serde_req")]
    pub trace_timeout: Duration,
    /// Most spans held while their trace is incomplete; beyond, exports are answered
    /// `503` with `Retry-After` (nothing is dropped).
    pub max_pending_spans: usize,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        OtlpConfig {
            enabled: true,
            quiet_period: Duration::from_secs(2),
            trace_timeout: Duration::from_secs(300),
            max_pending_spans: 100_000,
        }
    }
}

/// `audit.masking`: what is replaced in a record's text before it is queued, spooled or
/// stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaskingConfig {
    /// Mask secrets (API keys, tokens, passwords, private keys, Secret manifests…).
    /// On by default; turning it off stores what agents send verbatim.
    pub enabled: bool,
    /// Also mask personal data: e-mail addresses, phone numbers, Chinese resident ID
    /// numbers, and truncate IP addresses.
    pub pii: bool,
    /// Rules of your own, applied after the built-in ones.
    pub rules: Vec<CustomRule>,
}

impl Default for MaskingConfig {
    fn default() -> Self {
        MaskingConfig { enabled: true, pii: false, rules: Vec::new() }
    }
}

/// A masking rule from configuration: its name, pattern and replacement (default: the
/// marker naming it, `[MASKED:<name>]`). A capture group named `secret`, if present, is
/// what is replaced; otherwise the whole match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomRule {
    /// Name shown in the marker and the metrics: lowercase letters, digits and `_`.
    pub name: String,
    /// The pattern (Rust `regex` syntax).
    pub regex: String,
    /// Replacement text; default `[MASKED:<name>]`.
    #[serde(default)]
    pub replacement: Option<String>,
}

/// `audit.risk`: how tool calls are classified at ingest (after masking, before the
/// queue), by the built-in rules, then `rules`, with `overrides` changing any rule's level.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RiskConfig {
    /// Classify every tool call (on by default). Off, the levels a producer sends are
    /// stored as they are (absent: `none`).
    pub enabled: bool,
    /// Rules of your own, checked after the built-in ones; the highest level wins.
    pub rules: Vec<RiskRuleConfig>,
    /// A level for any rule by name, built-in or custom (`kubectl_exec: medium`).
    pub overrides: BTreeMap<String, crate::model::RiskLevel>,
}

impl Default for RiskConfig {
    fn default() -> Self {
        RiskConfig { enabled: true, rules: Vec::new(), overrides: BTreeMap::new() }
    }
}

/// A risk rule from configuration: a tool call whose tool name matches `tool` (any tool
/// when absent) and whose input matches `pattern` gets `level`, named `name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RiskRuleConfig {
    /// Rule name stored in `risk_rule`: lowercase letters, digits and `_`.
    pub name: String,
    /// The level it gives.
    pub level: crate::model::RiskLevel,
    /// Regex on the tool name (Rust `regex` syntax); absent: every tool.
    #[serde(default)]
    pub tool: Option<String>,
    /// Regex on the tool input (after masking).
    pub pattern: String,
}

/// `audit.anomalies`: the background job of `serve` that compares each hour with its own
/// recent past, per model, user, cluster and tool.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnomaliesConfig {
    /// Run the detection job in `serve`.
    pub enabled: bool,
    /// How often the job runs (`1h`); each run looks at the hours completed since.
    #[serde(with = "humantime_serde_req")]
    pub interval: Duration,
    /// Days of history each hour is compared with.
    pub baseline_days: u32,
    /// Fewest requests an hour needs before its rates count, and fewest hours of
    /// baseline before a series is scored, so one request is never a spike.
    pub min_volume: u32,
    /// Robust z-score (distance from the baseline median in scaled MADs) above which
    /// an hour is reported.
    pub threshold: f64,
}

impl Default for AnomaliesConfig {
    fn default() -> Self {
        AnomaliesConfig {
            enabled: true,
            interval: Duration::from_secs(3600),
            baseline_days: 14,
            min_volume: 20,
            threshold: 6.0,
        }
    }
}

/// `audit.alerts`: where anomalies are POSTed (generic JSON), if anywhere.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// The webhook URL (`http://…`); absent: anomalies are only stored and counted.
    pub webhook_url: Option<String>,
    /// Most webhook posts per minute; anomalies beyond are counted as dropped.
    pub max_per_minute: u32,
    /// Attempts per anomaly before it is given up (counted and logged).
    pub max_attempts: u32,
    /// How long one POST may take.
    #[serde(with = "humantime_serde_req")]
    pub timeout: Duration,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig { webhook_url: None, max_per_minute: 30, max_attempts: 8, timeout: Duration::from_secs(5) }
    }
}

/// `audit.auth`: who may call the API. Without tokens the API is open, and `serve` then
/// refuses to listen beyond loopback unless given `--insecure`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The accepted bearer tokens.
    pub tokens: Vec<TokenConfig>,
    /// Let anyone scrape `/metrics` (otherwise it takes a `read` token when tokens are
    /// configured).
    pub metrics_public: bool,
}

/// One API token: never the token itself, but where to find it or its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it (in logs and metrics; never the token).
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// The environment variable holding the token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// The token's SHA-256, 64 hex digits (`printf %s "$TOKEN" | sha256sum`).
    #[serde(default)]
    pub token_sha256: Option<String>,
}

/// What a token may do. Each role includes nothing of the others but `admin`, which may
/// do everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Send records (write only).
    Ingest,
    /// Query, stats, export, the dashboard, metrics.
    Read,
    /// Everything, dead letters and maintenance included.
    Admin,
}

impl Role {
    /// The role's name as configured.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Ingest => "ingest",
            Role::Read => "read",
            Role::Admin => "admin",
        }
    }

    /// True when a holder of `self` may do what needs `required`.
    pub fn allows(self, required: Role) -> bool {
        self == Role::Admin || self == required
    }
}

/// `audit.proxy`: the auditing reverse proxy. Off unless `upstream` is set; then `serve`
/// also listens on `listen` and forwards every request there to the agent, recording the
/// exchanges on `paths`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// The OpsAgent to forward to, `http://host:port` (`serve --proxy-upstream`).
    pub upstream: Option<String>,
    /// Address the proxy listens on (`serve --proxy-listen`), apart from the API's, so
    /// no route of the agent collides with this service's.
    pub listen: SocketAddr,
    /// Request paths (exact, `POST`) recorded as interactions; everything else is only
    /// forwarded.
    pub paths: Vec<String>,
    /// Ask the agent for its trace (`show-thought=true`) on audited requests that did
    /// not, and remove it from the answer, so the client sees what it asked for.
    pub capture_thoughts: bool,
    /// Longest wait for the agent's answer to begin (its response head); the client is
    /// answered `504` then. Agent calls take minutes, hence the generous default.
    #[serde(with = "humantime_serde_req")]
    pub upstream_timeout: Duration,
    /// Name of an environment variable holding the HS256 secret of the agent's JWTs;
    /// when set, a token whose signature does not verify gives no user. Unset: the
    /// user is read from the token's claims unverified.
    pub jwt_secret_env: Option<String>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            upstream: None,
            listen: DEFAULT_PROXY_LISTEN.parse().expect("default proxy address is valid"),
            paths: DEFAULT_PROXY_PATHS.iter().map(|p| p.to_string()).collect(),
            capture_thoughts: false,
            upstream_timeout: Duration::from_secs(300),
            jwt_secret_env: None,
        }
    }
}

impl ProxyConfig {
    /// `upstream` parsed, checked to be `http://host[:port]` with nothing after the
    /// authority but `/` (validated at load). `None`: the proxy is off.
    pub fn upstream_uri(&self) -> Result<Option<http::Uri>, ConfigError> {
        let Some(text) = &self.upstream else { return Ok(None) };
        let bad = |why: &str| invalid("audit.proxy.upstream".into(), format!("`{text}`: {why}"));
        let uri: http::Uri = text.parse().map_err(|e| bad(&format!("not a URL ({e})")))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => return Err(bad("https upstreams are not supported; use http://host:port")),
            _ => return Err(bad("expected http://host:port")),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(bad("no host"));
        }
        if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
            return Err(bad("give only the scheme, host and port; every path is forwarded as it is"));
        }
        Ok(Some(uri))
    }
}

/// The address `worker` serves `/metrics`, `/healthz` and `/readyz` on when nothing is
/// configured (beside the API's 8427 and the proxy's 8428).
pub const DEFAULT_WORKER_LISTEN: &str = "127.0.0.1:8429";

/// `audit.distributed`: distributed mode. Off unless `amqp_url` is set; then `serve` (and
/// every path into its pipeline) publishes masked records to the RabbitMQ queue `queue`
/// instead of writing the database, and `worker` processes consume them into it.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistributedConfig {
    /// The broker, `amqp://user:password@host:port/vhost` (`AUDIT_DISTRIBUTED_AMQP_URL`;
    /// the password is never logged).
    pub amqp_url: Option<String>,
    /// The durable quorum queue records travel through; its dead-letter exchange and
    /// queue are named after it (`<queue>.dlx`, `<queue>.dead`).
    pub queue: String,
    /// Deliveries a worker holds unacknowledged at once, and so the largest batch it
    /// writes: about one batch (`audit.async.batch_size`).
    pub prefetch: u16,
    /// How long a producer waits for the broker to confirm a batch before it counts the
    /// broker as unavailable (and the records go to the spool).
    #[serde(with = "humantime_serde_req")]
    pub confirm_timeout: Duration,
    /// Deliveries of one message before the broker dead-letters it (`x-delivery-limit`):
    /// a message that keeps killing its workers stops going round.
    pub delivery_limit: u32,
    /// Address `worker` serves `/metrics`, `/healthz` and `/readyz` on
    /// (`worker --listen`).
    pub worker_listen: SocketAddr,
}

impl Default for DistributedConfig {
    fn default() -> Self {
        DistributedConfig {
            amqp_url: None,
            queue: "opsagent-audit".into(),
            prefetch: 500,
            confirm_timeout: Duration::from_secs(10),
            delivery_limit: 20,
            worker_listen: DEFAULT_WORKER_LISTEN.parse().expect("default worker address is valid"),
        }
    }
}

impl std::fmt::Debug for DistributedConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DistributedConfig")
            .field("amqp_url", &self.amqp_url.as_deref().map(redact_url))
            .field("queue", &self.queue)
            .field("prefetch", &self.prefetch)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("delivery_limit", &self.delivery_limit)
            .field("worker_listen", &self.worker_listen)
            .finish()
    }
}

impl DistributedConfig {
    /// True when distributed mode is on (`amqp_url` set).
    pub fn is_enabled(&self) -> bool {
        self.amqp_url.is_some()
    }
}

/// Overrides given on the command line; they win over everything else.
#[derive(Debug, Clone, Default)]
pub struct CliOverrides {
    /// `--database-url`.
    pub database_url: Option<String>,
    /// `serve --listen`.
    pub listen: Option<SocketAddr>,
    /// `serve --proxy-upstream`.
    pub proxy_upstream: Option<String>,
    /// `serve --proxy-listen`.
    pub proxy_listen: Option<SocketAddr>,
    /// `worker --listen`.
    pub worker_listen: Option<SocketAddr>,
}

impl Config {
    /// Loads defaults, then `path` (if any), then the process environment, then `cli`.
    pub fn load(path: Option<&Path>, cli: &CliOverrides) -> Result<Config, ConfigError> {
        Self::load_from(path, std::env::vars(), cli)
    }

    /// [`Config::load`] with an explicit environment, for tests.
    pub fn load_from(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        cli: &CliOverrides,
    ) -> Result<Config, ConfigError> {
        let mut tree = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|cause| ConfigError::Read { path: path.to_path_buf(), cause })?;
                let root: FileRoot = serde_yaml_ng::from_str(&text)
                    .map_err(|cause| ConfigError::Syntax { path: path.to_path_buf(), cause })?;
                match root.audit {
                    None | Some(Value::Null) => Value::Mapping(Default::default()),
                    Some(v) => v,
                }
            }
            None => Value::Mapping(Default::default()),
        };
        let origins = apply_env(&mut tree, env)?;
        let mut config: Config = serde_path_to_error::deserialize(tree).map_err(|e| {
            let key = yaml_key_of(&e);
            ConfigError::Key {
                origin: origins.get(&key).map(|v| format!(" (from {v})")).unwrap_or_default(),
                message: e.inner().to_string(),
                key,
            }
        })?;
        if let Some(url) = &cli.database_url {
            config.database.url = Some(url.clone());
        }
        if let Some(listen) = cli.listen {
            config.server.listen = listen;
        }
        if let Some(upstream) = &cli.proxy_upstream {
            config.proxy.upstream = Some(upstream.clone());
        }
        if let Some(listen) = cli.proxy_listen {
            config.proxy.listen = listen;
        }
        if let Some(listen) = cli.worker_listen {
            config.distributed.worker_listen = listen;
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let positive = |key: &str, v: u64| {
            if v == 0 {
                Err(ConfigError::Key {
                    key: format!("audit.{key}"),
                    origin: String::new(),
                    message: "must be greater than 0".into(),
                })
            } else {
                Ok(())
            }
        };
        positive("async.workers", self.pipeline.workers as u64)?;
        positive("async.queue_size", self.pipeline.queue_size as u64)?;
        positive("async.batch_size", self.pipeline.batch_size as u64)?;
        positive("async.batch_interval_ms", self.pipeline.batch_interval_ms)?;
        positive("database.max_open_conns", u64::from(self.database.max_open_conns))?;
        positive("limits.max_body_bytes", self.limits.max_body_bytes as u64)?;
        positive("limits.max_records_per_request", self.limits.max_records_per_request as u64)?;
        positive("limits.max_field_bytes", self.limits.max_field_bytes as u64)?;
        positive("limits.max_thoughts_per_record", self.limits.max_thoughts_per_record as u64)?;
        positive("limits.max_tool_calls_per_record", self.limits.max_tool_calls_per_record as u64)?;
        positive("limits.max_attributes_depth", self.limits.max_attributes_depth as u64)?;
        // A zero timeout would refuse every request; sub-millisecond ones count as zero.
        positive("limits.request_timeout", self.limits.request_timeout.as_millis() as u64)?;
        positive("limits.header_read_timeout", self.limits.header_read_timeout.as_millis() as u64)?;
        positive("limits.max_connections", self.limits.max_connections as u64)?;
        if self.spool.enabled {
            positive("spool.max_bytes", self.spool.max_bytes)?;
            positive("spool.segment_bytes", self.spool.segment_bytes)?;
            if self.spool.dir.as_os_str().is_empty() {
                return Err(ConfigError::Key {
                    key: "audit.spool.dir".into(),
                    origin: String::new(),
                    message: "must name a directory (or set audit.spool.enabled: false)".into(),
                });
            }
        }
        if self.otlp.enabled {
            positive("otlp.quiet_period", self.otlp.quiet_period.as_millis() as u64)?;
            positive("otlp.trace_timeout", self.otlp.trace_timeout.as_millis() as u64)?;
            positive("otlp.max_pending_spans", self.otlp.max_pending_spans as u64)?;
        }
        self.validate_masking()?;
        self.validate_risk()?;
        self.validate_auth()?;
        self.validate_proxy()?;
        self.validate_distributed()?;
        self.retention.cleanup_time_of_day()?;
        self.retention.zone()?;
        positive("retention.batch_size", u64::from(self.retention.batch_size))?;
        self.database.resolved_url().map(|_| ())
    }

    fn validate_masking(&self) -> Result<(), ConfigError> {
        let mut names = std::collections::BTreeSet::new();
        for (i, rule) in self.masking.rules.iter().enumerate() {
            let key = format!("audit.masking.rules[{i}]");
            check_rule_name(&key, &rule.name, &mut names)?;
            if let Err(e) = regex::Regex::new(&rule.regex) {
                return Err(invalid(format!("{key}.regex"), format!("invalid pattern: {e}")));
            }
        }
        Ok(())
    }

    fn validate_risk(&self) -> Result<(), ConfigError> {
        let mut names = std::collections::BTreeSet::new();
        for (i, rule) in self.risk.rules.iter().enumerate() {
            let key = format!("audit.risk.rules[{i}]");
            check_rule_name(&key, &rule.name, &mut names)?;
            if let Err(e) = regex::Regex::new(&rule.pattern) {
                return Err(invalid(format!("{key}.pattern"), format!("rule `{}`: invalid pattern: {e}", rule.name)));
            }
            if let Some(Err(e)) = rule.tool.as_deref().map(regex::Regex::new) {
                return Err(invalid(format!("{key}.tool"), format!("rule `{}`: invalid pattern: {e}", rule.name)));
            }
        }
        let anomalies = &self.anomalies;
        if anomalies.interval.as_secs() == 0 {
            return Err(invalid("audit.anomalies.interval".into(), "must be at least 1s".into()));
        }
        if anomalies.baseline_days == 0 {
            return Err(invalid("audit.anomalies.baseline_days".into(), "must be greater than 0".into()));
        }
        if !(anomalies.threshold.is_finite() && anomalies.threshold > 0.0) {
            return Err(invalid("audit.anomalies.threshold".into(), "must be a number greater than 0".into()));
        }
        if let Some(url) = &self.alerts.webhook_url {
            if !url.starts_with("http://") {
                return Err(invalid(
                    "audit.alerts.webhook_url".into(),
                    format!("`{url}`: only http:// URLs are supported (this build has no TLS client)"),
                ));
            }
        }
        if self.alerts.max_per_minute == 0 || self.alerts.max_attempts == 0 {
            return Err(invalid(
                "audit.alerts".into(),
                "max_per_minute and max_attempts must be greater than 0".into(),
            ));
        }
        Ok(())
    }

    fn validate_distributed(&self) -> Result<(), ConfigError> {
        let d = &self.distributed;
        if let Some(url) = &d.amqp_url {
            // amqps:// would be retried for ever: this build's AMQP client has no TLS.
            if !url.starts_with("amqp://") {
                return Err(invalid(
                    "audit.distributed.amqp_url".into(),
                    format!(
                        "`{}`: expected amqp://user:password@host:port/vhost (amqps:// is not supported by this build)",
                        redact_url(url)
                    ),
                ));
            }
        }
        if d.queue.trim().is_empty() || d.queue.len() > 200 || d.queue.starts_with("amq.") {
            return Err(invalid(
                "audit.distributed.queue".into(),
                "must be a queue name of 1 to 200 characters, not starting with `amq.` (reserved by RabbitMQ)".into(),
            ));
        }
        if d.prefetch == 0 {
            return Err(invalid("audit.distributed.prefetch".into(), "must be greater than 0".into()));
        }
        if d.confirm_timeout.as_millis() == 0 {
            return Err(invalid("audit.distributed.confirm_timeout".into(), "must be greater than 0".into()));
        }
        if d.delivery_limit == 0 {
            return Err(invalid("audit.distributed.delivery_limit".into(), "must be greater than 0".into()));
        }
        Ok(())
    }

    fn validate_proxy(&self) -> Result<(), ConfigError> {
        let proxy = &self.proxy;
        proxy.upstream_uri()?;
        for (i, path) in proxy.paths.iter().enumerate() {
            if !path.starts_with('/') || path.contains('?') {
                return Err(invalid(
                    format!("audit.proxy.paths[{i}]"),
                    format!("`{path}`: a path starting with `/`, without a query"),
                ));
            }
        }
        if proxy.upstream_timeout.is_zero() {
            return Err(invalid("audit.proxy.upstream_timeout".into(), "must be greater than 0".into()));
        }
        if proxy.jwt_secret_env.as_deref().is_some_and(|v| v.trim().is_empty()) {
            return Err(invalid(
                "audit.proxy.jwt_secret_env".into(),
                "must name an environment variable (or be left out)".into(),
            ));
        }
        if proxy.upstream.is_some() && proxy.listen == self.server.listen && proxy.listen.port() != 0 {
            return Err(invalid(
                "audit.proxy.listen".into(),
                format!("{} is the API's address (audit.server.listen); the proxy needs its own", proxy.listen),
            ));
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        let mut names = std::collections::BTreeSet::new();
        for (i, token) in self.auth.tokens.iter().enumerate() {
            let key = format!("audit.auth.tokens[{i}]");
            if token.name.trim().is_empty() {
                return Err(invalid(format!("{key}.name"), "must not be empty".into()));
            }
            if !names.insert(&token.name) {
                return Err(invalid(format!("{key}.name"), format!("`{}` is used by another token", token.name)));
            }
            match (&token.token_env, &token.token_sha256) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(invalid(
                        key,
                        "give exactly one of `token_env` (an environment variable holding the token) or \
                         `token_sha256` (its SHA-256 in hex); tokens are never written in the file"
                            .into(),
                    ))
                }
                (None, Some(hash)) if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    return Err(invalid(format!("{key}.token_sha256"), "must be 64 hex digits (a SHA-256)".into()))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The environment variable names that override keys, with the dotted key each sets.
    pub fn env_keys() -> Vec<(String, String)> {
        let tree = serde_yaml_ng::to_value(Config::default()).expect("default config serialises");
        let mut out = Vec::new();
        collect_leaves(&tree, &mut Vec::new(), &mut out);
        let mut keys: Vec<(String, String)> = out
            .into_iter()
            .map(|path| (format!("AUDIT_{}", path.join("_").to_uppercase()), format!("audit.{}", path.join("."))))
            .collect();
        // Names fixed by SPEC.md beside the generated ones.
        keys.push(("AUDIT_LISTEN".into(), "audit.server.listen".into()));
        keys
    }
}

/// A [`ConfigError::Key`] found by validation (not from a particular source).
/// A custom rule's name (masking or risk) is a new `snake_case` word: it becomes a label
/// in `/metrics` and the name in markers and verdicts.
fn check_rule_name<'a>(
    key: &str,
    name: &'a str,
    names: &mut std::collections::BTreeSet<&'a str>,
) -> Result<(), ConfigError> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
        return Err(invalid(format!("{key}.name"), format!("`{name}`: use lowercase letters, digits and `_`")));
    }
    if !names.insert(name) {
        return Err(invalid(format!("{key}.name"), format!("`{name}` is used by another rule")));
    }
    Ok(())
}

fn invalid(key: String, message: String) -> ConfigError {
    ConfigError::Key { key, origin: String::new(), message }
}

/// Dotted YAML key (with the `audit.` prefix) of a deserialisation error.
fn yaml_key_of(e: &serde_path_to_error::Error<serde_yaml_ng::Error>) -> String {
    let mut key = String::from("audit");
    let path = e.path().to_string();
    if path != "." {
        key.push('.');
        key.push_str(&path);
    }
    // "unknown field `x`" names the offending key below the path.
    let message = e.inner().to_string();
    // serde_path_to_error sometimes ends the path with that key already.
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some(field) = rest.split('`').next() {
            if !key.ends_with(&format!(".{field}")) {
                key.push('.');
                key.push_str(field);
            }
        }
    }
    key
}

fn collect_leaves(value: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match value {
        Value::Mapping(map) => {
            for (k, v) in map {
                if let Some(k) = k.as_str() {
                    prefix.push(k.to_string());
                    collect_leaves(v, prefix, out);
                    prefix.pop();
                }
            }
        }
        _ => out.push(prefix.clone()),
    }
}

/// Applies `AUDIT_…` variables to the YAML tree; returns dotted key → variable name.
fn apply_env(
    tree: &mut Value,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let known: BTreeMap<String, String> = Config::env_keys().into_iter().collect();
    let mut origins = BTreeMap::new();
    let mut vars: Vec<(String, String)> = env.into_iter().filter(|(k, _)| k.starts_with("AUDIT_")).collect();
    // AUDIT_LISTEN is the documented short name; the generated long name wins if both are set.
    vars.sort_by_key(|(k, _)| k != "AUDIT_LISTEN");
    for (name, raw) in vars {
        let Some(key) = known.get(&name) else {
            continue;
        };
        let value: Value = if raw.is_empty() {
            Value::Null
        } else {
            serde_yaml_ng::from_str(&raw).unwrap_or_else(|_| Value::String(raw.clone()))
        };
        // Keep text as text where the key is a string (a password of digits stays a string).
        let value = match value {
            Value::Number(_) | Value::Bool(_) if is_text_key(key) => Value::String(raw.clone()),
            v => v,
        };
        set_path(tree, key.trim_start_matches("audit.").split('.'), value, key)?;
        origins.insert(key.clone(), name);
    }
    Ok(origins)
}

fn is_text_key(key: &str) -> bool {
    matches!(
        key,
        "audit.database.url"
            | "audit.database.driver"
            | "audit.database.host"
            | "audit.database.user"
            | "audit.database.password"
            | "audit.database.password_file"
            | "audit.database.dbname"
            | "audit.database.sslmode"
            | "audit.retention.cleanup_time"
            | "audit.retention.time_zone"
            | "audit.retention.archive_dir"
            | "audit.proxy.upstream"
            | "audit.proxy.jwt_secret_env"
            | "audit.distributed.amqp_url"
            | "audit.distributed.queue"
    )
}

fn set_path<'a>(
    tree: &mut Value,
    mut path: impl Iterator<Item = &'a str>,
    value: Value,
    key: &str,
) -> Result<(), ConfigError> {
    let Some(segment) = path.next() else {
        *tree = value;
        return Ok(());
    };
    if tree.is_null() {
        *tree = Value::Mapping(Default::default());
    }
    let Value::Mapping(map) = tree else {
        return Err(ConfigError::Key {
            key: key.to_string(),
            origin: String::new(),
            message: "the YAML file has a scalar where a section is expected".into(),
        });
    };
    let child = map.entry(Value::String(segment.to_string())).or_insert(Value::Null);
    set_path(child, path, value, key)
}

/// Replaces the password of a URL with `***`, for logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `humantime` strings (`1h`, `30s`) for an optional duration.
mod humantime_serde_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| humantime::parse_duration(&t).map_err(|e| serde::de::Error::custom(format!("`{t}`: {e}"))))
            .transpose()
    }
}

/// `humantime` strings for a required duration.
mod humantime_serde_req {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        super::humantime_serde_opt::serialize(&Some(*d), s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        super::humantime_serde_opt::deserialize(d)?.ok_or_else(|| serde::de::Error::custom("a duration is required"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, yaml).unwrap();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::load_from(Some(&path), env, &CliOverrides::default())
    }

    const SEED_YAML: &str = r#"
server:
  port: 8080
audit:
  enabled: true
  database:
    driver: "postgres"
    host: "localhost"
    port: 5432
    user: "opsagent"
    password: "your_secure_password"
    dbname: "opsagent"
    sslmode: "disable"
    max_open_conns: 10
    max_idle_conns: 5
    conn_max_lifetime: 1h
  async:
    workers: 5
    queue_size: 1000
    batch_size: 10
    batch_interval_ms: 1000
  retention:
    days: 90
    auto_cleanup: true
    cleanup_time: "03:00"
"#;

    #[test]
    fn the_seed_section_is_read_unchanged() {
        let c = load(SEED_YAML, &[]).unwrap();
        assert_eq!(c.pipeline.workers, 5);
        assert_eq!(c.pipeline.batch_size, 10);
        assert_eq!(c.database.conn_max_lifetime, Some(Duration::from_secs(3600)));
        assert_eq!(
            c.database.resolved_url().unwrap(),
            "postgres://opsagent:your_secure_password@localhost:5432/opsagent?sslmode=disable"
        );
        assert!(!format!("{c:?}").contains("your_secure_password"));
    }

    #[test]
    fn environment_overrides_the_file_and_cli_overrides_both() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, SEED_YAML).unwrap();
        let env =
            [("AUDIT_ASYNC_WORKERS", "3"), ("AUDIT_DATABASE_PASSWORD", "12345"), ("AUDIT_LISTEN", "127.0.0.1:9000")]
                .map(|(k, v)| (k.to_string(), v.to_string()));
        let cli = CliOverrides { listen: Some("127.0.0.1:9100".parse().unwrap()), ..CliOverrides::default() };
        let c = Config::load_from(Some(&path), env, &cli).unwrap();
        assert_eq!(c.pipeline.workers, 3);
        assert_eq!(c.database.password.as_deref(), Some("12345"));
        assert_eq!(c.server.listen.port(), 9100);
    }

    #[test]
    fn password_may_come_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("pw");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let yaml = format!("audit:\n  database:\n    host: db\n    password_file: {}\n", secret.display());
        let c = load(&yaml, &[]).unwrap();
        assert_eq!(c.database.resolved_url().unwrap(), "postgres://postgres:s3cret@db:5432/opsagent?sslmode=prefer");
    }

    #[test]
    fn unknown_key_is_an_error_naming_the_key() {
        let err = load("audit:\n  async:\n    wokers: 3\n", &[]).unwrap_err().to_string();
        assert!(err.contains("audit.async.wokers"), "{err}");
    }

    #[test]
    fn an_unknown_key_is_named_once() {
        // Regression: reported as `audit.async.colour.colour`.
        let err = load("audit:\n  async:\n    colour: blue\n", &[]).unwrap_err().to_string();
        assert!(err.contains("`audit.async.colour`"), "{err}");
    }

    #[test]
    fn wrong_type_is_an_error_naming_the_key_and_its_origin() {
        let err = load("audit:\n  async:\n    workers: many\n", &[]).unwrap_err().to_string();
        assert!(err.contains("audit.async.workers"), "{err}");
        let err = load("", &[("AUDIT_ASYNC_BATCH_SIZE", "lots")]).unwrap_err().to_string();
        assert!(err.contains("audit.async.batch_size") && err.contains("AUDIT_ASYNC_BATCH_SIZE"), "{err}");
        let err = load("audit:\n  retention:\n    cleanup_time: '25:00'\n", &[]).unwrap_err().to_string();
        assert!(err.contains("audit.retention.cleanup_time"), "{err}");
    }

    #[test]
    fn retention_zone_archive_and_batch_size_are_read_and_checked() {
        let c = load(
            "audit:\n  retention:\n    time_zone: Asia/Shanghai\n    archive_dir: /var/archive\n    batch_size: 100\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.retention.zone().unwrap(), Some(chrono_tz::Asia::Shanghai));
        assert_eq!(c.retention.archive_dir.as_deref(), Some(Path::new("/var/archive")));
        assert_eq!(c.retention.batch_size, 100);
        assert_eq!(
            load("", &[("AUDIT_RETENTION_TIME_ZONE", "UTC")]).unwrap().retention.zone().unwrap(),
            Some(chrono_tz::UTC)
        );
        let err = load("audit:\n  retention:\n    time_zone: Mars/Olympus\n", &[]).unwrap_err().to_string();
        assert!(err.contains("audit.retention.time_zone") && err.contains("Mars/Olympus"), "{err}");
        let err = load("audit:\n  retention:\n    batch_size: 0\n", &[]).unwrap_err().to_string();
        assert!(err.contains("audit.retention.batch_size"), "{err}");
    }

    #[test]
    fn limits_have_defaults_env_overrides_and_must_be_positive() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.limits.request_timeout, Duration::from_secs(30));
        assert_eq!(c.limits.header_read_timeout, Duration::from_secs(10));
        assert_eq!((c.limits.max_connections, c.limits.max_attributes_depth), (1024, 16));
        let env = [
            ("AUDIT_LIMITS_REQUEST_TIMEOUT", "2s"),
            ("AUDIT_LIMITS_HEADER_READ_TIMEOUT", "500ms"),
            ("AUDIT_LIMITS_MAX_CONNECTIONS", "2"),
            ("AUDIT_LIMITS_MAX_THOUGHTS_PER_RECORD", "3"),
            ("AUDIT_LIMITS_MAX_TOOL_CALLS_PER_RECORD", "4"),
            ("AUDIT_LIMITS_MAX_ATTRIBUTES_DEPTH", "5"),
        ];
        let c = load("", &env).unwrap();
        assert_eq!(c.limits.request_timeout, Duration::from_secs(2));
        assert_eq!(c.limits.header_read_timeout, Duration::from_millis(500));
        assert_eq!(
            (c.limits.max_connections, c.limits.max_thoughts_per_record, c.limits.max_tool_calls_per_record),
            (2, 3, 4)
        );
        assert_eq!(c.limits.max_attributes_depth, 5);
        for (yaml, key) in [
            ("max_connections: 0", "audit.limits.max_connections"),
            ("max_attributes_depth: 0", "audit.limits.max_attributes_depth"),
            ("max_thoughts_per_record: 0", "audit.limits.max_thoughts_per_record"),
            ("max_tool_calls_per_record: 0", "audit.limits.max_tool_calls_per_record"),
            ("request_timeout: 0s", "audit.limits.request_timeout"),
            ("header_read_timeout: 0s", "audit.limits.header_read_timeout"),
            ("request_timeout: soon", "audit.limits.request_timeout"),
        ] {
            let err = load(&format!("audit:\n  limits:\n    {yaml}\n"), &[]).unwrap_err().to_string();
            assert!(err.contains(key), "{yaml}: {err}");
        }
    }

    #[test]
    fn no_file_means_the_embedded_default() {
        let c = Config::load_from(None, Vec::new(), &CliOverrides::default()).unwrap();
        assert_eq!(c.database.resolved_url().unwrap(), DEFAULT_DATABASE_URL);
        assert_eq!(c.server.listen.to_string(), DEFAULT_LISTEN);
    }

    #[test]
    fn distributed_mode_is_off_by_default_its_keys_are_read_and_the_password_never_shown() {
        let c = load("", &[]).unwrap();
        assert!(!c.distributed.is_enabled());
        assert_eq!(c.distributed.queue, "opsagent-audit");
        assert_eq!(c.distributed.worker_listen.to_string(), DEFAULT_WORKER_LISTEN);
        let c = load(
            "",
            &[
                ("AUDIT_DISTRIBUTED_AMQP_URL", "amqp://audit:s3cret@broker:5672/%2f"),
                ("AUDIT_DISTRIBUTED_QUEUE", "1234"),
                ("AUDIT_DISTRIBUTED_PREFETCH", "250"),
                ("AUDIT_DISTRIBUTED_CONFIRM_TIMEOUT", "3s"),
                ("AUDIT_DISTRIBUTED_DELIVERY_LIMIT", "7"),
            ],
        )
        .unwrap();
        assert!(c.distributed.is_enabled());
        assert_eq!(c.distributed.queue, "1234", "a queue name of digits stays text");
        assert_eq!(c.distributed.prefetch, 250);
        assert_eq!(c.distributed.confirm_timeout, Duration::from_secs(3));
        assert_eq!(c.distributed.delivery_limit, 7);
        let shown = format!("{:?}", c.distributed);
        assert!(!shown.contains("s3cret") && shown.contains("audit:***@broker"), "{shown}");
        for (yaml, key) in [
            ("amqp_url: http://broker", "audit.distributed.amqp_url"),
            ("amqp_url: amqps://u:s3cret@broker", "audit.distributed.amqp_url"),
            ("queue: amq.mine", "audit.distributed.queue"),
            ("prefetch: 0", "audit.distributed.prefetch"),
            ("confirm_timeout: 0s", "audit.distributed.confirm_timeout"),
            ("delivery_limit: 0", "audit.distributed.delivery_limit"),
        ] {
            let err = load(&format!("audit:\n  distributed:\n    {yaml}\n"), &[]).unwrap_err().to_string();
            assert!(err.contains(key), "{yaml}: {err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn proxy_is_off_by_default_and_its_keys_are_read_and_checked() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.proxy.upstream_uri().unwrap(), None);
        assert_eq!(c.proxy.listen.to_string(), DEFAULT_PROXY_LISTEN);
        assert_eq!(c.proxy.paths, DEFAULT_PROXY_PATHS);
        assert_eq!(c.proxy.upstream_timeout, Duration::from_secs(300));
        let env = [
            ("AUDIT_PROXY_UPSTREAM", "http://agent:8080"),
            ("AUDIT_PROXY_LISTEN", "0.0.0.0:9000"),
            ("AUDIT_PROXY_PATHS", "[/api/execute, /api/custom]"),
            ("AUDIT_PROXY_CAPTURE_THOUGHTS", "true"),
            ("AUDIT_PROXY_UPSTREAM_TIMEOUT", "90s"),
            ("AUDIT_PROXY_JWT_SECRET_ENV", "OPSAGENT_JWT_SECRET"),
        ];
        let c = load("", &env).unwrap();
        assert_eq!(c.proxy.upstream_uri().unwrap().unwrap().authority().unwrap().as_str(), "agent:8080");
        assert_eq!(c.proxy.listen.port(), 9000);
        assert_eq!(c.proxy.paths, ["/api/execute", "/api/custom"]);
        assert!(c.proxy.capture_thoughts);
        assert_eq!(c.proxy.upstream_timeout, Duration::from_secs(90));
        assert_eq!(c.proxy.jwt_secret_env.as_deref(), Some("OPSAGENT_JWT_SECRET"));
        let cli = CliOverrides {
            proxy_upstream: Some("http://127.0.0.1:8080".into()),
            proxy_listen: Some("127.0.0.1:9999".parse().unwrap()),
            ..CliOverrides::default()
        };
        let c = Config::load_from(None, Vec::new(), &cli).unwrap();
        assert_eq!(c.proxy.upstream.as_deref(), Some("http://127.0.0.1:8080"));
        assert_eq!(c.proxy.listen.port(), 9999);
        for (yaml, key) in [
            ("upstream: 'not a url'", "audit.proxy.upstream"),
            ("upstream: https://agent", "audit.proxy.upstream"),
            ("upstream: http://agent:8080/api", "audit.proxy.upstream"),
            ("paths: [api/execute]", "audit.proxy.paths[0]"),
            ("upstream_timeout: 0s", "audit.proxy.upstream_timeout"),
            ("upstream: http://a:1\n    listen: 127.0.0.1:8427", "audit.proxy.listen"),
        ] {
            let err = load(&format!("audit:\n  proxy:\n    {yaml}\n"), &[]).unwrap_err().to_string();
            assert!(err.contains(key), "{yaml}: {err}");
        }
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("postgres://u:pw@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
    }
}
