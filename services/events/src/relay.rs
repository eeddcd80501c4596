//! The relay: moves committed outbox rows of one schema to the bus, in id order.
//!
//! It sleeps until the outbox's NOTIFY (sent at commit by [`crate::outbox::append`]) or a
//! slow fallback sweep, then moves batches until the outbox is empty. An idle relay runs no
//! query but the sweep.
//!
//! Several relay processes may run (one per replica of the service); a transaction-scoped
//! advisory lock per schema lets one move at a time, so the bus receives events in outbox
//! order, and the others take over when it goes. `FOR UPDATE SKIP LOCKED` keeps a relay
//! off rows another one is moving regardless.

use std::{future::Future, time::Duration};

use tracing::Instrument;
use waybill_runtime::{Db, DbError};

use crate::{
    Event,
    bus::{Bus, BusError, BusInner, nats::NatsBus, postgres},
    event::headers_from_json,
    listen::Listener,
    outbox::{channel, check_schema},
    shutdown::Shutdown,
};

const FAILURE_FIRST: Duration = Duration::from_millis(200);
const FAILURE_MAX: Duration = Duration::from_secs(10);
/// How often the outbox's backlog and the age of its oldest event are sampled for metrics.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// Moves woken by a notification start at least this long apart: under load one move then
/// carries every event committed meanwhile instead of one commit per event, while an idle
/// relay still moves the moment an event commits.
const GATHER: Duration = Duration::from_millis(5);

/// Moves one schema's outbox to the bus.
pub struct Relay {
    db: Db,
    schema: &'static str,
    /// The advisory lock that lets one relay at a time move this schema's outbox.
    lock_key: String,
    bus: Bus,
    batch_size: u32,
    sweep_interval: Duration,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("schema", &self.schema)
            .field("bus", &self.bus)
            .field("batch_size", &self.batch_size)
            .field("sweep_interval", &self.sweep_interval)
            .finish_non_exhaustive()
    }
}

/// What one move did.
enum Moved {
    /// Moved this many rows (a full batch means: look again at once).
    Rows(u64),
    /// Another relay holds the schema's lock; it will move what there is.
    Busy,
}

impl Relay {
    /// Rows moved per transaction, by default.
    pub const DEFAULT_BATCH_SIZE: u32 = 256;
    /// How often the relay looks without being notified, by default (a notification is lost
    /// only while its LISTEN connection is down).
    pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(5);

    /// A relay for `<schema>.outbox` in `db`'s primary. With the Postgres bus, the bus
    /// tables must be in that database too (a move is one transaction).
    ///
    /// Fails only if `schema` is not a plain lowercase identifier.
    pub fn new(db: Db, schema: &'static str, bus: Bus) -> Result<Self, BusError> {
        check_schema(schema)?;
        Ok(Self {
            db,
            schema,
            lock_key: format!("waybill.relay.{schema}"),
            bus,
            batch_size: Self::DEFAULT_BATCH_SIZE,
            sweep_interval: Self::DEFAULT_SWEEP_INTERVAL,
        })
    }

    /// Sets the rows moved per transaction (at least 1).
    pub fn with_batch_size(mut self, rows: u32) -> Self {
        self.batch_size = rows.max(1);
        self
    }

