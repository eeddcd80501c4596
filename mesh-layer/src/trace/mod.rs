//! A span per call, on both ends, following OpenTelemetry's conventions for RPC, and the
//! W3C trace context carried across in gRPC metadata.
//!
//! The failure mode: a slow or failed PlaceOrder crosses four services and a bus; without one
//! trace joining the pieces, nobody can say which hop was slow, which retry happened where,
//! or whether a breaker or a shed answered instead of the service. So every call through a
//! mesh stack is a span named `package.Service/Method` with `rpc.system=grpc`,
//! `rpc.service`, `rpc.method`, `rpc.grpc.status_code`, `server.address`/`server.port` (the
//! client's target, or the server's own socket) and, when a mesh layer answered itself,
//! `waybill.mesh.decision` (the `waybill-mesh` marker: `load-shed`, `breaker-open`,
//! `replayed`, `fault`, `deadline`, …). The client injects `traceparent`, `tracestate` and
//! `baggage` from its span; the server makes its span a child of what it extracts.
//!
//! The spans are ordinary `tracing` spans (DEBUG, target `mesh_layer::trace`): the process's
//! subscriber decides whether they exist. waybill's runtime exports them through OpenTelemetry
//! when an OTLP endpoint is configured; otherwise no layer enables them and a call pays for
//! one disabled span (a cached interest check) and no header work. The events the layers
//! below log while deciding (retrying, shed, injected fault, replayed response, deadline
//! passed) happen inside the span, so an exporting subscriber records them as span events.
//!
//! The client layer is outermost (outside retry): one span per logical call, its attempts
//! and their waits as events. The server layer is outermost too, so shed, failed-fast and
//! replayed calls have spans.
//!
//! ```
//! use mesh_layer::trace::ServerTraceLayer;
//! use tower::Layer;
//!
//! let _service = ServerTraceLayer.layer(tower::service_fn(|_: http::Request<()>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
//! }));
//! ```

mod future;
pub mod propagation;

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use http::Request;
use tonic::transport::server::TcpConnectInfo;
use tower::{Layer, Service};
use tracing::{Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use self::future::{CallSpan, Side};
pub use self::future::{ResponseFuture, TraceBody};
use crate::method::split_path;

/// The service and method of a path, `unknown` for anything that is not a gRPC path.
fn names(path: &str) -> (&str, &str) {
    split_path(path).unwrap_or(("unknown", "unknown"))
}

// === impl ServerTraceLayer ===

/// A server span per call, child of the caller's span when the call carries a trace
/// context. See the module docs.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerTraceLayer;

impl<S> Layer<S> for ServerTraceLayer {
    type Service = ServerTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ServerTrace { inner }
    }
}

/// See [`ServerTraceLayer`].
#[derive(Clone, Debug)]
pub struct ServerTrace<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ServerTrace<S>
where
    S: Service<Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<TraceBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let span = server_span(&request);
        let started = Some((request.uri().clone(), Instant::now()));
        let future = span.in_scope(|| self.inner.call(request));
        ResponseFuture::new(future, CallSpan::new(span, Side::Server, started))
    }
}

/// Health checks make no spans: probes every few seconds from every kubelet and balancer
/// would be most of the traces, and say nothing a failing probe does not.
const HEALTH: &str = "/grpc.health.v1.Health/";

fn server_span<B>(request: &Request<B>) -> Span {
    let path = request.uri().path();
    if path.starts_with(HEALTH) {
        return Span::none();
    }
    let (service, method) = names(path);
    // Every attribute known now is given at creation: each later `record` is a call through
    // the subscriber, which costs more than the field.
    let connection = request.extensions().get::<TcpConnectInfo>();
    let local = connection.and_then(TcpConnectInfo::local_addr);
    let remote = connection.and_then(TcpConnectInfo::remote_addr);
    let span = tracing::debug_span!(
        "rpc",
        otel.name = path.trim_start_matches('/'),
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = Empty,
        server.address = local.map(|a| tracing::field::display(a.ip())),
        server.port = local.map(|a| i64::from(a.port())),
        client.address = remote.map(|a| tracing::field::display(a.ip())),
        client.port = remote.map(|a| i64::from(a.port())),
        waybill.mesh.decision = Empty,
    );
    if span.is_disabled() {
        return span;
    }
    // The caller's span (and baggage) becomes the parent; with no trace context in the
    // metadata the call starts a trace.
    let _ = span.set_parent(propagation::extract(request.headers()));
    span
}

