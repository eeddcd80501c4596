//! Reservations that are not committed in time give their stock back. Expiry goes through
//! the same release as the Release call, so an expiring reservation and a concurrent Commit
//! serialize on the reservation row and exactly one of them wins.

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
            match store.release(order_id).await {
                Ok(Ok(_)) => tracing::info!(%order_id, "reservation expired; stock released"),
                // Committed or released meanwhile: nothing to give back.
                Ok(Err(_)) => {}
                Err(error) => {
                    tracing::warn!(%order_id, %error, "releasing an expired reservation failed")
                }
            }
        }
    }
}
