//! Idempotency keys: a call carrying `idempotency-key` runs at most once per (caller, method,
//! key).
//!
//! The failure mode: a client sends PlaceOrder, the connection drops before the answer
//! arrives, and the client cannot know whether the order exists. Retrying may place it twice;
//! not retrying may lose it. With a key, the retry is safe: the server runs the call once and
//! answers every repeat with the stored outcome.
//!
//! - A repeat of a finished call gets the stored response replayed (status, message, details,
//!   and the response message), marked `waybill-mesh: replayed`.
//! - A repeat with a different request message gets INVALID_ARGUMENT: the key was reused.
//! - A repeat while the first call runs gets ABORTED; it never runs a second time.
//! - An outcome a retry may change (UNAVAILABLE, RESOURCE_EXHAUSTED, ABORTED,
//!   DEADLINE_EXCEEDED, CANCELLED, or a call abandoned midway) releases the key, so the
//!   retry runs the call.
//! - Keys expire after the policy's `idempotency.retention` (24 h by default).
//! - A running claim holds a lease (the call's deadline, or 60 s); if its process dies, a
//!   repeat after the lease runs the call.
//!
//! NOTE: the outcome is stored after the handler's own transaction commits. A process that
//! dies between the two leaves a claim whose lease expiry lets a repeat run again, and a
//! handler whose commit the database never confirmed (a lost connection) answers UNAVAILABLE,
//! which releases the key. Handlers whose effects must be exactly-once also key their own
//! writes: the layer hands the call's [`KeyId`] to the handler in the request's extensions,
//! and [`KeyId::digest`] is stable across repeats (orders store it, uniquely, with the order).
//!
//! The caller is the `waybill-caller` metadata value until mTLS identities exist (a claim,
//! not a proof: it scopes keys, it does not secure them).

mod store;

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tonic::{Code, Status, body::Body};
use tower::{Layer, Service};

pub use store::{
    Begin, Fingerprint, IdempotencyStore, KeyId, MemoryStore, StoreError, StoredResponse,
};

use crate::{
    BoxFuture,
    body::{Buffered, MAX_RESPONSE_BYTES, buffer_request, read_response, replay},
    context::CallContext,
    grpc::{self, IDEMPOTENCY_KEY, MESH_MARKER},
    method::MethodTable,
    metrics,
    policy::Policy,
};

/// The metadata naming the caller, which scopes its keys.
pub const CALLER: &str = "waybill-caller";
/// Longest accepted key.
const MAX_KEY_LENGTH: usize = 128;
/// How long a running claim lasts when the call has no deadline.
const DEFAULT_LEASE: Duration = Duration::from_secs(60);

/// Runs keyed calls at most once (see the module docs).
#[derive(Clone)]
pub struct IdempotencyLayer {
    store: Arc<dyn IdempotencyStore>,
    retention: Duration,
    methods: MethodTable,
}

impl IdempotencyLayer {
    /// Keys kept in `store` for the policy's retention; only unary methods (per `methods`)
    /// accept keys.
    pub fn new(store: Arc<dyn IdempotencyStore>, policy: &Policy, methods: MethodTable) -> Self {
        Self {
            store,
            retention: policy.idempotency().retention,
            methods,
        }
    }
}

impl std::fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`IdempotencyLayer`].
#[derive(Clone, Debug)]
pub struct Idempotency<S> {
    inner: S,
    layer: IdempotencyLayer,
}

/// Outcomes a retry may change: the key is released instead of stored.
fn is_transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::DeadlineExceeded
            | Code::Cancelled
    )
}

