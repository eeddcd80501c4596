//! Live tracking across processes: how a TrackDelivery stream hears of a change made by any
//! replica of the delivery service.
//!
//! Every state-changing transaction runs `pg_notify(CHANNEL, order_id)`, which Postgres
//! delivers at commit to every session listening. Each process keeps ONE such session
//! (`waybill_runtime::listen`), and fans notifications out through a [`Hub`]: a map from order id to a broadcast channel,
//! an entry per watched delivery, removed when its last watcher leaves. So a thousand
//! watchers cost one connection, and a change costs one notification per process.
//!
//! A notification only says "order X changed"; the watcher then reads what changed since the
//! version it last sent (from the primary), so lost, merged or duplicated notifications cannot
//! make it skip, repeat or reorder a change. Notifications are lost while the listening
//! session is down, so every (re)established session, and every lagging receiver, makes the
//! watchers read again. A watcher subscribes before it reads the current state, so nothing
//! can slip between its first read and its subscription.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Once},
};

use tokio::sync::broadcast;
use uuid::Uuid;
use waybill_runtime::{
    Db,
    listen::{Heard, listen_forever},
};

/// The notification channel of delivery changes; the payload is the order id.
pub const CHANNEL: &str = "waybill_delivery_tracking";

/// Signals buffered per delivery; a watcher further behind reads again instead.
const SIGNAL_BUFFER: usize = 8;

/// Fans one process's delivery notifications out to its watchers. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    watched: Mutex<HashMap<Uuid, broadcast::Sender<()>>>,
    listener: Once,
}

/// One watcher's interest in one delivery: a signal arrives when the delivery may have
/// changed. Dropping it unsubscribes.
pub struct Subscription {
    hub: Hub,
    order_id: Uuid,
    receiver: Option<broadcast::Receiver<()>>,
}

impl Hub {
    /// A hub for the database `db`; its listening session starts with the first watcher.
    pub fn new(db: Db) -> Self {
        Self {
            inner: Arc::new(Inner {
                db,
                watched: Mutex::new(HashMap::new()),
                listener: Once::new(),
            }),
        }
    }

    /// Starts watching `order_id`. Call it before reading the delivery's state.
    pub fn subscribe(&self, order_id: Uuid) -> Subscription {
        self.inner.listener.call_once(|| {
            tokio::spawn(listen(self.clone()));
        });
        let receiver = self
            .watched()
            .entry(order_id)
            .or_insert_with(|| broadcast::channel(SIGNAL_BUFFER).0)
            .subscribe();
        Subscription {
            hub: self.clone(),
            order_id,
            receiver: Some(receiver),
        }
    }

    /// Tells the watchers of `order_id` that it may have changed.
    fn notify(&self, order_id: Uuid) {
        if let Some(sender) = self.watched().get(&order_id) {
            // No receivers left is not an error: the last one is about to unsubscribe.
            let _ = sender.send(());
        }
    }

    /// Tells every watcher to read again (notifications may have been missed).
    fn notify_all(&self) {
        for sender in self.watched().values() {
            let _ = sender.send(());
        }
    }

    fn watched(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, broadcast::Sender<()>>> {
        // The map stays consistent even if a holder panicked: every operation on it is one
        // call.
        self.inner
            .watched
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Subscription {
    /// Waits until the delivery may have changed. Missed signals (a lagging receiver) also
    /// end the wait: the watcher reads again either way. Pending signals are consumed, as one
    /// read covers them all.
    pub async fn changed(&mut self) {
        let Some(receiver) = self.receiver.as_mut() else {
            return std::future::pending().await;
        };
        match receiver.recv().await {
            Ok(()) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            // The hub keeps the sender while this subscription exists.
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
        while let Ok(()) | Err(broadcast::error::TryRecvError::Lagged(_)) = receiver.try_recv() {}
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        drop(self.receiver.take());
        let mut watched = self.hub.watched();
        if watched
            .get(&self.order_id)
            .is_some_and(|sender| sender.receiver_count() == 0)
        {
            watched.remove(&self.order_id);
        }
    }
}

/// Keeps one LISTEN session open for the life of the process and feeds what it hears to
/// `hub`.
async fn listen(hub: Hub) {
    let db = hub.inner.db.clone();
    listen_forever(db, CHANNEL.to_owned(), |heard| match heard {
        // Changes made while no session listened were not heard: every watcher reads again.
        Heard::Connected => hub.notify_all(),
        Heard::Notification(payload) => match Uuid::parse_str(payload) {
            Ok(order_id) => hub.notify(order_id),
            Err(_) => tracing::debug!(
                payload,
                "delivery tracking: ignoring a foreign notification"
            ),
        },
    })
    .await;
}
