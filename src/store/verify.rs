//! `verify`: walks each day's hash chain over the [`Store`] and recomputes it from the
//! rows as they are now.
//!
//! Per day, in this order (the first problem found is the day's answer):
//! 1. Blocks in seq order from the day's anchor (genesis, or where retention stopped):
//!    seq contiguous, `prev_hash` equal to the hash before, the root equal to the hash of
//!    the leaves, the block hash recomputed; then the records carrying the block's id,
//!    each re-hashed and matched against the leaves by id: a hash that differs is a
//!    modified record, a leaf without a row a deleted one, a row without a leaf an added
//!    one. A moved `created_at` is a modification (it is hashed).
//! 2. The last block's hash equal to the day's head and the block count to the day's.
//! 3. Every record of the day (streamed: ids only) carries one of the day's blocks: a
//!    NULL or foreign `chain_block` on a chained day is an inserted row. A day with no
//!    chain row whose records are all unchained was written before the hash chain (or
//!    with it off): reported as unchained, not as a failure.
//!
//! A day whose expiry by retention was interrupted (records deleted in batches, blocks
//! not yet retired, see [`Store::expire_day`]) is broken with a deleted record, and the
//! problem says the expiry did not finish.
//!
//! Memory is bounded by one block (its leaves and records) plus one id per block of the
//! day; records are never all held at once.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use chrono::{DateTime, NaiveDate, Utc};
use futures::StreamExt;
use uuid::Uuid;

use super::chain::{self, ChainBlock, ChainDay, Hash};
use super::{Store, StoreError};

/// Blocks read per round trip.
const BLOCK_PAGE: u32 = 64;

/// What is wrong with a day's chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// A record's content differs from what was committed.
    Modified,
    /// A committed record is gone.
    Deleted,
    /// A record that was never committed through the chain (or not in this block).
    Inserted,
    /// A block's `prev_hash` is not the hash of the block before.
    BrokenLink,
    /// A block of the sequence is missing.
    MissingBlock,
    /// A block's stored fields do not hash to its stored hash or root.
    BlockAltered,
    /// The day's head or block count does not match its last block.
    HeadMismatch,
}

impl ProblemKind {
    /// A fixed short name.
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemKind::Modified => "modified",
            ProblemKind::Deleted => "deleted",
            ProblemKind::Inserted => "inserted",
            ProblemKind::BrokenLink => "broken link",
            ProblemKind::MissingBlock => "missing block",
            ProblemKind::BlockAltered => "block altered",
            ProblemKind::HeadMismatch => "head mismatch",
        }
    }
}

/// The first problem found on a day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// What kind.
    pub kind: ProblemKind,
    /// The block it was found in, when there is one.
    pub seq: Option<i64>,
    /// The record, when it is about one.
    pub interaction_id: Option<Uuid>,
    /// What exactly.
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.as_str())?;
        if let Some(id) = self.interaction_id {
            write!(f, ": interaction {id}")?;
        }
        if let Some(seq) = self.seq {
            write!(f, " (block {seq})")?;
        }
        write!(f, ": {}", self.detail)
    }
}

/// How a day came out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DayStatus {
    /// Every block and record checks out.
    Ok,
    /// Retention removed the day; blocks appended after it (late records) check out.
    Retired {
        /// When.
        at: DateTime<Utc>,
    },
    /// Records written before the hash chain existed or with it off; nothing to check.
    Unchained,
    /// The first problem found.
    Broken(Problem),
}

/// One day's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DayReport {
    /// The UTC day.
    pub day: NaiveDate,
    /// Blocks checked.
    pub blocks: u64,
    /// Records stored for the day now.
    pub records: u64,
    /// Records without a block (only on an unchained day; elsewhere a problem).
    pub unchained: u64,
    /// The day's head as stored (hex), to be kept elsewhere: whoever can rewrite the
    /// whole day including its chain row can only be caught against a copy.
    pub head: Option<String>,
    /// The outcome.
    pub status: DayStatus,
}

/// The result of [`verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Each day in the range that has records or a chain, oldest first.
    pub days: Vec<DayReport>,
}

impl VerifyReport {
    /// True when no day is broken.
    pub fn is_ok(&self) -> bool {
        self.first_problem().is_none()
    }

    /// The oldest broken day and its problem.
    pub fn first_problem(&self) -> Option<(NaiveDate, &Problem)> {
        self.days.iter().find_map(|d| match &d.status {
            DayStatus::Broken(p) => Some((d.day, p)),
            _ => None,
        })
    }
}