impl<S> Service<Request<Body>> for Idempotency<S>
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
        let Some(key) = request.headers().get(IDEMPOTENCY_KEY) else {
            return Box::pin(self.inner.call(request));
        };
        let key = match key.to_str() {
            Ok(key) if !key.is_empty() && key.len() <= MAX_KEY_LENGTH => key.to_owned(),
            _ => {
                let status = Status::invalid_argument(format!(
                    "{IDEMPOTENCY_KEY} must be 1 to {MAX_KEY_LENGTH} visible ASCII characters"
                ));
                return Box::pin(async move { Ok(refused(status)) });
            }
        };
        let path = request.uri().path().to_owned();
        if !self.layer.methods.get(&path).is_unary() {
            let status = Status::invalid_argument(format!(
                "{IDEMPOTENCY_KEY} applies only to unary methods"
            ));
            return Box::pin(async move { Ok(refused(status)) });
        }
        let id = KeyId {
            caller: request
                .headers()
                .get(CALLER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("anonymous")
                .to_owned(),
            method: path,
            key,
        };
        let layer = self.layer.clone();
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);

        Box::pin(async move {
            let (mut parts, body) = request.into_parts();
            let bytes = match buffer_request(body, MAX_RESPONSE_BYTES).await {
                Buffered::Complete(bytes) => bytes,
                Buffered::TooLarge(_) => {
                    return Ok(refused(Status::invalid_argument(
                        "request too large to be made idempotent",
                    )));
                }
                Buffered::Failed(status) => return Ok(status.into_http()),
            };
            let fingerprint: Fingerprint = Sha256::digest(&bytes).into();
            let lease = CallContext::current()
                .and_then(|c| c.deadline)
                .map(|d| d.saturating_duration_since(Instant::now()) + Duration::from_secs(1))
                .unwrap_or(DEFAULT_LEASE);

            let begin = layer
                .store
                .begin(&id, fingerprint, lease, layer.retention)
                .await;
            let mismatch = || {
                metrics::idempotency(&id.method, "mismatch");
                refused(Status::invalid_argument(format!(
                    "{IDEMPOTENCY_KEY} {:?} was already used with a different request",
                    id.key
                )))
            };
            match begin {
                Err(error) => {
                    tracing::warn!(%error, "idempotency store unavailable; refusing keyed call");
                    return Ok(refused(Status::unavailable(
                        "idempotency store unavailable",
                    )));
                }
                Ok(Begin::Running {
                    fingerprint: theirs,
                }) if theirs != fingerprint => {
                    return Ok(mismatch());
                }
                Ok(Begin::Running { .. }) => {
                    tracing::debug!(method = %id.method, key = %id.key, "keyed call still running");
                    metrics::idempotency(&id.method, "in_progress");
                    return Ok(refused(Status::aborted(
                        "a call with this idempotency-key is still running; retry later",
                    )));
                }
                Ok(Begin::Done(stored)) if stored.fingerprint != fingerprint => {
                    return Ok(mismatch());
                }
                Ok(Begin::Done(stored)) => {
                    tracing::debug!(method = %id.method, key = %id.key, code = stored.code, "replaying stored response");
                    metrics::idempotency(&id.method, "replayed");
                    return Ok(replay_stored(stored));
                }
                Ok(Begin::Started) => {}
            }

            // If this future is dropped (deadline, cancelled call), the claim is released so
            // a retry can run the call.
            parts.extensions.insert(id.clone());
            let mut claim = Claim {
                store: layer.store.clone(),
                id,
                armed: true,
            };
            let response = inner
                .call(Request::from_parts(parts, replay(&bytes)))
                .await?;
            let (head, body) = response.into_parts();
            let (status, data, body) = match Status::from_header_map(&head.headers) {
                Some(status) => (status, Bytes::new(), body),
                None => match read_response(body, MAX_RESPONSE_BYTES, true).await {
                    Ok(read) => {
                        let status = read
                            .status
                            .unwrap_or_else(|| Status::unknown("response without grpc-status"));
                        (status, read.data, read.body)
                    }
                    Err(status) => return Ok(status.into_http()),
                },
            };
            metrics::idempotency(&claim.id.method, "executed");
            if !is_transient(status.code()) {
                let stored = StoredResponse {
                    fingerprint,
                    code: status.code() as i32,
                    message: status.message().to_owned(),
                    details: status.details().to_vec().into(),
                    body: data,
                };
                match layer
                    .store
                    .complete(&claim.id, stored, layer.retention)
                    .await
                {
                    Ok(()) => claim.armed = false,
                    Err(error) => {
                        // Keep the claim: repeats get ABORTED until its lease ends rather than
                        // a second execution now.
                        tracing::error!(%error, "could not store the outcome of a keyed call");
                        claim.armed = false;
                    }
                }
            }
            Ok(Response::from_parts(head, body))
        })
    }
}

/// A response for a refused keyed call.
fn refused(status: Status) -> Response<Body> {
    grpc::error_response(status, "idempotency")
}

/// The stored outcome as a response again.
fn replay_stored(stored: StoredResponse) -> Response<Body> {
    let code = Code::from_i32(stored.code);
    let mut response = if code == Code::Ok {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let body = Full::new(stored.body)
            .with_trailers(async move { Some(Ok(trailers)) })
            .map_err(|never: std::convert::Infallible| match never {});
        let mut response = Response::new(Body::new(body));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        response
    } else {
        Status::with_details(code, stored.message, stored.details).into_http()
    };
    response
        .headers_mut()
        .insert(MESH_MARKER, HeaderValue::from_static("replayed"));
    response
}

/// A claimed key, released if the call is abandoned before its outcome is stored.
struct Claim {
    store: Arc<dyn IdempotencyStore>,
    id: KeyId,
    armed: bool,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let release = self.store.release(&self.id);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = release.await {
                    tracing::warn!(%error, "could not release an idempotency key");
                }
            });
        }
    }
}
