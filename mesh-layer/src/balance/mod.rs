//! Client-side load balancing over a service's endpoints: power of two choices on peak-EWMA
//! latency, each endpoint behind its own circuit breaker.
//!
//! Why client-side: a Kubernetes ClusterIP balances connections, not calls, so one HTTP/2
//! connection pins every call to one pod. With a headless Service the client sees every pod
//! and spreads calls itself. Power of two choices (pick two at random, send to the cheaper)
//! avoids both herding on the single "best" endpoint and the cost of scanning all of them.
//!
//! Endpoints whose circuit is open leave the rotation; when every circuit is open, calls fail
//! fast with UNAVAILABLE. Endpoints come from a static list or from DNS, re-resolved
//! periodically ([`Balancer::connect`]); an endpoint that stays keeps its circuit and latency.

mod ewma;

use std::{
    sync::{Arc, RwLock, Weak},
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response};
use tokio::time::Instant;
use tonic::{Status, body::Body};
use tower::{Layer, Service, ServiceExt};

use self::ewma::PeakEwma;
use crate::{
    BoxFuture,
    breaker::{BreakerLayer, BreakerState, CircuitBreaker},
    connection::{Connection, ConnectionError},
    grpc,
    policy::BreakerPolicy,
};

/// How often DNS targets are re-resolved.
const DNS_REFRESH: Duration = Duration::from_secs(5);

/// Balances calls over endpoints. Clones share the endpoints. Each call clones the chosen
/// endpoint's service, so that service should be a cheap handle ([`Connection`] is).
#[derive(Debug)]
pub struct Balancer<S> {
    shared: Arc<Shared<S>>,
}

impl<S> Clone for Balancer<S> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

#[derive(Debug)]
struct Shared<S> {
    endpoints: RwLock<Arc<[Arc<Endpoint<S>>]>>,
    breaker: BreakerPolicy,
}

#[derive(Debug)]
struct Endpoint<S> {
    name: String,
    service: CircuitBreaker<S>,
    load: PeakEwma,
}

/// Why a balancer target could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The target string is malformed.
    #[error("invalid target {0:?}: use http://host:port[,http://host:port…] or dns://host:port")]
    Invalid(String),
    /// An endpoint URI was refused.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
}

impl<S> Balancer<S>
where
    S: Clone,
{
    /// A balancer over named services.
    pub fn new(breaker: BreakerPolicy, services: impl IntoIterator<Item = (String, S)>) -> Self {
        let balancer = Self {
            shared: Arc::new(Shared {
                endpoints: RwLock::new(Arc::from(Vec::new())),
                breaker,
            }),
        };
        balancer.set_endpoints(services);
        balancer
    }

    /// Replaces the endpoint set. Endpoints already present (by name) keep their circuit and
    /// latency history; the rest are added or dropped.
    pub fn set_endpoints(&self, services: impl IntoIterator<Item = (String, S)>) {
        let current = self.snapshot();
        let next: Vec<Arc<Endpoint<S>>> = services
            .into_iter()
            .map(|(name, service)| {
                current
                    .iter()
                    .find(|e| e.name == name)
                    .cloned()
                    .unwrap_or_else(|| {
                        Arc::new(Endpoint {
                            service: BreakerLayer::new(name.clone(), self.shared.breaker.clone())
                                .layer(service),
                            name,
                            load: PeakEwma::default(),
                        })
                    })
            })
            .collect();
        if let Ok(mut endpoints) = self.shared.endpoints.write() {
            *endpoints = Arc::from(next);
        }
    }

    /// Each endpoint's name and circuit state.
    pub fn endpoints(&self) -> Vec<(String, BreakerState)> {
        self.snapshot()
            .iter()
            .map(|e| (e.name.clone(), e.service.breaker().state()))
            .collect()
    }

    fn snapshot(&self) -> Arc<[Arc<Endpoint<S>>]> {
        self.shared
            .endpoints
            .read()
            .map(|e| e.clone())
            .unwrap_or_else(|_| Arc::from(Vec::new()))
    }
}

