//! A day's archive: the day's interactions through the Parquet export encoder into
//! `<dir>/interactions-YYYY-MM-DD.parquet`, then read back in full.
//!
//! Written as `<name>.partial`, fsynced, renamed, and the directory fsynced, so a file
//! under its final name is always whole and survives power loss; an existing archive
//! is never overwritten (a second archive of the same day, after an interrupted run,
//! takes the next free name `interactions-YYYY-MM-DD.2.parquet`).

use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use super::{ArchivedFile, RetentionError};
use crate::export::{encode_stream, Format};
use crate::store::{Filter, Store};

/// Creates the archive directory if missing and checks that a file can be created in
/// it, before anything is read or deleted.
pub(super) async fn prepare_dir(dir: &Path) -> std::io::Result<()> {
    tokio::fs::create_dir_all(dir).await?;
    let probe = dir.join(format!(".opsagent-audit-write-test-{}", uuid::Uuid::new_v4().simple()));
    tokio::fs::File::create(&probe).await?;
    tokio::fs::remove_file(&probe).await
}

/// The first free archive name of `day` in `dir`.
pub fn archive_path(dir: &Path, day: NaiveDate) -> PathBuf {
    let first = dir.join(format!("interactions-{day}.parquet"));
    if !first.exists() {
        return first;
    }
    (2u32..).map(|n| dir.join(format!("interactions-{day}.{n}.parquet"))).find(|p| !p.exists()).unwrap_or(first)
}

/// Writes the records of `filter` (one day) to a new archive file and reads it back.
pub(super) async fn write_day(
    store: &dyn Store,
    dir: &Path,
    day: NaiveDate,
    filter: &Filter,
) -> Result<ArchivedFile, RetentionError> {
    let path = archive_path(dir, day);
    let partial = {
        let mut name = path.clone().into_os_string();
        name.push(".partial");
        PathBuf::from(name)
    };
    let written = write_file(store, &partial, filter).await;
    let bytes = match written {
        Ok(bytes) => bytes,
        Err(e) => {
            // Best effort: a leftover .partial is harmless (never read), only untidy.
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(match e {
                WriteError::Io(cause) => RetentionError::ArchiveWrite { day, path: partial, cause },
                WriteError::Export(cause) => RetentionError::ArchiveEncode { day, path: partial, cause },
            });
        }
    };
    let io_error = |cause| RetentionError::ArchiveWrite { day, path: path.clone(), cause };
    tokio::fs::rename(&partial, &path).await.map_err(io_error)?;
    sync_dir(dir).await.map_err(io_error)?;
    let rows = read_back_rows(&path).await.map_err(|message| RetentionError::ArchiveUnreadable {
        day,
        path: path.clone(),
        message,
    })?;
    tracing::debug!(%day, file = %path.display(), bytes, rows, "archive written and read back");
    Ok(ArchivedFile { path, bytes, rows })
}

enum WriteError {
    Io(std::io::Error),
    Export(crate::export::ExportError),
}

/// Streams the export into `path`, on disk (fsynced) when it returns; the bytes written.
async fn write_file(store: &dyn Store, path: &Path, filter: &Filter) -> Result<u64, WriteError> {
    let mut file = tokio::fs::File::create(path).await.map_err(WriteError::Io)?;
    let mut chunks = std::pin::pin!(encode_stream(store.export(filter), Format::Parquet));
    let mut bytes = 0u64;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(WriteError::Export)?;
        file.write_all(&chunk).await.map_err(WriteError::Io)?;
        bytes += chunk.len() as u64;
    }
    file.flush().await.map_err(WriteError::Io)?;
    file.sync_all().await.map_err(WriteError::Io)?;
    Ok(bytes)
}

/// Makes a rename in `dir` durable.
async fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all()).await.map_err(std::io::Error::other)?
}

/// Reads a Parquet file through to the end (every page decoded, so a corrupt file
/// fails here) and returns its rows; the footer's count must agree.
pub async fn read_back_rows(path: &Path) -> Result<u64, String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        let file = std::fs::File::open(&path).map_err(|e| e.to_string())?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| e.to_string())?;
        let footer_rows = builder.metadata().file_metadata().num_rows();
        let mut rows = 0u64;
        for batch in builder.build().map_err(|e| e.to_string())? {
            rows += batch.map_err(|e| e.to_string())?.num_rows() as u64;
        }
        if u64::try_from(footer_rows).ok() != Some(rows) {
            return Err(format!("the footer says {footer_rows} rows, {rows} were read"));
        }
        Ok(rows)
    })
    .await
    .map_err(|e| format!("reader task failed: {e}"))?
}
