//! Idempotent consumers: a subscription, the handler it runs, and the loop that feeds it.
//!
//! Each event is handled in one transaction on the consumer's database that first inserts
//! `(subscription, event id)` into the consumer's inbox. If the insert conflicts, the event
//! was handled before (the bus redelivered it after a crash between commit and ack), so the
//! handler is skipped and the event acked. A failed handler rolls the transaction back (no
//! inbox row) and the event is retried with exponential backoff, then dead-lettered.

use std::{collections::HashMap, fmt, future::Future, sync::Arc, time::Duration};

use tokio_postgres::error::SqlState;
use tracing::Instrument;
use waybill_runtime::{Db, DbError, purge::delete_in_batches};

use crate::{
    Event,
    bus::{Bus, BusInner},
    outbox::check_schema,
    shutdown::Shutdown,
};

/// What went wrong in a handler, and whether trying again can help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// A transient failure (a dependency down, a conflict): retried with backoff until the
    /// subscription's attempts run out.
    #[error("{0}")]
    Retry(String),
    /// The event can never be handled as it is (it does not decode, it breaks a rule):
    /// dead-lettered at once.
    #[error("{0}")]
    Permanent(String),
}

impl From<DbError> for HandlerError {
    fn from(error: DbError) -> Self {
        HandlerError::Retry(error.to_string())
    }
}

impl From<tokio_postgres::Error> for HandlerError {
    fn from(error: tokio_postgres::Error) -> Self {
        DbError::from(error).into()
    }
}

impl From<prost::DecodeError> for HandlerError {
    fn from(error: prost::DecodeError) -> Self {
        HandlerError::Permanent(format!("payload does not decode: {error}"))
    }
}

/// What a consumer does with each event.
#[tonic::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handles `event` inside `tx`, the transaction that also records it in the inbox: write
    /// the consequences through `tx` and they commit together with the inbox row, or not at
    /// all. Do not commit or roll back `tx` yourself.
    async fn handle(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        event: &Event,
    ) -> Result<(), HandlerError>;
}

/// A named interest in topics, with its retry policy. The name identifies the consumer group:
/// every process running a consumer of the same subscription shares its events.
#[derive(Clone, Debug)]
pub struct Subscription {
    name: String,
    topics: Vec<String>,
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    ack_wait: Duration,
}

/// A subscription name or topic that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid subscription: {0}")]
pub struct InvalidSubscription(String);

impl Subscription {
    /// Attempts per event before it is dead-lettered, by default.
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
    /// The first retry delay, by default; each further one doubles.
    pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_secs(1);
    /// The longest retry delay, by default.
    pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(60);
    /// How long a consumer may work on one event before the bus gives it to another, by
    /// default.
    pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);

    /// A subscription `name` (letters, digits, `-`, `_`; it names a NATS durable consumer) to
    /// `topics` (lowercase `service.event` names), with the default retry policy.
    pub fn new<T: Into<String>>(
        name: impl Into<String>,
        topics: impl IntoIterator<Item = T>,
    ) -> Result<Self, InvalidSubscription> {
        let name = name.into();
        let valid_name = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid_name {
            return Err(InvalidSubscription(format!(
                "name {name:?} must be 1 to 64 letters, digits, '-' or '_'"
            )));
        }
        let mut topics: Vec<String> = topics.into_iter().map(Into::into).collect();
        topics.sort();
        topics.dedup();
        if topics.is_empty() {
            return Err(InvalidSubscription(format!("{name} names no topic")));
        }
        if let Some(bad) = topics.iter().find(|topic| !is_topic(topic)) {
            return Err(InvalidSubscription(format!(
                "topic {bad:?} must be dot-separated lowercase words, like orders.order_confirmed"
            )));
        }
        Ok(Self {
            name,
            topics,
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
            initial_backoff: Self::DEFAULT_INITIAL_BACKOFF,
            max_backoff: Self::DEFAULT_MAX_BACKOFF,
            ack_wait: Self::DEFAULT_ACK_WAIT,
        })
    }

    /// Sets the attempts per event (at least 1) before it is dead-lettered.
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Sets the retry delays: `initial` after the first failure, doubling up to `max`
    /// (raised to `initial` if lower).
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }

    /// Sets how long one attempt may take (at least 1 s) before the bus assumes the consumer
    /// died and delivers the event again.
    pub fn with_ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait.max(Duration::from_secs(1));
        self
    }

    /// The subscription's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its topics, sorted.
    pub fn topics(&self) -> &[String] {
        &self.topics
    }

    /// Attempts per event before dead-lettering.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// How long one attempt may take before the event is delivered again.
    pub fn ack_wait(&self) -> Duration {
        self.ack_wait
    }

    /// The delay before the attempt after attempt `attempt` (1-based) failed.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.initial_backoff
            .saturating_mul(1 << doublings)
            .min(self.max_backoff)
    }
}

