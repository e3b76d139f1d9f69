//! Opening a spool directory: take its lock, find the segments an earlier run left,
//! check each frame by frame, cut off a torn tail, and rebuild the [`Ledger`].
//!
//! Nothing found here is ever a reason not to start: a file that is not a segment is
//! discarded, a torn tail is truncated, a corrupt frame in the middle is skipped (the
//! frames after it are kept, see `frame`), and each loss is logged and counted.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use super::frame::{self, Decoded, HEADER, MAGIC};
use super::io::{read_frame, read_range, Filesystem};
use super::ledger::{Ledger, Segment};
use super::{SpoolError, SpoolStats};

/// Read buffer of the start-up scan.
const SCAN_BUFFER: usize = 1 << 20;

/// The name of a segment file: its id as 16 hex digits.
pub fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.seg"))
}

/// The marker of a segment whose tail could not be cut off after a failed write: it
/// holds the segment's valid length, so the next start does not replay frames whose
/// producers were told they failed. `DIR/<id>.seg.valid`.
pub fn valid_marker_path(segment: &Path) -> PathBuf {
    segment.with_extension("seg.valid")
}

/// The valid length a marker records, if there is a readable one.
fn valid_length(segment: &Path) -> Option<u64> {
    fs::read_to_string(valid_marker_path(segment)).ok()?.trim().parse().ok()
}

/// Creates the directory and takes the exclusive lock on `DIR/LOCK`, held for as long as
/// the returned file is open.
pub fn lock(dir: &Path) -> Result<File, SpoolError> {
    fs::create_dir_all(dir).map_err(|e| SpoolError::io(dir, e))?;
    let path = dir.join("LOCK");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| SpoolError::io(&path, e))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(fs::TryLockError::WouldBlock) => Err(SpoolError::Locked(dir.to_path_buf())),
        Err(fs::TryLockError::Error(e)) => Err(SpoolError::io(&path, e)),
    }
}

/// The ids of the segment files in `dir`, oldest first.
fn segment_ids(dir: &Path) -> Result<Vec<u64>, SpoolError> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| SpoolError::io(dir, e))? {
        let entry = entry.map_err(|e| SpoolError::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(id) = name.strip_suffix(".seg").and_then(|h| u64::from_str_radix(h, 16).ok()) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// What checking one segment found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Checked {
    /// Length of the valid part (the file is cut to it).
    pub bytes: u64,
    /// Valid frames.
    pub records: u64,
    /// Corrupt regions skipped in the middle, and a torn tail if any.
    pub corrupt_regions: u64,
    /// Bytes in them.
    pub corrupt_bytes: u64,
}

/// Walks the frames of a segment held in memory. `None` when it is not a segment at all.
pub fn check(bytes: &[u8]) -> Option<Checked> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return None;
    }
    Some(walk(&bytes[MAGIC.len()..], MAGIC.len() as u64))
}

/// Walks frames held in memory that start at file offset `base`: valid frames are
/// counted, a corrupt one is skipped to the next valid frame, and what follows the last
/// valid frame is a torn tail.
fn walk(bytes: &[u8], base: u64) -> Checked {
    let mut checked = Checked { bytes: base, ..Checked::default() };
    let mut at = 0;
    loop {
        match frame::decode(&bytes[at..]) {
            Decoded::Frame { len, .. } => {
                at += len;
                checked.records += 1;
                checked.bytes = base + at as u64;
            }
            Decoded::End => break,
            Decoded::Corrupt(_) => {
                checked.corrupt_regions += 1;
                match frame::resync(&bytes[at..]) {
                    Some(skip) => {
                        checked.corrupt_bytes += skip as u64;
                        at += skip;
                    }
                    None => {
                        // Nothing valid after it: a torn tail, cut off.
                        checked.corrupt_bytes += (bytes.len() - at) as u64;
                        break;
                    }
                }
            }
        }
    }
    checked
}

