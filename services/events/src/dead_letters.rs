//! Events a subscription gave up on, from either bus, in one table (`bus.dead_letters`), so
//! one tool lists and replays them.
//!
//! An event lands here after its subscription's `max_attempts` failed attempts, or at once
//! when the handler says the failure is permanent. It stays until replayed; a replay makes it
//! flow to that one subscription again with its attempts reset.

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;
use uuid::Uuid;
use waybill_runtime::{Db, DbError};

use crate::{
    Event,
    bus::{Bus, BusError, BusInner},
    event::headers_to_json,
};

/// One dead-lettered event of one subscription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// The event.
    pub event_id: Uuid,
    /// The subscription that gave up on it.
    pub subscription: String,
    /// The event's topic.
    pub topic: String,
    /// The event's ordering key.
    pub key: String,
    /// Attempts made before giving up.
    pub attempts: u32,
    /// The last attempt's error.
    pub last_error: String,
    /// When the event was created.
    pub created_at: DateTime<Utc>,
    /// When it was dead-lettered.
    pub dead_at: DateTime<Utc>,
}

/// The dead letters of `subscription` (all of them with `None`), oldest first.
pub async fn list(db: &Db, subscription: Option<&str>) -> Result<Vec<DeadLetter>, DbError> {
    let client = db.primary().await?;
    let rows = client
        .query(
            "SELECT event_id, subscription, topic, key, attempts, last_error, created_at, dead_at
             FROM bus.dead_letters
             WHERE $1::text IS NULL OR subscription = $1
             ORDER BY dead_at, event_id",
            &[&subscription],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| DeadLetter {
            event_id: row.get(0),
            subscription: row.get(1),
            topic: row.get(2),
            key: row.get(3),
            attempts: u32::try_from(row.get::<_, i32>(4)).unwrap_or(0),
            last_error: row.get(5),
            created_at: row.get(6),
            dead_at: row.get(7),
        })
        .collect())
}

/// Makes dead-lettered `event_id` flow to `subscription` again, with its attempts reset, and
/// removes the dead letter. Only that subscription sees it again.
///
/// With the Postgres bus this is one transaction on `db` (which must be the bus's database).
/// With NATS the event is republished (see the crate docs), then the dead letter deleted.
pub async fn replay(
    db: &Db,
    bus: &Bus,
    subscription: &str,
    event_id: Uuid,
) -> Result<(), BusError> {
    match &bus.inner {
        BusInner::Postgres(_) => crate::bus::postgres::replay(db, subscription, event_id).await,
        BusInner::Nats(nats) => nats.replay(db, subscription, event_id).await,
    }
    .inspect(|()| tracing::info!(%subscription, %event_id, "dead letter replayed"))
}

/// Records that `subscription` gave up on `event` after `attempts` attempts (a later give-up
/// on the same event, after a replay, replaces the earlier record).
pub(crate) async fn record(
    client: &impl GenericClient,
    subscription: &str,
    event: &Event,
    attempts: u32,
    error: &str,
) -> Result<(), DbError> {
    client
        .execute(
            "INSERT INTO bus.dead_letters
                 (subscription, event_id, topic, key, payload, headers, created_at, attempts,
                  last_error)
             VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7, $8, $9)
             ON CONFLICT (subscription, event_id) DO UPDATE
             SET attempts = EXCLUDED.attempts, last_error = EXCLUDED.last_error, dead_at = now()",
            &[
                &subscription,
                &event.id,
                &event.topic,
                &event.key,
                &event.payload,
                &headers_to_json(&event.headers),
                &event.created_at,
                &i32::try_from(attempts).unwrap_or(i32::MAX),
                &error,
            ],
        )
        .await?;
    Ok(())
}

/// Logs a give-up: the one place a dead-lettered event is reported.
pub(crate) fn log_dead(subscription: &str, event: &Event, attempts: u32, error: &str) {
    waybill_runtime::metrics::dead_letter(subscription, &event.topic);
    tracing::warn!(
        %subscription,
        event_id = %event.id,
        topic = %event.topic,
        key = %event.key,
        attempts,
        %error,
        "event dead-lettered"
    );
}