fn is_topic(topic: &str) -> bool {
    topic.split('.').all(|word| {
        !word.is_empty()
            && word
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    })
}

/// Runs a subscription's handler over the events the bus delivers to it.
pub struct Consumer {
    db: Db,
    bus: Bus,
    inbox_schema: &'static str,
    subscription: Subscription,
    handler: Arc<dyn Handler>,
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("inbox_schema", &self.inbox_schema)
            .field("subscription", &self.subscription)
            .finish_non_exhaustive()
    }
}

impl Consumer {
    /// A consumer that handles `subscription`'s events with `handler` in transactions on `db`,
    /// recording them in `<inbox_schema>.inbox` (see [`crate::INBOX_TABLE_SQL`]).
    ///
    /// Fails only if `inbox_schema` is not a plain lowercase identifier.
    pub fn new(
        db: Db,
        bus: Bus,
        inbox_schema: &'static str,
        subscription: Subscription,
        handler: impl Handler,
    ) -> Result<Self, DbError> {
        check_schema(inbox_schema)?;
        Ok(Self {
            db,
            bus,
            inbox_schema,
            subscription,
            handler: Arc::new(handler),
        })
    }

    /// Registers the subscription with the bus ([`Bus::register`]) before the process serves
    /// or relays anything, trying a few times over about two seconds. If the bus is still
    /// unreachable, it says so and returns: [`Consumer::run`] registers again and retries for
    /// as long as it takes, and a process that will not start helps nobody.
    pub async fn register(&self) {
        let mut delay = std::time::Duration::from_millis(100);
        for attempt in 1..=5 {
            match self.bus.register(&self.subscription).await {
                Ok(()) => {
                    tracing::info!(subscription = %self.subscription.name(), topics = ?self.subscription.topics(),
                        "subscription registered before serving");
                    return;
                }
                Err(error) if attempt == 5 => {
                    tracing::warn!(subscription = %self.subscription.name(), %error,
                        "cannot register the subscription before serving; the consumer keeps trying");
                }
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
    }

    /// Registers the subscription with the bus and handles its events until `shutdown`
    /// completes (the event in hand is finished first). Database and bus failures are logged
    /// and retried with backoff; this returns only on shutdown.
    pub async fn run(self, shutdown: impl Future) {
        // For logs only: a trace that lasted as long as the process would never be exported.
        // Each event gets a span of its own (see `Inbox::handle_settling`).
        let span = tracing::info_span!(target: waybill_runtime::telemetry::BACKGROUND, "consumer",
            subscription = %self.subscription.name());
        async {
            let mut shutdown = Shutdown::new(shutdown);
            let inbox = Inbox {
                db: &self.db,
                schema: self.inbox_schema,
                subscription: &self.subscription,
                handler: self.handler.as_ref(),
                bus: match self.bus.kind() {
                    crate::BusKind::Postgres => "postgresql",
                    crate::BusKind::Nats => "nats",
                },
            };
            let consume = async {
                match &self.bus.inner {
                    BusInner::Postgres(pg) => pg.consume(&inbox, &mut shutdown).await,
                    BusInner::Nats(nats) => nats.consume(&inbox, &mut shutdown).await,
                }
            };
            // The purge never ends by itself; the consumer stops at shutdown.
            tokio::select! {
                () = consume => {}
                () = purge_inbox_forever(
                    &self.db,
                    self.inbox_schema,
                    self.subscription.name(),
                    self.bus.inbox_retention,
                ) => {}
            }
            tracing::info!("consumer stopped");
        }
        .instrument(span)
        .await;
    }
}

/// Inbox rows deleted per statement: short statements, so handlers never wait behind one.
const INBOX_PURGE_BATCH: i64 = 1_000;

/// Deletes `subscription`'s inbox rows older than `retention`, in batches, for the life of the
/// consumer: without it the inbox grows by a row per event forever. A purged event delivered
/// again would be handled again, which is why the retention must outlast the bus's
/// redeliveries.
async fn purge_inbox_forever(db: &Db, schema: &str, subscription: &str, retention: Duration) {
    // Often enough that a short retention is honoured; never more than every ten minutes.
    let every = (retention / 2).clamp(Duration::from_millis(200), Duration::from_secs(600));
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let statement = format!(
        "DELETE FROM {schema}.inbox WHERE ctid = ANY(ARRAY(
             SELECT ctid FROM {schema}.inbox
             WHERE subscription = $1 AND received_at < now() - make_interval(secs => $2)
             LIMIT $3))"
    );
    let statement = &statement;
    loop {
        ticker.tick().await;
        let (purged, error) = delete_in_batches(INBOX_PURGE_BATCH.unsigned_abs(), || async move {
            let client = db.primary().await?;
            let batch = INBOX_PURGE_BATCH;
            Ok(client
                .execute(
                    statement,
                    &[&subscription, &retention.as_secs_f64(), &batch],
                )
                .await?)
        })
        .await;
        if let Some(error) = error {
            tracing::warn!(%error, "purging the inbox failed; trying again next sweep");
        }
        if purged > 0 {
            tracing::info!(purged, ?retention, "purged inbox rows past retention");
        }
    }
}

