//! The spool's file operations behind a narrow seam, so tests can make a write, an
//! fsync or a file creation fail (disk full, I/O error) and watch the spool cope.
//!
//! [`StdFilesystem`] is the real thing. Directory scanning and the `LOCK` file use
//! `std::fs` directly: they are not failure paths worth injecting.

use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::Path;

use super::frame::{self, Corruption, HEADER};

/// A segment open for appending.
pub trait AppendFile: Send {
    /// Appends all of `bytes`.
    fn append(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Makes what was appended durable (`fdatasync`).
    fn sync(&mut self) -> io::Result<()>;
    /// Cuts the file back to `len` bytes (after a failed append).
    fn truncate(&mut self, len: u64) -> io::Result<()>;
}

/// A segment open for reading.
pub trait ReadFile: Read + Seek + Send {}

impl<T: Read + Seek + Send> ReadFile for T {}

/// Every file operation the spool makes on its segments.
pub trait Filesystem: Debug + Send + Sync + 'static {
    /// Creates a new segment file; fails if it exists.
    fn create(&self, path: &Path) -> io::Result<Box<dyn AppendFile>>;
    /// Opens a segment for reading.
    fn open(&self, path: &Path) -> io::Result<Box<dyn ReadFile>>;
    /// The length of a file.
    fn len(&self, path: &Path) -> io::Result<u64>;
    /// Cuts a file to `len` bytes and makes that durable.
    fn truncate(&self, path: &Path, len: u64) -> io::Result<()>;
    /// Deletes a file.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Makes the directory's entries (a new or deleted name) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The real filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdFilesystem;

struct StdAppendFile(File);

impl AppendFile for StdAppendFile {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.0.write_all(bytes)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
}

impl Filesystem for StdFilesystem {
    fn create(&self, path: &Path) -> io::Result<Box<dyn AppendFile>> {
        let file = OpenOptions::new().create_new(true).append(true).open(path)?;
        Ok(Box::new(StdAppendFile(file)))
    }
    fn open(&self, path: &Path) -> io::Result<Box<dyn ReadFile>> {
        Ok(Box::new(File::open(path)?))
    }
    fn len(&self, path: &Path) -> io::Result<u64> {
        Ok(std::fs::metadata(path)?.len())
    }
    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        let file = OpenOptions::new().write(true).open(path)?;
        file.set_len(len)?;
        file.sync_all()
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

/// Reads one frame from `reader` with `available` bytes left before the end of what may
/// be read: its payload, or why the bytes there are not a frame (the reader is then at an
/// unspecified position).
pub fn read_frame(reader: &mut impl Read, available: u64) -> io::Result<Result<Vec<u8>, Corruption>> {
    if available < HEADER as u64 {
        return Ok(Err(Corruption::TornHeader));
    }
    let mut head = [0u8; HEADER];
    reader.read_exact(&mut head)?;
    let (len, crc) = match frame::check_header(&head, available - HEADER as u64) {
        Ok(h) => h,
        Err(why) => return Ok(Err(why)),
    };
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload)?;
    if crc32fast::hash(&payload) != crc {
        return Ok(Err(Corruption::CrcMismatch));
    }
    Ok(Ok(payload))
}

/// Reads bytes `from..until` of a file into memory: the rest of a segment after a corrupt
/// frame, to resynchronise on the next valid one.
pub fn read_range(fs: &dyn Filesystem, path: &Path, from: u64, until: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut file = fs.open(path)?;
    file.seek(io::SeekFrom::Start(from))?;
    file.take(until.saturating_sub(from)).read_to_end(&mut bytes)?;
    Ok(bytes)
}
