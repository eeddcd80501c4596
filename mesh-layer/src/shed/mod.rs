//! Load shedding with an adaptive concurrency limit.
//!
//! The failure mode: a server past its capacity queues calls without bound; every call gets
//! slower, callers time out and retry, and the queue grows until nothing succeeds. A server
//! that refuses the excess at once (RESOURCE_EXHAUSTED, which clients may retry elsewhere)
//! keeps serving the calls it admits at their normal latency.
//!
//! The limit is not configured by hand: it follows Netflix's Gradient2 algorithm, which
//! compares recent latency with the long-run latency. When recent calls are slower than the
//! long-run average by more than the tolerance, work is queueing somewhere (CPU, database
//! pool), so the limit shrinks; while latency holds, it grows by a small queue allowance.

mod limit;

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use tokio::time::Instant;
use tonic::{Status, body::Body};
use tower::{Layer, Service};

pub use limit::GradientLimit;

use crate::{BoxFuture, grpc, metrics, policy::ShedPolicy};

/// Refuses calls beyond the adaptive concurrency limit. One limit is shared by all clones, so
/// apply the layer once per server.
#[derive(Clone, Debug)]
pub struct LoadShedLayer {
    /// `None`: shedding is off and the layer passes calls through.
    limit: Option<Arc<GradientLimit>>,
}

impl LoadShedLayer {
    /// A layer with its own limit, or a pass-through one when `policy` is `None`.
    pub fn new(policy: Option<&ShedPolicy>) -> Self {
        Self {
            limit: policy.map(|p| Arc::new(GradientLimit::new(p))),
        }
    }

    /// The shared limit, for inspection.
    pub fn limit(&self) -> Option<&Arc<GradientLimit>> {
        self.limit.as_ref()
    }
}

impl<S> Layer<S> for LoadShedLayer {
    type Service = LoadShed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LoadShed {
            inner,
            limit: self.limit.clone(),
        }
    }
}

fn is_health_check(request: &Request<Body>) -> bool {
    request.uri().path().starts_with("/grpc.health.v1.Health/")
}

/// See [`LoadShedLayer`].
#[derive(Clone, Debug)]
pub struct LoadShed<S> {
    inner: S,
    limit: Option<Arc<GradientLimit>>,
}

impl<S> Service<Request<Body>> for LoadShed<S>
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
        // Health checks are never shed: a liveness probe refused under load would get the
        // process restarted exactly when it is busiest.
        let Some(limit) = self.limit.as_ref().filter(|_| !is_health_check(&request)) else {
            return Box::pin(self.inner.call(request));
        };
        let Some(permit) = limit.try_acquire() else {
            let path = request.uri().path();
            tracing::debug!(method = %path, limit = limit.current(), "shed: over the concurrency limit");
            metrics::shed(path);
            return Box::pin(async {
                Ok(grpc::error_response(
                    Status::resource_exhausted("server overloaded; retry later or elsewhere"),
                    "load-shed",
                ))
            });
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let started = Instant::now();
            let response = response.await;
            permit.complete(started.elapsed());
            response
        })
    }
}
