//! Live tracking across processes: how a TrackDelivery stream hears of a change made by any
//! replica of the delivery service.
//!
//! Every state-changing transaction runs `pg_notify(CHANNEL, order_id)`, which Postgres
//! delivers at commit to every session listening. Each process keeps ONE such session, a
//! dedicated connection outside the pool (a pooled connection's driver drops notifications),
//! and fans notifications out through a [`Hub`]: a map from order id to a broadcast channel,
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
    time::Duration,
};

use tokio::sync::broadcast;
use tokio_postgres::AsyncMessage;
use uuid::Uuid;
use waybill_runtime::Db;

/// The notification channel of delivery changes; the payload is the order id.
pub const CHANNEL: &str = "waybill_delivery_tracking";

/// First wait before reconnecting the listening session; doubled up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often an idle listening session is probed, so a dead TCP connection is noticed (and
/// watchers resynchronized) in seconds rather than after the kernel's keepalive hours.
const PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a probe may take before the session is deemed dead.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
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
            tokio::spawn(listen_forever(self.clone()));
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

/// Keeps one LISTEN session open for the life of the process, reconnecting with bounded
/// exponential backoff, and feeds its notifications to `hub`.
async fn listen_forever(hub: Hub) {
    let mut backoff = MIN_BACKOFF;
    loop {
        match listen_once(&hub).await {
            Ok(()) => backoff = MIN_BACKOFF,
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "delivery tracking: listening session failed");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One listening session, until its connection fails. `Ok` once it had been listening.
async fn listen_once(hub: &Hub) -> Result<(), waybill_runtime::DbError> {
    let (client, mut connection) = hub.inner.db.connect_primary_unpooled().await?;
    let (closed_tx, mut closed_rx) = tokio::sync::oneshot::channel();
    let dispatch_hub = hub.clone();
    // The connection must be polled for queries on `client` to progress, and polling it is
    // also how notifications arrive.
    let driver = tokio::spawn(async move {
        let result = loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(notification))) => {
                    match Uuid::parse_str(notification.payload()) {
                        Ok(order_id) => dispatch_hub.notify(order_id),
                        Err(_) => tracing::debug!(
                            payload = notification.payload(),
                            "delivery tracking: ignoring a foreign notification"
                        ),
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => break Err(error),
                None => break Ok(()),
            }
        };
        let _ = closed_tx.send(result);
    });
    let listening = async {
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
        Ok::<_, tokio_postgres::Error>(())
    };
    let started = tokio::select! {
        result = listening => result,
        _ = &mut closed_rx => {
            driver.abort();
            return Err(waybill_runtime::DbError::Unavailable(
                "connection closed before LISTEN".into(),
            ));
        }
    };
    if let Err(error) = started {
        driver.abort();
        return Err(error.into());
    }
    tracing::info!("delivery tracking: listening for changes");
    // Changes made while no session listened were not heard: have every watcher read again.
    hub.notify_all();

    let outcome = loop {
        tokio::select! {
            closed = &mut closed_rx => break closed,
            () = tokio::time::sleep(PROBE_INTERVAL) => {
                let probe = tokio::time::timeout(PROBE_TIMEOUT, client.simple_query("")).await;
                if !matches!(probe, Ok(Ok(_))) {
                    tracing::warn!("delivery tracking: listening session does not answer");
                    break Ok(Ok(()));
                }
            }
        }
    };
    driver.abort();
    match outcome {
        Ok(Err(error)) => {
            tracing::warn!(%error, "delivery tracking: listening session lost");
        }
        _ => tracing::warn!("delivery tracking: listening session closed"),
    }
    Ok(())
}
