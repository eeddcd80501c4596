//! A LISTEN session (`waybill_runtime::listen`) that turns notifications into wake-ups.
//! Notifications sent while it was down are lost, so every (re)connection also counts as a
//! wake-up, and the owners keep a slow fallback sweep for what a half-dead connection may
//! hide.

use std::sync::Arc;

use tokio::{sync::Notify, task::JoinHandle};
use waybill_runtime::{
    Db,
    listen::{Heard, listen_forever},
};

/// Wakes its owner when a notification arrives on a channel; stops when dropped.
pub(crate) struct Listener {
    wake: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Listener {
    /// Listens on `channel` of `db`'s primary. With `payload`, only notifications carrying
    /// exactly that payload wake the owner.
    pub(crate) fn spawn(db: Db, channel: String, payload: Option<String>) -> Self {
        let wake = Arc::new(Notify::new());
        let task = tokio::spawn(listen(db, channel, payload, wake.clone()));
        Self { wake, task }
    }

    /// Completes at the next wake-up. One that came while nobody waited is kept (one permit),
    /// so none is lost between two waits.
    pub(crate) async fn notified(&self) {
        self.wake.notified().await;
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn listen(db: Db, channel: String, payload: Option<String>, wake: Arc<Notify>) {
    listen_forever(db, channel, |heard| match heard {
        Heard::Connected => wake.notify_one(),
        Heard::Notification(note) if payload.as_deref().is_none_or(|want| want == note) => {
            wake.notify_one();
        }
        Heard::Notification(_) => {}
    })
    .await;
}
