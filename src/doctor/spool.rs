//! The spool checks of `doctor`: read-only, without holding the spool's lock.

use std::fs::{self, File, TryLockError};
use std::io;
use std::path::{Path, PathBuf};

use super::{Check, Options};
use crate::config::SpoolConfig;
use crate::pipeline::journal;
use crate::pipeline::spool::recovery::{self, Checked};

/// What a server leaves in the directory besides segments.
const LOCK_FILE: &str = "LOCK";
/// Suffix of a segment's valid-length marker (see `recovery`).
const VALID_SUFFIX: &str = ".seg.valid";
/// Suffix of a file set aside as unreadable (by the server's recovery or by doctor).
const UNREADABLE_SUFFIX: &str = ".unreadable";

/// Whether a server holds the spool's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    /// A server holds it: inspect only, repair nothing.
    Server,
    /// Nobody does (or there is no lock file yet).
    Nobody,
}

/// What was found in the directory.
#[derive(Debug, Default)]
struct Inventory {
    segments: u64,
    records: u64,
    bytes: u64,
    /// Damaged frames in the middle of a segment (skipped at the next start).
    corrupt_regions: u64,
    /// Segments ending in a partial frame (cut at the next start).
    torn_tails: u64,
    /// `.seg` files without the segment header, or that cannot be read.
    unreadable: Vec<(PathBuf, String)>,
    /// Files set aside before.
    set_aside: Vec<PathBuf>,
    /// Anything else.
    foreign: Vec<PathBuf>,
    /// Bytes of the OTLP receiver's journal (spans waiting for their traces), if any.
    otlp_journal: Option<u64>,
}

/// The spool and disk-space checks.
pub(super) fn checks(config: &SpoolConfig, options: Options) -> Vec<Check> {
    if !config.enabled {
        return vec![Check::ok("spool", "disabled (audit.spool.enabled: false)")];
    }
    let dir = &config.dir;
    if !dir.exists() {
        return vec![
            Check::ok("spool", format!("{} does not exist yet (created by the first `serve`)", dir.display())),
            disk(config, 0),
        ];
    }
    let holder = match holder(dir) {
        Ok(h) => h,
        Err(e) => return vec![Check::fail("spool", format!("cannot test the lock of {}: {e}", dir.display()))],
    };
    let inventory = match inventory(dir, holder) {
        Ok(i) => i,
        Err(e) => return vec![Check::fail("spool", format!("cannot list {}: {e}", dir.display()))],
    };
    let bytes = inventory.bytes;
    vec![spool_check(dir, holder, inventory, options), disk(config, bytes)]
}