/// Checks a file frame by frame, streaming; only from a corrupt frame on (rare: a crash
/// mid-write, damage on disk) is the rest of the file read into memory to resynchronise.
/// `None` when it is not a segment; otherwise what is valid, and the file's length.
fn scan(fs: &dyn Filesystem, path: &Path) -> std::io::Result<(Option<Checked>, u64)> {
    let on_disk = fs.len(path)?;
    // Bytes past a valid-length marker were never acknowledged: they are not scanned,
    // and the cut below removes them.
    let len = valid_length(path).map_or(on_disk, |valid| valid.min(on_disk));
    let mut reader = BufReader::with_capacity(SCAN_BUFFER, fs.open(path)?);
    let mut magic = [0u8; MAGIC.len()];
    if len < MAGIC.len() as u64 {
        return Ok((None, len));
    }
    reader.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Ok((None, len));
    }
    let mut checked = Checked { bytes: MAGIC.len() as u64, ..Checked::default() };
    while checked.bytes < len {
        if let Ok(payload) = read_frame(&mut reader, len - checked.bytes)? {
            checked.bytes += (HEADER + payload.len()) as u64;
            checked.records += 1;
            continue;
        }
        let rest = read_range(fs, path, checked.bytes, len)?;
        let tail = walk(&rest, checked.bytes);
        checked.bytes = tail.bytes;
        checked.records += tail.records;
        checked.corrupt_regions += tail.corrupt_regions;
        checked.corrupt_bytes += tail.corrupt_bytes;
        break;
    }
    Ok((Some(checked), on_disk))
}

/// Checks a segment found at start-up and truncates it after its last valid frame.
/// `None` when the file is not a segment (it is counted and should be deleted).
fn recover_segment(fs: &dyn Filesystem, path: &Path, stats: &SpoolStats) -> Option<Checked> {
    let (checked, len) = match scan(fs, path) {
        Ok(scanned) => scanned,
        Err(e) => {
            set_aside(path, stats, &e);
            return None;
        }
    };
    let Some(checked) = checked else {
        stats.corrupt_bytes.fetch_add(len, Ordering::Relaxed);
        if len > 0 {
            stats.corrupt_records.fetch_add(1, Ordering::Relaxed);
        }
        tracing::error!(segment = %path.display(), bytes = len, "spool segment has no valid header; discarding it");
        remove(fs, path);
        return None;
    };
    if checked.corrupt_regions > 0 {
        stats.corrupt_records.fetch_add(checked.corrupt_regions, Ordering::Relaxed);
        stats.corrupt_bytes.fetch_add(checked.corrupt_bytes, Ordering::Relaxed);
        tracing::warn!(
            segment = %path.display(),
            regions = checked.corrupt_regions,
            discarded_bytes = checked.corrupt_bytes,
            records_kept = checked.records,
            "corrupt spool frames (a crash mid-write, or damage on disk); skipped them and kept the rest"
        );
    }
    if checked.bytes < len {
        // If the cut fails, the segment is still read only up to its valid length (and a
        // marker, if any, is kept for the next start).
        match fs.truncate(path, checked.bytes) {
            Ok(()) => remove_marker(fs, path),
            Err(e) => {
                tracing::warn!(segment = %path.display(), error = %e, "cannot cut the damaged tail off a spool segment")
            }
        }
    } else {
        remove_marker(fs, path);
    }
    Some(checked)
}

/// A segment that cannot be read at all (an I/O error on a damaged disk): counted,
/// logged, and renamed `….seg.unreadable` for the operator, never a reason not to start.
fn set_aside(path: &Path, stats: &SpoolStats, error: &std::io::Error) {
    let len = fs::metadata(path).map_or(0, |m| m.len());
    stats.corrupt_records.fetch_add(1, Ordering::Relaxed);
    stats.corrupt_bytes.fetch_add(len, Ordering::Relaxed);
    let aside = path.with_extension("seg.unreadable");
    let renamed = fs::rename(path, &aside);
    tracing::error!(
        segment = %path.display(),
        bytes = len,
        error = %error,
        set_aside_as = %aside.display(),
        rename_failed = renamed.err().map(|e| e.to_string()),
        "spool segment cannot be read; its records are counted as lost and the file set aside"
    );
}

