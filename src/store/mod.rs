//! Storage: one [`Store`] trait holding every operation the service needs, with a
//! PostgreSQL implementation (production) and an embedded SQLite one (zero set-up).
//!
//! Writes are batches: a whole batch is one transaction made of set-based statements (a
//! statement per table, never a statement per row). Writing is idempotent on
//! `interaction_id`: a record already stored is skipped with its children, so re-delivery
//! (a retry after a lost commit acknowledgement, a spool replay) stores nothing twice.
//! Sessions are upserted with `ON CONFLICT`, so concurrent writers of one session never
//! race. Both backends pass the same behavioural suite (`tests/store.rs`).
//!
//! The pipeline sees only [`BatchSink`] (write a batch, write dead letters), a
//! supertrait of [`Store`]. Rows are read back through the shared row types and SQL of
//! [`rows`]; each backend keeps only what its dialect does differently (how a batch is
//! expanded: `UNNEST` of arrays or `json_each` of one JSON parameter; how ids are bound).
//!
//! Each batch's fresh records are hash-chained in the batch's own transaction ([`chain`]),
//! and [`verify`] walks the chains back over this trait.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::NaiveDate;
use futures::stream::BoxStream;
use uuid::Uuid;

use crate::config::{redact_url, ConfigError, DatabaseConfig};
use crate::model::Interaction;

pub mod anomalies;
pub mod chain;
pub mod consistency;
pub mod filter;
pub mod postgres;
mod read;
pub mod rows;
mod sql;
pub mod sqlite;
pub mod verify;

pub use filter::{
    Bucket, Filter, FrequentQuestion, GroupBy, InteractionSummary, Keyset, Page, SessionView, StatsRequest, StatsRow,
};

pub use anomalies::{Anomaly, AnomalyKind, NewAnomaly};
pub use chain::{ChainBlock, ChainDay, DayCount, ExpiredDay, RecordLink};
pub use consistency::{ChildTable, Finding, Inspection};
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// Which database a store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// PostgreSQL.
    Postgres,
    /// Embedded SQLite file.
    Sqlite,
}

/// What a batch write did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteSummary {
    /// Interactions newly stored.
    pub inserted: u64,
    /// Interactions skipped because their `interaction_id` was already stored (or repeated
    /// within the batch).
    pub duplicates: u64,
    /// The ids that were already stored before this batch.
    pub already_stored: Vec<Uuid>,
}

/// A record the database refused because of its data, kept aside with the reason.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetter {
    /// The refused record's id.
    pub interaction_id: Uuid,
    /// The record as JSON, as it was when refused.
    pub record: String,
    /// What the database said.
    pub error: String,
    /// How many times it was refused (re-deliveries of the same record add up).
    pub attempts: i32,
    /// When it was last refused.
    pub failed_at: chrono::DateTime<chrono::Utc>,
}

impl DeadLetter {
    /// A dead letter for `record`, refused now for `error`.
    pub fn new(record: &Interaction, error: impl Into<String>) -> DeadLetter {
        DeadLetter {
            interaction_id: record.interaction_id,
            // Serialising a record of plain strings and numbers cannot fail; the fallback
            // keeps the id if it ever does.
            record: serde_json::to_string(record).unwrap_or_else(|e| {
                format!("{{\"interaction_id\":\"{}\",\"unserialisable\":\"{e}\"}}", record.interaction_id)
            }),
            error: error.into(),
            attempts: 1,
            failed_at: chrono::Utc::now(),
        }
    }
}

/// Whether the store can take writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// Migrations known to this binary that the database has not applied.
    pub pending_migrations: Vec<i64>,
}

impl Readiness {
    /// The migrations of `migrator` missing from `applied` (versions recorded as applied).
    pub(crate) fn against(migrator: &sqlx::migrate::Migrator, applied: &[i64]) -> Readiness {
        let pending = migrator.iter().map(|m| m.version).filter(|v| !applied.contains(v)).collect();
        Readiness { pending_migrations: pending }
    }

    /// True when the database is reachable and fully migrated.
    pub fn is_ready(&self) -> bool {
        self.pending_migrations.is_empty()
    }
}

