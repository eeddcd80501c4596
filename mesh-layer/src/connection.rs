//! One HTTP/2 connection to one endpoint, straight on hyper: the service at the bottom of
//! every client stack, and the one place connections are made (so TLS and mTLS plug in here).
//!
//! Why not tonic's `Channel`: a `Channel` is a tower `Buffer`, so each call goes from the
//! caller's task to the buffer's worker task and only then to hyper's connection task, one
//! more cross-thread wake-up per call. On two cores that hop cost more than all the mesh
//! layers together (docs/benchmarks.md). hyper's `SendRequest` is already a cheap clonable
//! handle onto the connection task, so a caller can hand its request over directly, as
//! linkerd2-proxy does. What the `Channel` gave besides is here: lazy connection with a
//! timeout, reconnection after the connection closes, `TCP_NODELAY`, HTTP/2 keep-alive, and
//! the request's scheme and authority. Deadlines are the deadline layer's job.

use std::{
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{
    HeaderValue, Request, Response, Uri,
    header::USER_AGENT,
    uri::{Authority, Scheme},
};
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioIo, TokioTimer};
use tonic::body::Body;
use tower::Service;

use crate::BoxFuture;

/// How long establishing a connection (TCP and the HTTP/2 handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 PING interval: notices a peer that vanished without closing the connection (a
/// rescheduled pod, a dropped NAT entry) before calls pile up on it.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a PING may go unanswered before the connection is closed.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A lazily connected HTTP/2 connection to one endpoint; clones share it. The first call
/// connects; after the connection closes, the next call reconnects. A failed connection is an
/// error of that call only (the balancer reports it as UNAVAILABLE and the breaker counts it).
#[derive(Clone)]
pub struct Connection {
    shared: Arc<Shared>,
}

struct Shared {
    scheme: Scheme,
    authority: Authority,
    /// The live connection's sender, if any. A std mutex: held only to clone or replace it.
    sender: Mutex<Option<SendRequest<Body>>>,
    /// Serialises connecting, so that the callers waiting for a connection make one.
    connecting: tokio::sync::Mutex<()>,
    /// Connection attempts made so far, and the error of the last one that failed: a caller
    /// that waited while another attempt failed gets that failure instead of trying again, so a
    /// dead endpoint costs one connect timeout, not one per waiting caller.
    attempts: AtomicU64,
    last_failure: Mutex<Option<Arc<ConnectionError>>>,
}

