use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::time::Instant;
use tonic::{Status, body::Body};
use tower::{Layer, Service};

use crate::{
    BoxFuture,
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
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

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
            return Box::pin(self.inner.call(request));
        };
        if deadline <= now {
            metrics::client_deadline_exceeded(request.uri().path(), "before_send");
            return Box::pin(async {
                Ok(grpc::error_response(
                    Status::deadline_exceeded("deadline passed before the call was sent"),
                    "deadline",
                ))
            });
        }
        // The layers below (retry) read the deadline back from this header.
        request
            .headers_mut()
            .insert(GRPC_TIMEOUT, grpc::format_timeout(deadline - now));
        // A refcounted copy, for the rare log line: not an allocation per call.
        let uri = request.uri().clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            tokio::select! {
                biased;
                response = response => response,
                () = tokio::time::sleep_until(deadline) => {
                    metrics::client_deadline_exceeded(uri.path(), "in_flight");
                    Ok(grpc::error_response(Status::deadline_exceeded("deadline exceeded"), "deadline"))
                }
            }
        })
    }
}