/// The error a database driver (or a test double) reports, kept as the cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a store operation failed. The database's own message is part of each message
/// (not a separate `source()`), so a chain printer shows it once.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The requested record does not exist.
    #[error("not found")]
    NotFound,
    /// The database could not be reached or the connection broke; retrying may succeed.
    #[error("database unavailable: {0}")]
    Unavailable(BoxError),
    /// The database refused the data itself (a constraint, a value out of range);
    /// retrying the same records fails the same way.
    #[error("database rejected the data: {0}")]
    Rejected(BoxError),
    /// A stored value cannot be read back as what it should be (a `status` no version
    /// of this program writes, an id that is not a UUID).
    #[error("stored {column} cannot be read: {message}")]
    Decode {
        /// The column.
        column: &'static str,
        /// What was wrong with it.
        message: String,
    },
    /// Migrations could not be applied.
    #[error("migration failed: {0}")]
    Migration(BoxError),
    /// The URL names no supported database.
    #[error("unsupported database URL `{0}`: expected postgres://… or sqlite://PATH")]
    UnsupportedUrl(String),
    /// The database settings are unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Anything else the database said.
    #[error("database error: {0}")]
    Other(BoxError),
}

impl StoreError {
    /// The database is unreachable, for this reason; retrying may succeed.
    pub fn unavailable(cause: impl Into<BoxError>) -> StoreError {
        StoreError::Unavailable(cause.into())
    }

    /// The database refused the data, for this reason.
    pub fn rejected(cause: impl Into<BoxError>) -> StoreError {
        StoreError::Rejected(cause.into())
    }

    /// True when retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }

    /// A fixed short name, for metric labels and API error codes.
    pub fn as_error_code(&self) -> &'static str {
        match self {
            StoreError::NotFound => "not_found",
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Rejected(_) => "rejected",
            StoreError::Decode { .. } => "decode",
            StoreError::Migration(_) => "migration",
            StoreError::UnsupportedUrl(_) => "unsupported_url",
            StoreError::Config(_) => "config",
            StoreError::Other(_) => "database",
        }
    }
}

/// What the pipeline needs of a database: write a batch, keep refused records aside.
/// Every [`Store`] is one; test doubles implement just these two.
#[async_trait]
pub trait BatchSink: Send + Sync + 'static {
    /// Writes a batch in one transaction; records whose `interaction_id` is already stored
    /// are skipped whole. Records must already be sanitised.
    async fn write_batch(&self, batch: &[Interaction]) -> Result<WriteSummary, StoreError>;

    /// Stores refused records aside, in one transaction. A record dead-lettered again
    /// (re-delivery) updates its row and counts the attempt; repeats within one call
    /// count once, the last one's reason kept.
    async fn write_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), StoreError>;
}

/// Every storage operation the service needs.
#[async_trait]
pub trait Store: BatchSink {
    /// Which database this is.
    fn backend(&self) -> Backend;

    /// Applies the schema migrations not yet applied.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Checks the database answers and reports migrations not yet applied.
    async fn readiness(&self) -> Result<Readiness, StoreError>;

    /// The database's size on disk, in bytes (for the metrics; cheap, but not free:
    /// sample it, do not call it per scrape).
    async fn database_bytes(&self) -> Result<u64, StoreError>;

    /// Reads one interaction with its thoughts, tool calls and metrics.
    async fn get_interaction(&self, interaction_id: Uuid) -> Result<Interaction, StoreError>;

    /// Number of stored interactions.
    async fn count_interactions(&self) -> Result<u64, StoreError> {
        self.count_matching(&Filter::default()).await
    }

    /// How many interactions match `filter`.
    async fn count_matching(&self, filter: &Filter) -> Result<u64, StoreError>;

    /// A page of interactions matching `filter`, newest first, starting after `after`.
    async fn list_interactions(
        &self,
        filter: &Filter,
        after: Option<Keyset>,
        limit: u32,
    ) -> Result<Page<InteractionSummary>, StoreError>;

    /// A session and its first `limit` interactions in full, in the order they happened.
    async fn get_session(&self, session_id: Uuid, limit: u32) -> Result<SessionView, StoreError>;

    /// Counts, error rates, duration percentiles and token sums, computed by the database.
    async fn stats(&self, request: &StatsRequest) -> Result<Vec<StatsRow>, StoreError>;

    /// The questions asked most often (case and white space normalised).
    async fn frequent_questions(&self, filter: &Filter, limit: u32) -> Result<Vec<FrequentQuestion>, StoreError>;

    /// A page of dead letters, newest first, starting after `before`.
    async fn list_dead_letters(&self, before: Option<Keyset>, limit: u32) -> Result<Page<DeadLetter>, StoreError>;

    /// Every interaction matching `filter` in full, oldest first, streamed from one
    /// statement in constant memory (rows are read off the connection as the stream is
    /// polled; the connection is held until the stream ends or is dropped).
    fn export(&self, filter: &Filter) -> BoxStream<'static, Result<Interaction, StoreError>>;

