//! The Postgres bus: `bus.messages`, fanned out to `bus.deliveries` at publish time, claimed
//! by consumers with `FOR UPDATE SKIP LOCKED` under a lease, woken by NOTIFY on
//! [`CHANNEL`] (payload: the subscription's name).

use std::time::Duration;

use tokio_postgres::GenericClient;
use uuid::Uuid;
use waybill_runtime::{Db, DbError};

use crate::{
    Event,
    bus::BusError,
    consumer::{Inbox, Outcome},
    dead_letters,
    event::headers_from_json,
    listen::Listener,
    shutdown::Shutdown,
};

/// The channel that tells a subscription's consumers they have new deliveries.
pub(crate) const CHANNEL: &str = "waybill_bus";
/// Deliveries claimed per query.
const CLAIM_BATCH: i64 = 16;
/// The longest an idle consumer sleeps without a notification before it looks again.
const IDLE_MAX: Duration = Duration::from_secs(5);
/// Retry delays when the database fails.
const FAILURE_FIRST: Duration = Duration::from_millis(200);
const FAILURE_MAX: Duration = Duration::from_secs(10);

pub(crate) struct PgBus {
    pub(crate) db: Db,
}

/// A claimed delivery.
struct Claimed {
    seq: i64,
    attempts: u32,
    event: Event,
}

/// Moves up to `limit` outbox rows of `schema` into the bus within `tx` (the relay's
/// transaction): one message per event whose topic has subscriptions, one delivery per
/// subscription, and a notification per subscription that got any. Returns the rows moved.
pub(crate) async fn move_outbox(
    tx: &impl GenericClient,
    schema: &str,
    limit: i64,
) -> Result<u64, DbError> {
    // One statement. Events of topics nobody subscribes to are dropped: a subscription gets
    // what is published after it first registered.
    let statement = format!(
        "WITH moved AS (
             DELETE FROM {schema}.outbox
             WHERE id IN (SELECT id FROM {schema}.outbox ORDER BY id LIMIT $1
                          FOR UPDATE SKIP LOCKED)
             RETURNING id, topic, key, payload, headers, created_at
         ), published AS (
             INSERT INTO bus.messages (event_id, topic, key, payload, headers, created_at)
             SELECT id, topic, key, payload, headers, created_at FROM moved
             WHERE EXISTS (SELECT 1 FROM bus.subscriptions s WHERE s.topic = moved.topic)
             ORDER BY id
             ON CONFLICT (event_id) DO NOTHING
             RETURNING seq, topic
         ), fanned AS (
             INSERT INTO bus.deliveries (subscription, seq)
             SELECT s.name, p.seq FROM published p JOIN bus.subscriptions s ON s.topic = p.topic
             RETURNING subscription
         ), notified AS (
             SELECT pg_notify('{CHANNEL}', subscription)
             FROM (SELECT DISTINCT subscription FROM fanned) d
         )
         SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM notified)"
    );
    let row = tx.query_one(&statement, &[&limit]).await?;
    Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
}

