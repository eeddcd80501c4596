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
//!
//! Each gRPC service on a server has its own limit (a partition, as in Netflix's partitioned
//! limiters). With one shared limit, a process serving orders and inventory together would
//! let PlaceOrder calls, which wait on their own Reserve calls to the same process, take every
//! slot and shed those Reserve calls: a priority inversion. Per service, each behaves as it
//! would in a process of its own.

mod limit;

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    task::{Context, Poll},
};

use http::{Request, Response};
use tokio::time::Instant;
use tonic::{Status, body::Body};
use tower::{Layer, Service};

pub use limit::GradientLimit;

use crate::{BoxFuture, grpc, metrics, policy::ShedPolicy};

/// Refuses calls beyond the adaptive concurrency limit of their gRPC service. The limits are
/// shared by all clones, so apply the layer once per server.
#[derive(Clone, Debug)]
pub struct LoadShedLayer {
    /// `None`: shedding is off and the layer passes calls through.
    limits: Option<Arc<Limits>>,
}

/// Most gRPC services with a limit of their own; further names share [`OTHER`]'s.
const MAX_PARTITIONS: usize = 64;
/// The partition of names past [`MAX_PARTITIONS`].
const OTHER: &str = "other";

/// One limit per gRPC service, made on its first call.
#[derive(Debug)]
struct Limits {
    policy: ShedPolicy,
    by_service: RwLock<HashMap<String, Arc<GradientLimit>>>,
}

impl Limits {
    fn for_path(&self, path: &str) -> Arc<GradientLimit> {
        // "/pkg.Service/Method" → "pkg.Service"
        let service = path
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or_default();
        let known = self
            .by_service
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(service)
            .cloned();
        known.unwrap_or_else(|| {
            let mut by_service = self
                .by_service
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            // The path comes from the client before routing: past a bound, unknown names share
            // one limit, so junk paths cannot grow the map (or the gauge's label set).
            let service = if by_service.len() >= MAX_PARTITIONS {
                OTHER
            } else {
                service
            };
            by_service
                .entry(service.to_owned())
                .or_insert_with(|| Arc::new(GradientLimit::new(&self.policy, service)))
                .clone()
        })
    }
}

impl LoadShedLayer {
    /// A layer with its own limits, or a pass-through one when `policy` is `None`.
    pub fn new(policy: Option<&ShedPolicy>) -> Self {
        Self {
            limits: policy.map(|policy| {
                Arc::new(Limits {
                    policy: policy.clone(),
                    by_service: RwLock::default(),
                })
            }),
        }
    }

    /// The limit of the gRPC service that `path` (`/pkg.Service/Method`) calls, for
    /// inspection; `None` when shedding is off.
    pub fn limit_for(&self, path: &str) -> Option<Arc<GradientLimit>> {
        self.limits.as_ref().map(|limits| limits.for_path(path))
    }
}

impl<S> Layer<S> for LoadShedLayer {
    type Service = LoadShed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LoadShed {
            inner,
            limits: self.limits.clone(),
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
    limits: Option<Arc<Limits>>,
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
        let Some(limits) = self.limits.as_ref().filter(|_| !is_health_check(&request)) else {
            return Box::pin(self.inner.call(request));
        };
        let limit = limits.for_path(request.uri().path());
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