// === impl ClientTraceLayer ===

/// A client span per call, its context injected into the request's metadata. See the module
/// docs. Clones share the target's address.
#[derive(Clone, Debug, Default)]
pub struct ClientTraceLayer {
    peer: Option<Arc<Peer>>,
}

/// The target's address as the spans name it (`server.address`, `server.port`).
#[derive(Debug)]
struct Peer {
    host: String,
    port: Option<u16>,
}

impl ClientTraceLayer {
    /// Spans that name no server address (the connection's target is not known here).
    pub fn new() -> Self {
        Self::default()
    }

    /// Spans naming the first endpoint of `target` (`http://host:port[,…]`, `dns://host:port`)
    /// as the server.
    pub fn for_target(target: &str) -> Self {
        Self {
            peer: parse_peer(target).map(Arc::new),
        }
    }
}

/// The host and port of the first URI in a target list.
fn parse_peer(target: &str) -> Option<Peer> {
    let first = target.split(',').next()?.trim();
    let authority = first
        .split_once("://")
        .map_or(first, |(_, rest)| rest)
        .split('/')
        .next()?;
    let authority: http::uri::Authority = authority.parse().ok()?;
    Some(Peer {
        host: authority.host().trim_matches(['[', ']']).to_owned(),
        port: authority.port_u16(),
    })
}

impl<S> Layer<S> for ClientTraceLayer {
    type Service = ClientTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ClientTrace {
            inner,
            peer: self.peer.clone(),
        }
    }
}

/// See [`ClientTraceLayer`].
#[derive(Clone, Debug)]
pub struct ClientTrace<S> {
    inner: S,
    peer: Option<Arc<Peer>>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ClientTrace<S>
where
    S: Service<Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<TraceBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let span = self.client_span(&request);
        if !span.is_disabled() {
            propagation::inject(&span.context(), request.headers_mut());
        }
        let future = span.in_scope(|| self.inner.call(request));
        ResponseFuture::new(future, CallSpan::new(span, Side::Client, None))
    }
}

impl<S> ClientTrace<S> {
    fn client_span<B>(&self, request: &Request<B>) -> Span {
        let path = request.uri().path();
        let (service, method) = names(path);
        let peer = self.peer.as_deref();
        tracing::debug_span!(
            "rpc",
            otel.name = path.trim_start_matches('/'),
            otel.kind = "client",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            rpc.grpc.status_code = Empty,
            server.address = peer.map(|peer| peer.host.as_str()),
            server.port = peer.and_then(|peer| peer.port).map(i64::from),
            waybill.mesh.decision = Empty,
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn peers_are_read_from_targets() {
        let peer = parse_peer("http://10.0.0.1:50051,http://10.0.0.2:50051").unwrap();
        assert_eq!((peer.host.as_str(), peer.port), ("10.0.0.1", Some(50051)));
        let peer = parse_peer("dns://inventory.waybill.svc:50051").unwrap();
        assert_eq!(
            (peer.host.as_str(), peer.port),
            ("inventory.waybill.svc", Some(50051))
        );
        let peer = parse_peer("http://[::1]:7/").unwrap();
        assert_eq!((peer.host.as_str(), peer.port), ("::1", Some(7)));
        assert!(parse_peer("").is_none());
    }

    #[test]
    fn paths_name_service_and_method() {
        assert_eq!(
            names("/waybill.orders.v1.OrdersService/PlaceOrder"),
            ("waybill.orders.v1.OrdersService", "PlaceOrder")
        );
        assert_eq!(names("/junk"), ("unknown", "unknown"));
    }
}