impl PgBus {
    /// Runs `inbox`'s subscription until shutdown.
    pub(crate) async fn consume<F: Future>(&self, inbox: &Inbox<'_>, shutdown: &mut Shutdown<F>) {
        let subscription = inbox.subscription;
        let mut delay = FAILURE_FIRST;
        while let Err(error) = self.register(inbox).await {
            tracing::warn!(%error, retry_in = ?delay, "cannot register the subscription");
            if !shutdown.sleep(delay).await {
                return;
            }
            delay = (delay * 2).min(FAILURE_MAX);
        }
        let listener = Listener::spawn(
            self.db.clone(),
            CHANNEL.to_owned(),
            Some(subscription.name().to_owned()),
        );
        let mut delay = FAILURE_FIRST;
        while !shutdown.is_done() {
            let wait = match self.claim_and_handle(inbox, shutdown).await {
                Ok(None) => {
                    delay = FAILURE_FIRST;
                    continue;
                }
                Ok(Some(wait)) => {
                    delay = FAILURE_FIRST;
                    wait
                }
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?delay, "cannot claim deliveries");
                    let wait = delay;
                    delay = (delay * 2).min(FAILURE_MAX);
                    wait
                }
            };
            tokio::select! {
                () = listener.notified() => {}
                () = tokio::time::sleep(wait) => {}
                () = shutdown.wait() => {}
            }
        }
    }

    async fn register(&self, inbox: &Inbox<'_>) -> Result<(), DbError> {
        let sub = inbox.subscription;
        let client = self.db.primary().await?;
        client
            .execute(
                &client
                    .prepare_cached(
                        // The latest configuration wins: topics no longer listed stop fanning out.
                        "WITH dropped AS (
                     DELETE FROM bus.subscriptions WHERE name = $1 AND topic <> ALL($2::text[])
                 )
                 INSERT INTO bus.subscriptions (name, topic) SELECT $1, unnest($2::text[])
                 ON CONFLICT DO NOTHING",
                    )
                    .await?,
                &[&sub.name(), &sub.topics()],
            )
            .await?;
        tracing::info!(topics = ?sub.topics(), "subscription registered");
        Ok(())
    }

    /// Claims one batch of due deliveries and handles them. `None`: the batch was full, look
    /// again at once; otherwise how long to sleep unless notified.
    async fn claim_and_handle<F: Future>(
        &self,
        inbox: &Inbox<'_>,
        shutdown: &mut Shutdown<F>,
    ) -> Result<Option<Duration>, DbError> {
        let batch = self.claim(inbox).await?;
        let full = batch.len() as i64 == CLAIM_BATCH;
        for claimed in batch {
            if shutdown.is_done() {
                // The rest go back when their lease ends; give them back now instead.
                self.release(inbox, claimed.seq).await?;
                continue;
            }
            self.deliver(inbox, claimed).await?;
        }
        if full {
            return Ok(None);
        }
        self.next_due(inbox).await
    }

    async fn claim(&self, inbox: &Inbox<'_>) -> Result<Vec<Claimed>, DbError> {
        let sub = inbox.subscription;
        let client = self.db.primary().await?;
        let rows = client
            .query(
                &client
                    .prepare_cached(
                        "WITH due AS (
                     SELECT subscription, seq FROM bus.deliveries
                     WHERE subscription = $1 AND next_attempt_at <= now()
                     ORDER BY seq LIMIT $2
                     FOR UPDATE SKIP LOCKED
                 )
                 UPDATE bus.deliveries d
                 SET attempts = d.attempts + 1,
                     next_attempt_at = now() + make_interval(secs => $3)
                 FROM due, bus.messages m
                 WHERE d.subscription = due.subscription AND d.seq = due.seq AND m.seq = d.seq
                 RETURNING d.seq, d.attempts, m.event_id, m.topic, m.key, m.payload,
                           m.headers::text, m.created_at",
                    )
                    .await?,
                &[&sub.name(), &CLAIM_BATCH, &sub.ack_wait().as_secs_f64()],
            )
            .await?;
        let mut batch: Vec<Claimed> = rows
            .iter()
            .map(|row| Claimed {
                seq: row.get(0),
                attempts: u32::try_from(row.get::<_, i32>(1)).unwrap_or(u32::MAX),
                event: Event {
                    id: row.get(2),
                    topic: row.get(3),
                    key: row.get(4),
                    payload: row.get(5),
                    headers: headers_from_json(row.get(6)),
                    created_at: row.get(7),
                },
            })
            .collect();
        batch.sort_by_key(|claimed| claimed.seq);
        if !batch.is_empty() {
            tracing::debug!(claimed = batch.len(), "claimed deliveries");
        }
        Ok(batch)
    }

    /// Hands one claimed delivery to the handler and settles it: ack, retry later, or dead
    /// letter.
    async fn deliver(&self, inbox: &Inbox<'_>, claimed: Claimed) -> Result<(), DbError> {
        let sub = inbox.subscription;
        let Claimed {
            seq,
            attempts,
            event,
        } = claimed;
        if attempts > sub.max_attempts() {
            // The last attempt's lease ran out: the consumer died or the handler hung.
            let error = format!(
                "gave up after {} attempts; the last did not finish within the ack wait",
                sub.max_attempts()
            );
            return self
                .dead_letter(inbox, seq, &event, attempts - 1, &error)
                .await;
        }
        // The delivery is settled in the handler's own transaction.
        match inbox.handle_settling(&event, Some(seq)).await {
            Outcome::Handled | Outcome::Duplicate => Ok(()),
            Outcome::Failed(error) => {
                let permanent = matches!(error, crate::HandlerError::Permanent(_));
                if permanent || attempts >= sub.max_attempts() {
                    self.dead_letter(inbox, seq, &event, attempts, &error.to_string())
                        .await
                } else {
                    let delay = sub.backoff(attempts);
                    tracing::info!(event_id = %event.id, attempts, retry_in = ?delay, %error,
                        "handler failed; will retry");
                    self.retry_later(inbox, seq, delay, &error.to_string())
                        .await
                }
            }
        }
    }

    async fn dead_letter(
        &self,
        inbox: &Inbox<'_>,
        seq: i64,
        event: &Event,
        attempts: u32,
        error: &str,
    ) -> Result<(), DbError> {
        let name = inbox.subscription.name();
        let mut client = self.db.primary().await?;
        let tx = client.transaction().await?;
        lock_message(&tx, seq).await?;
        dead_letters::record(&*tx, name, event, attempts, error).await?;
        settle(&tx, name, seq).await?;
        tx.commit().await?;
        dead_letters::log_dead(name, event, attempts, error);
        Ok(())
    }

    async fn retry_later(
        &self,
        inbox: &Inbox<'_>,
        seq: i64,
        delay: Duration,
        error: &str,
    ) -> Result<(), DbError> {
        let client = self.db.primary().await?;
        client
            .execute(
                &client
                    .prepare_cached(
                        "UPDATE bus.deliveries
                 SET next_attempt_at = now() + make_interval(secs => $3), last_error = $4
                 WHERE subscription = $1 AND seq = $2",
                    )
                    .await?,
                &[
                    &inbox.subscription.name(),
                    &seq,
                    &delay.as_secs_f64(),
                    &error,
                ],
            )
            .await?;
        Ok(())
    }

    /// Gives a claimed delivery back untried (at shutdown).
    async fn release(&self, inbox: &Inbox<'_>, seq: i64) -> Result<(), DbError> {
        let client = self.db.primary().await?;
        client
            .execute(
                &client
                    .prepare_cached(
                        "UPDATE bus.deliveries SET attempts = attempts - 1, next_attempt_at = now()
                 WHERE subscription = $1 AND seq = $2",
                    )
                    .await?,
                &[&inbox.subscription.name(), &seq],
            )
            .await?;
        Ok(())
    }

    /// How long until the subscription's next delivery is due, at most [`IDLE_MAX`]; `None`
    /// if one is due now.
    async fn next_due(&self, inbox: &Inbox<'_>) -> Result<Option<Duration>, DbError> {
        let client = self.db.primary().await?;
        let row = client
            .query_one(
                &client
                    .prepare_cached(
                        "SELECT extract(epoch FROM min(next_attempt_at) - now())::float8
                 FROM bus.deliveries WHERE subscription = $1",
                    )
                    .await?,
                &[&inbox.subscription.name()],
            )
            .await?;
        Ok(match row.get::<_, Option<f64>>(0) {
            Some(secs) if secs <= 0.0 => None,
            Some(secs) => Some(Duration::from_secs_f64(secs).min(IDLE_MAX)),
            None => Some(IDLE_MAX),
        })
    }
}

