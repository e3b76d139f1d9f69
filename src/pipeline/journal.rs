//! A small durable journal of byte records, each under a 128-bit key: what a caller must
//! not lose before it can hand a finished record to the pipeline (the OTLP receiver
//! keeps the spans of incomplete traces here, keyed by trace id).
//!
//! # On disk
//! One file, `DIR/journal.oaj`: the magic [`MAGIC`], then spool frames
//! ([`super::spool::frame`]: length, CRC-32, payload) whose payload is the key (16 bytes,
//! big-endian) followed by the record. [`Journal::append`] writes a group of frames and
//! fsyncs before it returns. [`Journal::forget`] drops a key's frames from the index;
//! once most of the file is forgotten it is rewritten (live frames copied to a temporary
//! file, fsync'd, renamed over the old one, the directory fsync'd), so a crash leaves
//! either the old file or the new one, both valid.
//!
//! # Crashes
//! A crash can leave a torn frame at the end; at open the file is read up to the first
//! frame that is not whole and valid, and cut there (the bytes lost are logged and
//! reported in [`Replayed::corrupt_bytes`]). A frame in the middle is never skipped over:
//! payloads here are binary, so the spool's resynchronisation does not apply.
//!
//! # One process at a time
//! The journal takes no lock of its own: it lives inside the spool directory, whose
//! `LOCK` the spool holds.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::spool::frame::{self, HEADER};

/// The OTLP receiver's journal directory, inside the spool directory.
pub const OTLP_DIR: &str = "otlp";
/// The first bytes of a journal file.
pub const MAGIC: &[u8; 8] = b"OAJRNL01";
/// Name of the journal file in its directory.
pub const FILE_NAME: &str = "journal.oaj";
/// Rewrite only once at least this many bytes are forgotten (and they outweigh the live
/// ones), so a small journal is not rewritten at every forget.
const COMPACT_AFTER: u64 = 4 * 1024 * 1024;

/// Why the journal could not be opened or written.
#[derive(Debug, thiserror::Error)]
#[error("journal I/O error on {path}: {cause}")]
pub struct JournalError {
    /// The file or directory.
    pub path: PathBuf,
    /// What went wrong.
    pub cause: io::Error,
}

fn error(path: &Path) -> impl FnOnce(io::Error) -> JournalError + '_ {
    move |cause| JournalError { path: path.to_path_buf(), cause }
}

/// What an open found in the journal of an earlier run.
#[derive(Debug, Default)]
pub struct Replayed {
    /// Every valid record, in the order it was appended: key and bytes.
    pub records: Vec<(u128, Vec<u8>)>,
    /// Bytes cut from the end (a torn or corrupt frame and what followed it).
    pub corrupt_bytes: u64,
}

/// Where one frame is in the file.
#[derive(Debug, Clone, Copy)]
struct Frame {
    offset: u64,
    len: u64,
}

struct State {
    file: File,
    len: u64,
    live: HashMap<u128, Vec<Frame>>,
    live_bytes: u64,
}

