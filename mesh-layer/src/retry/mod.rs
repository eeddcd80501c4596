//! Retries that cannot turn an outage into a retry storm.
//!
//! The failure mode: a dependency slows or fails, every client retries every call three
//! times, and the dependency now receives four times its normal load exactly when it can
//! least take it. Chained services multiply that again at every hop.
//!
//! So a call is retried only when all of these hold:
//! - its status says the server did not process it (the policy's `retryableStatusCodes`,
//!   UNAVAILABLE by default), read from the headers or, for unary calls, the trailers;
//! - the method is marked idempotent in the proto (`idempotency_level`), or the call carries
//!   an `idempotency-key`;
//! - attempts remain (`maxAttempts`), and the incoming call this one serves is not itself a
//!   retry (`grpc-previous-rpc-attempts` > 0 upstream): only one hop of a chain retries;
//! - the server did not push back with a negative `grpc-retry-pushback-ms`;
//! - the deadline leaves room for the backoff plus the method's typical latency;
//! - the retry budget has a token: retries may add at most `retryRatio` of recent original
//!   requests (plus `minRetriesPerSecond`), so in a full outage they add about 20 % load, not
//!   300 % (tower's `TpsBudget`, the Finagle/linkerd design, rather than a bare max count;
//!   ported in `budget` so that the retries it would allow are a gauge).
//!
//! Backoff is exponential with full jitter (gRPC A6); a positive pushback replaces it. Each
//! retry sets `grpc-previous-rpc-attempts`. The request body is kept for replay up to
//! `maxRetryBufferBytes`; larger requests are sent once.

mod backoff;
mod budget;
mod latency;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use http::{HeaderValue, Request, Response};
use tokio::time::Instant;
use tonic::{Code, body::Body};
use tower::{Layer, Service, ServiceExt};

use self::{backoff::Backoff, budget::RetryBudget, latency::TypicalLatency};
use crate::{
    BoxFuture,
    body::{Buffered, MAX_RESPONSE_BYTES, buffer_request, read_response, replay},
    context::CallContext,
    grpc::{self, IDEMPOTENCY_KEY, PREVIOUS_ATTEMPTS, Pushback},
    method::{MethodInfo, MethodTable, PathMap},
    metrics::{self, Handles, MethodMetrics},
    policy::{MethodPolicy, Policy},
};

/// Every how many original calls the budget gauge is refreshed (retries refresh it too).
const BUDGET_SAMPLE: u64 = 64;

/// Budgeted retries (see the module docs). Clones share one budget: build one layer per
/// target service.
#[derive(Clone, Debug)]
pub struct RetryLayer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    policy: Policy,
    budget: RetryBudget,
    /// Original calls so far, to sample the budget gauge every [`BUDGET_SAMPLE`] calls.
    calls_seen: AtomicU64,
    /// What a call needs to know about its method, found with one lookup per call.
    routes: PathMap<Route>,
    /// For paths not in the method table.
    unknown: Route,
}

/// One method as the retry layer sees it.
#[derive(Debug)]
struct Route {
    info: MethodInfo,
    policy: Arc<MethodPolicy>,
    /// `mesh_client_requests_total` handles.
    metrics: Arc<Handles>,
    latency: TypicalLatency,
}

impl Shared {
    fn route(&self, path: &str) -> &Route {
        self.routes.get(path).unwrap_or(&self.unknown)
    }
}

