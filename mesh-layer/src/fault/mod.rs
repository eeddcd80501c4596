//! Fault injection from configuration: fail P % of a method's calls with a given code, or
//! delay P % of them. Off unless the policy configures it. Tests and chaos runs use it to
//! prove that callers survive what production will eventually do to them.

use std::task::{Context, Poll};

use http::{Request, Response};
use tonic::{Status, body::Body};
use tower::{Layer, Service};

use crate::{BoxFuture, grpc, metrics, policy::Policy};

/// Injects the faults `policy` configures per method.
#[derive(Clone, Debug)]
pub struct FaultLayer {
    policy: Policy,
    /// False when no method has faults: the layer then only passes calls through.
    enabled: bool,
}

impl FaultLayer {
    /// Faults from `policy`'s `methodConfig[].faults`.
    pub fn new(policy: Policy) -> Self {
        Self {
            enabled: policy.has_faults(),
            policy,
        }
    }
}

impl<S> Layer<S> for FaultLayer {
    type Service = Fault<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Fault {
            inner,
            policy: self.policy.clone(),
            enabled: self.enabled,
        }
    }
}

/// See [`FaultLayer`].
#[derive(Clone, Debug)]
pub struct Fault<S> {
    inner: S,
    policy: Policy,
    enabled: bool,
}

fn roll(percent: f64) -> bool {
    fastrand::f64() * 100.0 < percent
}

impl<S> Service<Request<Body>> for Fault<S>
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
        if !self.enabled {
            return Box::pin(self.inner.call(request));
        }
        let path = request.uri().path();
        let method_policy = self.policy.method(path);
        let faults = &method_policy.faults;
        let delay = faults.delay.filter(|(_, p)| roll(*p)).map(|(d, _)| d);
        let abort = faults.abort.filter(|(_, p)| roll(*p)).map(|(c, _)| c);
        if let Some(code) = abort {
            tracing::debug!(method = %path, ?code, ?delay, "injected fault: abort");
            metrics::fault_injected(path, "abort");
        }
        if delay.is_some() {
            tracing::debug!(method = %path, ?delay, "injected fault: delay");
            metrics::fault_injected(path, "delay");
        }
        // With an abort the handler never runs; with a delay it starts after the delay.
        let response = abort.is_none().then(|| self.inner.call(request));
        Box::pin(async move {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            match (abort, response) {
                (None, Some(response)) => response.await,
                (code, _) => Ok(grpc::error_response(
                    Status::new(code.unwrap_or(tonic::Code::Unknown), "injected fault"),
                    "fault",
                )),
            }
        })
    }
}