/// Tests the lock without keeping it: a shared lock conflicts with the server's
/// exclusive one, and is dropped at once, so a server starting meanwhile finds it free
/// (outside a window of microseconds).
fn holder(dir: &Path) -> io::Result<Holder> {
    let file = match File::open(dir.join(LOCK_FILE)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Holder::Nobody),
        Err(e) => return Err(e),
    };
    match file.try_lock_shared() {
        Ok(()) => Ok(Holder::Nobody),
        Err(TryLockError::WouldBlock) => Ok(Holder::Server),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

fn inventory(dir: &Path, holder: Holder) -> io::Result<Inventory> {
    let mut names: Vec<PathBuf> = fs::read_dir(dir)?.map(|e| e.map(|e| e.path())).collect::<io::Result<_>>()?;
    names.sort();
    let newest_segment = names.iter().rfind(|p| is_segment(p)).cloned();
    let mut found = Inventory::default();
    for path in names {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name == LOCK_FILE || name.ends_with(VALID_SUFFIX) {
            continue;
        }
        if name == journal::OTLP_DIR && path.is_dir() {
            found.otlp_journal = fs::metadata(path.join(journal::FILE_NAME)).ok().map(|m| m.len());
            continue;
        }
        if name.ends_with(UNREADABLE_SUFFIX) {
            found.set_aside.push(path);
            continue;
        }
        if !is_segment(&path) {
            found.foreign.push(path);
            continue;
        }
        match read_segment(&path) {
            Err(e) => found.unreadable.push((path, e.to_string())),
            Ok((None, _)) => found.unreadable.push((path, "no segment header".into())),
            Ok((Some(checked), len)) => {
                found.segments += 1;
                found.records += checked.records;
                found.bytes += len;
                let torn = checked.bytes < len;
                // The segment a running server appends to ends mid-frame between a write
                // and its fsync: that is not damage.
                let being_written = holder == Holder::Server && newest_segment.as_ref() == Some(&path);
                if torn && !being_written {
                    found.torn_tails += 1;
                }
                found.corrupt_regions += checked.corrupt_regions - u64::from(torn);
            }
        }
    }
    Ok(found)
}

/// A `<16 hex digits>.seg` name.
fn is_segment(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    name.strip_suffix(".seg").is_some_and(|id| id.len() == 16 && id.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Reads a segment (at most `spool.segment_bytes`, so whole) up to its valid-length
/// marker if it has one, and walks its frames: `None` when it is not a segment.
fn read_segment(path: &Path) -> io::Result<(Option<Checked>, u64)> {
    let mut bytes = fs::read(path)?;
    let marker = fs::read_to_string(recovery::valid_marker_path(path)).ok();
    if let Some(valid) = marker.and_then(|m| m.trim().parse::<usize>().ok()) {
        bytes.truncate(valid);
    }
    let len = bytes.len() as u64;
    Ok((recovery::check(&bytes), len))
}

fn spool_check(dir: &Path, holder: Holder, found: Inventory, options: Options) -> Check {
    const NAME: &str = "spool";
    let mut detail = format!(
        "{}: {} segments, {} records, {} bytes; {}",
        dir.display(),
        found.segments,
        found.records,
        found.bytes,
        match holder {
            Holder::Server => "held by a running server (inspected read-only, not repaired)",
            Holder::Nobody => "no server holds it",
        }
    );
    if let Some(bytes) = found.otlp_journal {
        detail.push_str(&format!("; OTLP journal (spans of incomplete traces): {bytes} bytes"));
    }
    let mut notes = Vec::new();
    if found.corrupt_regions > 0 {
        notes.push(format!("{} damaged frame regions (skipped at the next start)", found.corrupt_regions));
    }
    if found.torn_tails > 0 {
        notes.push(format!("{} torn tails (cut at the next start)", found.torn_tails));
    }
    if !found.set_aside.is_empty() {
        notes.push(format!("{} files set aside earlier: {}", found.set_aside.len(), names(&found.set_aside)));
    }
    if !found.foreign.is_empty() {
        notes.push(format!("{} files that are not the spool's: {}", found.foreign.len(), names(&found.foreign)));
    }
    if found.unreadable.is_empty() {
        for note in &notes {
            detail.push_str("; ");
            detail.push_str(note);
        }
        return if notes.is_empty() { Check::ok(NAME, detail) } else { Check::warn(NAME, detail) };
    }
    let listed: Vec<String> = found
        .unreadable
        .iter()
        .map(|(p, why)| format!("{} ({why})", p.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()))
        .collect();
    notes.insert(0, format!("{} unreadable segment files: {}", found.unreadable.len(), listed.join(", ")));
    for note in &notes {
        detail.push_str("; ");
        detail.push_str(note);
    }
    let mut check = Check::fail(NAME, detail).repairable();
    if options.repair {
        match (holder, set_aside(dir, &found.unreadable)) {
            (Holder::Server, _) => check.detail.push_str("; not set aside: a server holds the spool"),
            (Holder::Nobody, Ok(n)) => {
                check.repaired = true;
                check.detail.push_str(&format!("; set aside {n} as …{UNREADABLE_SUFFIX}"));
            }
            (Holder::Nobody, Err(e)) => check.detail.push_str(&format!("; repair failed: {e}")),
        }
    }
    check
}

/// Renames each file `NAME.unreadable` under the spool's exclusive lock, so that no
/// server starting meanwhile reads (or discards) it half-way. Never deletes.
fn set_aside(dir: &Path, files: &[(PathBuf, String)]) -> Result<usize, String> {
    let _lock = recovery::lock(dir).map_err(|e| e.to_string())?;
    for (path, _) in files {
        let mut aside = path.clone().into_os_string();
        aside.push(UNREADABLE_SUFFIX);
        fs::rename(path, &aside).map_err(|e| format!("renaming {}: {e}", path.display()))?;
        tracing::info!(file = %path.display(), "unreadable spool file set aside");
    }
    Ok(files.len())
}

fn names(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Free space on the spool's filesystem against `max_bytes` (less the bytes the spool
/// already holds, which count toward the cap).
fn disk(config: &SpoolConfig, held: u64) -> Check {
    const NAME: &str = "spool disk";
    // The directory, or the nearest parent that exists (where it will be created).
    let probe = config.dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("."));
    let probe = if probe.as_os_str().is_empty() { Path::new(".") } else { probe };
    match fs4::available_space(probe) {
        Ok(free) => {
            let needed = config.max_bytes.saturating_sub(held);
            let detail = format!(
                "{} MiB free on the filesystem of {}; the spool may grow to {} MiB more (audit.spool.max_bytes)",
                free / (1 << 20),
                probe.display(),
                needed / (1 << 20)
            );
            if free < needed {
                Check::warn(NAME, detail)
            } else {
                Check::ok(NAME, detail)
            }
        }
        Err(e) => Check::warn(NAME, format!("cannot read free space of {}: {e}", probe.display())),
    }
}
