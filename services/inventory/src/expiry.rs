//! Reservations that are not committed in time give their stock back. The release re-checks
//! under the reservation's row lock that it is still HELD and expired, so an expiring
//! reservation and a concurrent Commit serialize on that row and exactly one of them wins (a
//! plain Release would give a just-committed reservation's units back on hand).

use std::time::Duration;

use crate::store::InventoryStore;

/// Most reservations released per sweep; the next sweep takes the rest.
const BATCH: i64 = 500;

/// Releases expired reservations every `interval`, forever.
pub async fn sweep_forever(store: InventoryStore, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let expired = match store.expired(BATCH).await {
            Ok(expired) => expired,
            Err(error) => {
                tracing::warn!(%error, "looking for expired reservations failed");
                continue;
            }
        };
        for order_id in expired {
            match store.release_expired(order_id).await {
                Ok(true) => tracing::info!(%order_id, "reservation expired; stock released"),
                // Committed or released meanwhile: nothing to give back.
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(%order_id, %error, "releasing an expired reservation failed")
                }
            }
        }
    }
}
