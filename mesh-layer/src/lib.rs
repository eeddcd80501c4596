//! waybill's resilience layer: the tower middleware every service's server and every client
//! channel goes through, sidecar-style.
//!
//! Today it holds the server's request tracing. Deadlines, budgeted retries, circuit breakers,
//! idempotency keys, load shedding and client-side balancing land here as one `Layer` per
//! module (see the mesh-layer issue); services pick them up by using this crate's stacks
//! instead of assembling middleware themselves.
//!
//! Invariant: this crate knows no waybill service; it speaks gRPC over HTTP/2 only.

pub mod server;
