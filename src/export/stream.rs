//! Records in, byte chunks out: the shape the HTTP body and the CLI's file writer take.

use bytes::Bytes;
use futures::{Stream, StreamExt};

use super::{Encoder, ExportError, Format};
use crate::model::Interaction;
use crate::store::StoreError;

/// Bytes gathered before a chunk is handed on: large enough that per-chunk costs (a body
/// frame, a write call, a progress bar tick) do not show, small enough to stream smoothly.
pub const CHUNK_BYTES: usize = 64 * 1024;

/// Encodes a stream of records into a stream of byte chunks of about [`CHUNK_BYTES`], in
/// constant memory: the whole export is never held.
///
/// A chunk is yielded as soon as at least [`CHUNK_BYTES`] are ready, so text chunks are a
/// little over that size; Parquet produces bytes a row group at a time, so its chunks are
/// whole row groups (up to about 8 MiB). The chunks, concatenated, are the file (an empty
/// NDJSON export is no chunk at all).
///
/// A store error mid-stream ends the stream with that error (the HTTP layer will abort the
/// body), as does an encoding error: nothing follows an error, not even a file footer, so
/// a failed export can never pass for a complete one.
///
/// Encoding runs on the task that polls the stream rather than on a blocking thread: it
/// costs microseconds per record and milliseconds per Parquet row group, less than
/// handing each chunk between threads would.
pub fn encode_stream<S>(records: S, format: Format) -> impl Stream<Item = Result<Bytes, ExportError>> + Send
where
    S: Stream<Item = Result<Interaction, StoreError>> + Send + 'static,
{
    let phase = match Encoder::new(format) {
        Ok(encoder) => Phase::Encoding(encoder),
        Err(e) => Phase::Failed(e),
    };
    futures::stream::unfold(State { records: Box::pin(records), phase }, State::step)
}

/// Where an export stands between two chunks.
enum Phase {
    /// Records are still coming.
    Encoding(Encoder),
    /// The next item is this error, and then the stream ends.
    Failed(ExportError),
    /// Nothing more to yield.
    Done,
}

struct State<S> {
    records: std::pin::Pin<Box<S>>,
    phase: Phase,
}

impl<S> State<S>
where
    S: Stream<Item = Result<Interaction, StoreError>>,
{
    /// `unfold`'s step: the next chunk, and the state to continue from.
    async fn step(mut self) -> Option<(Result<Bytes, ExportError>, Self)> {
        let item = self.next_chunk().await?;
        Some((item, self))
    }

    async fn next_chunk(&mut self) -> Option<Result<Bytes, ExportError>> {
        // Any way out of this function other than a full chunk leaves `Done` behind: after
        // an error or the last bytes there is nothing more to yield.
        let mut encoder = match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Encoding(encoder) => encoder,
            Phase::Failed(e) => return Some(Err(e)),
            Phase::Done => return None,
        };
        loop {
            match self.records.next().await {
                Some(Ok(record)) => {
                    if let Err(e) = encoder.push(&record) {
                        return Some(Err(e));
                    }
                    if encoder.output_len() >= CHUNK_BYTES {
                        let chunk = encoder.take_output();
                        self.phase = Phase::Encoding(encoder);
                        return Some(Ok(chunk));
                    }
                }
                Some(Err(e)) => return Some(Err(e.into())),
                None => {
                    return match encoder.finish() {
                        Ok(last) if last.is_empty() => None,
                        Ok(last) => Some(Ok(last)),
                        Err(e) => Some(Err(e)),
                    }
                }
            }
        }
    }
}