/// What every bus needs to hand an event to the handler through the inbox.
pub(crate) struct Inbox<'a> {
    pub(crate) db: &'a Db,
    pub(crate) schema: &'static str,
    pub(crate) subscription: &'a Subscription,
    pub(crate) handler: &'a dyn Handler,
    /// The bus's name in spans (`messaging.system`).
    pub(crate) bus: &'static str,
}

/// What became of one delivery of an event.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The handler ran and its transaction committed with the inbox row.
    Handled,
    /// The inbox already had the event: handled before, skipped now.
    Duplicate,
    /// The handler (or the database) failed; nothing was committed.
    Failed(HandlerError),
}

impl Inbox<'_> {
    /// Handles `event` once: the inbox insert and the handler in one transaction.
    pub(crate) async fn handle(&self, event: &Event) -> Outcome {
        self.handle_settling(event, None).await
    }

    /// [`Self::handle`], and when it is handled (or was before), also removes the Postgres
    /// bus's delivery `seq` in the same transaction: one commit per event instead of two.
    ///
    /// Each delivery is a consumer span, a child of the span that appended the event to the
    /// outbox (its `traceparent` header), so a trace continues across the bus (see
    /// docs/tracing.md for why a child and not a link). An event without one starts a trace.
    pub(crate) async fn handle_settling(&self, event: &Event, settle: Option<i64>) -> Outcome {
        let span = self.span(event);
        let outcome = match self
            .try_handle(event, settle)
            .instrument(span.clone())
            .await
        {
            Ok(Ok(true)) => Outcome::Handled,
            Ok(Ok(false)) => Outcome::Duplicate,
            Ok(Err(error)) => Outcome::Failed(error),
            Err(error) => Outcome::Failed(HandlerError::Retry(error.to_string())),
        };
        self.record(&span, &outcome);
        outcome
    }

    /// Puts `outcome` on the delivery's span and in the consumer's counter.
    fn record(&self, span: &tracing::Span, outcome: &Outcome) {
        let name = match outcome {
            Outcome::Handled => "handled",
            Outcome::Duplicate => "duplicate",
            Outcome::Failed(error) => {
                span.record("otel.status_code", "ERROR");
                // The bus logs the failure with what it does next; this is the span's event.
                tracing::debug!(parent: span, %error, "handler failed");
                "failed"
            }
        };
        span.record("waybill.event.outcome", name);
        waybill_runtime::metrics::consumer_outcome(self.subscription.name(), name);
    }

    /// Handles a batch of events in one transaction: one commit for the batch. With the
    /// Postgres bus each comes with its delivery's `seq`, settled in that transaction when
    /// the event is handled (or was before); the NATS bus passes `None` and acks after.
    ///
    /// Each handler runs under a savepoint, sent pipelined ahead of its first statement, so a
    /// failing handler is rolled back alone: its delivery stays unsettled, its inbox row is
    /// removed, and it is returned as [`Outcome::Failed`] for the caller to retry or dead
    /// letter, while the others commit. No handler runs twice for one claim (a webhook sent
    /// by the handler of a neighbouring event is not sent again). `None` when the transaction
    /// itself failed: nothing of the batch committed.
    pub(crate) async fn handle_batch(
        &self,
        batch: &[(Option<i64>, &Event)],
    ) -> Option<Vec<Outcome>> {
        let spans: Vec<tracing::Span> = batch.iter().map(|(_, event)| self.span(event)).collect();
        let name = self.subscription.name();
        let outcomes = async {
            let mut client = self.db.primary().await?;
            let tx = client.transaction().await?;
            let ids: Vec<uuid::Uuid> = batch.iter().map(|(_, event)| event.id).collect();
            let mut fresh: std::collections::HashSet<uuid::Uuid> = tx
                .query(
                    &tx.prepare_cached(&format!(
                        "INSERT INTO {}.inbox (subscription, event_id)
                         -- In id order: two consumers inserting the same events in different
                         -- orders would deadlock.
                         SELECT $1::text, id FROM unnest($2::uuid[]) AS id ORDER BY id
                         ON CONFLICT DO NOTHING
                         RETURNING event_id",
                        self.schema
                    ))
                    .await?,
                    &[&name, &ids],
                )
                .await?
                .iter()
                .map(|row| row.try_get(0))
                .collect::<Result<_, _>>()?;
            let mut outcomes = Vec::with_capacity(batch.len());
            let mut settled = Vec::with_capacity(batch.len());
            let mut failed: HashMap<uuid::Uuid, HandlerError> = HashMap::new();
            for ((seq, event), span) in batch.iter().zip(&spans) {
                // Taken out when handled: an event twice in one batch (a redelivery next to
                // its original) is inserted once, and its second copy shares the first's
                // fate: a duplicate if it was handled, a failure (to retry) if it failed.
                if !fresh.remove(&event.id) {
                    outcomes.push(match failed.get(&event.id) {
                        Some(error) => Outcome::Failed(error.clone()),
                        None => {
                            settled.extend(*seq);
                            Outcome::Duplicate
                        }
                    });
                    continue;
                }
                let handle = tracing::debug_span!(parent: span, "events.handle",
                    otel.kind = "client", db.system = "postgresql",
                    db.operation.name = "handle");
                let (savepoint, handled) = tokio::join!(
                    biased;
                    tx.batch_execute("SAVEPOINT handler"),
                    self.handler.handle(&tx, event).instrument(handle),
                );
                savepoint?;
                match handled {
                    Ok(()) => {
                        outcomes.push(Outcome::Handled);
                        settled.extend(*seq);
                    }
                    Err(error) => {
                        tx.batch_execute("ROLLBACK TO SAVEPOINT handler").await?;
                        failed.insert(event.id, error.clone());
                        outcomes.push(Outcome::Failed(error));
                    }
                }
            }
            let failed_any = !failed.is_empty();
            if failed_any {
                let failed: Vec<uuid::Uuid> = failed.into_keys().collect();
                tx.execute(
                    &tx.prepare_cached(&format!(
                        "DELETE FROM {}.inbox WHERE subscription = $1 AND event_id = ANY($2)",
                        self.schema
                    ))
                    .await?,
                    &[&name, &failed],
                )
                .await?;
            }
            if !settled.is_empty() {
                crate::bus::postgres::settle(&tx, name, &settled).await?;
            } else if !failed_any {
                // Nothing of ours ran after the handlers (the NATS bus) to find an aborted
                // transaction; the inbox DELETE above, when it ran, did.
                expect_open(&tx).await?;
            }
            tx.commit().await?;
            Ok::<_, DbError>(outcomes)
        }
        .await;
        let outcomes = match outcomes {
            Ok(outcomes) => outcomes,
            Err(error) => {
                tracing::debug!(%error, "a batch of deliveries failed; they go one by one");
                return None;
            }
        };
        for (outcome, span) in outcomes.iter().zip(&spans) {
            self.record(span, outcome);
        }
        Some(outcomes)
    }

    /// The span of one delivery of `event` (OpenTelemetry's messaging conventions).
    fn span(&self, event: &Event) -> tracing::Span {
        use tracing_opentelemetry::OpenTelemetrySpanExt;

        let span = tracing::debug_span!(
            "event",
            otel.name = tracing::field::Empty,
            otel.kind = "consumer",
            otel.status_code = tracing::field::Empty,
            messaging.system = self.bus,
            messaging.operation.type = "process",
            messaging.operation.name = "process",
            messaging.destination.name = event.topic.as_str(),
            messaging.consumer.group.name = self.subscription.name(),
            messaging.message.id = tracing::field::display(event.id),
            waybill.event.key = event.key.as_str(),
            waybill.event.outcome = tracing::field::Empty,
        );
        if !span.is_disabled() {
            span.record("otel.name", format!("process {}", event.topic));
            let _ = span.set_parent(crate::event::trace_context(&event.headers));
        }
        span
    }

    #[tracing::instrument(name = "events.handle", level = "debug", skip_all, fields(
        otel.kind = "client", db.system = "postgresql", db.operation.name = "handle",
        db.namespace, waybill.db.role))]
    async fn try_handle(
        &self,
        event: &Event,
        settle: Option<i64>,
    ) -> Result<Result<bool, HandlerError>, DbError> {
        let mut client = self.db.primary().await?;
        let tx = client.transaction().await?;
        let inserted = tx
            .execute(
                &tx.prepare_cached(&format!(
                    "INSERT INTO {}.inbox (subscription, event_id) VALUES ($1, $2)
                     ON CONFLICT DO NOTHING",
                    self.schema
                ))
                .await?,
                &[&self.subscription.name(), &event.id],
            )
            .await?;
        if inserted == 0 {
            if let Some(seq) = settle {
                crate::bus::postgres::settle(&tx, self.subscription.name(), &[seq]).await?;
                tx.commit().await?;
            } else {
                tx.rollback().await?;
            }
            return Ok(Ok(false));
        }
        match self.handler.handle(&tx, event).await {
            Ok(()) => {
                let checked = match settle {
                    Some(seq) => {
                        crate::bus::postgres::settle(&tx, self.subscription.name(), &[seq]).await
                    }
                    None => expect_open(&tx).await,
                };
                match checked {
                    Ok(()) => {}
                    // A statement of the handler failed and the handler hid it.
                    Err(error)
                        if error.sqlstate() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION) =>
                    {
                        tx.rollback().await?;
                        return Ok(Err(HandlerError::Retry(format!(
                            "the handler returned success but its transaction had failed: {error}"
                        ))));
                    }
                    // The database's own failure (the transaction rolls back when dropped).
                    Err(error) => return Err(error),
                }
                tx.commit().await?;
                Ok(Ok(true))
            }
            Err(error) => {
                tx.rollback().await?;
                Ok(Err(error))
            }
        }
    }
}

