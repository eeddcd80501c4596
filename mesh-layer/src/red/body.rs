//! The response body: passes frames through and records the call when the trailers carrying
//! its status go by.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Instant,
};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::Code;

use crate::{grpc, metrics::Handles};

/// A call not yet recorded. Dropped unrecorded, it records CANCELLED: whoever held it (the
/// response future, the body) was dropped before the call had a status, which on a server
/// means the client went away.
#[derive(Debug, Default)]
pub(super) struct Pending(Option<(Arc<Handles>, Instant)>);

impl Pending {
    pub(super) fn new(handles: Arc<Handles>, started: Instant) -> Self {
        Self(Some((handles, started)))
    }

    /// Records the call with `code` (once; later calls do nothing).
    pub(super) fn finish(&mut self, code: Code) {
        if let Some((handles, started)) = self.0.take() {
            handles.server_call(code, started.elapsed());
        }
    }

    /// Moves the pending record out, leaving nothing to record here.
    pub(super) fn take(&mut self) -> Self {
        Self(self.0.take())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

pin_project! {
    /// The body of a response whose status is still to come (in the trailers).
    pub struct RecordBody<B> {
        #[pin]
        inner: B,
        pending: Pending,
    }
}

impl<B> RecordBody<B> {
    pub(super) fn new(inner: B, pending: Pending) -> Self {
        Self { inner, pending }
    }
}

impl<B: Body> Body for RecordBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.pending
                        .finish(grpc::status_code(trailers).unwrap_or(Code::Unknown));
                }
            }
            // A broken body or one that ended without trailers: no status was sent.
            Some(Err(_)) | None => this.pending.finish(Code::Unknown),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