    /// The hash-chain rows of the days from `from` to `to` (inclusive; open ends: all),
    /// oldest first.
    async fn chain_days(&self, from: Option<NaiveDate>, to: Option<NaiveDate>) -> Result<Vec<ChainDay>, StoreError>;

    /// The UTC days from `from` to `to` (inclusive) that have interactions, with how
    /// many, oldest first.
    async fn record_days(&self, from: Option<NaiveDate>, to: Option<NaiveDate>) -> Result<Vec<DayCount>, StoreError>;

    /// At most `limit` blocks of `day` with a seq above `after_seq`, in seq order.
    async fn chain_blocks(&self, day: NaiveDate, after_seq: i64, limit: u32) -> Result<Vec<ChainBlock>, StoreError>;

    /// The interactions in full whose `chain_block` is `block_id`, by id.
    async fn block_records(&self, block_id: Uuid) -> Result<Vec<Interaction>, StoreError>;

    /// Every interaction of a UTC day with the block it says it was committed in,
    /// streamed in constant memory.
    fn day_links(&self, day: NaiveDate) -> BoxStream<'static, Result<RecordLink, StoreError>>;

    /// Retention's removal of a whole UTC day: its interactions (and their children) and
    /// its blocks are deleted, and its chain row is kept, retired, with its head as the
    /// anchor that later blocks (late records of the day) continue from, so `verify`
    /// still passes. Sessions are left alone (they span days).
    ///
    /// Never one long transaction: the interactions go `batch_size` at a time, each
    /// batch its own short transaction ([`delete_day_batch`](Store::delete_day_batch)),
    /// so concurrent ingest waits for one batch at most; then
    /// [`retire_day`](Store::retire_day) closes the day in a last short one.
    ///
    /// # Interrupted
    /// Stopped between batches (a crash, the database gone), the day has fewer records
    /// than its blocks list: `verify` reports the day broken (a committed record
    /// deleted) and says that its expiry started and did not finish (the chain row is
    /// marked first by [`mark_expiring`](Store::mark_expiring)). Running retention
    /// again finishes the day: the plan lists a day with blocks left to retire even
    /// when none of its records are.
    async fn expire_day(&self, day: NaiveDate, batch_size: u32) -> Result<ExpiredDay, StoreError> {
        let batch_size = batch_size.max(1);
        self.mark_expiring(day).await?;
        let mut records = 0;
        loop {
            let deleted = self.delete_day_batch(day, batch_size).await?;
            records += deleted;
            if deleted < u64::from(batch_size) {
                break;
            }
        }
        let mut expired = self.retire_day(day).await?;
        // What retire_day found left: records of the day committed during the batches.
        expired.records += records;
        tracing::info!(%day, records = expired.records, blocks = expired.blocks, "day expired");
        Ok(expired)
    }

    /// First step of [`expire_day`](Store::expire_day): stamps the day's chain row (if
    /// any) with the time its expiry started (`retired_at`, anchor unchanged), which is
    /// how `verify` tells an interrupted expiry from a deletion.
    async fn mark_expiring(&self, day: NaiveDate) -> Result<(), StoreError>;

    /// Deletes at most `limit` interactions of a UTC day with their children (the
    /// foreign keys cascade), in one short transaction; returns how many.
    async fn delete_day_batch(&self, day: NaiveDate, limit: u32) -> Result<u64, StoreError>;

    /// Last step of [`expire_day`](Store::expire_day), in one transaction under the day
    /// row's lock (so no writer appends meanwhile): deletes what is left of the day's
    /// interactions (records committed while the batches ran), deletes the day's blocks
    /// and moves the anchor to the head. Returns what it deleted.
    async fn retire_day(&self, day: NaiveDate) -> Result<ExpiredDay, StoreError>;

    /// Counts what `inspection` looks for (`doctor`), with up to `examples` of them.
    async fn inspect(&self, inspection: Inspection, examples: u32) -> Result<Finding, StoreError>;

    /// Deletes the rows of `child` whose interaction does not exist (`doctor --repair`);
    /// returns how many. Touches nothing else: rows with their interaction, and the
    /// chain, are never changed.
    async fn delete_orphans(&self, child: ChildTable) -> Result<u64, StoreError>;

    /// Whether the full-text index agrees with the rows it indexes; `None` where the
    /// database maintains the index itself (PostgreSQL's trigram indexes).
    async fn search_index_intact(&self) -> Result<Option<bool>, StoreError>;

    /// Rebuilds the full-text index from the rows (a no-op where the database maintains
    /// it itself).
    async fn rebuild_search_index(&self) -> Result<(), StoreError>;

    /// Stores detected anomalies, skipping any already stored (same kind, scope and
    /// window); returns the ones that were new.
    async fn write_anomalies(&self, anomalies: &[NewAnomaly]) -> Result<Vec<NewAnomaly>, StoreError>;

