//! The server-side stack.

use tower_http::{
    classify::{GrpcCode, GrpcErrorsAsFailures, SharedClassifier},
    trace::{DefaultOnFailure, TraceLayer},
};
use tracing::Level;

/// Codes that report the caller's mistake or a normal outcome, not a server failure. They are
/// not logged as failures: a client sending bad input must not page the server's owner.
const CALLER_CODES: [GrpcCode; 7] = [
    GrpcCode::Cancelled,
    GrpcCode::InvalidArgument,
    GrpcCode::NotFound,
    GrpcCode::AlreadyExists,
    GrpcCode::FailedPrecondition,
    GrpcCode::OutOfRange,
    GrpcCode::Unauthenticated,
];

/// The server's trace layer type.
pub type Trace = TraceLayer<
    SharedClassifier<GrpcErrorsAsFailures>,
    tower_http::trace::DefaultMakeSpan,
    tower_http::trace::DefaultOnRequest,
    tower_http::trace::DefaultOnResponse,
    tower_http::trace::DefaultOnBodyChunk,
    tower_http::trace::DefaultOnEos,
    DefaultOnFailure,
>;

/// A span per call, and a WARN line (status, latency) for each call that fails on the server's
/// side. gRPC errors are read from the `grpc-status` header or trailer, not the HTTP status,
/// which is 200 for them.
pub fn trace() -> Trace {
    let classifier = CALLER_CODES.into_iter().fold(
        GrpcErrorsAsFailures::new(),
        GrpcErrorsAsFailures::with_success,
    );
    TraceLayer::new(SharedClassifier::new(classifier))
        .on_failure(DefaultOnFailure::new().level(Level::WARN))
}
