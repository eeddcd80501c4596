//! The server-side stack, outermost first: trace span (child of the caller's, from the
//! metadata) → RED metrics → deadline enforcement → injected faults → load shedding →
//! idempotency → handler. The span is outermost so that every call has one and every
//! layer's decision is an event on it. The metrics sit outside every
//! layer that answers by itself, so shed, failed-fast and replayed calls are counted with
//! their codes. Faults sit inside the deadline so injected delays
//! count against it, and outside shedding so an injected failure does not hold a concurrency
//! slot. Idempotency is innermost: a shed or failed-fast call never claims its key.

use tower::layer::util::Stack;

use std::sync::Arc;

use crate::{
    deadline::ServerDeadlineLayer,
    fault::FaultLayer,
    idempotency::{IdempotencyLayer, IdempotencyStore},
    method::MethodTable,
    policy::Policy,
    red::RedLayer,
    shed::{LoadShedLayer, MethodCaps},
    trace::ServerTraceLayer,
};

/// A server span per call (see [`crate::trace`]), and a WARN line (code, latency) for each
/// call that fails on the server's side: codes that report the caller's mistake or a normal
/// outcome (INVALID_ARGUMENT, NOT_FOUND, …) are not logged, since a client sending bad input
/// must not page the server's owner. gRPC errors are read from the `grpc-status` header or
/// trailer, not the HTTP status, which is 200 for them.
pub fn trace() -> ServerTraceLayer {
    ServerTraceLayer
}

/// The mesh layers of a server (all but tracing), built from one policy.
pub type ServerStack = Stack<
    IdempotencyLayer,
    Stack<LoadShedLayer, Stack<FaultLayer, Stack<ServerDeadlineLayer, RedLayer>>>,
>;

/// Builds the server stack from `policy`, for the methods `methods` describes (which are
/// also the methods the RED metrics name), keeping idempotency keys in `store` and holding
/// the methods in `caps` to their caps. Build it once per server: the load-shedding limit is
/// shared by everything the stack wraps.
pub fn stack(
    policy: &Policy,
    methods: &MethodTable,
    store: Arc<dyn IdempotencyStore>,
    caps: MethodCaps,
) -> ServerStack {
    Stack::new(
        IdempotencyLayer::new(store, policy, methods.clone()),
        Stack::new(
            LoadShedLayer::new(policy.load_shedding()).with_caps(caps),
            Stack::new(
                FaultLayer::new(policy.clone()),
                Stack::new(ServerDeadlineLayer, RedLayer::new(methods)),
            ),
        ),
    )
}
