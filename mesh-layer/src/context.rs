//! What an incoming call hands to the calls it makes: its deadline, and whether it is itself a
//! retry. The server stack sets it for the duration of the handler (a tokio task-local); the
//! client stack reads it, so a handler's outgoing calls inherit both without any code in the
//! handler.
//!
//! NOTE: work the handler moves to a spawned task leaves the scope; such work must carry the
//! context explicitly with [`CallContext::scope`].

use std::future::Future;

use tokio::time::Instant;

/// The incoming call's facts that travel to outgoing calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallContext {
    /// When the incoming call's caller stops waiting.
    pub deadline: Option<Instant>,
    /// How many attempts of the incoming call came before this one (its
    /// `grpc-previous-rpc-attempts`). Non-zero means the caller is already retrying, so
    /// outgoing calls must not retry again (retries would multiply along a chain).
    pub previous_attempts: u32,
}

tokio::task_local! {
    static CURRENT: CallContext;
}

impl CallContext {
    /// The context of the call being handled, if any.
    pub fn current() -> Option<CallContext> {
        CURRENT.try_with(|context| *context).ok()
    }

    /// Runs `future` with this context as the current one.
    pub fn scope<F: Future>(self, future: F) -> impl Future<Output = F::Output> {
        CURRENT.scope(self, future)
    }
}
