//! The server-side stack, outermost first: trace span → RED metrics → deadline enforcement →
//! injected faults → load shedding → idempotency → handler. The metrics sit outside every
//! layer that answers by itself, so shed, failed-fast and replayed calls are counted with
//! their codes. Faults sit inside the deadline so injected delays
//! count against it, and outside shedding so an injected failure does not hold a concurrency
//! slot. Idempotency is innermost: a shed or failed-fast call never claims its key.

use tower::layer::util::Stack;
use tower_http::{
    classify::{GrpcCode, GrpcErrorsAsFailures, SharedClassifier},
    trace::{
        DefaultMakeSpan, DefaultOnBodyChunk, DefaultOnEos, DefaultOnFailure, DefaultOnRequest,
        DefaultOnResponse, TraceLayer,
    },
};
use tracing::Level;

use std::sync::Arc;

use crate::{
    deadline::ServerDeadlineLayer,
    fault::FaultLayer,
    idempotency::{IdempotencyLayer, IdempotencyStore},
    method::MethodTable,
    policy::Policy,
    red::RedLayer,
    shed::LoadShedLayer,
};

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
    DefaultMakeSpan,
    DefaultOnRequest,
    DefaultOnResponse,
    DefaultOnBodyChunk,
    DefaultOnEos,
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

/// The mesh layers of a server (all but tracing), built from one policy.
pub type ServerStack = Stack<
    IdempotencyLayer,
    Stack<LoadShedLayer, Stack<FaultLayer, Stack<ServerDeadlineLayer, RedLayer>>>,
>;

/// Builds the server stack from `policy`, for the methods `methods` describes (which are
/// also the methods the RED metrics name), keeping idempotency keys in `store`. Build it once per server: the load-shedding limit is shared
/// by everything the stack wraps.
pub fn stack(
    policy: &Policy,
    methods: &MethodTable,
    store: Arc<dyn IdempotencyStore>,
) -> ServerStack {
    Stack::new(
        IdempotencyLayer::new(store, policy, methods.clone()),
        Stack::new(
            LoadShedLayer::new(policy.load_shedding()),
            Stack::new(
                FaultLayer::new(policy.clone()),
                Stack::new(ServerDeadlineLayer, RedLayer::new(methods)),
            ),
        ),
    )
}
