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
use tokio::sync::watch;
use tonic::body::Body;
use tower::Service;

use crate::BoxFuture;

/// How long establishing a connection may take: resolving the host and TCP connect, shared
/// across the host's addresses. (h2's handshake only writes the preface; a peer that is not an
/// HTTP/2 server shows up as the first call's error.)
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 PING interval while calls are in flight: notices a peer that vanished without
/// closing the connection (a rescheduled pod, a dropped NAT entry) instead of leaving the calls
/// to their deadlines. An idle connection is not pinged; its next call finds out.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a PING may go unanswered before the connection is closed.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A lazily connected HTTP/2 connection to one endpoint; clones share it. The first call
/// connects; after the connection closes, the next call reconnects. A failed connection is an
/// error of the calls that waited for it (the balancer reports it as UNAVAILABLE and the
/// breaker counts it).
#[derive(Clone)]
pub struct Connection {
    shared: Arc<Shared>,
}

struct Shared {
    scheme: Scheme,
    authority: Authority,
    /// A std mutex: held only to read or replace the slot, never across an await.
    slot: Mutex<Slot>,
    /// Connection attempts started, for tests and debugging.
    attempts: AtomicU64,
}

/// The result of one connection attempt, as its waiters see it.
type Attempt = Option<Result<(u64, SendRequest<Body>), Arc<ConnectionError>>>;

enum Slot {
    /// No connection, none being made.
    Idle,
    /// A connection, numbered so that a caller can retire the one it used and not a newer one.
    Live(u64, SendRequest<Body>),
    /// An attempt under way in its own task: callers that give up waiting (a deadline, a
    /// dropped call) do not cancel it, and everyone waiting gets its one result.
    Connecting(watch::Receiver<Attempt>),
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
    /// Resolving the host or TCP connect failed (refused, unreachable, no such host).
    #[error("connect to {authority}: {source}")]
    Connect {
        /// The endpoint.
        authority: Authority,
        /// The socket error.
        source: std::io::Error,
    },
    /// Resolving and connecting took longer than the connect timeout.
    #[error("connect to {authority}: timed out after {CONNECT_TIMEOUT:?}")]
    ConnectTimeout {
        /// The endpoint.
        authority: Authority,
    },
    /// The HTTP/2 handshake or the call failed on the connection.
    #[error(transparent)]
    Http(#[from] hyper::Error),
    /// The connection attempt this call waited for failed (the same error for every waiter).
    #[error(transparent)]
    Attempt(Arc<ConnectionError>),
    /// The task making the connection ended without a result (the runtime is shutting down).
    #[error("connect to {authority}: the attempt was abandoned")]
    Abandoned {
        /// The endpoint.
        authority: Authority,
    },
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
        if authority.as_str().contains('@') {
            // HTTP/2 forbids userinfo in `:authority`, and we have no use for it.
            return Err(invalid("user info (user@) is not allowed"));
        }
        Ok(Self {
            shared: Arc::new(Shared {
                scheme,
                authority,
                slot: Mutex::new(Slot::Idle),
                attempts: AtomicU64::new(0),
            }),
        })
    }

    /// How many connection attempts were started so far.
    #[doc(hidden)]
    pub fn attempts(&self) -> u64 {
        self.shared.attempts.load(Ordering::Relaxed)
    }
}

impl Shared {
    /// The live connection's sender and number, connecting first if there is none.
    async fn sender(self: &Arc<Self>) -> Result<(u64, SendRequest<Body>), ConnectionError> {
        let mut waiting = {
            let Ok(mut slot) = self.slot.lock() else {
                return Err(self.abandoned());
            };
            match &*slot {
                Slot::Live(number, sender) if !sender.is_closed() => {
                    return Ok((*number, sender.clone()));
                }
                // (An attempt whose task is gone, at runtime shutdown, is replaced.)
                Slot::Connecting(attempt) if attempt.has_changed().is_ok() => attempt.clone(),
                Slot::Live(..) | Slot::Idle | Slot::Connecting(_) => {
                    let (done, attempt) = watch::channel(None);
                    *slot = Slot::Connecting(attempt.clone());
                    let number = self.attempts.fetch_add(1, Ordering::Relaxed) + 1;
                    tokio::spawn(self.clone().attempt(number, done));
                    attempt
                }
            }
        };
        let result = waiting
            .wait_for(Option::is_some)
            .await
            .map_err(|_| self.abandoned())?
            .clone();
        match result {
            Some(Ok(live)) => Ok(live),
            Some(Err(error)) => Err(ConnectionError::Attempt(error)),
            None => Err(self.abandoned()),
        }
    }

