//! The client connection against real HTTP/2 servers on loopback: lazy connection, the
//! request's origin, reconnection after a restart, and a hung connect shared by its waiters.

#![allow(clippy::unwrap_used)]

mod support;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderValue, Request, Response};
use mesh_layer::connection::{Connection, ConnectionError};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{body::Body, server::NamedService, transport::Server};
use tower::{Service, ServiceExt};

/// Answers every call OK, echoing what it saw of the request's origin in response headers.
#[derive(Clone)]
struct Origin;

impl NamedService for Origin {
    const NAME: &'static str = "test.Origin";
}

impl Service<Request<Body>> for Origin {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let mut response = support::ok();
        let seen = |value: Option<&str>| HeaderValue::from_str(value.unwrap_or("")).unwrap();
        let headers = response.headers_mut();
        headers.insert("seen-scheme", seen(request.uri().scheme_str()));
        headers.insert(
            "seen-authority",
            seen(request.uri().authority().map(|a| a.as_str())),
        );
        headers.insert(
            "seen-user-agent",
            seen(
                request
                    .headers()
                    .get("user-agent")
                    .and_then(|v| v.to_str().ok()),
            ),
        );
        std::future::ready(Ok(response))
    }
}

/// A tonic server on `listener` that counts the connections it accepts; stops when `stop` fires.
fn serve(
    listener: TcpListener,
    accepted: Arc<AtomicUsize>,
) -> (oneshot::Sender<()>, JoinHandle<()>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let incoming = tokio_stream::StreamExt::map(TcpListenerStream::new(listener), move |io| {
        accepted.fetch_add(1, Ordering::SeqCst);
        io
    });
    let server = tokio::spawn(async move {
        Server::builder()
            .add_service(Origin)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    (stop, server)
}

async fn call(connection: &Connection) -> Result<Response<Body>, ConnectionError> {
    let request = Request::builder()
        .uri("/test.Origin/Call")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Body::empty())
        .unwrap();
    connection.clone().oneshot(request).await
}

fn header<'a>(response: &'a Response<Body>, name: &str) -> &'a str {
    response.headers().get(name).unwrap().to_str().unwrap()
}

#[tokio::test]
async fn connects_at_the_first_call_sets_the_origin_and_reconnects_after_a_restart() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address: SocketAddr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let connection = Connection::lazy(&format!("http://{address}")).unwrap();

    let (stop, server) = serve(listener, accepted.clone());
    // Lazy: no connection is even attempted until the first call.
    assert_eq!(connection.attempts(), 0);
    assert_eq!(accepted.load(Ordering::SeqCst), 0);

    let response = call(&connection).await.unwrap();
    assert_eq!(header(&response, "seen-scheme"), "http");
    assert_eq!(header(&response, "seen-authority"), address.to_string());
    assert!(header(&response, "seen-user-agent").starts_with("waybill-mesh/"));
    for _ in 0..10 {
        call(&connection).await.unwrap();
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "calls share one connection"
    );
    assert_eq!(connection.attempts(), 1);

    // The server goes away: calls fail (the balancer makes that UNAVAILABLE) instead of hanging.
    stop.send(()).unwrap();
    server.await.unwrap();
    let error = tokio::time::timeout(Duration::from_secs(5), call(&connection))
        .await
        .expect("a call to a stopped server fails at once")
        .unwrap_err();
    assert!(error.to_string().contains(&address.to_string()), "{error}");

    // Back on the same port: the next call reconnects.
    let listener = TcpListener::bind(address).await.unwrap();
    let (stop, server) = serve(listener, accepted.clone());
    call(&connection).await.unwrap();
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    stop.send(()).unwrap();
    server.await.unwrap();
}

/// A listener that never accepts, with its accept queue full: the kernel drops further SYNs,
/// so a connect to it hangs, as one to a host that vanished does. Keep the streams alive.
fn hung_endpoint() -> (
    std::net::SocketAddr,
    tokio::net::TcpListener,
    Vec<std::net::TcpStream>,
) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let address = socket.local_addr().unwrap();
    let listener = socket.listen(1).unwrap();
    // Blocking connects on the real clock (the tests' clock is paused) until one times out.
    let mut queued = Vec::new();
    while queued.len() < 8 {
        match std::net::TcpStream::connect_timeout(&address, Duration::from_millis(200)) {
            Ok(stream) => queued.push(stream),
            Err(_) => break, // the queue is full
        }
    }
    assert!(queued.len() < 8, "the accept queue never filled");
    (address, listener, queued)
}

/// Callers that wait while a connection attempt hangs get that attempt's failure: a dead
/// endpoint costs them one connect timeout and one attempt, not one each in turn.
#[tokio::test(start_paused = true)]
async fn callers_waiting_on_a_hung_connect_share_one_attempt() {
    let (address, _listener, _queued) = hung_endpoint();
    let connection = Connection::lazy(&format!("http://{address}")).unwrap();
    let started = tokio::time::Instant::now();
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let connection = connection.clone();
            tokio::spawn(async move { call(&connection).await })
        })
        .collect();
    for call in calls {
        let error = call.await.unwrap().unwrap_err();
        let error = error.to_string();
        assert!(
            error.contains("did not answer") || error.contains("timed out"),
            "{error}"
        );
    }
    assert_eq!(connection.attempts(), 1);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(6),
        "ten callers waited {waited:?}: one connect timeout (5 s) between them"
    );

    // The failure is not kept: the next call makes a new attempt.
    call(&connection).await.unwrap_err();
    assert_eq!(connection.attempts(), 2);
}

/// A caller that gives up (its deadline) does not cancel the attempt it started: the next
/// caller waits for the same attempt instead of starting over, so short deadlines cannot
/// keep a slow endpoint from ever being connected.
#[tokio::test(start_paused = true)]
async fn a_caller_that_gives_up_leaves_the_attempt_running() {
    let (address, _listener, _queued) = hung_endpoint();
    let connection = Connection::lazy(&format!("http://{address}")).unwrap();
    let started = tokio::time::Instant::now();
    let gave_up = tokio::time::timeout(Duration::from_secs(1), call(&connection)).await;
    assert!(gave_up.is_err(), "the first caller's deadline passed");

    call(&connection).await.unwrap_err();
    assert_eq!(
        connection.attempts(),
        1,
        "the second caller joined the first attempt"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(6),
        "the attempt ran its 5 s once: {waited:?}"
    );
}

#[test]
fn an_endpoint_it_cannot_use_is_refused_up_front() {
    for (uri, why) in [
        ("https://127.0.0.1:1", "only http://"),
        ("http://127.0.0.1", "no port"),
        ("127.0.0.1:80", "no scheme"),
        ("http://exa mple:80", "not a URI"),
        ("http://user@127.0.0.1:80", "user info"),
    ] {
        let error = Connection::lazy(uri).unwrap_err().to_string();
        assert!(error.contains(why), "{uri}: {error}");
    }
}
