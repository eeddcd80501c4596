//! The response future: waits for the inner service's response, records the call at once if
//! its headers carry the status, else hands the pending record to the body.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Instant,
};

use pin_project_lite::pin_project;
use tonic::Code;

use super::body::{Pending, RecordBody};
use crate::{grpc, metrics::Handles};

pin_project! {
    /// See [`RedLayer`](super::RedLayer).
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        // Some until the response arrives; dropped unfinished (the client went away before
        // any response), it records CANCELLED.
        pending: Pending,
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(inner: F, handles: Arc<Handles>) -> Self {
        Self {
            inner,
            pending: Pending::new(handles, Instant::now()),
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<RecordBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        Poll::Ready(match result {
            Ok(response) => {
                // Trailers-only: the status is in the headers and the call is over.
                if let Some(code) = grpc::status_code(response.headers()) {
                    this.pending.finish(code);
                }
                let pending = this.pending.take();
                Ok(response.map(|body| RecordBody::new(body, pending)))
            }
            Err(error) => {
                this.pending.finish(Code::Unknown);
                Err(error)
            }
        })
    }
}
