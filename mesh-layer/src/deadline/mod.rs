//! Deadlines: every call has one, and it shrinks as it crosses hops.
//!
//! The failure mode: a caller gives up after 1 s, but the services behind it keep working for
//! 30 s on an answer nobody will read, holding connections and database slots while the
//! caller's retries pile more work on top. A deadline that travels with the call
//! (`grpc-timeout`) lets every hop stop when the original caller stops.
//!
//! - [`ServerDeadlineLayer`] reads `grpc-timeout`, makes the deadline the handler's (through
//!   [`CallContext`](crate::context::CallContext)), and cancels the handler when it passes.
//! - [`DeadlineLayer`] (client) gives each outgoing call the earliest of: the method's
//!   configured timeout, the caller's own timeout, and the incoming call's deadline minus a
//!   margin. A call whose deadline has already passed fails with DEADLINE_EXCEEDED without
//!   being sent.

mod client;
mod server;

pub use client::{DeadlineLayer, DeadlineService, ResponseFuture};
pub use server::{ServerDeadline, ServerDeadlineLayer};
