//! A dedicated LISTEN connection that turns notifications into wake-ups.
//!
//! A pooled connection cannot LISTEN (the pool drives its connections and drops their
//! notifications), so this opens its own, and opens it again with a doubling backoff when it
//! drops. Notifications sent while it was down are lost, so every (re)connection also counts
//! as a wake-up, and the owners keep a slow fallback sweep for what a half-dead connection may
//! hide.

use std::{sync::Arc, time::Duration};

use tokio::{sync::Notify, task::JoinHandle};
use tokio_postgres::AsyncMessage;
use waybill_runtime::{Db, DbError};

const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(10);

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
    let mut delay = RECONNECT_FIRST;
    loop {
        match listen_once(&db, &channel, payload.as_deref(), &wake).await {
            Ok(()) => {
                tracing::warn!(%channel, "LISTEN connection closed; reconnecting");
                delay = RECONNECT_FIRST;
            }
            Err(error) => {
                tracing::warn!(%channel, %error, retry_in = ?delay, "LISTEN connection failed");
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RECONNECT_MAX);
    }
}

/// One connection's life: LISTEN, wake once (to catch up), then wake per notification until
/// the connection ends.
async fn listen_once(
    db: &Db,
    channel: &str,
    payload: Option<&str>,
    wake: &Arc<Notify>,
) -> Result<(), DbError> {
    let (client, mut connection) = db.connect_primary_unpooled().await?;
    let driver_wake = wake.clone();
    let filter = payload.map(str::to_owned);
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(note))) => {
                    if filter.as_deref().is_none_or(|want| want == note.payload()) {
                        driver_wake.notify_one();
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(DbError::from(error)),
                None => return Ok(()),
            }
        }
    });
    // The channel name is quoted: it is ours, but need not be a plain identifier.
    let listened = client
        .batch_execute(&format!("LISTEN \"{}\"", channel.replace('"', "\"\"")))
        .await;
    if let Err(error) = listened {
        driver.abort();
        return Err(error.into());
    }
    tracing::debug!(%channel, "listening");
    wake.notify_one();
    let result = match driver.await {
        Ok(result) => result,
        // The driver never panics; if it did, treat it as a closed connection.
        Err(_) => Ok(()),
    };
    drop(client);
    result
}