    /// Makes connection `number`, puts the result in the slot and tells the waiters.
    async fn attempt(self: Arc<Self>, number: u64, done: watch::Sender<Attempt>) {
        let result = tokio::time::timeout(CONNECT_TIMEOUT, self.establish())
            .await
            .unwrap_or_else(|_| {
                Err(ConnectionError::ConnectTimeout {
                    authority: self.authority.clone(),
                })
            })
            .map(|sender| (number, sender))
            .map_err(Arc::new);
        if let Ok(mut slot) = self.slot.lock() {
            *slot = match &result {
                Ok((_, sender)) => Slot::Live(number, sender.clone()),
                // The next call tries again: the breaker above decides how often that is.
                Err(_) => Slot::Idle,
            };
        }
        done.send_replace(Some(result));
    }

    /// Retires connection `number` if it is still the live one: it refused a call it had not
    /// sent, so the next call must not get it again.
    fn retire(&self, number: u64) {
        if let Ok(mut slot) = self.slot.lock()
            && matches!(&*slot, Slot::Live(live, _) if *live == number)
        {
            *slot = Slot::Idle;
        }
    }

    fn abandoned(&self) -> ConnectionError {
        ConnectionError::Abandoned {
            authority: self.authority.clone(),
        }
    }

    /// Resolves the host, connects to its addresses in turn, shakes hands and spawns the
    /// connection's task.
    async fn establish(&self) -> Result<SendRequest<Body>, ConnectionError> {
        let connect_error = |source| ConnectionError::Connect {
            authority: self.authority.clone(),
            source,
        };
        let host = self.authority.host();
        // `[::1]` in a URI is `::1` to the resolver.
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let port = self.authority.port_u16().unwrap_or(80);
        let addresses: Vec<_> = tokio::net::lookup_host((host, port))
            .await
            .map_err(connect_error)?
            .collect();
        // A name with several addresses must not spend the whole timeout on a dead first one.
        let share = CONNECT_TIMEOUT / u32::try_from(addresses.len().max(1)).unwrap_or(u32::MAX);
        let mut last_error = std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses");
        let mut tcp = None;
        for address in addresses {
            match tokio::time::timeout(share, tokio::net::TcpStream::connect(address)).await {
                Ok(Ok(stream)) => {
                    tcp = Some(stream);
                    break;
                }
                Ok(Err(error)) => last_error = error,
                Err(_) => {
                    last_error = std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("{address} did not answer within {share:?}"),
                    );
                }
            }
        }
        let tcp = tcp.ok_or_else(|| connect_error(last_error))?;
        // gRPC messages are small and latency-bound: never wait to coalesce them.
        tcp.set_nodelay(true).map_err(connect_error)?;
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
            let request = shared.with_origin(request)?;
            let (number, mut sender) = shared.sender().await?;
            match sender.try_send_request(request).await {
                Ok(response) => Ok(response.map(Body::new)),
                Err(mut error) => match error.take_message() {
                    // The connection closed before it took the request: nothing was sent, so
                    // sending it on a new connection is safe for any method. Once only.
                    Some(request) => {
                        shared.retire(number);
                        let (_, mut sender) = shared.sender().await?;
                        let response = sender.send_request(request).await?;
                        Ok(response.map(Body::new))
                    }
                    None => Err(error.into_error().into()),
                },
            }
        })
    }
}

impl Shared {
    /// The request with this endpoint's scheme and authority (HTTP/2's `:scheme` and
    /// `:authority`), and a user agent if it has none.
    fn with_origin(&self, request: Request<Body>) -> Result<Request<Body>, ConnectionError> {
        let (mut head, body) = request.into_parts();
        let mut uri = http::uri::Parts::from(std::mem::take(&mut head.uri));
        uri.scheme = Some(self.scheme.clone());
        uri.authority = Some(self.authority.clone());
        if uri.path_and_query.is_none() {
            uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        head.uri = Uri::from_parts(uri).map_err(|_| ConnectionError::InvalidUri {
            uri: self.authority.to_string(),
            reason: "the request's path does not combine with the endpoint",
        })?;
        head.headers
            .entry(USER_AGENT)
            .or_insert_with(|| HeaderValue::from_static(USER_AGENT_VALUE));
        Ok(Request::from_parts(head, body))
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