/// The journal; share it behind an `Arc`. Its methods block on disk I/O: call them from
/// `spawn_blocking`.
pub struct Journal {
    dir: PathBuf,
    path: PathBuf,
    state: Mutex<State>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Journal {
    /// Opens (or creates) the journal in `dir` and reads back what it holds.
    pub fn open(dir: &Path) -> Result<(Journal, Replayed), JournalError> {
        std::fs::create_dir_all(dir).map_err(error(dir))?;
        let path = dir.join(FILE_NAME);
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(&path).map_err(error(&path))?;
        let size = file.metadata().map_err(error(&path))?.len();
        let mut replayed = Replayed::default();
        let mut live: HashMap<u128, Vec<Frame>> = HashMap::new();
        let mut live_bytes = 0;
        let mut valid = MAGIC.len() as u64;
        if size < MAGIC.len() as u64 {
            // New, or torn before its magic was whole: start it afresh.
            file.set_len(0).map_err(error(&path))?;
            file.write_all(MAGIC).map_err(error(&path))?;
            file.sync_all().map_err(error(&path))?;
            sync_dir(dir).map_err(error(dir))?;
            replayed.corrupt_bytes = size;
        } else {
            let mut reader = BufReader::new(File::open(&path).map_err(error(&path))?);
            let mut magic = [0u8; 8];
            reader.read_exact(&mut magic).map_err(error(&path))?;
            if &magic != MAGIC {
                // Not a journal this version wrote: keep it aside, never overwrite it.
                let aside = dir.join(format!("{FILE_NAME}.unreadable-{}", uuid::Uuid::now_v7().simple()));
                drop(file);
                std::fs::rename(&path, &aside).map_err(error(&path))?;
                tracing::error!(path = %aside.display(), "journal file has an unknown format; set aside, starting empty");
                return Journal::open(dir);
            }
            loop {
                match super::spool::io::read_frame(&mut reader, size - valid).map_err(error(&path))? {
                    Ok(payload) if payload.len() >= 16 => {
                        let mut key = [0u8; 16];
                        key.copy_from_slice(&payload[..16]);
                        let key = u128::from_be_bytes(key);
                        let len = (HEADER + payload.len()) as u64;
                        live.entry(key).or_default().push(Frame { offset: valid, len });
                        live_bytes += len;
                        valid += len;
                        replayed.records.push((key, payload[16..].to_vec()));
                    }
                    _ => break,
                }
            }
            if valid < size {
                replayed.corrupt_bytes = size - valid;
                tracing::warn!(
                    path = %path.display(),
                    lost_bytes = size - valid,
                    kept_records = replayed.records.len(),
                    "journal ends in a torn or corrupt frame (a crash while writing); cut there"
                );
                file.set_len(valid).map_err(error(&path))?;
                file.sync_all().map_err(error(&path))?;
            }
        }
        let state = State { file, len: valid, live, live_bytes };
        Ok((Journal { dir: dir.to_path_buf(), path, state: Mutex::new(state) }, replayed))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `records` and makes them durable (fdatasync) before returning. On an
    /// error nothing of them is kept.
    pub fn append(&self, records: &[(u128, &[u8])]) -> Result<(), JournalError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut bytes = Vec::with_capacity(records.iter().map(|(_, r)| HEADER + 16 + r.len()).sum());
        let mut frames = Vec::with_capacity(records.len());
        for (key, record) in records {
            let mut payload = Vec::with_capacity(16 + record.len());
            payload.extend_from_slice(&key.to_be_bytes());
            payload.extend_from_slice(record);
            let at = bytes.len() as u64;
            bytes.extend_from_slice(&frame::encode_payload(&payload));
            frames.push((*key, at, bytes.len() as u64 - at));
        }
        let sync_handle = {
            let mut state = self.lock();
            let start = state.len;
            if let Err(cause) = state.file.write_all(&bytes) {
                // Cut a partial write so the file stays a sequence of whole frames.
                let _ = state.file.set_len(start);
                return Err(JournalError { path: self.path.clone(), cause });
            }
            state.len += bytes.len() as u64;
            for (key, at, len) in frames {
                state.live.entry(key).or_default().push(Frame { offset: start + at, len });
                state.live_bytes += len;
            }
            state.file.try_clone().map_err(error(&self.path))?
        };
        // Outside the lock, so appends of concurrent requests share the disk's flushes. A
        // rewrite in between copied these frames and fsync'd its copy before the rename.
        sync_handle.sync_data().map_err(error(&self.path))
    }

    /// Forgets every record under `key` (its work is safe elsewhere now); rewrites the
    /// file once forgotten bytes outweigh the live ones.
    pub fn forget(&self, key: u128) -> Result<(), JournalError> {
        let mut state = self.lock();
        let Some(frames) = state.live.remove(&key) else { return Ok(()) };
        state.live_bytes -= frames.iter().map(|f| f.len).sum::<u64>();
        let dead = state.len - MAGIC.len() as u64 - state.live_bytes;
        if dead >= COMPACT_AFTER && dead > state.live_bytes {
            self.rewrite(&mut state)?;
        }
        Ok(())
    }

    /// Rewrites the file without its forgotten records now, if there are any (at a clean
    /// stop, so the next start reads back only what still waits).
    pub fn compact(&self) -> Result<(), JournalError> {
        let mut state = self.lock();
        if state.len > MAGIC.len() as u64 + state.live_bytes {
            self.rewrite(&mut state)?;
        }
        Ok(())
    }

    /// Keys with records in the journal.
    pub fn keys(&self) -> usize {
        self.lock().live.len()
    }

    /// Bytes of the journal file (forgotten records included until the next rewrite).
    pub fn file_bytes(&self) -> u64 {
        self.lock().len
    }

    /// Bytes of the records not yet forgotten.
    pub fn live_bytes(&self) -> u64 {
        self.lock().live_bytes
    }

    /// Copies the live frames to a new file and puts it in place of the old one.
    fn rewrite(&self, state: &mut State) -> Result<(), JournalError> {
        let tmp = self.dir.join(format!("{FILE_NAME}.tmp"));
        let mut old = File::open(&self.path).map_err(error(&self.path))?;
        let mut new =
            OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp).map_err(error(&tmp))?;
        let mut frames: Vec<(u128, Frame)> =
            state.live.iter().flat_map(|(k, fs)| fs.iter().map(move |f| (*k, *f))).collect();
        frames.sort_by_key(|(_, f)| f.offset);
        let mut live: HashMap<u128, Vec<Frame>> = HashMap::new();
        let mut at = MAGIC.len() as u64;
        let mut writer = io::BufWriter::new(&mut new);
        writer.write_all(MAGIC).map_err(error(&tmp))?;
        let mut buffer = Vec::new();
        for (key, f) in frames {
            buffer.resize(f.len as usize, 0);
            old.seek(SeekFrom::Start(f.offset)).map_err(error(&self.path))?;
            old.read_exact(&mut buffer).map_err(error(&self.path))?;
            writer.write_all(&buffer).map_err(error(&tmp))?;
            live.entry(key).or_default().push(Frame { offset: at, len: f.len });
            at += f.len;
        }
        writer.flush().map_err(error(&tmp))?;
        drop(writer);
        new.sync_all().map_err(error(&tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(error(&self.path))?;
        sync_dir(&self.dir).map_err(error(&self.dir))?;
        let file = OpenOptions::new().read(true).append(true).open(&self.path).map_err(error(&self.path))?;
        tracing::debug!(before = state.len, after = at, "journal rewritten without its forgotten records");
        *state = State { file, len: at, live, live_bytes: state.live_bytes };
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_reopen_until_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (journal, replayed) = Journal::open(dir.path()).unwrap();
            assert!(replayed.records.is_empty());
            journal.append(&[(1, b"one"), (2, b"two")]).unwrap();
            journal.append(&[(1, b"uno")]).unwrap();
            journal.forget(2).unwrap();
        }
        let (journal, replayed) = Journal::open(dir.path()).unwrap();
        // Forgetting is in memory until a rewrite: the next run sees `2` again, and its
        // owner must treat replays as possibly done already.
        let keys: Vec<u128> = replayed.records.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, vec![1, 2, 1]);
        assert_eq!(replayed.records[2].1, b"uno");
        assert_eq!(journal.keys(), 2);
    }

