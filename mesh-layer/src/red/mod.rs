//! Rate, errors and duration of every call a server answers (RED), per service and method.
//!
//! The failure mode: without per-method request counts by status code and a latency
//! histogram, an error spike or a slow dependency shows only as unhappy callers. So the
//! outermost mesh layer counts every call by its final gRPC status — calls the layers below
//! answer themselves (shed, deadline, fault, replay) included — and times it from arrival to
//! status: `mesh_server_requests_total{service,method,code}` and
//! `mesh_server_request_duration_seconds{service,method}` (see [`crate::metrics`]).
//!
//! The status comes from the response headers (trailers-only responses: errors, mesh
//! decisions) or from the trailers at the end of the body; a body dropped before its
//! trailers is a call the client cancelled (`CANCELLED`), and a body that ends without them
//! is `UNKNOWN`. Response streams are counted but not timed: their length is the
//! subscriber's choice, not latency.
//!
//! Cost per call: a hash lookup of the path, one clock read at arrival and one at the status,
//! atomic adds on handles resolved once per method and code; no allocation (the response
//! future and body wrappers are not boxed).
//!
//! ```
//! use mesh_layer::{method::MethodTable, red::RedLayer};
//! use tower::Layer;
//!
//! let layer = RedLayer::new(&MethodTable::default());
//! let _service = layer.layer(tower::service_fn(|_: http::Request<()>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
//! }));
//! ```

mod body;
mod future;

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use http::Request;
use tower::{Layer, Service};

pub use self::{body::RecordBody, future::ResponseFuture};
use crate::{method::MethodTable, metrics::MethodMetrics};

/// Records RED metrics for every call through it (see the module docs). Clones share one
/// set of handles.
#[derive(Clone, Debug)]
pub struct RedLayer {
    metrics: Arc<MethodMetrics>,
}

impl RedLayer {
    /// Records the methods `methods` describes by name; other paths are recorded together
    /// as `service="unknown"`.
    pub fn new(methods: &MethodTable) -> Self {
        Self {
            metrics: Arc::new(MethodMetrics::new(methods)),
        }
    }
}

impl<S> Layer<S> for RedLayer {
    type Service = Red<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Red {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// See [`RedLayer`].
#[derive(Clone, Debug)]
pub struct Red<S> {
    inner: S,
    metrics: Arc<MethodMetrics>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Red<S>
where
    S: Service<Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<RecordBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let handles = self.metrics.get(request.uri().path()).clone();
        ResponseFuture::new(self.inner.call(request), handles)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use http_body_util::BodyExt;
    use tonic::{Code, Status, body::Body};
    use tower::ServiceExt;

    use super::*;

    fn table() -> MethodTable {
        MethodTable::default()
    }

    #[tokio::test]
    async fn trailers_only_and_trailer_statuses_pass_through_unchanged() {
        let service =
            RedLayer::new(&table()).layer(tower::service_fn(|request: Request<Body>| async move {
                if request.uri().path() == "/a.B/Fail" {
                    return Ok::<_, std::convert::Infallible>(
                        Status::not_found("nope").into_http::<Body>(),
                    );
                }
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", "0".parse().unwrap());
                let body = http_body_util::StreamBody::new(tokio_stream_once(trailers));
                Ok(http::Response::new(Body::new(body)))
            }));
        let fail = service
            .clone()
            .oneshot(Request::get("/a.B/Fail").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(
            crate::grpc::status_code(fail.headers()),
            Some(Code::NotFound)
        );
        let ok = service
            .oneshot(Request::get("/a.B/Ok").body(Body::empty()).unwrap())
            .await
            .unwrap();
        let collected = ok.into_body().collect().await.unwrap();
        let trailers = collected.trailers().unwrap();
        assert_eq!(crate::grpc::status_code(trailers), Some(Code::Ok));
    }

    fn tokio_stream_once(
        trailers: http::HeaderMap,
    ) -> impl tokio_stream::Stream<Item = Result<http_body::Frame<bytes::Bytes>, Status>> {
        tokio_stream::once(Ok(http_body::Frame::trailers(trailers)))
    }
}
