//! A shutdown future that can be asked "are we done?" without waiting, and awaited again
//! after it completed (a plain future may not be polled after completion).

use std::{future::Future, pin::Pin, task::Context};

pub(crate) struct Shutdown<F> {
    future: Pin<Box<F>>,
    done: bool,
}

impl<F: Future> Shutdown<F> {
    pub(crate) fn new(future: F) -> Self {
        Self {
            future: Box::pin(future),
            done: false,
        }
    }

    /// Whether shutdown was requested, without waiting.
    pub(crate) fn is_done(&mut self) -> bool {
        if !self.done {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            self.done = self.future.as_mut().poll(&mut cx).is_ready();
        }
        self.done
    }

    /// Completes when shutdown is requested (at once if it was).
    pub(crate) async fn wait(&mut self) {
        if !self.done {
            self.future.as_mut().await;
            self.done = true;
        }
    }

    /// Sleeps for `duration`; returns false if shutdown came first.
    pub(crate) async fn sleep(&mut self, duration: std::time::Duration) -> bool {
        tokio::select! {
            () = self.wait() => false,
            () = tokio::time::sleep(duration) => true,
        }
    }
}