/// Fails if a statement of `tx` failed: a handler that caught a database error and returned
/// success leaves its transaction aborted, and COMMIT then rolls back without an error, so the
/// event would be acked as handled with nothing of it stored. Needed only where no statement
/// of ours follows the handlers (with the Postgres bus, settling them finds it).
async fn expect_open(tx: &tokio_postgres::Transaction<'_>) -> Result<(), DbError> {
    tx.batch_execute("SELECT 1").await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn names_and_topics_are_checked() {
        assert!(Subscription::new("notifications", ["orders.order_confirmed"]).is_ok());
        assert!(Subscription::new("a.b", ["orders.x"]).is_err());
        assert!(Subscription::new("", ["orders.x"]).is_err());
        assert!(Subscription::new("n", Vec::<String>::new()).is_err());
        assert!(Subscription::new("n", ["orders.>"]).is_err());
        assert!(Subscription::new("n", ["orders..x"]).is_err());
        assert!(Subscription::new("n", ["Orders.x"]).is_err());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let sub = Subscription::new("n", ["t.x"])
            .unwrap()
            .with_backoff(Duration::from_millis(100), Duration::from_millis(500));
        assert_eq!(sub.backoff(1), Duration::from_millis(100));
        assert_eq!(sub.backoff(2), Duration::from_millis(200));
        assert_eq!(sub.backoff(3), Duration::from_millis(400));
        assert_eq!(sub.backoff(4), Duration::from_millis(500));
        assert_eq!(sub.backoff(400), Duration::from_millis(500));
        assert_eq!(sub.with_max_attempts(0).max_attempts(), 1);
    }
}
