//! The response future and body of a traced call: the inner service runs inside the call's
//! span (so the layers' decisions and the handler's events land on it), and the span gets the
//! call's gRPC status when it is known: in the response headers (trailers-only) or in the
//! trailers at the end of the body.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Instant,
};

use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::Code;
use tracing::Span;

use crate::{
    grpc::{self, MESH_MARKER},
    metrics::code_name,
};

/// Which end of the call a span stands for; it decides which codes are failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Side {
    Server,
    Client,
}

/// A call's span until its status is recorded. Dropped before that, it records CANCELLED:
/// whoever held it (the future, the body) was dropped before the call had a status.
pub(super) struct CallSpan {
    span: Option<Span>,
    side: Side,
    /// Server side: the path and arrival, for the WARN line of a failed call.
    started: Option<(http::Uri, Instant)>,
}

impl CallSpan {
    pub(super) fn new(span: Span, side: Side, started: Option<(http::Uri, Instant)>) -> Self {
        Self {
            span: Some(span),
            side,
            started,
        }
    }

    fn span(&self) -> Option<&Span> {
        self.span.as_ref()
    }

    /// Records the status (once; later calls do nothing). `headers` are the response
    /// headers or trailers, read for the mesh marker of a layer's own answer.
    fn finish(&mut self, code: Code, headers: Option<&HeaderMap>) {
        let Some(span) = self.span.take() else {
            return;
        };
        let failed = match self.side {
            // OpenTelemetry's RPC conventions: on a server only the codes that mean the
            // server failed are errors; a client sees every non-OK code as an error.
            Side::Server => is_server_failure(code),
            Side::Client => code != Code::Ok,
        };
        if !span.is_disabled() {
            span.record("rpc.grpc.status_code", code as i64);
            if failed {
                span.record("otel.status_code", "ERROR");
            }
            if let Some(marker) = headers
                .and_then(|headers| headers.get(MESH_MARKER))
                .and_then(|value| value.to_str().ok())
            {
                span.record("waybill.mesh.decision", marker);
            }
        }
        if failed && let Some((uri, started)) = &self.started {
            tracing::warn!(parent: &span, method = uri.path(), code = code_name(code),
                latency = ?started.elapsed(), "call failed on the server's side");
        }
    }

    fn take(&mut self) -> Self {
        Self {
            span: self.span.take(),
            side: self.side,
            started: self.started.take(),
        }
    }
}

impl Drop for CallSpan {
    fn drop(&mut self) {
        self.finish(Code::Cancelled, None);
    }
}

/// Codes that say the server failed, not that the caller asked for something it could not
/// have (the conventions' list for server spans).
fn is_server_failure(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

pin_project! {
    /// See [`ServerTraceLayer`](super::ServerTraceLayer) and
    /// [`ClientTraceLayer`](super::ClientTraceLayer).
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        call: CallSpan,
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(inner: F, call: CallSpan) -> Self {
        Self { inner, call }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<TraceBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = {
            let _entered = this.call.span().map(Span::enter);
            ready!(this.inner.poll(cx))
        };
        Poll::Ready(match result {
            Ok(response) => {
                // Trailers-only: the status is in the headers and the call is over.
                if let Some(code) = grpc::status_code(response.headers()) {
                    this.call.finish(code, Some(response.headers()));
                }
                let call = this.call.take();
                Ok(response.map(|body| TraceBody { inner: body, call }))
            }
            Err(error) => {
                // A transport error: the call has no status from the peer.
                this.call.finish(Code::Unknown, None);
                Err(error)
            }
        })
    }
}

pin_project! {
    /// A response body whose call's status is still to come (in the trailers); the span
    /// stays open until then.
    pub struct TraceBody<B> {
        #[pin]
        inner: B,
        call: CallSpan,
    }
}

impl<B: Body> Body for TraceBody<B> {
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
                    let code = grpc::status_code(trailers).unwrap_or(Code::Unknown);
                    this.call.finish(code, Some(trailers));
                }
            }
            // A broken body or one that ended without trailers: no status was sent.
            Some(Err(_)) | None => this.call.finish(Code::Unknown, None),
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
