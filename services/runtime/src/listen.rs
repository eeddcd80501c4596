//! A LISTEN session that lasts the life of the process: the one way waybill hears Postgres
//! notifications (outbox relays and bus consumers waking up, live delivery tracking, cache
//! invalidation).
//!
//! A pooled connection cannot LISTEN (the pool drives its connections and drops their
//! notifications), so each session has its own connection, opened again with a doubling
//! backoff when it drops. Notifications sent while no session listened are lost, so every
//! (re)connection is reported as [`Heard::Connected`]: the owner catches up (a relay sweeps,
//! a watcher re-reads, a cache empties). A connection that stops answering without closing
//! is found by a periodic probe.

use std::time::Duration;

use tokio_postgres::AsyncMessage;

use crate::{Db, DbError};

const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// How often an idle session checks that its connection still answers.
const PROBE_INTERVAL: Duration = Duration::from_secs(10);
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a session heard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard<'a> {
    /// Listening (again): anything sent before may have been missed.
    Connected,
    /// A notification with this payload.
    Notification(&'a str),
}

/// Listens on `channel` of `db`'s primary forever, calling `on` with what it hears. Run it in
/// its own task; abort the task to stop.
pub async fn listen_forever(db: Db, channel: String, mut on: impl FnMut(Heard<'_>) + Send) {
    let mut delay = RECONNECT_FIRST;
    loop {
        match listen_once(&db, &channel, &mut on).await {
            Ok(()) => {
                tracing::warn!(%channel, "LISTEN session closed; reconnecting");
                delay = RECONNECT_FIRST;
            }
            Err(error) => {
                tracing::warn!(%channel, %error, retry_in = ?delay, "LISTEN session failed");
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RECONNECT_MAX);
    }
}

/// One connection's life: LISTEN, report `Connected`, then each notification until the
/// connection ends or stops answering.
async fn listen_once(
    db: &Db,
    channel: &str,
    on: &mut (impl FnMut(Heard<'_>) + Send),
) -> Result<(), DbError> {
    let (client, mut connection) = db.connect_primary_unpooled().await?;
    let (notes_tx, mut notes) = tokio::sync::mpsc::unbounded_channel::<String>();
    // Polling the connection is what makes queries on `client` progress, and how
    // notifications arrive; it ends when the connection does.
    let mut driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(note))) => {
                    if notes_tx.send(note.payload().to_owned()).is_err() {
                        return Ok(());
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(DbError::from(error)),
                None => return Ok(()),
            }
        }
    });
    // The channel name is quoted: it is ours, but need not be a plain identifier.
    let statement = format!("LISTEN \"{}\"", channel.replace('"', "\"\""));
    let listen = client.batch_execute(&statement);
    tokio::select! {
        result = listen => if let Err(error) = result {
            driver.abort();
            return Err(error.into());
        },
        ended = &mut driver => return ended.unwrap_or(Ok(())),
    }
    tracing::debug!(%channel, "listening");
    on(Heard::Connected);
    loop {
        tokio::select! {
            note = notes.recv() => match note {
                Some(payload) => on(Heard::Notification(&payload)),
                None => break,
            },
            () = tokio::time::sleep(PROBE_INTERVAL) => {
                let probe = tokio::time::timeout(PROBE_TIMEOUT, client.simple_query("")).await;
                if !matches!(probe, Ok(Ok(_))) {
                    tracing::warn!(%channel, "LISTEN session does not answer");
                    break;
                }
            }
        }
    }
    driver.abort();
    Ok(())
}
