//! The metrics waybill's services and runtime record beside the mesh's (whose names live in
//! `mesh_layer::metrics`): database pools and replication, saga outcomes, the outbox and its
//! relay, event consumers. Each is named here once, and docs/metrics.md lists them all.
//!
//! Gauges of state (pool use, replica lag, outbox backlog) are sampled by periodic queries,
//! never computed per call or per event.

use std::time::Duration;

use metrics::{
    Gauge, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

use crate::Db;

/// Describes every metric of this module to the installed recorder.
pub fn describe() {
    describe_gauge!(
        "waybill_db_pool_max_connections",
        "Most connections the pool may open."
    );
    describe_gauge!(
        "waybill_db_pool_connections",
        "Connections the pool holds open now (idle and in use)."
    );
    describe_gauge!(
        "waybill_db_pool_idle_connections",
        "Open connections not in use now."
    );
    describe_gauge!(
        "waybill_db_pool_waiting",
        "Tasks waiting for a connection from the pool now."
    );
    describe_gauge!(
        "waybill_db_up",
        "1 if the database answered the last probe, else 0."
    );
    describe_gauge!(
        "waybill_db_replica_lag_bytes",
        Unit::Bytes,
        "WAL the replica has yet to replay: the primary's current LSN minus the replica's replay LSN."
    );
    describe_gauge!(
        "waybill_db_replica_lag_seconds",
        Unit::Seconds,
        "Age of the last transaction the replica replayed while it is behind the primary; 0 when caught up."
    );
    describe_counter!(
        "waybill_saga_outcomes_total",
        "PlaceOrder sagas by outcome: confirmed, cancelled (compensated), deferred (a participant was down or slow)."
    );
    describe_counter!(
        "waybill_outbox_relayed_events_total",
        "Events moved from the outbox to the bus."
    );
    describe_gauge!(
        "waybill_outbox_backlog_events",
        "Events in the outbox not yet relayed (sampled)."
    );
    describe_gauge!(
        "waybill_outbox_lag_seconds",
        Unit::Seconds,
        "Age of the oldest event in the outbox, 0 when empty (sampled)."
    );
    describe_counter!(
        "waybill_consumer_events_total",
        "Event deliveries to a consumer, by outcome: handled, duplicate (already in the inbox), failed."
    );
    describe_counter!(
        "waybill_consumer_dead_letters_total",
        "Events a consumer gave up on (moved to the dead letters)."
    );
    describe_counter!(
        "waybill_command_attempts_total",
        "Command attempts ended, by kind and outcome: succeeded, retrying, dead."
    );
    describe_histogram!(
        "waybill_command_run_duration_seconds",
        Unit::Seconds,
        "How long a command's handler ran, by kind."
    );
    describe_histogram!(
        "waybill_group_commit_batch_writes",
        "Writes per group-commit batch, by kind."
    );
    describe_gauge!(
        "waybill_command_queue_depth",
        "Commands waiting or running (ACCEPTED, RETRYING, RUNNING) per shard (sampled)."
    );
    describe_gauge!(
        "waybill_command_queue_oldest_age_seconds",
        Unit::Seconds,
        "Age of the oldest waiting or running command per shard, 0 when none (sampled)."
    );
    describe_counter!(
        "waybill_command_purged_total",
        "Finished commands deleted by retention."
    );
    describe_counter!(
        "waybill_command_marked_total",
        "Queued commands a claim scan found waiting behind an older command of their user and marked blocked (left out of later scans until released)."
    );
    describe_counter!(
        "waybill_command_stranded_total",
        "Blocked commands the periodic sweep released because they were already their user's next command; each waited up to one retention sweep (expected 0)."
    );
    describe_counter!(
        "waybill_command_claims_total",
        "Commands claimed, by how the worker found them: scan of the log, JetStream dispatch, or successor of a command that finished."
    );
}

// === the command pipeline ===

/// `waybill_command_attempts_total{kind,outcome}` and
/// `waybill_command_run_duration_seconds{kind}`: one attempt ended.
pub fn command_attempt(kind: &'static str, outcome: &'static str, ran: Duration) {
    counter!("waybill_command_attempts_total", "kind" => kind, "outcome" => outcome).increment(1);
    histogram!("waybill_command_run_duration_seconds", "kind" => kind).record(ran.as_secs_f64());
}

/// `waybill_command_claims_total{via}`: commands claimed by the scan of the log (`scan`),
/// from JetStream dispatches (`jetstream`) or as a finished command's successor (`successor`).
pub fn commands_claimed(via: &'static str, count: usize) {
    counter!("waybill_command_claims_total", "via" => via).increment(count as u64);
}

/// `waybill_group_commit_batch_writes{kind}`: one group commit stored `size` writes of `kind`.
pub fn group_commit_batch(kind: &'static str, size: usize) {
    histogram!("waybill_group_commit_batch_writes", "kind" => kind).record(size as f64);
}

/// `waybill_command_queue_depth{shard}` and `waybill_command_queue_oldest_age_seconds{shard}`,
/// as last sampled.
pub fn command_queue_sampled(shard: i32, depth: u64, oldest_age: Duration) {
    let shard = shard.to_string();
    gauge!("waybill_command_queue_depth", "shard" => shard.clone()).set(depth as f64);
    gauge!("waybill_command_queue_oldest_age_seconds", "shard" => shard)
        .set(oldest_age.as_secs_f64());
}

/// `waybill_command_stranded_total`: blocked commands the sweep released (should stay 0).
pub fn commands_stranded(count: u64) {
    counter!("waybill_command_stranded_total").increment(count);
}

/// `waybill_command_marked_total`: queued commands a claim round marked blocked.
pub fn commands_marked(count: u64) {
    counter!("waybill_command_marked_total").increment(count);
}

/// `waybill_command_purged_total`.
pub fn commands_purged(count: u64) {
    counter!("waybill_command_purged_total").increment(count);
}

// === saga, outbox, consumers ===

/// `waybill_saga_outcomes_total{outcome}`: `confirmed`, `cancelled`, `deferred` or
/// `compensation_refused`.
pub fn saga_outcome(outcome: &'static str) {
    counter!("waybill_saga_outcomes_total", "outcome" => outcome).increment(1);
}

/// `waybill_outbox_relayed_events_total{schema}`: `events` more moved to the bus.
pub fn outbox_relayed(schema: &'static str, events: u64) {
    counter!("waybill_outbox_relayed_events_total", "schema" => schema).increment(events);
}

/// `waybill_outbox_backlog_events{schema}` and `waybill_outbox_lag_seconds{schema}`, as
/// last sampled.
pub fn outbox_sampled(schema: &'static str, backlog: u64, oldest_age: Duration) {
    gauge!("waybill_outbox_backlog_events", "schema" => schema).set(backlog as f64);
    gauge!("waybill_outbox_lag_seconds", "schema" => schema).set(oldest_age.as_secs_f64());
}

/// `waybill_consumer_events_total{subscription,outcome}`: `handled`, `duplicate`, `failed`.
pub fn consumer_outcome(subscription: &str, outcome: &'static str) {
    counter!("waybill_consumer_events_total", "subscription" => subscription.to_owned(),
        "outcome" => outcome)
    .increment(1);
}

/// `waybill_consumer_dead_letters_total{subscription,topic}`.
pub fn dead_letter(subscription: &str, topic: &str) {
    counter!("waybill_consumer_dead_letters_total",
        "subscription" => subscription.to_owned(), "topic" => topic.to_owned())
    .increment(1);
}

// === databases ===

/// `waybill_db_up{pool="primary"}`, from the health monitor's probe.
pub fn primary_up(up: bool) {
    gauge!("waybill_db_up", "pool" => "primary").set(if up { 1.0 } else { 0.0 });
}

/// One pool's gauges, resolved once.
struct PoolGauges {
    max: Gauge,
    size: Gauge,
    idle: Gauge,
    waiting: Gauge,
}

impl PoolGauges {
    fn new(pool: &str) -> Self {
        Self {
            max: gauge!("waybill_db_pool_max_connections", "pool" => pool.to_owned()),
            size: gauge!("waybill_db_pool_connections", "pool" => pool.to_owned()),
            idle: gauge!("waybill_db_pool_idle_connections", "pool" => pool.to_owned()),
            waiting: gauge!("waybill_db_pool_waiting", "pool" => pool.to_owned()),
        }
    }
}

/// One replica's gauges, resolved once.
struct ReplicaGauges {
    up: Gauge,
    lag_bytes: Gauge,
    lag_seconds: Gauge,
}

/// Samples every `interval`, until aborted: each pool's use (`pool` = `primary`,
/// `replica-0`, `replica-1`, … in configuration order) and each replica's lag behind the
/// primary, in bytes of WAL (the primary's `pg_current_wal_lsn()` minus the replica's
/// `pg_last_wal_replay_lsn()`) and in seconds (the age of the last replayed transaction,
/// `pg_last_xact_replay_timestamp()`, counted only while bytes remain: an idle primary
/// writes nothing, and a caught-up replica is not late). Probes time out after `interval`.
pub async fn sample_databases(db: Db, interval: Duration) {
    let pools: Vec<PoolGauges> = std::iter::once("primary".to_owned())
        .chain((0..db.replica_count()).map(|i| format!("replica-{i}")))
        .map(|name| PoolGauges::new(&name))
        .collect();
    let replicas: Vec<ReplicaGauges> = (0..db.replica_count())
        .map(|i| {
            let pool = format!("replica-{i}");
            ReplicaGauges {
                up: gauge!("waybill_db_up", "pool" => pool.clone()),
                lag_bytes: gauge!("waybill_db_replica_lag_bytes", "pool" => pool.clone()),
                lag_seconds: gauge!("waybill_db_replica_lag_seconds", "pool" => pool),
            }
        })
        .collect();
    let timeout = interval.max(Duration::from_millis(500));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        for (status, gauges) in db.pool_statuses().zip(&pools) {
            gauges.max.set(status.max_size as f64);
            gauges.size.set(status.size as f64);
            gauges.idle.set(status.available as f64);
            gauges.waiting.set(status.waiting as f64);
        }
        if replicas.is_empty() {
            continue;
        }
        let primary_lsn = tokio::time::timeout(timeout, primary_lsn(&db)).await;
        let Ok(Ok(primary_lsn)) = primary_lsn else {
            // Without the primary's position there is no lag to measure; leave the last.
            continue;
        };
        for (index, gauges) in replicas.iter().enumerate() {
            match tokio::time::timeout(timeout, replica_lag(&db, index, &primary_lsn)).await {
                Ok(Ok((bytes, seconds))) => {
                    gauges.up.set(1.0);
                    gauges.lag_bytes.set(bytes);
                    gauges.lag_seconds.set(seconds);
                }
                Ok(Err(error)) => {
                    tracing::debug!(replica = index, %error, "replica lag probe failed");
                    gauges.up.set(0.0);
                }
                Err(_) => gauges.up.set(0.0),
            }
        }
    }
}

async fn primary_lsn(db: &Db) -> Result<String, crate::DbError> {
    let client = db.primary().await?;
    Ok(client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0))
}

/// (bytes, seconds) replica `index` is behind a primary at `primary_lsn`.
async fn replica_lag(
    db: &Db,
    index: usize,
    primary_lsn: &str,
) -> Result<(f64, f64), crate::DbError> {
    let client = db.replica_at(index).await?;
    let row = client
        .query_one(
            "SELECT pg_wal_lsn_diff($1::text::pg_lsn, pg_last_wal_replay_lsn())::float8,
                    extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8",
            &[&primary_lsn],
        )
        .await?;
    // NULL: not a replica (or one that never replayed anything): nothing to be behind on.
    let bytes = row.get::<_, Option<f64>>(0).unwrap_or(0.0).max(0.0);
    let seconds = if bytes > 0.0 {
        row.get::<_, Option<f64>>(1).unwrap_or(0.0).max(0.0)
    } else {
        0.0
    };
    Ok((bytes, seconds))
}