impl Balancer<Connection> {
    /// Connects to `target`: comma-separated `http://host:port` URIs, or `dns://host:port`
    /// (also `dns:///host:port`), re-resolved every 5 s, for example a Kubernetes headless
    /// Service. Must be called inside a tokio runtime when the target is DNS.
    pub fn connect(target: &str, breaker: BreakerPolicy) -> Result<Self, TargetError> {
        if let Some(authority) = target
            .strip_prefix("dns:///")
            .or_else(|| target.strip_prefix("dns://"))
        {
            let (host, port) = authority
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
                .ok_or_else(|| TargetError::Invalid(target.to_owned()))?;
            let balancer = Self::new(breaker, Vec::new());
            tokio::spawn(resolve_forever(
                Arc::downgrade(&balancer.shared),
                host,
                port,
            ));
            return Ok(balancer);
        }
        let services = target
            .split(',')
            .map(str::trim)
            .filter(|uri| !uri.is_empty())
            .map(|uri| Ok((uri.to_owned(), crate::client::connect(uri)?)))
            .collect::<Result<Vec<_>, TargetError>>()?;
        if services.is_empty() {
            return Err(TargetError::Invalid(target.to_owned()));
        }
        Ok(Self::new(breaker, services))
    }
}

/// Re-resolves `host` until the balancer is dropped.
async fn resolve_forever(shared: Weak<Shared<Connection>>, host: String, port: u16) {
    loop {
        match tokio::net::lookup_host((host.as_str(), port)).await {
            Ok(addresses) => {
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                let mut uris: Vec<String> = addresses.map(|a| format!("http://{a}")).collect();
                uris.sort();
                uris.dedup();
                let services: Vec<_> = uris
                    .into_iter()
                    .filter_map(|uri| Some((uri.clone(), crate::client::connect(&uri).ok()?)))
                    .collect();
                Balancer { shared }.set_endpoints(services);
            }
            Err(error) => {
                // Keep the last known endpoints: a DNS hiccup must not empty the rotation.
                tracing::warn!(%host, %error, "DNS resolution failed; keeping the last endpoints");
            }
        }
        tokio::time::sleep(DNS_REFRESH).await;
        if shared.strong_count() == 0 {
            return;
        }
    }
}