/// Verifies the chains of the days from `from` to `to` (inclusive; open ends: all).
pub async fn verify(
    store: &dyn Store,
    from: Option<NaiveDate>,
    to: Option<NaiveDate>,
) -> Result<VerifyReport, StoreError> {
    let mut days: BTreeMap<NaiveDate, (Option<ChainDay>, u64)> = BTreeMap::new();
    for chain_day in store.chain_days(from, to).await? {
        let day = chain_day.day;
        days.entry(day).or_default().0 = Some(chain_day);
    }
    for count in store.record_days(from, to).await? {
        days.entry(count.day).or_default().1 = count.records;
    }
    let mut report = VerifyReport::default();
    for (day, (chain_day, records)) in days {
        let day_report = verify_day(store, day, chain_day, records).await?;
        tracing::debug!(%day, status = ?day_report.status, "day verified");
        report.days.push(day_report);
    }
    Ok(report)
}

async fn verify_day(
    store: &dyn Store,
    day: NaiveDate,
    chain_day: Option<ChainDay>,
    records: u64,
) -> Result<DayReport, StoreError> {
    let mut report = DayReport {
        day,
        blocks: 0,
        records,
        unchained: 0,
        head: chain_day.as_ref().map(|c| hex::encode(&c.head)),
        status: DayStatus::Ok,
    };
    let Some(chain_day) = chain_day else {
        // No chain: every record must be unchained; one carrying a block id was moved
        // here or forged.
        let (unchained, stray) = scan_links(store, day, None, &HashMap::new()).await?;
        report.unchained = unchained;
        report.status = match stray {
            Some(stray) => DayStatus::Broken(stray.problem()),
            None => DayStatus::Unchained,
        };
        return Ok(report);
    };

    let mut walk = Walk::new(&chain_day);
    if let Some(mut problem) = walk_blocks(store, &chain_day, &mut walk).await? {
        report.blocks = walk.checked;
        // Stamped by retention's first step and not yet anchored by its last: the
        // missing records are most likely that unfinished expiry's. Still a failure
        // (it cannot be told from a deletion by hand), but the operator learns the fix.
        if let (ProblemKind::Deleted, Some(at), 0) = (problem.kind, chain_day.retired_at, chain_day.anchor_seq) {
            problem.detail.push_str(&format!(
                "; the day's expiry by retention started at {at} and did not finish: run `retention run` again to \
                 complete it"
            ));
        }
        report.status = DayStatus::Broken(problem);
        return Ok(report);
    }
    report.blocks = walk.checked;
    if let Some(problem) = walk.finish(&chain_day) {
        report.status = DayStatus::Broken(problem);
        return Ok(report);
    }
    let legacy = u64::try_from(chain_day.legacy_records).unwrap_or(0);
    let (unchained, stray) = scan_links(store, day, Some(legacy), &walk.block_seqs).await?;
    report.unchained = unchained;
    if let Some(stray) = stray {
        report.status = DayStatus::Broken(stray.problem());
        return Ok(report);
    }
    if let Some(at) = chain_day.retired_at {
        report.status = DayStatus::Retired { at };
    }
    Ok(report)
}

/// Where the walk along a day's blocks is.
struct Walk {
    /// Seq the next block must have.
    next_seq: i64,
    /// Hash the next block must point back to.
    prev: Vec<u8>,
    /// Blocks checked.
    checked: u64,
    /// Block id → seq of every block walked (for the record scan).
    block_seqs: HashMap<Uuid, i64>,
}

impl Walk {
    fn new(chain_day: &ChainDay) -> Walk {
        Walk {
            next_seq: chain_day.anchor_seq + 1,
            prev: chain_day.anchor_hash.clone(),
            checked: 0,
            block_seqs: HashMap::new(),
        }
    }

    /// Checks a block's own fields and its link; records are checked apart.
    fn step(&mut self, block: &ChainBlock) -> Option<Problem> {
        let problem = |kind, detail: String| Some(Problem { kind, seq: Some(block.seq), interaction_id: None, detail });
        if block.seq != self.next_seq {
            return problem(
                ProblemKind::MissingBlock,
                format!("expected block {} next, found block {}", self.next_seq, block.seq),
            );
        }
        if block.prev_hash != self.prev {
            return problem(ProblemKind::BrokenLink, "does not point back to the block before it".into());
        }
        let Some(leaves) = chain::parse_leaves(&block.leaves) else {
            return problem(ProblemKind::BlockAltered, "its record list is not whole".into());
        };
        if leaves.len() as i64 != block.record_count {
            return problem(
                ProblemKind::BlockAltered,
                format!("lists {} records but says {}", leaves.len(), block.record_count),
            );
        }
        let root = chain::root(&block.leaves);
        if block.root != root {
            return problem(ProblemKind::BlockAltered, "its root is not the hash of its record list".into());
        }
        let hash = chain::block_hash(&self.prev, block.day, block.seq, block.block_id, block.record_count, &root);
        if block.hash != hash {
            return problem(ProblemKind::BlockAltered, "its hash does not match its contents".into());
        }
        self.next_seq += 1;
        self.prev = block.hash.clone();
        self.checked += 1;
        self.block_seqs.insert(block.block_id, block.seq);
        None
    }

