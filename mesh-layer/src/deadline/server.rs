use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::time::Instant;
use tonic::{Status, body::Body};
use tower::{Layer, Service};

use crate::{
    BoxFuture,
    context::CallContext,
    grpc::{self, GRPC_TIMEOUT, PREVIOUS_ATTEMPTS},
    metrics,
};

/// Enforces the caller's `grpc-timeout` on the server and hands the deadline to the handler.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerDeadlineLayer;

impl<S> Layer<S> for ServerDeadlineLayer {
    type Service = ServerDeadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ServerDeadline { inner }
    }
}

/// See [`ServerDeadlineLayer`].
#[derive(Clone, Debug)]
pub struct ServerDeadline<S> {
    inner: S,
}

impl<S> Service<Request<Body>> for ServerDeadline<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let timeout = match request.headers().get(GRPC_TIMEOUT) {
            None => None,
            Some(value) => match grpc::parse_timeout(value) {
                Some(timeout) => Some(timeout),
                None => {
                    let status = Status::invalid_argument(format!(
                        "malformed grpc-timeout header {value:?}"
                    ));
                    return Box::pin(async move { Ok(grpc::error_response(status, "deadline")) });
                }
            },
        };
        let previous_attempts = request
            .headers()
            .get(PREVIOUS_ATTEMPTS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let deadline = timeout.map(|t| Instant::now() + t);
        let context = CallContext {
            deadline,
            previous_attempts,
        };
        let path = request.uri().path().to_owned();
        let response = context.scope(self.inner.call(request));
        let Some(deadline) = deadline else {
            return Box::pin(response);
        };
        Box::pin(async move {
            tokio::select! {
                biased;
                response = response => response,
                () = tokio::time::sleep_until(deadline) => {
                    // Dropping the handler's future cancels its work (open transactions roll back).
                    tracing::debug!(method = %path, "deadline passed; handler cancelled");
                    metrics::server_deadline_exceeded(&path);
                    Ok(grpc::error_response(
                        Status::deadline_exceeded("the caller's deadline passed"),
                        "deadline",
                    ))
                }
            }
        })
    }
}