/// The status of a call the connection failed, as gRPC clients report it
/// (PROTOCOL-HTTP2.md, "Errors"):
/// - the connection failed or went away (refused, reset, GOAWAY, keep-alive timeout): the call
///   may not have arrived, UNAVAILABLE, which the retry policy may retry;
/// - the peer reset the stream: by its reason, CANCEL is CANCELLED, REFUSED_STREAM (not
///   processed) UNAVAILABLE, ENHANCE_YOUR_CALM RESOURCE_EXHAUSTED, and a protocol or internal
///   error INTERNAL, which no policy retries, since the call may have run;
/// - tonic's channel ran out of deadline (when a balancer wraps one): DEADLINE_EXCEEDED.
fn transport_status(endpoint: &str, error: &(dyn std::error::Error + 'static)) -> Status {
    let mut cause = Some(error);
    while let Some(current) = cause {
        if current.is::<tonic::TimeoutExpired>() {
            return Status::deadline_exceeded(format!("endpoint {endpoint}: deadline exceeded"));
        }
        if let Some(h2) = current.downcast_ref::<h2::Error>()
            && !h2.is_go_away()
            && let Some(reason) = h2.reason()
        {
            let code = match reason {
                h2::Reason::REFUSED_STREAM => tonic::Code::Unavailable,
                h2::Reason::CANCEL => tonic::Code::Cancelled,
                h2::Reason::ENHANCE_YOUR_CALM => tonic::Code::ResourceExhausted,
                h2::Reason::INADEQUATE_SECURITY => tonic::Code::PermissionDenied,
                _ => tonic::Code::Internal,
            };
            return Status::new(code, format!("endpoint {endpoint}: {error}"));
        }
        cause = current.source();
    }
    Status::unavailable(format!("endpoint {endpoint}: {error}"))
}

/// Power of two choices among the available endpoints.
fn choose<S>(endpoints: &[Arc<Endpoint<S>>]) -> Option<&Arc<Endpoint<S>>> {
    let available = |e: &&Arc<Endpoint<S>>| e.service.breaker().is_available();
    match endpoints.len() {
        0 => None,
        1 => endpoints.first().filter(available),
        n => {
            let a = fastrand::usize(..n);
            let b = (a + 1 + fastrand::usize(..n - 1)) % n;
            let (a, b) = (&endpoints[a], &endpoints[b]);
            match (available(&a), available(&b)) {
                (true, true) => Some(if a.load.cost() <= b.load.cost() { a } else { b }),
                (true, false) => Some(a),
                (false, true) => Some(b),
                (false, false) => endpoints
                    .iter()
                    .filter(available)
                    .min_by(|x, y| x.load.cost().total_cmp(&y.load.cost())),
            }
        }
    }
}

impl<S> Service<Request<Body>> for Balancer<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: std::error::Error + Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    /// Always ready: readiness is awaited on the chosen endpoint, inside the call.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let endpoints = self.snapshot();
        let Some(endpoint) = choose(&endpoints).cloned() else {
            // No endpoints yet (DNS not answered) may change in a moment: retryable. All
            // circuits open will not: the retry layer leaves `breaker-open` alone.
            let (status, marker) = if endpoints.is_empty() {
                let status = Status::unavailable("no endpoints resolved for this service");
                (status, "no-endpoints")
            } else {
                let status = Status::unavailable(format!(
                    "all {} endpoints have open circuits; failing fast",
                    endpoints.len()
                ));
                (status, "breaker-open")
            };
            return Box::pin(async move { Ok(grpc::error_response(status, marker)) });
        };
        endpoint.load.start();
        let in_flight = InFlight {
            endpoint,
            started: Instant::now(),
        };
        Box::pin(async move {
            let endpoint = &in_flight.endpoint;
            let result = match endpoint.service.clone().ready_oneshot().await {
                Ok(mut ready) => ready.call(request).await,
                Err(error) => Err(error),
            };
            Ok(result.unwrap_or_else(|error| transport_status(&endpoint.name, &error).into_http()))
        })
    }
}

/// A call counted in its endpoint's load until it ends, however it ends: a call dropped at its
/// deadline must leave the pending count too, or the endpoint would look busier for good. Its
/// time counts as a latency sample, as in tower's PeakEwma.
struct InFlight<S> {
    endpoint: Arc<Endpoint<S>>,
    started: Instant,
}

impl<S> Drop for InFlight<S> {
    fn drop(&mut self) {
        self.endpoint.load.finish(self.started.elapsed());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tonic::Code;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_call_dropped_before_its_answer_leaves_the_endpoints_load() {
        // An endpoint that never answers.
        let never = tower::service_fn(|_: Request<Body>| {
            std::future::pending::<Result<Response<Body>, std::io::Error>>()
        });
        let mut balancer = Balancer::new(
            crate::policy::Policy::default().breaker().clone(),
            [("never".to_owned(), never)],
        );
        for _ in 0..3 {
            let call = balancer.call(Request::new(Body::empty()));
            let dropped = tokio::time::timeout(Duration::from_millis(10), call).await;
            assert!(dropped.is_err(), "the call cannot have answered");
        }
        assert_eq!(balancer.snapshot()[0].load.pending(), 0);
    }

    #[test]
    fn a_stream_reset_maps_by_its_reason_and_a_lost_connection_is_unavailable() {
        let reset = |reason| transport_status("e", &h2::Error::from(reason)).code();
        assert_eq!(reset(h2::Reason::REFUSED_STREAM), Code::Unavailable);
        assert_eq!(reset(h2::Reason::CANCEL), Code::Cancelled);
        assert_eq!(
            reset(h2::Reason::ENHANCE_YOUR_CALM),
            Code::ResourceExhausted
        );
        // The call may have run: not UNAVAILABLE, so no retry policy re-runs it.
        assert_eq!(reset(h2::Reason::PROTOCOL_ERROR), Code::Internal);
        assert_eq!(reset(h2::Reason::INTERNAL_ERROR), Code::Internal);

        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let status = transport_status("http://10.0.0.1:1", &refused);
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("http://10.0.0.1:1"), "{status:?}");
    }
}
