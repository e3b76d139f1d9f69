//! A request body that keeps a bounded copy of what the handler reads, so the layer can
//! find the question in it afterwards without holding the request up.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::Bytes;
use http_body::{Body, Frame, SizeHint};

/// The bytes a [`CapturingBody`] saw, up to its limit.
#[derive(Debug, Default)]
pub(super) struct Captured {
    pub(super) bytes: Vec<u8>,
    /// More arrived than the limit kept.
    pub(super) truncated: bool,
}

/// Passes every frame of the inner body on unchanged and copies data frames into a
/// shared [`Captured`] until `limit` bytes are kept.
pub(super) struct CapturingBody<B> {
    // Boxed so the wrapper is `Unpin` whatever the inner body is, without a pin-projection
    // crate for one field.
    inner: Pin<Box<B>>,
    captured: Arc<Mutex<Captured>>,
    limit: usize,
}

impl<B> CapturingBody<B> {
    pub(super) fn new(inner: B, limit: usize) -> (Self, Arc<Mutex<Captured>>) {
        let captured = Arc::new(Mutex::new(Captured::default()));
        (CapturingBody { inner: Box::pin(inner), captured: captured.clone(), limit }, captured)
    }
}

impl<B: Body<Data = Bytes>> Body for CapturingBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = self.inner.as_mut().poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                let mut captured = self.captured.lock().unwrap_or_else(|p| p.into_inner());
                let room = self.limit.saturating_sub(captured.bytes.len());
                captured.bytes.extend_from_slice(&data[..room.min(data.len())]);
                captured.truncated |= data.len() > room;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
