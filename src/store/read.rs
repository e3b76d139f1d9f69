//! The read operations, written once over [`Fetch`]: each backend only says how to run a
//! statement of `sql` and get rows back; building the statement, paging and turning rows
//! into public types is shared, so both databases answer every read the same way.

use async_trait::async_trait;
use chrono::NaiveDate;
use futures::stream::{BoxStream, StreamExt};
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;
use sqlx::FromRow;
use uuid::Uuid;

use super::chain::{ChainBlock, ChainDay, DayCount, RecordLink};
use super::filter::{Filter, FrequentQuestion, InteractionSummary, Keyset, Page, SessionView, StatsRequest, StatsRow};
use super::rows::{
    ChainBlockRow, ChainDayRow, CountRow, DayCountRow, DeadLetterRow, FullRow, LinkRow, QuestionRow, SessionRow,
    StatsRowRaw, SummaryRow,
};
use super::sql::{self, Sql};
use super::{Backend, DeadLetter, StoreError};
use crate::model::Interaction;

/// A row type both databases decode.
pub(crate) trait ReadRow:
    for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow> + Send + Unpin + 'static
{
}
impl<T> ReadRow for T where T: for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow> + Send + Unpin + 'static {}

/// How a backend runs a read statement.
#[async_trait]
pub(crate) trait Fetch: Send + Sync {
    /// The dialect statements are built for.
    fn dialect(&self) -> Backend;

    /// Runs `sql` and collects its rows.
    async fn fetch_all<R: ReadRow>(&self, sql: Sql) -> Result<Vec<R>, StoreError>;

    /// Runs `sql` and yields its rows as the database sends them (constant memory: the
    /// rows are read off the connection as the stream is polled).
    fn fetch_stream<R: ReadRow>(&self, sql: Sql) -> BoxStream<'static, Result<R, StoreError>>;
}

/// The body of [`Fetch::fetch_stream`] for a backend: runs the statement in a task of
/// its own and yields its rows as they come. The statement borrows its text, so the task
/// owns both; rows reach the reader through a short channel, and a reader that goes away
/// stops the query at the next row. A macro, not a generic function: sqlx's bounds for
/// arguments that outlive a borrowed statement differ per database (SQLite's arguments
/// carry the statement's lifetime).
macro_rules! spawn_rows {
    ($pool:expr, $sql:expr, $arguments:path, $classify:path) => {{
        use futures::StreamExt as _;
        /// Rows an export runs ahead of its reader.
        const BUFFER: usize = 256;
        let (pool, sql) = ($pool, $sql);
        let (tx, rx) = tokio::sync::mpsc::channel(BUFFER);
        tokio::spawn(async move {
            let args = match $arguments(sql.params) {
                Ok(args) => args,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            let mut rows = sqlx::query_as_with::<_, R, _>(&sql.text, args).fetch(&pool);
            while let Some(row) = rows.next().await {
                let failed = row.is_err();
                if tx.send(row.map_err($classify)).await.is_err() || failed {
                    return;
                }
            }
        });
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|row| (row, rx)) }).boxed()
    }};
}
pub(crate) use spawn_rows;

/// One interaction in full.
pub(crate) async fn interaction(db: &impl Fetch, id: Uuid) -> Result<Interaction, StoreError> {
    let rows: Vec<FullRow> = db.fetch_all(sql::select_interaction(db.dialect(), id)).await?;
    rows.into_iter().next().ok_or(StoreError::NotFound)?.try_into()
}

/// How many interactions match.
pub(crate) async fn count(db: &impl Fetch, filter: &Filter) -> Result<u64, StoreError> {
    let rows: Vec<CountRow> = db.fetch_all(sql::select_count(db.dialect(), filter)).await?;
    Ok(rows.first().map_or(0, |r| r.n.max(0) as u64))
}

/// A newest-first page: one row more than asked tells whether another page exists.
pub(crate) async fn page(
    db: &impl Fetch,
    filter: &Filter,
    after: Option<Keyset>,
    limit: u32,
) -> Result<Page<InteractionSummary>, StoreError> {
    let rows: Vec<SummaryRow> = db.fetch_all(sql::select_page(db.dialect(), filter, after, limit + 1)).await?;
    paginate(rows.into_iter().map(SummaryRow::into_summary), limit)
}

/// The newest dead letters, a page at a time.
pub(crate) async fn dead_letters(
    db: &impl Fetch,
    before: Option<Keyset>,
    limit: u32,
) -> Result<Page<DeadLetter>, StoreError> {
    let rows: Vec<DeadLetterRow> = db.fetch_all(sql::select_dead_letters(db.dialect(), before, limit + 1)).await?;
    paginate(rows.into_iter().map(DeadLetterRow::into_letter), limit)
}

