//! A circuit breaker per endpoint.
//!
//! The failure mode: an endpoint is down or drowning, and every caller keeps sending it calls
//! that wait for a timeout, tying up the callers' threads, connections and deadlines while
//! adding load to the endpoint that is trying to recover. An open circuit fails those calls
//! at once (UNAVAILABLE, marked `waybill-mesh: breaker-open`) and, behind a balancer, takes
//! the endpoint out of rotation.
//!
//! The circuit opens on any of: `consecutiveFailures` failures in a row; a failure rate at or
//! above `failureRate` over the sliding `window` once it holds `minimumCalls`; a rate of calls
//! slower than `slowCallDuration` at or above `slowCallRate`. After an open period (doubling
//! from `baseOpen` to `maxOpen` on each reopening, with ±20 % jitter) it turns half-open and
//! lets `halfOpenProbes` calls through: all succeed and it closes; one fails and it reopens.
//!
//! A failure is a transport error or a code that says the endpoint is unwell (UNAVAILABLE,
//! DEADLINE_EXCEEDED, INTERNAL, UNKNOWN, DATA_LOSS; a shed call, RESOURCE_EXHAUSTED, counts neither way), read from the
//! headers or, when the response streams, from the trailers. A caller's mistake
//! (INVALID_ARGUMENT, NOT_FOUND, …) is a healthy endpoint's answer.

mod state;

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::{Code, Status, body::Body};
use tower::{Layer, Service};

pub use state::{Admission, Breaker, BreakerState};

use crate::{BoxFuture, grpc, metrics, policy::BreakerPolicy};

/// Whether a code means the endpoint is unwell.
///
/// RESOURCE_EXHAUSTED is not: it is a healthy server shedding load, which costs it nothing
/// and which callers answer by backing off (budgeted retries). Counting it would open the
/// breaker exactly under overload, and with one endpoint (or all endpoints busy) turn a
/// partial refusal into a complete outage for the open time.
pub fn is_failure(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Internal
            | Code::Unknown
            | Code::DataLoss
    )
}

/// Records a finished call: RESOURCE_EXHAUSTED counts neither way (a shed call is no sign of
/// health either, so it must not reset the failure streak or close a half-open circuit).
fn settle(admission: Admission, code: Code) {
    if code == Code::ResourceExhausted {
        admission.ignore();
    } else {
        admission.record(is_failure(code));
    }
}

/// Wraps one endpoint's service in a circuit breaker.
#[derive(Clone, Debug)]
pub struct BreakerLayer {
    policy: BreakerPolicy,
    endpoint: String,
}

impl BreakerLayer {
    /// A breaker for the endpoint named `endpoint` (used in logs and metrics).
    pub fn new(endpoint: impl Into<String>, policy: BreakerPolicy) -> Self {
        Self {
            policy,
            endpoint: endpoint.into(),
        }
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = CircuitBreaker<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker {
            inner,
            breaker: Breaker::new(self.endpoint.clone(), self.policy.clone()),
        }
    }
}

/// See [`BreakerLayer`]. Clones share the circuit.
#[derive(Clone, Debug)]
pub struct CircuitBreaker<S> {
    inner: S,
    breaker: Arc<Breaker>,
}

impl<S> CircuitBreaker<S> {
    /// The circuit, for balancers and inspection.
    pub fn breaker(&self) -> &Arc<Breaker> {
        &self.breaker
    }
}

impl<S> Service<Request<Body>> for CircuitBreaker<S>
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

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let Some(admission) = self.breaker.try_acquire() else {
            metrics::breaker_rejected(self.breaker.endpoint());
            let status = Status::unavailable(format!(
                "circuit open for {}; failing fast",
                self.breaker.endpoint()
            ));
            return Box::pin(async move { Ok(grpc::error_response(status, "breaker-open")) });
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            match response.await {
                Err(error) => {
                    admission.record(true);
                    Err(error)
                }
                Ok(response) => match grpc::status_code(response.headers()) {
                    Some(code) => {
                        settle(admission, code);
                        Ok(response)
                    }
                    None => Ok(response.map(|body| {
                        Body::new(Observed {
                            inner: body,
                            admission: Some(admission),
                        })
                    })),
                },
            }
        })
    }
}

/// A response body that reports the call's outcome when its trailers (or its end) arrive.
struct Observed {
    inner: Body,
    admission: Option<Admission>,
}

impl Observed {
    fn finish(&mut self, code: Option<Code>) {
        if let Some(admission) = self.admission.take() {
            settle(admission, code.unwrap_or(Code::Unknown));
        }
    }
}

impl HttpBody for Observed {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => {
                let code = frame.trailers_ref().and_then(grpc::status_code);
                self.finish(code);
            }
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => self.finish(None),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        // The reader stopped early (a cancelled stream): that is the caller's choice, not the
        // endpoint's failure.
        if let Some(admission) = self.admission.take() {
            admission.record(false);
        }
    }
}
