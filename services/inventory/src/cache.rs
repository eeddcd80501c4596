//! GetItem's cache: catalog reads are the hot reads of a shop, and most of them ask for the
//! same few items. A bounded cache per process (LRU-ish, moka's TinyLFU) with a short TTL.
//!
//! Invalidation: PutItem and AdjustStock notify `CHANNEL` with the SKU in their statement
//! (delivered at commit), and every inventory process's LISTEN session drops that entry, so a
//! catalog change is visible everywhere at once; a session that reconnects empties the cache,
//! since it may have missed some. Reservations change `reserved` and `available` too often to
//! invalidate on each: for those the TTL bounds how stale a cached item may be. Reserve itself
//! never reads the cache — the row locks decide — so a stale `available` can mislead a reader
//! for at most the TTL, never oversell.
//!
//! A miss is filled from the primary, not a replica: the miss may be the invalidation's own
//! doing, and a replica that has not replayed the change yet would put the old item back for
//! a whole TTL.

use std::time::Duration;

use moka::sync::Cache;
use waybill_runtime::{
    Db,
    listen::{Heard, listen_forever},
};

use crate::domain::Item;

/// The channel of catalog changes; the payload is the SKU.
pub const CHANNEL: &str = "waybill_inventory_items";

/// Cached items; a disabled cache (TTL 0) holds nothing. Cheap to clone.
#[derive(Clone)]
pub struct ItemCache {
    items: Option<Cache<String, Item>>,
}

impl ItemCache {
    /// A cache of at most `capacity` items, each kept at most `ttl`.
    pub fn new(ttl: Duration, capacity: u64) -> Self {
        Self {
            items: (!ttl.is_zero()).then(|| {
                Cache::builder()
                    .max_capacity(capacity)
                    .time_to_live(ttl)
                    .build()
            }),
        }
    }

    /// Whether this cache keeps anything (a TTL above zero).
    pub fn is_enabled(&self) -> bool {
        self.items.is_some()
    }

    pub fn get(&self, sku: &str) -> Option<Item> {
        self.items.as_ref()?.get(sku)
    }

    pub fn insert(&self, item: &Item) {
        if let Some(items) = &self.items {
            items.insert(item.sku.clone(), item.clone());
        }
    }

    /// Drops entries as catalog changes are heard, for the life of the process.
    pub async fn invalidate_forever(self, db: Db) {
        let Some(items) = self.items else {
            return;
        };
        listen_forever(db, CHANNEL.to_owned(), |heard| match heard {
            Heard::Connected => items.invalidate_all(),
            Heard::Notification(sku) => items.invalidate(sku),
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;

    fn item(sku: &str) -> Item {
        Item {
            sku: sku.into(),
            name: String::new(),
            on_hand: 1,
            reserved: 0,
            updated_at: Utc::now(),
        }
    }

    #[test]
    fn a_zero_ttl_caches_nothing() {
        let cache = ItemCache::new(Duration::ZERO, 10);
        cache.insert(&item("A"));
        assert!(cache.get("A").is_none());
        let cache = ItemCache::new(Duration::from_secs(60), 10);
        cache.insert(&item("A"));
        assert_eq!(cache.get("A").map(|i| i.sku), Some("A".to_owned()));
    }
}