/// Locks message `seq`, so acks of several subscriptions take turns deciding whether the
/// message is fully delivered (each then sees the others' committed deletes).
async fn lock_message(tx: &deadpool_postgres::Transaction<'_>, seq: i64) -> Result<(), DbError> {
    tx.query_opt(
        &tx.prepare_cached("SELECT 1 FROM bus.messages WHERE seq = $1 FOR UPDATE")
            .await?,
        &[&seq],
    )
    .await?;
    Ok(())
}

/// Deletes `subscription`'s delivery of `seq`, and the message if it was the last one.
pub(crate) async fn settle(
    tx: &deadpool_postgres::Transaction<'_>,
    subscription: &str,
    seq: i64,
) -> Result<(), DbError> {
    lock_message(tx, seq).await?;
    tx.execute(
        &tx.prepare_cached("DELETE FROM bus.deliveries WHERE subscription = $1 AND seq = $2")
            .await?,
        &[&subscription, &seq],
    )
    .await?;
    tx.execute(
        &tx.prepare_cached(
            "DELETE FROM bus.messages m WHERE m.seq = $1
         AND NOT EXISTS (SELECT 1 FROM bus.deliveries d WHERE d.seq = $1)",
        )
        .await?,
        &[&seq],
    )
    .await?;
    Ok(())
}

/// Moves a dead letter back into the bus for its subscription, in one transaction on `db`.
pub(crate) async fn replay(db: &Db, subscription: &str, event_id: Uuid) -> Result<(), BusError> {
    let mut client = db.primary().await?;
    let tx = client.transaction().await?;
    let seq: Option<i64> = tx
        .query_opt(
            &tx.prepare_cached(
                "WITH dead AS (
                 DELETE FROM bus.dead_letters WHERE subscription = $1 AND event_id = $2
                 RETURNING event_id, topic, key, payload, headers, created_at
             )
             INSERT INTO bus.messages (event_id, topic, key, payload, headers, created_at)
             SELECT event_id, topic, key, payload, headers, created_at FROM dead
             ON CONFLICT (event_id) DO UPDATE SET event_id = EXCLUDED.event_id
             RETURNING seq",
            )
            .await?,
            &[&subscription, &event_id],
        )
        .await?
        .map(|row| row.get(0));
    let Some(seq) = seq else {
        return Err(BusError::NotFound {
            subscription: subscription.to_owned(),
            event_id,
        });
    };
    tx.execute(
        &tx.prepare_cached(
            "INSERT INTO bus.deliveries (subscription, seq) VALUES ($1, $2)
         ON CONFLICT (subscription, seq) DO UPDATE
         SET attempts = 0, next_attempt_at = now(), last_error = NULL",
        )
        .await?,
        &[&subscription, &seq],
    )
    .await?;
    tx.execute(
        &tx.prepare_cached("SELECT pg_notify($1, $2)").await?,
        &[&CHANNEL, &subscription],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}
