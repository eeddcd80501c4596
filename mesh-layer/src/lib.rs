//! waybill's resilience layer: the tower middleware every service's server and every client
//! channel goes through, sidecar-style.
//!
//! Each concern is one `Layer` in its own module, usable alone, configured per method by one
//! [`Policy`](policy::Policy) document:
//!
//! | module | side | what it prevents |
//! |---|---|---|
//! | [`balance`] | client | one hot endpoint while others idle; calls to dead endpoints |
//! | [`breaker`] | client | waiting on a dead endpoint; piling load on a drowning one |
//! | [`connection`] | client | a task hop per call (tonic's buffered channel); calls stuck on a vanished peer |
//! | [`deadline`] | both | work nobody waits for; calls that outlive their caller |
//! | [`idempotency`] | server | a retried write applied twice |
//! | [`retry`] | client | lost calls, without retry storms (budget, no amplification) |
//! | [`shed`] | server | unbounded queueing under overload |
//! | [`fault`] | server | untested failure paths |
//! | [`red`] | server | errors and latency nobody sees (requests by code, duration) |
//! | [`trace`] | both | a slow or failed call nobody can follow across services (spans, W3C context) |
//!
//! [`server::stack`] composes the server side, [`client::stack`] the client side. The layers speak HTTP/2 requests carrying
//! gRPC (`http::Request<tonic::body::Body>`), so they wrap tonic servers and channels alike.
//!
//! Invariant: this crate knows no waybill service; everything it knows about a method comes
//! from the policy and the protobuf descriptors ([`method::MethodTable`]).

#![forbid(unsafe_code)]

pub mod balance;
pub mod body;
pub mod breaker;
pub mod client;
pub mod connection;
pub mod context;
pub mod deadline;
pub mod fault;
pub mod grpc;
pub mod idempotency;
pub mod method;
pub mod metrics;
pub mod policy;
pub mod red;
pub mod retry;
pub mod server;
pub mod shed;
pub mod trace;

/// The boxed response future most layers return.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;