impl RetryLayer {
    /// Retries as `policy` configures them, for the methods `methods` describes.
    pub fn new(policy: Policy, methods: MethodTable) -> Self {
        let budget = policy.retry_budget();
        let metrics = MethodMetrics::new(&methods);
        let routes = methods
            .iter()
            .map(|(path, info)| {
                let route = Route {
                    info: *info,
                    policy: policy.method(path),
                    metrics: metrics.get(path).clone(),
                    latency: TypicalLatency::default(),
                };
                (path.to_owned(), route)
            })
            .collect();
        let unknown = Route {
            info: methods.get(""),
            policy: policy.method(""),
            metrics: metrics.get("").clone(),
            latency: TypicalLatency::default(),
        };
        Self {
            shared: Arc::new(Shared {
                budget: RetryBudget::new(budget.ttl, budget.min_per_second, budget.retry_ratio),
                calls_seen: AtomicU64::new(0),
                routes,
                unknown,
                policy,
            }),
        }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// See [`RetryLayer`].
#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Service<Request<Body>> for Retry<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let shared = &self.shared;
        // Every original request earns retry credit, retried or not.
        shared.budget.deposit();
        let path = request.uri().path();
        // The gauge is sampled, not set per call: reading the balance sums ten slots.
        if shared
            .calls_seen
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(BUDGET_SAMPLE)
        {
            metrics::retry_budget(path, shared.budget.available());
        }
        let route = shared.route(path);
        route.metrics.client_call();
        let info = route.info;
        let method = &route.policy;
        let eligible = method.retry.is_some()
            && !info.client_streaming
            && (info.idempotent || request.headers().contains_key(IDEMPOTENCY_KEY));
        if !eligible {
            return Box::pin(self.inner.call(request));
        }
        let upstream_retry = CallContext::current().is_some_and(|c| c.previous_attempts > 0);
        let shared = self.shared.clone();
        let method = method.clone();
        // The service we were polled ready on makes the first attempt; keep a clone in its
        // place (tower's rule: the clone is not ready, the original is).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);

        Box::pin(async move {
            let Some(retry) = method.retry.as_ref() else {
                return inner.call(request).await;
            };
            let (parts, body) = request.into_parts();
            let path = parts.uri.path();
            let route = shared.route(path);
            let bytes = match buffer_request(body, shared.policy.max_retry_buffer_bytes()).await {
                Buffered::Complete(bytes) => bytes,
                Buffered::TooLarge(body) => {
                    metrics::retry_skipped(path, "buffer");
                    return inner.call(Request::from_parts(parts, body)).await;
                }
                Buffered::Failed(status) => return Ok(status.into_http()),
            };
            // The call's deadline, as the deadline layer above wrote it (or the caller did).
            let deadline = parts
                .headers
                .get(grpc::GRPC_TIMEOUT)
                .and_then(grpc::parse_timeout)
                .map(|timeout| Instant::now() + timeout);
            let max_attempts = retry.max_attempts;
            let mut backoff = Backoff::new(retry);
            let mut attempt = 1;
            loop {
                let mut request = Request::from_parts(parts.clone(), replay(&bytes));
                if attempt > 1 {
                    let headers = request.headers_mut();
                    headers.insert(PREVIOUS_ATTEMPTS, HeaderValue::from(attempt - 1));
                    // The copied header still says the time the call had at first.
                    if let Some(deadline) = deadline {
                        let left = deadline.saturating_duration_since(Instant::now());
                        headers.insert(grpc::GRPC_TIMEOUT, grpc::format_timeout(left));
                    }
                }
                let started = Instant::now();
                let result = if attempt == 1 {
                    inner.call(request).await
                } else {
                    match inner.ready().await {
                        Ok(ready) => ready.call(request).await,
                        Err(error) => Err(error),
                    }
                };
                let last = attempt >= max_attempts || upstream_retry;

                let (code, pushback, outcome) = match result {
                    // A transport error (refused, reset) means the call may not have arrived;
                    // it counts as UNAVAILABLE for the decision and is returned as it is.
                    Err(error) => (Code::Unavailable, None, Err(error)),
                    Ok(response) => match grpc::status_code(response.headers()) {
                        Some(code) => (code, grpc::pushback(response.headers()), Ok(response)),
                        // Response headers without a status commit a streaming call (A6);
                        // the last attempt needs no decision.
                        None if info.server_streaming || last => return Ok(response),
                        None => {
                            let (head, body) = response.into_parts();
                            let read = match read_response(body, MAX_RESPONSE_BYTES, false).await {
                                Ok(read) => read,
                                Err(status) => return Ok(status.into_http()),
                            };
                            (
                                read.code.unwrap_or(Code::Unknown),
                                read.pushback,
                                Ok(Response::from_parts(head, read.body)),
                            )
                        }
                    },
                };

                if code == Code::Ok {
                    route.latency.record(started.elapsed());
                    return outcome;
                }
                if !retry.retryable_codes.contains(&code) {
                    return outcome;
                }
                // Our own breaker failed the call fast: every endpoint's circuit is open, and
                // a retry would only spend budget on the same answer.
                if outcome.as_ref().is_ok_and(|r| {
                    r.headers()
                        .get(grpc::MESH_MARKER)
                        .is_some_and(|m| m == "breaker-open")
                }) {
                    return outcome;
                }
                let skip = |reason: &'static str| {
                    tracing::debug!(method = %path, attempt, ?code, reason, "not retrying");
                    metrics::retry_skipped(path, reason);
                };
                if upstream_retry {
                    skip("upstream_retry");
                    return outcome;
                }
                if last {
                    skip("attempts");
                    return outcome;
                }
                let wait = match pushback {
                    Some(Pushback::Never) => {
                        skip("pushback");
                        return outcome;
                    }
                    Some(Pushback::After(wait)) => wait,
                    None => backoff.next(),
                };
                if let Some(deadline) = deadline {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left < wait + route.latency.get() {
                        skip("deadline");
                        return outcome;
                    }
                }
                let withdrawn = shared.budget.withdraw();
                metrics::retry_budget(path, shared.budget.available());
                if !withdrawn {
                    skip("budget");
                    return outcome;
                }
                tracing::debug!(method = %path, attempt, ?code, ?wait, "retrying");
                metrics::retried(path);
                drop(outcome);
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
        })
    }
}
