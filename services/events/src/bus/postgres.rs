//! The Postgres bus: `bus.messages`, fanned out to `bus.deliveries` at publish time, claimed
//! by consumers with `FOR UPDATE SKIP LOCKED` under a lease, woken by NOTIFY on
//! [`CHANNEL`] (payload: the subscription's name).

use std::time::Duration;

use uuid::Uuid;
use waybill_runtime::{Db, DbError, pipeline::pipeline};

use crate::{
    Event,
    bus::BusError,
    consumer::{Inbox, Outcome, Subscription},
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

/// Moves up to `limit` outbox rows of `schema` into the bus, in one statement (its own
/// transaction): one message per event whose topic has subscriptions, one delivery per
/// subscription, and a notification per subscription that got any. Returns the rows moved,
/// or `None` when another relay holds the schema's advisory lock `lock_key` and is moving.
pub(crate) async fn move_outbox(
    client: &impl deadpool_postgres::GenericClient,
    schema: &str,
    limit: i64,
    lock_key: &str,
) -> Result<Option<u64>, DbError> {
    // Events of topics nobody subscribes to are dropped: a subscription gets what is
    // published after it first registered. The lock is taken (or not) before anything is
    // read, and held until the statement's transaction ends.
    let statement = format!(
        "WITH lock AS (
             SELECT pg_try_advisory_xact_lock(hashtext($2)) AS held
         ), moved AS (
             DELETE FROM {schema}.outbox
             WHERE (SELECT held FROM lock)
               AND id IN (SELECT id FROM {schema}.outbox ORDER BY id LIMIT $1
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
         SELECT (SELECT held FROM lock), (SELECT count(*) FROM moved),
                (SELECT count(*) FROM notified)"
    );
    let row = client
        .query_one(
            &client.prepare_cached(&statement).await?,
            &[&limit, &lock_key],
        )
        .await?;
    if !row.try_get::<_, bool>(0)? {
        return Ok(None);
    }
    Ok(Some(u64::try_from(row.try_get::<_, i64>(1)?).unwrap_or(0)))
}

impl PgBus {
    /// Runs `inbox`'s subscription until shutdown.
    pub(crate) async fn consume<F: Future>(&self, inbox: &Inbox<'_>, shutdown: &mut Shutdown<F>) {
        let subscription = inbox.subscription;
        let mut delay = FAILURE_FIRST;
        while let Err(error) = self.register(subscription).await {
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

    /// Records `sub`'s topics in `bus.subscriptions`: from then on the relay fans their events
    /// out to it. Idempotent.
    pub(crate) async fn register(&self, sub: &Subscription) -> Result<(), DbError> {
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
        let (batch, later) = self.claim(inbox).await?;
        let full = batch.len() as i64 == CLAIM_BATCH;
        // Deadlines, fixed when each delay is learnt: handling the batch takes time too.
        let mut wake_at = tokio::time::Instant::now()
            + match later {
                Some(secs) => Duration::try_from_secs_f64(secs.max(0.0))
                    .unwrap_or(IDLE_MAX)
                    .min(IDLE_MAX),
                None => IDLE_MAX,
            };
        let max_attempts = inbox.subscription.max_attempts();
        let (expired, due): (Vec<Claimed>, Vec<Claimed>) = batch
            .into_iter()
            .partition(|claimed| claimed.attempts > max_attempts);
        for claimed in expired {
            self.give_up(inbox, claimed).await?;
        }
        for (claimed, outcome) in self.handle_all(inbox, shutdown, due).await? {
            if let Outcome::Failed(error) = outcome
                && let Some(retry_in) = self.after_failure(inbox, claimed, error).await?
            {
                wake_at = wake_at.min(tokio::time::Instant::now() + retry_in);
            }
        }
        if full {
            return Ok(None);
        }
        // Everything due was claimed: what is left waits for its retry time (or is held by
        // another consumer, which settles it); new deliveries come with a NOTIFY.
        Ok(Some(
            wake_at.saturating_duration_since(tokio::time::Instant::now()),
        ))
    }

    /// Claims up to a batch of due deliveries under a lease, and says in how many seconds the
    /// earliest delivery not yet due will be (`None`: there is none), in one statement.
    async fn claim(&self, inbox: &Inbox<'_>) -> Result<(Vec<Claimed>, Option<f64>), DbError> {
        let sub = inbox.subscription;
        let client = self.db.primary().await?;
        // `later` always yields its one row, so the answer has a row even when nothing was
        // claimed; claimed deliveries come as further columns of rows joined to it.
        let rows = client
            .query(
                &client
                    .prepare_cached(
                        "WITH due AS (
                     SELECT subscription, seq FROM bus.deliveries
                     WHERE subscription = $1 AND next_attempt_at <= now()
                     ORDER BY seq LIMIT $2
                     FOR UPDATE SKIP LOCKED
                 ), claimed AS (
                     UPDATE bus.deliveries d
                     SET attempts = d.attempts + 1,
                         next_attempt_at = now() + make_interval(secs => $3)
                     FROM due, bus.messages m
                     WHERE d.subscription = due.subscription AND d.seq = due.seq AND m.seq = d.seq
                     RETURNING d.seq, d.attempts, m.event_id, m.topic, m.key, m.payload,
                               m.headers::text AS headers, m.created_at
                 ), later AS (
                     SELECT extract(epoch FROM min(next_attempt_at) - now())::float8 AS secs
                     FROM bus.deliveries WHERE subscription = $1 AND next_attempt_at > now()
                 )
                 SELECT later.secs, c.seq, c.attempts, c.event_id, c.topic, c.key, c.payload,
                        c.headers, c.created_at
                 FROM later LEFT JOIN claimed c ON true",
                    )
                    .await?,
                &[&sub.name(), &CLAIM_BATCH, &sub.ack_wait().as_secs_f64()],
            )
            .await?;
        let later: Option<f64> = match rows.first() {
            Some(row) => row.try_get(0)?,
            None => None,
        };
        let mut batch: Vec<Claimed> = rows
            .iter()
            .filter(|row| row.get::<_, Option<i64>>(1).is_some())
            .map(|row| Claimed {
                seq: row.get(1),
                attempts: u32::try_from(row.get::<_, i32>(2)).unwrap_or(u32::MAX),
                event: Event {
                    id: row.get(3),
                    topic: row.get(4),
                    key: row.get(5),
                    payload: row.get(6),
                    headers: headers_from_json(row.get(7)),
                    created_at: row.get(8),
                },
            })
            .collect();
        batch.sort_by_key(|claimed| claimed.seq);
        if !batch.is_empty() {
            tracing::debug!(claimed = batch.len(), "claimed deliveries");
        }
        Ok((batch, later))
    }

    /// Handles `due` in one transaction, one commit for all of it. If that transaction fails
    /// as a whole (the database, not a handler), the deliveries go one at a time, each in a
    /// transaction of its own, so that one cannot hold the others back. At shutdown, what is
    /// not handled yet is given back untried.
    async fn handle_all<F: Future>(
        &self,
        inbox: &Inbox<'_>,
        shutdown: &mut Shutdown<F>,
        due: Vec<Claimed>,
    ) -> Result<Vec<(Claimed, Outcome)>, DbError> {
        if due.is_empty() {
            return Ok(Vec::new());
        }
        if !shutdown.is_done() {
            let batch: Vec<(Option<i64>, &Event)> = due
                .iter()
                .map(|claimed| (Some(claimed.seq), &claimed.event))
                .collect();
            if let Some(outcomes) = inbox.handle_batch(&batch).await {
                return Ok(due.into_iter().zip(outcomes).collect());
            }
        }
        let mut handled = Vec::with_capacity(due.len());
        for claimed in due {
            if shutdown.is_done() {
                // They would go back when their lease ends; give them back now instead.
                self.release(inbox, claimed.seq).await?;
                continue;
            }
            // The delivery is settled in the handler's own transaction.
            let outcome = inbox
                .handle_settling(&claimed.event, Some(claimed.seq))
                .await;
            handled.push((claimed, outcome));
        }
        Ok(handled)
    }

    /// Dead-letters a delivery claimed again after its last attempt: that attempt's lease ran
    /// out (the consumer died or the handler hung).
    async fn give_up(&self, inbox: &Inbox<'_>, claimed: Claimed) -> Result<(), DbError> {
        let max_attempts = inbox.subscription.max_attempts();
        let error = format!(
            "gave up after {max_attempts} attempts; the last did not finish within the ack wait"
        );
        self.dead_letter(
            inbox,
            claimed.seq,
            &claimed.event,
            claimed.attempts - 1,
            &error,
        )
        .await
    }

    /// What follows a failed handling of a claimed delivery: a retry after its backoff (the
    /// delay is returned), or the dead letter when the failure is permanent or the attempts
    /// are used up.
    async fn after_failure(
        &self,
        inbox: &Inbox<'_>,
        claimed: Claimed,
        error: crate::HandlerError,
    ) -> Result<Option<Duration>, DbError> {
        let sub = inbox.subscription;
        let Claimed {
            seq,
            attempts,
            event,
        } = claimed;
        let permanent = matches!(error, crate::HandlerError::Permanent(_));
        if permanent || attempts >= sub.max_attempts() {
            self.dead_letter(inbox, seq, &event, attempts, &error.to_string())
                .await?;
            Ok(None)
        } else {
            let delay = sub.backoff(attempts);
            tracing::info!(event_id = %event.id, attempts, retry_in = ?delay, %error,
                "handler failed; will retry");
            self.retry_later(inbox, seq, delay, &error.to_string())
                .await?;
            Ok(Some(delay))
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
        dead_letters::record(&*tx, name, event, attempts, error).await?;
        settle(&tx, name, &[seq]).await?;
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
            .query(
                &client
                    .prepare_cached(
                        // With a NOTIFY, so another consumer of the subscription, which
                        // may have gone to sleep past this delivery, takes it now.
                        "WITH released AS (
                     UPDATE bus.deliveries SET attempts = attempts - 1, next_attempt_at = now()
                     WHERE subscription = $1 AND seq = $2
                     RETURNING subscription
                 )
                 SELECT pg_notify($3, subscription) FROM released",
                    )
                    .await?,
                &[&inbox.subscription.name(), &seq, &CHANNEL],
            )
            .await?;
        Ok(())
    }
}

/// Deletes `subscription`'s deliveries of `seqs`, and each message whose last delivery that
/// was.
///
/// The three statements go out pipelined (one round trip), yet run in order, each with a
/// snapshot of its own: the last one sees deliveries another subscription deleted while this
/// one waited for the message locks, which every subscription takes in `seq` order.
pub(crate) async fn settle(
    tx: &deadpool_postgres::Transaction<'_>,
    subscription: &str,
    seqs: &[i64],
) -> Result<(), DbError> {
    pipeline(
        tx,
        &[
            (
                "SELECT 1 FROM bus.messages WHERE seq = ANY($1) ORDER BY seq FOR UPDATE",
                &[&seqs],
            ),
            (
                "DELETE FROM bus.deliveries WHERE subscription = $1 AND seq = ANY($2)",
                &[&subscription, &seqs],
            ),
            (
                "DELETE FROM bus.messages m WHERE m.seq = ANY($1)
                 AND NOT EXISTS (SELECT 1 FROM bus.deliveries d WHERE d.seq = m.seq)",
                &[&seqs],
            ),
        ],
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