    #[test]
    fn a_torn_tail_is_cut_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (journal, _) = Journal::open(dir.path()).unwrap();
            journal.append(&[(7, b"kept")]).unwrap();
        }
        let path = dir.path().join(FILE_NAME);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let (journal, replayed) = Journal::open(dir.path()).unwrap();
        assert_eq!(replayed.records, vec![(7, b"kept".to_vec())]);
        assert_eq!(replayed.corrupt_bytes, 6);
        journal.append(&[(8, b"after")]).unwrap();
        drop(journal);
        let (_, replayed) = Journal::open(dir.path()).unwrap();
        assert_eq!(replayed.records.len(), 2);
    }

    #[test]
    fn forgetting_most_of_the_file_rewrites_it() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path()).unwrap();
        let big = vec![b'x'; 1024 * 1024];
        for key in 0..6u128 {
            journal.append(&[(key, &big)]).unwrap();
        }
        journal.append(&[(99, b"last")]).unwrap();
        for key in 0..6u128 {
            journal.forget(key).unwrap();
        }
        // Rewritten once 4 MiB were forgotten and outweighed the 2 MiB still live.
        assert!(journal.file_bytes() < 3 * 1024 * 1024, "not rewritten: {}", journal.file_bytes());
        assert_eq!(journal.keys(), 1);
        journal.append(&[(100, b"new")]).unwrap();
        journal.compact().unwrap();
        drop(journal);
        let (_, replayed) = Journal::open(dir.path()).unwrap();
        assert_eq!(replayed.records, vec![(99, b"last".to_vec()), (100, b"new".to_vec())]);
    }
}