/// Deletes a segment that holds nothing to replay; failing that, logs it (the next start
/// tries again).
fn remove(fs: &dyn Filesystem, path: &Path) {
    if let Err(e) = fs.remove(path) {
        tracing::warn!(segment = %path.display(), error = %e, "cannot delete an empty or invalid spool segment");
    }
    remove_marker(fs, path);
}

/// Deletes a segment's valid-length marker, if it has one.
pub(super) fn remove_marker(fs: &dyn Filesystem, segment: &Path) {
    let marker = valid_marker_path(segment);
    if let Err(e) = fs.remove(&marker) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(marker = %marker.display(), error = %e, "cannot delete a spool valid-length marker");
        }
    }
}

/// Checks every segment in `dir` and returns the ledger of those holding records, with
/// their total bytes and records. Empty and invalid segment files are deleted, unreadable
/// ones set aside. Fails only when the directory itself cannot be listed.
pub fn recover(fs: &dyn Filesystem, dir: &Path, stats: &SpoolStats) -> Result<Ledger, SpoolError> {
    let ids = segment_ids(dir)?;
    let mut segments = BTreeMap::new();
    let (mut total_bytes, mut total_records) = (0u64, 0u64);
    for &id in &ids {
        let path = segment_path(dir, id);
        match recover_segment(fs, &path, stats) {
            Some(checked) if checked.records > 0 => {
                total_bytes += checked.bytes;
                total_records += checked.records;
                segments.insert(id, Segment::recovered(path, checked.bytes, checked.records));
            }
            Some(_) => remove(fs, &path),
            None => {}
        }
    }
    stats.bytes.store(total_bytes, Ordering::Relaxed);
    stats.records.store(total_records, Ordering::Relaxed);
    if total_records > 0 {
        tracing::info!(
            dir = %dir.display(),
            segments = segments.len(),
            records = total_records,
            bytes = total_bytes,
            "spool holds records from an earlier run; replaying them"
        );
    }
    Ok(Ledger::new(segments, ids.last().copied()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Interaction;

    fn segment(questions: &[&str]) -> Vec<u8> {
        let mut bytes = MAGIC.to_vec();
        for q in questions {
            bytes.extend(frame::encode(&Interaction::new(*q)));
        }
        bytes
    }

    #[test]
    fn a_torn_tail_is_cut_and_counted() {
        let mut bytes = segment(&["a", "b"]);
        let whole = bytes.len() as u64;
        bytes.extend_from_slice(&frame::encode(&Interaction::new("c"))[..20]);
        let checked = check(&bytes).unwrap();
        assert_eq!((checked.records, checked.bytes, checked.corrupt_regions), (2, whole, 1));
    }

    #[test]
    fn a_zero_filled_tail_is_a_torn_tail_not_records() {
        // Regression: eight zero bytes decoded as an empty frame; a zero-filled page
        // after a crash read as hundreds of records.
        let mut bytes = segment(&["a"]);
        let whole = bytes.len() as u64;
        bytes.extend_from_slice(&[0u8; 4096]);
        let checked = check(&bytes).unwrap();
        assert_eq!((checked.records, checked.bytes, checked.corrupt_regions), (1, whole, 1));
    }

    #[test]
    fn a_corrupt_frame_in_the_middle_costs_only_itself() {
        let mut bytes = segment(&["a", "b", "c"]);
        let second = MAGIC.len() + frame::encode(&Interaction::new("a")).len();
        bytes[second + 12] ^= 0xff;
        let checked = check(&bytes).unwrap();
        assert_eq!((checked.records, checked.corrupt_regions), (2, 1));
        assert_eq!(checked.bytes, bytes.len() as u64, "the last frame is valid, nothing is cut");
    }
}
