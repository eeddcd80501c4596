//! Requests, responses and tiny services for the layer tests.

#![allow(dead_code, clippy::unwrap_used)]

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use http::{HeaderValue, Request, Response};
use mesh_layer::grpc;
use tonic::{Code, body::Body};
use tower::{Service, service_fn};

/// A gRPC request for `path`, with an optional `grpc-timeout`.
pub fn request(path: &str, timeout: Option<&'static str>) -> Request<Body> {
    let mut request = Request::builder()
        .uri(format!("http://test{path}"))
        .body(Body::empty())
        .unwrap();
    if let Some(timeout) = timeout {
        request
            .headers_mut()
            .insert(grpc::GRPC_TIMEOUT, HeaderValue::from_static(timeout));
    }
    request
}

/// Waits for `service` to be ready and sends `request`.
pub async fn send<S>(service: &mut S, request: Request<Body>) -> Response<Body>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    use tower::ServiceExt;
    service.ready().await.unwrap().call(request).await.unwrap()
}

/// A trailers-only OK response.
pub fn ok() -> Response<Body> {
    Response::builder()
        .header("grpc-status", "0")
        .body(Body::empty())
        .unwrap()
}

/// A trailers-only response with `code`.
pub fn status(code: Code) -> Response<Body> {
    tonic::Status::new(code, "test").into_http()
}

/// The response's gRPC code.
#[track_caller]
pub fn code(response: &Response<Body>) -> Code {
    grpc::status_code(response.headers()).expect("a grpc-status header")
}

/// Which mesh layer made the response, if one did.
pub fn marker(response: &Response<Body>) -> Option<&str> {
    response
        .headers()
        .get(grpc::MESH_MARKER)
        .and_then(|v| v.to_str().ok())
}

/// A handler that answers OK, reporting the `grpc-timeout` it was sent, and counts calls.
pub fn echo_timeout(
    calls: Arc<AtomicUsize>,
) -> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future = impl Send> + Clone
{
    service_fn(move |request: Request<Body>| {
        calls.fetch_add(1, Ordering::SeqCst);
        let timeout = request.headers().get(grpc::GRPC_TIMEOUT).cloned();
        async move {
            let mut response = ok();
            if let Some(timeout) = timeout {
                response.headers_mut().insert("sent-timeout", timeout);
            }
            Ok::<_, Infallible>(response)
        }
    })
}

/// The `grpc-timeout` an [`echo_timeout`] handler was sent.
pub fn sent_timeout(response: &Response<Body>) -> Option<Duration> {
    response
        .headers()
        .get("sent-timeout")
        .and_then(grpc::parse_timeout)
}

/// Methods of a test service `s.S`: `Get` (NO_SIDE_EFFECTS), `Put` (IDEMPOTENT), `Buy` (not
/// idempotent), `Watch` (idempotent, server streaming).
pub fn methods() -> mesh_layer::method::MethodTable {
    use prost::Message;
    use prost_types::{
        FileDescriptorProto, FileDescriptorSet, MethodDescriptorProto, MethodOptions,
        ServiceDescriptorProto, method_options::IdempotencyLevel,
    };
    let method =
        |name: &str, level: Option<IdempotencyLevel>, stream: bool| MethodDescriptorProto {
            name: Some(name.into()),
            options: level.map(|level| MethodOptions {
                idempotency_level: Some(level as i32),
                ..Default::default()
            }),
            server_streaming: Some(stream),
            ..Default::default()
        };
    let set = FileDescriptorSet {
        file: vec![FileDescriptorProto {
            package: Some("s".into()),
            service: vec![ServiceDescriptorProto {
                name: Some("S".into()),
                method: vec![
                    method("Get", Some(IdempotencyLevel::NoSideEffects), false),
                    method("Put", Some(IdempotencyLevel::Idempotent), false),
                    method("Buy", None, false),
                    method("Watch", Some(IdempotencyLevel::NoSideEffects), true),
                ],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    mesh_layer::method::MethodTable::from_descriptor_sets(&[&set.encode_to_vec()]).unwrap()
}