pub(crate) fn paginate<T>(
    rows: impl Iterator<Item = Result<(T, Keyset), StoreError>>,
    limit: u32,
) -> Result<Page<T>, StoreError> {
    let mut items = Vec::with_capacity(limit as usize);
    let mut last = None;
    let mut more = false;
    for row in rows {
        if items.len() == limit as usize {
            more = true;
            break;
        }
        let (item, keyset) = row?;
        items.push(item);
        last = Some(keyset);
    }
    Ok(Page { items, next: if more { last } else { None } })
}

/// A session and its first `limit` interactions in the order they happened.
pub(crate) async fn session(db: &impl Fetch, session_id: Uuid, limit: u32) -> Result<SessionView, StoreError> {
    let sessions: Vec<SessionRow> = db.fetch_all(sql::select_session(db.dialect(), session_id)).await?;
    let session = sessions.into_iter().next().ok_or(StoreError::NotFound)?;
    let rows: Vec<FullRow> = db.fetch_all(sql::select_session_interactions(db.dialect(), session_id, limit)).await?;
    let interactions = rows.into_iter().map(Interaction::try_from).collect::<Result<_, _>>()?;
    session.into_view(interactions)
}

/// Aggregates, computed by the database.
pub(crate) async fn stats(db: &impl Fetch, request: &StatsRequest) -> Result<Vec<StatsRow>, StoreError> {
    let rows: Vec<StatsRowRaw> = db.fetch_all(sql::select_stats(db.dialect(), request)).await?;
    rows.into_iter().map(StatsRow::try_from).collect()
}

/// The most frequent questions.
pub(crate) async fn frequent_questions(
    db: &impl Fetch,
    filter: &Filter,
    limit: u32,
) -> Result<Vec<FrequentQuestion>, StoreError> {
    let rows: Vec<QuestionRow> = db.fetch_all(sql::select_frequent_questions(db.dialect(), filter, limit)).await?;
    Ok(rows.into_iter().map(FrequentQuestion::from).collect())
}

/// Every matching interaction in full, oldest first, streamed.
pub(crate) fn export(db: &impl Fetch, filter: &Filter) -> BoxStream<'static, Result<Interaction, StoreError>> {
    db.fetch_stream::<FullRow>(sql::select_export(db.dialect(), filter))
        .map(|row| row.and_then(Interaction::try_from))
        .boxed()
}

/// The chain rows of a range of days.
pub(crate) async fn chain_days(
    db: &impl Fetch,
    from: Option<NaiveDate>,
    to: Option<NaiveDate>,
) -> Result<Vec<ChainDay>, StoreError> {
    let rows: Vec<ChainDayRow> = db.fetch_all(sql::select_chain_days(db.dialect(), from, to)).await?;
    Ok(rows.into_iter().map(ChainDay::from).collect())
}

/// The days with interactions in a range.
pub(crate) async fn record_days(
    db: &impl Fetch,
    from: Option<NaiveDate>,
    to: Option<NaiveDate>,
) -> Result<Vec<DayCount>, StoreError> {
    let rows: Vec<DayCountRow> = db.fetch_all(sql::select_record_days(db.dialect(), from, to)).await?;
    Ok(rows.into_iter().map(DayCount::from).collect())
}

/// A page of a day's blocks.
pub(crate) async fn chain_blocks(
    db: &impl Fetch,
    day: NaiveDate,
    after_seq: i64,
    limit: u32,
) -> Result<Vec<ChainBlock>, StoreError> {
    let rows: Vec<ChainBlockRow> = db.fetch_all(sql::select_chain_blocks(db.dialect(), day, after_seq, limit)).await?;
    rows.into_iter().map(ChainBlock::try_from).collect()
}

/// A block's interactions in full.
pub(crate) async fn block_records(db: &impl Fetch, block_id: Uuid) -> Result<Vec<Interaction>, StoreError> {
    let rows: Vec<FullRow> = db.fetch_all(sql::select_block_records(db.dialect(), block_id)).await?;
    rows.into_iter().map(Interaction::try_from).collect()
}

/// A day's interactions and their blocks, streamed.
pub(crate) fn day_links(db: &impl Fetch, day: NaiveDate) -> BoxStream<'static, Result<RecordLink, StoreError>> {
    db.fetch_stream::<LinkRow>(sql::select_day_links(db.dialect(), day))
        .map(|row| row.and_then(RecordLink::try_from))
        .boxed()
}
