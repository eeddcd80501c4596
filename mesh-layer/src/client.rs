//! The client-side stack, outermost first: trace span (its context injected into the
//! metadata) → deadline → budgeted retry → balancer (power of two choices) → per-endpoint
//! circuit breaker → connection. The span sits outside retry so that one call is one span
//! with its attempts as events; the deadline sits outside retry so that all attempts share
//! one deadline; the breakers sit below the balancer so that a retry can land on a healthy
//! endpoint.

use tower::{Layer, layer::util::Stack};

use crate::{
    balance::{Balancer, TargetError},
    connection::{Connection, ConnectionError},
    deadline::{DeadlineLayer, DeadlineService},
    method::MethodTable,
    policy::Policy,
    retry::{Retry, RetryLayer},
    trace::{ClientTrace, ClientTraceLayer},
};

/// The mesh layers of a client for one target service.
pub type ClientStack = Stack<Stack<RetryLayer, DeadlineLayer>, ClientTraceLayer>;

/// A connection wrapped in the client stack; hand it to a generated tonic client
/// (`OrdersServiceClient::new(client)`).
pub type MeshClient<S = Connection> = ClientTrace<DeadlineService<Retry<S>>>;

/// Builds the client stack for one target service. Clones of the result share the retry
/// budget, so build it once per target.
pub fn stack(policy: &Policy, methods: &MethodTable) -> ClientStack {
    stack_with_trace(policy, methods, ClientTraceLayer::new())
}

fn stack_with_trace(
    policy: &Policy,
    methods: &MethodTable,
    trace: ClientTraceLayer,
) -> ClientStack {
    Stack::new(
        Stack::new(
            RetryLayer::new(policy.clone(), methods.clone()),
            DeadlineLayer::new(policy.clone()),
        ),
        trace,
    )
}

/// Wraps `connection` in the client stack.
pub fn wrap<S>(policy: &Policy, methods: &MethodTable, connection: S) -> MeshClient<S> {
    stack(policy, methods).layer(connection)
}

/// A client for `target` (see [`Balancer::connect`]): the client stack over a balancer whose
/// endpoints each sit behind a circuit breaker.
pub fn balanced(
    target: &str,
    policy: &Policy,
    methods: &MethodTable,
) -> Result<MeshClient<Balancer<Connection>>, TargetError> {
    let balancer = Balancer::connect(target, policy.breaker().clone())?;
    Ok(stack_with_trace(policy, methods, ClientTraceLayer::for_target(target)).layer(balancer))
}

/// The one place connections are made (see [`Connection`]), so TLS and mTLS plug in there
/// later. Connects lazily: the first call connects, and a refused connection is an
/// UNAVAILABLE the retry layer sees.
pub fn connect(uri: &str) -> Result<Connection, ConnectionError> {
    Connection::lazy(uri)
}