    /// Sets how often the relay looks without being notified.
    pub fn with_sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = interval;
        self
    }

    /// Moves events until `shutdown` completes (a move in progress finishes first).
    /// Failures are logged and retried with backoff; this returns only on shutdown.
    pub async fn run(self, shutdown: impl Future) {
        // For logs only (see `Consumer::run`); the events carry their own trace context.
        let span = tracing::info_span!(target: waybill_runtime::telemetry::BACKGROUND, "relay", schema = self.schema);
        async {
            let mut shutdown = Shutdown::new(shutdown);
            let listener = Listener::spawn(self.db.clone(), channel(self.schema), None);
            let mut delay = FAILURE_FIRST;
            let mut next_sample = tokio::time::Instant::now();
            tracing::info!(bus = ?self.bus.kind(), "relay started");
            while !shutdown.is_done() {
                if tokio::time::Instant::now() >= next_sample {
                    self.sample().await;
                    next_sample = tokio::time::Instant::now() + SAMPLE_INTERVAL;
                }
                let last_move = tokio::time::Instant::now();
                let wait = match self.move_batch().await {
                    Ok(Moved::Rows(rows)) if rows >= u64::from(self.batch_size) => continue,
                    Ok(_) => {
                        delay = FAILURE_FIRST;
                        self.sweep_interval
                    }
                    Err(error) => {
                        tracing::warn!(%error, retry_in = ?delay, "cannot move outbox rows");
                        let wait = delay;
                        delay = (delay * 2).min(FAILURE_MAX);
                        wait
                    }
                };
                let wait =
                    wait.min(next_sample.saturating_duration_since(tokio::time::Instant::now()));
                tokio::select! {
                    () = listener.notified() => {
                        tokio::select! {
                            () = tokio::time::sleep_until(last_move + GATHER) => {}
                            () = shutdown.wait() => {}
                        }
                    }
                    () = tokio::time::sleep(wait) => {}
                    () = shutdown.wait() => {}
                }
            }
            tracing::info!("relay stopped");
        }
        .instrument(span)
        .await;
    }

    /// Locks the schema's relay slot and moves up to a batch: for the Postgres bus one
    /// statement, for NATS one transaction around the publish.
    async fn move_batch(&self) -> Result<Moved, BusError> {
        let lock_key = &self.lock_key;
        let limit = i64::from(self.batch_size);
        let moved = match &self.bus.inner {
            BusInner::Postgres(_) => {
                let client = self.db.primary().await?;
                postgres::move_outbox(&client, self.schema, limit, lock_key).await?
            }
            BusInner::Nats(nats) => self.publish_to_nats(nats, limit, lock_key).await?,
        };
        Ok(match moved {
            Some(rows) => {
                if rows > 0 {
                    waybill_runtime::metrics::outbox_relayed(self.schema, rows);
                    tracing::debug!(rows, "moved outbox rows to the bus");
                }
                Moved::Rows(rows)
            }
            None => Moved::Busy,
        })
    }

    /// Publishes up to `limit` outbox rows to NATS and deletes them, in one transaction under
    /// the advisory lock `lock_key`; `None` when another relay holds it.
    async fn publish_to_nats(
        &self,
        nats: &NatsBus,
        limit: i64,
        lock_key: &str,
    ) -> Result<Option<u64>, BusError> {
        let mut client = self.db.primary().await?;
        let tx = client.transaction().await?;
        let locked: bool = tx
            .query_one(
                &tx.prepare_cached("SELECT pg_try_advisory_xact_lock(hashtext($1))")
                    .await?,
                &[&lock_key],
            )
            .await?
            .get(0);
        if !locked {
            return Ok(None);
        }
        let events = self.select(&tx, limit).await?;
        nats.publish(&events, None).await?;
        let ids: Vec<uuid::Uuid> = events.iter().map(|event| event.id).collect();
        tx.execute(
            &tx.prepare_cached(&format!(
                "DELETE FROM {}.outbox WHERE id = ANY($1)",
                self.schema
            ))
            .await?,
            &[&ids],
        )
        .await?;
        tx.commit().await?;
        Ok(Some(ids.len() as u64))
    }

    /// Samples the backlog (rows in the outbox) and the age of its oldest row for metrics:
    /// one query per [`SAMPLE_INTERVAL`], never per event. A failure leaves the last values.
    async fn sample(&self) {
        let query = format!(
            "SELECT (SELECT count(*) FROM {schema}.outbox),
                    (SELECT extract(epoch FROM now() - created_at)::float8
                     FROM {schema}.outbox ORDER BY id LIMIT 1)",
            schema = self.schema
        );
        let sampled = async {
            let client = self.db.primary().await?;
            let row = client
                .query_one(&client.prepare_cached(&query).await?, &[])
                .await?;
            Ok::<_, DbError>((row.get::<_, i64>(0), row.get::<_, Option<f64>>(1)))
        };
        match sampled.await {
            Ok((backlog, oldest)) => waybill_runtime::metrics::outbox_sampled(
                self.schema,
                u64::try_from(backlog).unwrap_or(0),
                Duration::try_from_secs_f64(oldest.unwrap_or(0.0)).unwrap_or_default(),
            ),
            Err(error) => tracing::debug!(%error, "cannot sample the outbox"),
        }
    }

    /// The next batch of outbox rows, locked, in id order.
    async fn select(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        limit: i64,
    ) -> Result<Vec<Event>, DbError> {
        let rows = tx
            .query(
                &tx.prepare_cached(&format!(
                    "SELECT id, topic, key, payload, headers::text, created_at
                     FROM {}.outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                    self.schema
                ))
                .await?,
                &[&limit],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| Event {
                id: row.get(0),
                topic: row.get(1),
                key: row.get(2),
                payload: row.get(3),
                headers: headers_from_json(row.get(4)),
                created_at: row.get(5),
            })
            .collect())
    }
}