    /// Checks that the walk ended where the day's row says the chain ends.
    fn finish(&self, chain_day: &ChainDay) -> Option<Problem> {
        let last = self.next_seq - 1;
        if last != chain_day.blocks {
            return Some(Problem {
                kind: ProblemKind::MissingBlock,
                seq: Some(last + 1),
                interaction_id: None,
                detail: format!("the day has {} blocks, the chain ends at block {last}", chain_day.blocks),
            });
        }
        if self.prev != chain_day.head {
            return Some(Problem {
                kind: ProblemKind::HeadMismatch,
                seq: Some(last),
                interaction_id: None,
                detail: "the day's head is not the hash of its last block".into(),
            });
        }
        None
    }
}

/// Walks the day's blocks from the anchor; returns the first problem.
async fn walk_blocks(store: &dyn Store, chain_day: &ChainDay, walk: &mut Walk) -> Result<Option<Problem>, StoreError> {
    let mut after = chain_day.anchor_seq;
    loop {
        let blocks = store.chain_blocks(chain_day.day, after, BLOCK_PAGE).await?;
        let Some(last) = blocks.last() else { return Ok(None) };
        after = last.seq;
        for block in &blocks {
            if let Some(problem) = walk.step(block) {
                return Ok(Some(problem));
            }
            if let Some(problem) = check_records(store, block).await? {
                return Ok(Some(problem));
            }
        }
    }
}

/// Matches the records carrying a block's id against its leaves.
async fn check_records(store: &dyn Store, block: &ChainBlock) -> Result<Option<Problem>, StoreError> {
    let expected = chain::parse_leaves(&block.leaves).unwrap_or_default();
    let mut found: Vec<(Uuid, Hash)> =
        store.block_records(block.block_id).await?.iter().map(|r| (r.interaction_id, chain::record_hash(r))).collect();
    found.sort_by_key(|(id, _)| *id);
    let problem = |kind, id: Uuid, detail: &str| {
        Some(Problem { kind, seq: Some(block.seq), interaction_id: Some(id), detail: detail.to_string() })
    };
    let (mut e, mut f) = (expected.iter().peekable(), found.iter().peekable());
    loop {
        match (e.peek(), f.peek()) {
            (None, None) => return Ok(None),
            (Some((id, _)), None) => return Ok(problem(ProblemKind::Deleted, *id, "committed, no longer stored")),
            (None, Some((id, _))) => {
                return Ok(problem(ProblemKind::Inserted, *id, "stored in a block it was not committed in"))
            }
            (Some((eid, eh)), Some((fid, fh))) => {
                if eid < fid {
                    return Ok(problem(ProblemKind::Deleted, *eid, "committed, no longer stored"));
                }
                if fid < eid {
                    return Ok(problem(ProblemKind::Inserted, *fid, "stored in a block it was not committed in"));
                }
                if eh != fh {
                    return Ok(problem(ProblemKind::Modified, *eid, "its content differs from what was committed"));
                }
                e.next();
                f.next();
            }
        }
    }
}

/// A record of a day that is not in one of the day's blocks.
enum Stray {
    /// No block, on a day that is chained.
    Unchained(Uuid),
    /// A block that is not one of the day's (moved here, or a forged id).
    Foreign(Uuid, Uuid),
}

impl Stray {
    fn problem(&self) -> Problem {
        let (id, detail) = match self {
            Stray::Unchained(id) => (
                *id,
                "has no block on a day whose records are chained (inserted with SQL, or written with hash_chain off)"
                    .to_string(),
            ),
            Stray::Foreign(id, block) => (*id, format!("carries block {block}, which is not a block of this day")),
        };
        Problem { kind: ProblemKind::Inserted, seq: None, interaction_id: Some(id), detail }
    }
}

/// Streams the day's `(interaction_id, chain_block)` pairs: counts records without a
/// block and returns the first record whose block is not one of `blocks`, or, on a
/// chained day (`legacy` is `Some`), the first unchained record beyond the `legacy`
/// ones stored before the chain existed (which one is the forgery cannot be told; the
/// record named is the first beyond the count).
async fn scan_links(
    store: &dyn Store,
    day: NaiveDate,
    legacy: Option<u64>,
    blocks: &HashMap<Uuid, i64>,
) -> Result<(u64, Option<Stray>), StoreError> {
    let mut links = store.day_links(day);
    let mut unchained = 0;
    while let Some(link) = links.next().await {
        let link = link?;
        match link.chain_block {
            None if legacy.is_some_and(|n| unchained >= n) => {
                return Ok((unchained, Some(Stray::Unchained(link.interaction_id))))
            }
            None => unchained += 1,
            Some(block) if !blocks.contains_key(&block) => {
                return Ok((unchained, Some(Stray::Foreign(link.interaction_id, block))));
            }
            Some(_) => {}
        }
    }
    Ok((unchained, None))
}
