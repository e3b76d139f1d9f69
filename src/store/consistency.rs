//! Consistency inspections for `doctor`, written once for both databases over
//! [`Fetch`]: each is one statement yielding one row per offending item (an
//! `example` column naming it), counted and sampled by the same code.
//!
//! These look for states the schema forbids or the writers never produce, which appear
//! when someone bypassed them: foreign keys disabled (`session_replication_role =
//! replica` on PostgreSQL, `PRAGMA foreign_keys = OFF` on SQLite, which is per
//! connection and off unless a client turns it on; this store's pool turns it on), rows
//! deleted or inserted by hand, a restore of some tables only.

use super::read::Fetch;
use super::rows::{CountRow, ExampleRow};
use super::sql::Sql;
use super::StoreError;

/// A child table of `interactions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChildTable {
    /// `thoughts`.
    Thoughts,
    /// `tool_calls`.
    ToolCalls,
    /// `performance_metrics`.
    PerformanceMetrics,
}

impl ChildTable {
    /// Every child table.
    pub const ALL: [ChildTable; 3] = [ChildTable::Thoughts, ChildTable::ToolCalls, ChildTable::PerformanceMetrics];

    /// The table's name.
    pub fn table(self) -> &'static str {
        match self {
            ChildTable::Thoughts => "thoughts",
            ChildTable::ToolCalls => "tool_calls",
            ChildTable::PerformanceMetrics => "performance_metrics",
        }
    }
}

/// What to look for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inspection {
    /// Rows of a child table whose interaction does not exist (examples: the
    /// interaction ids they name).
    Orphans(ChildTable),
    /// Sessions no interaction belongs to (examples: session ids). Harmless: retention
    /// leaves sessions alone, as they span days.
    EmptySessions,
    /// Interactions whose thoughts' `sequence_number`s repeat or skip (examples:
    /// interaction ids).
    ThoughtSequences,
    /// Interactions whose tool calls' `sequence_number`s repeat or skip.
    ToolCallSequences,
    /// Tool calls naming a `thought_sequence_number` their interaction has no thought
    /// for (examples: interaction ids): a thought deleted after the fact, or a producer
    /// that referenced one it never sent (ingest does not refuse that).
    DanglingThoughtRefs,
    /// Records the database refused, kept aside (examples: interaction ids).
    DeadLetters,
}

/// What an inspection found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Finding {
    /// How many offending rows (or interactions, for the per-interaction inspections).
    pub count: u64,
    /// A few of them, in id order.
    pub examples: Vec<String>,
}

/// The statement yielding one `example` row per offending item.
fn subject(inspection: Inspection) -> String {
    // A skip is a spread wider than the count of distinct numbers; a repeat is fewer
    // distinct numbers than rows. Where the numbering starts is the producer's choice.
    let sequences = |table: &str| {
        format!(
            "SELECT CAST(interaction_id AS TEXT) AS example FROM {table} GROUP BY interaction_id
             HAVING count(*) <> count(DISTINCT sequence_number)
                 OR max(sequence_number) - min(sequence_number) + 1 <> count(DISTINCT sequence_number)"
        )
    };
    match inspection {
        Inspection::Orphans(child) => format!(
            "SELECT CAST(c.interaction_id AS TEXT) AS example FROM {} c
             WHERE NOT EXISTS (SELECT 1 FROM interactions i WHERE i.interaction_id = c.interaction_id)",
            child.table()
        ),
        Inspection::EmptySessions => "SELECT CAST(s.session_id AS TEXT) AS example FROM sessions s
             WHERE NOT EXISTS (SELECT 1 FROM interactions i WHERE i.session_id = s.session_id)"
            .to_string(),
        Inspection::ThoughtSequences => sequences("thoughts"),
        Inspection::ToolCallSequences => sequences("tool_calls"),
        // Orphans are another inspection's: only tool calls of existing interactions.
        Inspection::DanglingThoughtRefs => "SELECT DISTINCT CAST(c.interaction_id AS TEXT) AS example FROM tool_calls c
             WHERE c.thought_sequence_number IS NOT NULL
               AND EXISTS (SELECT 1 FROM interactions i WHERE i.interaction_id = c.interaction_id)
               AND NOT EXISTS (SELECT 1 FROM thoughts t
                   WHERE t.interaction_id = c.interaction_id AND t.sequence_number = c.thought_sequence_number)"
            .to_string(),
        Inspection::DeadLetters => "SELECT CAST(interaction_id AS TEXT) AS example FROM dead_letters".to_string(),
    }
}

/// Counts what `inspection` looks for, with up to `examples` distinct examples.
pub(crate) async fn inspect(db: &impl Fetch, inspection: Inspection, examples: u32) -> Result<Finding, StoreError> {
    let subject = subject(inspection);
    let mut count = Sql::new(db.dialect());
    count.push(&format!("SELECT count(*) AS n FROM ({subject}) s"));
    let counted: Vec<CountRow> = db.fetch_all(count).await?;
    let count = counted.first().map_or(0, |r| r.n.max(0) as u64);
    if count == 0 || examples == 0 {
        return Ok(Finding { count, examples: Vec::new() });
    }
    let mut sample = Sql::new(db.dialect());
    sample.push(&format!("SELECT DISTINCT example FROM ({subject}) s ORDER BY example LIMIT {examples}"));
    let rows: Vec<ExampleRow> = db.fetch_all(sample).await?;
    Ok(Finding { count, examples: rows.into_iter().map(|r| r.example).collect() })
}

/// The statement deleting the rows of `child` whose interaction is gone, one row back
/// per deleted row (`RETURNING`: PostgreSQL, and SQLite since 3.35).
pub(crate) fn delete_orphans(child: ChildTable) -> String {
    format!(
        "DELETE FROM {0} WHERE NOT EXISTS
             (SELECT 1 FROM interactions i WHERE i.interaction_id = {0}.interaction_id)",
        child.table()
    )
}
