//! The server-side stack.

use tower_http::{
    classify::{GrpcErrorsAsFailures, SharedClassifier},
    trace::TraceLayer,
};

/// A span per call (`grpc` span with method and path), and a log line for each call that
/// ends in a gRPC error, with its status and latency. gRPC errors are read from the
/// `grpc-status` header or trailer, not the HTTP status, which is 200 for them.
pub fn trace() -> TraceLayer<SharedClassifier<GrpcErrorsAsFailures>> {
    TraceLayer::new_for_grpc()
}