    /// A page of anomalies, newest window first, starting after `before`.
    async fn list_anomalies(&self, before: Option<Keyset>, limit: u32) -> Result<Page<Anomaly>, StoreError>;

    /// Closes the connections.
    async fn close(&self);
}

/// The export query of `filter` with its values written in, for PostgreSQL's
/// `COPY (…) TO STDOUT` (the baseline `bench query` measures an export against).
pub(crate) fn export_statement_for_copy(filter: &Filter) -> String {
    sql::postgres_literal(&sql::select_export(Backend::Postgres, filter))
}

/// The first-page list query of `filter` with its values written in, for `EXPLAIN`
/// (`bench query` checks that no typical filter scans `interactions` sequentially).
pub(crate) fn list_statement_for_explain(filter: &Filter, limit: u32) -> String {
    sql::postgres_literal(&sql::select_page(Backend::Postgres, filter, None, limit + 1))
}

/// Gets the database ready for writes: migrates it, or (without `migrate`) checks that
/// every migration is applied. The error says why not, for logs and readiness checks.
pub async fn prepare(store: &dyn Store, migrate: bool) -> Result<(), String> {
    if migrate {
        return store.migrate().await.map_err(|e| e.to_string());
    }
    match store.readiness().await {
        Ok(r) if r.is_ready() => Ok(()),
        Ok(r) => Err(format!(
            "migrations {:?} are not applied and migrate_on_start is off: run `opsagent-audit migrate`",
            r.pending_migrations
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// Opens the configured store (`audit.database.*`). Does not migrate.
pub async fn open(config: &DatabaseConfig) -> Result<Arc<dyn Store>, StoreError> {
    connect(&config.resolved_url()?, config).await
}

/// Opens the store a URL names: `postgres://…`/`postgresql://…` or `sqlite://PATH`
/// (`sqlite::memory:` for a throwaway database). Does not migrate.
pub async fn connect(url: &str, options: &DatabaseConfig) -> Result<Arc<dyn Store>, StoreError> {
    tracing::info!(url = %redact_url(url), "opening store");
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresStore::connect(url, options).await?.with_hash_chain(options.hash_chain)))
    } else if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::connect(url).await?.with_hash_chain(options.hash_chain)))
    } else {
        Err(StoreError::UnsupportedUrl(redact_url(url)))
    }
}

/// Orders a batch for writing: one record per `interaction_id` (the first wins), sorted by
/// id so that concurrent transactions take row locks in the same order and cannot
/// deadlock. Returns the records to write and how many repeats were removed.
pub(crate) fn dedup_sorted(batch: &[Interaction]) -> (Vec<&Interaction>, u64) {
    let mut records: Vec<&Interaction> = batch.iter().collect();
    // Stable sort keeps the first occurrence of each id first among its equals.
    records.sort_by_key(|r| r.interaction_id);
    let before = records.len();
    records.dedup_by_key(|r| r.interaction_id);
    let repeats = (before - records.len()) as u64;
    (records, repeats)
}

/// Maps a migration failure: an unreachable database is [`StoreError::Unavailable`] (so
/// start-up waits and retries), anything else [`StoreError::Migration`].
pub(crate) fn migrate_error(e: sqlx::migrate::MigrateError, classify: fn(sqlx::Error) -> StoreError) -> StoreError {
    match e {
        sqlx::migrate::MigrateError::Execute(inner) => match classify(inner) {
            unavailable @ StoreError::Unavailable(_) => unavailable,
            other => StoreError::Migration(Box::new(other)),
        },
        other => StoreError::Migration(Box::new(other)),
    }
}

/// One dead letter per `interaction_id` (the last wins: it is the latest refusal),
/// sorted: an upsert cannot touch the same row twice in one statement.
pub(crate) fn dedup_dead_letters(letters: &[DeadLetter]) -> Vec<&DeadLetter> {
    let mut out: Vec<&DeadLetter> = letters.iter().rev().collect();
    out.sort_by_key(|l| l.interaction_id);
    out.dedup_by_key(|l| l.interaction_id);
    out
}

/// The sessions a batch touches, one per `session_id` (earliest record's data), sorted.
pub(crate) fn sessions_of<'a>(records: &[&'a Interaction]) -> Vec<&'a Interaction> {
    let mut sessions: Vec<&Interaction> = records.to_vec();
    sessions.sort_by(|a, b| a.session_id.cmp(&b.session_id).then(a.created_at.cmp(&b.created_at)));
    sessions.dedup_by_key(|r| r.session_id);
    sessions
}