/// Why a call could not use the connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The endpoint URI cannot be connected to.
    #[error("invalid endpoint {uri:?}: {reason}")]
    InvalidUri {
        /// The URI given.
        uri: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// TCP connect failed (refused, unreachable).
    #[error("connect to {authority}: {source}")]
    Connect {
        /// The endpoint.
        authority: Authority,
        /// The socket error.
        source: std::io::Error,
    },
    /// TCP connect and handshake took longer than the connect timeout.
    #[error("connect to {authority}: timed out after {CONNECT_TIMEOUT:?}")]
    ConnectTimeout {
        /// The endpoint.
        authority: Authority,
    },
    /// The HTTP/2 handshake or the call failed on the connection.
    #[error(transparent)]
    Http(#[from] hyper::Error),
    /// Another caller's connection attempt, made while this call waited for it, failed.
    #[error(transparent)]
    Shared(Arc<ConnectionError>),
}

impl Connection {
    /// A connection to `uri` (`http://host:port`), made at the first call.
    pub fn lazy(uri: &str) -> Result<Self, ConnectionError> {
        let invalid = |reason| ConnectionError::InvalidUri {
            uri: uri.to_owned(),
            reason,
        };
        let parsed: Uri = uri.parse().map_err(|_| invalid("not a URI"))?;
        let parts = parsed.into_parts();
        let scheme = parts.scheme.ok_or_else(|| invalid("no scheme"))?;
        if scheme != Scheme::HTTP {
            // TLS plugs in here, in `establish`; until then an https URI must fail loudly
            // rather than send plaintext to a TLS port.
            return Err(invalid("only http:// is supported (no TLS yet)"));
        }
        let authority = parts.authority.ok_or_else(|| invalid("no host:port"))?;
        if authority.port_u16().is_none() {
            return Err(invalid("no port"));
        }
        Ok(Self {
            shared: Arc::new(Shared {
                scheme,
                authority,
                sender: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                attempts: AtomicU64::new(0),
                last_failure: Mutex::new(None),
            }),
        })
    }
}

impl Shared {
    /// The live connection's sender, without waiting.
    fn live_sender(&self) -> Option<SendRequest<Body>> {
        let sender = self.sender.lock().ok()?;
        sender.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    /// The live connection's sender, connecting first if there is none.
    async fn sender(&self) -> Result<SendRequest<Body>, ConnectionError> {
        if let Some(sender) = self.live_sender() {
            return Ok(sender);
        }
        let attempts_seen = self.attempts.load(Ordering::Acquire);
        let _connecting = self.connecting.lock().await;
        if let Some(sender) = self.live_sender() {
            return Ok(sender);
        }
        if self.attempts.load(Ordering::Acquire) != attempts_seen
            && let Some(failure) = self.last_failure.lock().ok().and_then(|f| f.clone())
        {
            return Err(ConnectionError::Shared(failure));
        }
        let result = tokio::time::timeout(CONNECT_TIMEOUT, self.establish())
            .await
            .unwrap_or_else(|_| {
                Err(ConnectionError::ConnectTimeout {
                    authority: self.authority.clone(),
                })
            });
        let failure = match result {
            Ok(sender) => {
                if let Ok(mut slot) = self.sender.lock() {
                    *slot = Some(sender.clone());
                }
                self.attempts.fetch_add(1, Ordering::Release);
                return Ok(sender);
            }
            Err(error) => Arc::new(error),
        };
        if let Ok(mut slot) = self.last_failure.lock() {
            *slot = Some(failure.clone());
        }
        self.attempts.fetch_add(1, Ordering::Release);
        Err(ConnectionError::Shared(failure))
    }

    /// Opens the TCP connection, shakes hands and spawns the connection's task.
    async fn establish(&self) -> Result<SendRequest<Body>, ConnectionError> {
        let host = self.authority.host();
        // `[::1]` in a URI is `::1` to the resolver.
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let port = self.authority.port_u16().unwrap_or(80);
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|source| ConnectionError::Connect {
                authority: self.authority.clone(),
                source,
            })?;
        // gRPC messages are small and latency-bound: never wait to coalesce them.
        tcp.set_nodelay(true)
            .map_err(|source| ConnectionError::Connect {
                authority: self.authority.clone(),
                source,
            })?;
        let (sender, connection) = http2::Builder::new(BoxingExecutor)
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            .handshake(TokioIo::new(tcp))
            .await?;
        let authority = self.authority.clone();
        tokio::spawn(async move {
            // It ends when the peer closes, keep-alive fails, or every sender is dropped; the
            // next call then sees a closed sender and reconnects.
            if let Err(error) = connection.await {
                tracing::debug!(%authority, %error, "connection closed");
            }
        });
        Ok(sender)
    }
}

impl Service<Request<Body>> for Connection {
    type Response = Response<Body>;
    type Error = ConnectionError;
    type Future = BoxFuture<Result<Response<Body>, ConnectionError>>;

    /// Always ready: HTTP/2 multiplexes, and connecting happens inside the call so that its
    /// failure is that call's error.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ConnectionError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move {
            let mut sender = shared.sender().await?;
            let request = shared.with_origin(request);
            let response = sender.send_request(request).await?;
            Ok(response.map(Body::new))
        })
    }
}

impl Shared {
    /// The request with this endpoint's scheme and authority (HTTP/2's `:scheme` and
    /// `:authority`), and a user agent if it has none.
    fn with_origin(&self, request: Request<Body>) -> Request<Body> {
        let (mut head, body) = request.into_parts();
        let mut uri = http::uri::Parts::from(std::mem::take(&mut head.uri));
        uri.scheme = Some(self.scheme.clone());
        uri.authority = Some(self.authority.clone());
        if uri.path_and_query.is_none() {
            uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        // Cannot fail: scheme, authority and path are all set and were valid on their own.
        head.uri = Uri::from_parts(uri).unwrap_or_default();
        head.headers
            .entry(USER_AGENT)
            .or_insert_with(|| HeaderValue::from_static(USER_AGENT_VALUE));
        Request::from_parts(head, body)
    }
}

/// Spawns the tasks hyper makes per call (one awaits the response, one streams the request
/// body) boxed. Spawning a future moves it three times inside tokio; hyper's per-call future is
/// several hundred bytes, so moving a box instead saves about 2 k instructions a call, as
/// tonic's executor does.
#[derive(Clone, Copy)]
struct BoxingExecutor;

impl<F> hyper::rt::Executor<F> for BoxingExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, future: F) {
        tokio::spawn(Box::pin(future) as BoxFuture<()>);
    }
}

const USER_AGENT_VALUE: &str = concat!("waybill-mesh/", env!("CARGO_PKG_VERSION"));

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("authority", &self.shared.authority)
            .finish_non_exhaustive()
    }
}
