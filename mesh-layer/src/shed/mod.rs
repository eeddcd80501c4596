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
//! A method may also have a fixed cap on its calls in flight ([`MethodCaps`]), for a service
//! that knows what it can take better than any latency signal tells: PlaceOrder's sagas each
//! run several transactions on a database other services share, so past the database's
//! capacity more of them only queue, and each participant's own limit sees its latency rise
//! without seeing why. A call over its method's cap is shed like one over the limit.
//!
//! Each gRPC service on a server has its own limit (a partition, as in Netflix's partitioned
//! limiters). With one shared limit, a process serving orders and inventory together would
//! let PlaceOrder calls, which wait on their own Reserve calls to the same process, take every
//! slot and shed those Reserve calls: a priority inversion. Per service, each behaves as it
//! would in a process of its own.

mod limit;

use std::{
    sync::{Arc, RwLock},
    task::{Context, Poll},
};

use http::{Request, Response};
use tokio::time::Instant;
use tonic::{Status, body::Body};
use tower::{Layer, Service};

pub use limit::GradientLimit;

use crate::{BoxFuture, grpc, method::PathMap, metrics, policy::ShedPolicy};

/// Refuses calls beyond the adaptive concurrency limit of their gRPC service, or beyond their
/// method's cap. The limits are shared by all clones, so apply the layer once per server.
#[derive(Clone, Debug)]
pub struct LoadShedLayer {
    /// `None`: shedding is off and the layer passes calls through.
    limits: Option<Arc<Limits>>,
    caps: MethodCaps,
}

/// Fixed caps on the calls in flight of some methods, by path (`/pkg.Service/Method`).
/// Clones share the counts.
#[derive(Clone, Debug, Default)]
pub struct MethodCaps {
    by_path: Arc<PathMap<Arc<tokio::sync::Semaphore>>>,
}

/// The slot a capped call holds, in the request's extensions. A handler that hands its work to
/// a task of its own (a saga that goes on if the caller hangs up) moves a clone into that
/// task, so the slot is free only when both the call and the work have ended.
#[derive(Clone, Debug)]
pub struct CapSlot(#[allow(dead_code)] Arc<tokio::sync::OwnedSemaphorePermit>);

impl MethodCaps {
    /// These caps plus at most `max` calls of `path` at once (at least one).
    pub fn with(self, path: impl Into<String>, max: usize) -> Self {
        let mut by_path = (*self.by_path).clone();
        by_path.insert(
            path.into(),
            Arc::new(tokio::sync::Semaphore::new(max.max(1))),
        );
        Self {
            by_path: Arc::new(by_path),
        }
    }

    /// A slot for a call of `path`: `Ok(None)` when the method has no cap, `Err(())` when
    /// its cap is reached.
    fn admit(&self, path: &str) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, ()> {
        match self.by_path.get(path) {
            None => Ok(None),
            Some(slots) => slots.clone().try_acquire_owned().map(Some).map_err(|_| ()),
        }
    }
}

/// Most gRPC services with a limit of their own; further names share [`OTHER`]'s.
const MAX_PARTITIONS: usize = 64;
/// The partition of names past [`MAX_PARTITIONS`].
const OTHER: &str = "other";

/// One limit per gRPC service, made on its first call.
#[derive(Debug)]
struct Limits {
    policy: ShedPolicy,
    by_service: RwLock<PathMap<Arc<GradientLimit>>>,
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
            caps: MethodCaps::default(),
        }
    }

    /// This layer, also holding the methods in `caps` to their caps (even with the adaptive
    /// limits off).
    pub fn with_caps(mut self, caps: MethodCaps) -> Self {
        self.caps = caps;
        self
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
            caps: self.caps.clone(),
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
    caps: MethodCaps,
}

/// A RESOURCE_EXHAUSTED answer, marked as shed.
fn refusal(reason: &'static str) -> Response<Body> {
    grpc::error_response(Status::resource_exhausted(reason), "load-shed")
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

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let path = request.uri().path();
        let capped = match self.caps.admit(path) {
            Ok(slot) => slot.map(Arc::new),
            Err(()) => {
                tracing::debug!(method = %path, "shed: the method's cap is reached");
                metrics::shed(path);
                let refused = refusal("server at this method's capacity; retry later or elsewhere");
                return Box::pin(async { Ok(refused) });
            }
        };
        if let Some(slot) = &capped {
            request.extensions_mut().insert(CapSlot(slot.clone()));
        }
        let path = request.uri().path();
        // Health checks are never shed: a liveness probe refused under load would get the
        // process restarted exactly when it is busiest.
        let Some(limits) = self.limits.as_ref().filter(|_| !is_health_check(&request)) else {
            let response = self.inner.call(request);
            return Box::pin(async move {
                let response = response.await;
                drop(capped);
                response
            });
        };
        let limit = limits.for_path(path);
        let Some(permit) = limit.try_acquire() else {
            tracing::debug!(method = %path, limit = limit.current(), "shed: over the concurrency limit");
            metrics::shed(path);
            let refused = refusal("server overloaded; retry later or elsewhere");
            return Box::pin(async { Ok(refused) });
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let started = Instant::now();
            let response = response.await;
            permit.complete(started.elapsed());
            drop(capped);
            response
        })
    }
}
