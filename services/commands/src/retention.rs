//! Background upkeep of the log: retention (old finished commands deleted in small batches)
//! with the sweep for commands left blocked, and the queue gauges (depth and oldest age per
//! shard).

use std::time::Duration;

use waybill_runtime::{Db, purge::delete_in_batches};

use crate::store::CommandStore;

/// Rows deleted per statement: small enough that each statement's locks and WAL are brief,
/// so ingestion and workers never wait behind retention.
const PURGE_BATCH: i64 = 1_000;
const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// Every `every`: deletes finished commands older than `age`, a batch at a time, and
/// releases blocked commands that are their user's head (see
/// [`CommandStore::release_stranded`]), counted in `waybill_command_stranded_total`.
pub async fn purge_forever(store: CommandStore, age: Duration, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Exported from the start at 0, so that its alert's increase() sees the first one.
    waybill_runtime::metrics::commands_stranded(0);
    loop {
        ticker.tick().await;
        let (deleted, error) =
            delete_in_batches(PURGE_BATCH.unsigned_abs(), || store.purge(age, PURGE_BATCH)).await;
        waybill_runtime::metrics::commands_purged(deleted);
        if let Some(error) = error {
            tracing::warn!(%error, "command retention failed; trying again next sweep");
        }
        if deleted > 0 {
            tracing::info!(deleted, "purged finished commands past retention");
        }
        match store.release_stranded().await {
            Ok(0) => {}
            Ok(released) => {
                waybill_runtime::metrics::commands_stranded(released);
                tracing::warn!(
                    released,
                    "released blocked commands that were their user's next; they should have \
                     been released when the command before them left the queue"
                );
            }
            Err(error) => {
                tracing::warn!(%error, "looking for stranded commands failed; trying again next sweep")
            }
        }
    }
}

/// Samples the queue per shard for the gauges `waybill_command_queue_depth` and
/// `waybill_command_queue_oldest_age_seconds`.
pub async fn sample_queue_forever(db: Db) {
    let mut ticker = tokio::time::interval(SAMPLE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Ok(client) = db.primary().await else {
            continue;
        };
        let rows = client
            .query(
                "SELECT s.shard, count(c.id),
                        COALESCE(EXTRACT(EPOCH FROM now() - min(c.created_at))::float8, 0)
                 FROM commands.settings, generate_series(0, shard_count - 1) AS s(shard)
                 LEFT JOIN commands.commands c
                   ON c.shard = s.shard AND c.phase = 'open'
                 GROUP BY s.shard",
                &[],
            )
            .await;
        match rows {
            Ok(rows) => {
                for row in rows {
                    waybill_runtime::metrics::command_queue_sampled(
                        row.get(0),
                        u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
                        Duration::from_secs_f64(row.get::<_, f64>(2).max(0.0)),
                    );
                }
            }
            Err(error) => tracing::debug!(%error, "sampling the command queue failed"),
        }
    }
}
