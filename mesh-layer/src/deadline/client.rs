use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use http::{Request, Response, Uri};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tonic::{Status, body::Body};
use tower::{Layer, Service};

use crate::{
    context::CallContext,
    grpc::{self, GRPC_TIMEOUT},
    metrics,
    policy::Policy,
};

/// Gives every outgoing call a deadline (see the module docs).
#[derive(Clone, Debug)]
pub struct DeadlineLayer {
    policy: Policy,
}

impl DeadlineLayer {
    /// Deadlines from `policy`'s per-method `timeout` and `deadlineMargin`.
    pub fn new(policy: Policy) -> Self {
        Self { policy }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = DeadlineService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DeadlineService {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// See [`DeadlineLayer`].
#[derive(Clone, Debug)]
pub struct DeadlineService<S> {
    inner: S,
    policy: Policy,
}

impl<S> Service<Request<Body>> for DeadlineService<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let now = Instant::now();
        let configured = self
            .policy
            .method(request.uri().path())
            .timeout
            .map(|t| now + t);
        let explicit = request
            .headers()
            .get(GRPC_TIMEOUT)
            .and_then(grpc::parse_timeout)
            .map(|t| now + t);
        let inherited = CallContext::current()
            .and_then(|c| c.deadline)
            .map(|d| d.checked_sub(self.policy.deadline_margin()).unwrap_or(now));
        let deadline = [configured, explicit, inherited]
            .into_iter()
            .flatten()
            .min();

        let Some(deadline) = deadline else {
            return ResponseFuture::Unbounded {
                inner: self.inner.call(request),
            };
        };
        if deadline <= now {
            metrics::client_deadline_exceeded(request.uri().path(), "before_send");
            return ResponseFuture::Expired;
        }
        // The layers below (retry) read the deadline back from this header.
        request
            .headers_mut()
            .insert(GRPC_TIMEOUT, grpc::format_timeout(deadline - now));
        // A refcounted copy, for the rare log line: not an allocation per call.
        let uri = request.uri().clone();
        ResponseFuture::Bounded {
            inner: self.inner.call(request),
            sleep: tokio::time::sleep_until(deadline),
            uri,
        }
    }
}

pin_project! {
    /// The response of a call with a deadline: the inner response, or DEADLINE_EXCEEDED
    /// (marked `deadline`) when the deadline comes first or had passed before the call.
    #[project = Projection]
    pub enum ResponseFuture<F> {
        /// No deadline applies.
        Unbounded { #[pin] inner: F },
        /// The deadline had passed: not sent.
        Expired,
        /// In flight until the deadline.
        Bounded { #[pin] inner: F, #[pin] sleep: Sleep, uri: Uri },
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Projection::Unbounded { inner } => inner.poll(cx),
            Projection::Expired => Poll::Ready(Ok(grpc::error_response(
                Status::deadline_exceeded("deadline passed before the call was sent"),
                "deadline",
            ))),
            Projection::Bounded { inner, sleep, uri } => {
                // The response first: one that is ready at the deadline still counts.
                if let Poll::Ready(response) = inner.poll(cx) {
                    return Poll::Ready(response);
                }
                ready!(sleep.poll(cx));
                metrics::client_deadline_exceeded(uri.path(), "in_flight");
                Poll::Ready(Ok(grpc::error_response(
                    Status::deadline_exceeded("deadline exceeded"),
                    "deadline",
                )))
            }
        }
    }
}
