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
//! a whole TTL. A fill also loses to any invalidation heard while its read was in flight
//! ([`ItemCache::ticket`]), since that read may predate the change.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

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
    /// Invalidations heard so far (of any item, or all): a fill whose read began before the
    /// latest one may hold what it invalidated.
    invalidations: Arc<AtomicU64>,
}

/// Taken before the read that fills a miss ([`ItemCache::ticket`]).
#[derive(Clone, Copy, Debug)]
pub struct Ticket(u64);

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
            invalidations: Arc::default(),
        }
    }

    /// Take before reading an item to cache: [`ItemCache::insert`] keeps the item only if no
    /// invalidation was heard since.
    pub fn ticket(&self) -> Ticket {
        Ticket(self.invalidations.load(Ordering::SeqCst))
    }

    /// Whether this cache keeps anything (a TTL above zero).
    pub fn is_enabled(&self) -> bool {
        self.items.is_some()
    }

    pub fn get(&self, sku: &str) -> Option<Item> {
        self.items.as_ref()?.get(sku)
    }

    /// Caches `item`, read after `ticket` was taken, unless an invalidation came since.
    pub fn insert(&self, item: &Item, ticket: Ticket) {
        let Some(items) = &self.items else {
            return;
        };
        if self.invalidations.load(Ordering::SeqCst) != ticket.0 {
            return;
        }
        items.insert(item.sku.clone(), item.clone());
        // An invalidation between the check and the insert: it counts before it drops, so
        // either it dropped this entry after the insert, or it is seen here.
        if self.invalidations.load(Ordering::SeqCst) != ticket.0 {
            items.invalidate(&item.sku);
        }
    }

    /// Drops `sku` (or everything), counting the invalidation first.
    fn invalidate(&self, sku: Option<&str>) {
        let Some(items) = &self.items else {
            return;
        };
        self.invalidations.fetch_add(1, Ordering::SeqCst);
        match sku {
            Some(sku) => items.invalidate(sku),
            None => items.invalidate_all(),
        }
    }

    /// Drops entries as catalog changes are heard, for the life of the process.
    pub async fn invalidate_forever(self, db: Db) {
        if !self.is_enabled() {
            return;
        }
        listen_forever(db, CHANNEL.to_owned(), |heard| match heard {
            Heard::Connected => self.invalidate(None),
            Heard::Notification(sku) => self.invalidate(Some(sku)),
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
        cache.insert(&item("A"), cache.ticket());
        assert!(cache.get("A").is_none());
        let cache = ItemCache::new(Duration::from_secs(60), 10);
        cache.insert(&item("A"), cache.ticket());
        assert_eq!(cache.get("A").map(|i| i.sku), Some("A".to_owned()));
    }

    /// A read that was in flight when a change was heard may hold the old item: not cached.
    #[test]
    fn a_fill_that_straddles_an_invalidation_is_not_kept() {
        let cache = ItemCache::new(Duration::from_secs(60), 10);
        let ticket = cache.ticket();
        cache.invalidate(Some("A"));
        cache.insert(&item("A"), ticket);
        assert!(cache.get("A").is_none());
        // A fill that starts after the invalidation is kept.
        cache.insert(&item("A"), cache.ticket());
        assert!(cache.get("A").is_some());
    }
}
