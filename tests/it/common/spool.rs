//! Helpers for the spool's tests (`spool.rs`, `spool_props.rs`): a spool in a directory,
//! reading records back with a bound on the wait, settling what was read.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use opsagent_audit::config::SpoolConfig;
use opsagent_audit::pipeline::{Spool, SpoolRef, Spooled};
use tokio::sync::mpsc;

/// How long a read waits when records must come (the reader retries a failed read after
/// 1 s, e.g. a segment evicted under it).
pub const PATIENCE: Duration = Duration::from_secs(10);

/// The default spool settings, in `dir`.
pub fn config(dir: &Path) -> SpoolConfig {
    SpoolConfig { dir: dir.to_path_buf(), ..SpoolConfig::default() }
}

/// Receives whole batches until at least `n` records arrived, or fails after
/// [`PATIENCE`].
pub async fn read_at_least(rx: &mut mpsc::Receiver<Vec<Spooled>>, n: usize) -> Vec<Spooled> {
    let mut out = Vec::new();
    while out.len() < n {
        let batch = tokio::time::timeout(PATIENCE, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} spooled records read back within {PATIENCE:?}", out.len()))
            .expect("the reader is running");
        out.extend(batch);
    }
    out
}

/// Receives exactly `n` records, or fails after [`PATIENCE`] (or if a batch brings more).
pub async fn read_n(rx: &mut mpsc::Receiver<Vec<Spooled>>, n: usize) -> Vec<Spooled> {
    let out = read_at_least(rx, n).await;
    assert_eq!(out.len(), n, "more records read back than expected");
    out
}

/// Settles every record read, segment by segment.
pub fn settle_all(spool: &Spool, read: &[Spooled]) {
    let mut per_segment: BTreeMap<SpoolRef, u64> = BTreeMap::new();
    for s in read {
        *per_segment.entry(s.at).or_default() += 1;
    }
    for (at, n) in per_segment {
        spool.settle(at, n);
    }
}
