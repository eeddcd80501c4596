//! What this process hears on the command channel, fanned out: workers are woken, watchers of
//! a changed command are told to look again, and GetCommand's cache drops the changed
//! entries. One LISTEN session per process, whatever the number of watchers.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use moka::sync::Cache;
use tokio::sync::{Notify, broadcast};
use uuid::Uuid;
use waybill_api::commands::v1 as pb;
use waybill_runtime::{
    Db,
    listen::{Heard, listen_forever},
};

use crate::store::CHANNEL;

/// Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    wake: Arc<Notify>,
    watchers: Mutex<HashMap<Uuid, broadcast::Sender<()>>>,
    cache: Option<Cache<Uuid, pb::Command>>,
    /// Bumped whenever a cached command may have changed. A read that started before a bump
    /// is not cached: it may be older than the change, and would outlive its eviction.
    epoch: AtomicU64,
}

impl Hub {
    /// A hub whose GetCommand cache keeps at most `capacity` commands for at most `ttl` (0:
    /// no cache). The TTL only bounds staleness if a notification is lost; changes normally
    /// evict at once.
    pub fn new(cache_ttl: Duration, capacity: u64) -> Self {
        Self {
            inner: Arc::new(Inner {
                wake: Arc::new(Notify::new()),
                watchers: Mutex::new(HashMap::new()),
                cache: (!cache_ttl.is_zero()).then(|| {
                    Cache::builder()
                        .max_capacity(capacity)
                        .time_to_live(cache_ttl)
                        .build()
                }),
                epoch: AtomicU64::new(0),
            }),
        }
    }

    /// See `Inner::epoch`.
    pub fn epoch(&self) -> u64 {
        self.inner.epoch.load(Ordering::Acquire)
    }

    /// What the workers wait on.
    pub fn wake(&self) -> Arc<Notify> {
        self.inner.wake.clone()
    }

    /// A receiver told whenever `id` may have changed. Subscribe before reading the command,
    /// so that no change falls between the read and the subscription.
    pub fn watch(&self, id: Uuid) -> broadcast::Receiver<()> {
        let mut watchers = self.watchers();
        if watchers.len() > 1024 {
            // Watchers that went away leave their entries until a change finds them gone.
            watchers.retain(|_, sender| sender.receiver_count() > 0);
        }
        watchers
            .entry(id)
            .or_insert_with(|| broadcast::channel(1).0)
            .subscribe()
    }

    pub fn cached(&self, id: Uuid) -> Option<pb::Command> {
        self.inner.cache.as_ref()?.get(&id)
    }

    pub fn cache(&self, command: &pb::Command, id: Uuid) {
        if let Some(cache) = &self.inner.cache {
            cache.insert(id, command.clone());
        }
    }

    /// A change made by this process: visible to its own readers at once, before the
    /// notification comes back.
    pub fn changed(&self, id: Uuid) {
        self.inner.epoch.fetch_add(1, Ordering::AcqRel);
        if let Some(cache) = &self.inner.cache {
            cache.invalidate(&id);
        }
        let mut watchers = self.watchers();
        if let Some(sender) = watchers.get(&id)
            && sender.send(()).is_err()
        {
            // Nobody listens any more.
            watchers.remove(&id);
        }
    }

    /// Listens for the life of the process.
    pub async fn listen_forever(self, db: Db) {
        listen_forever(db, CHANNEL.to_owned(), |heard| match heard {
            Heard::Connected => {
                // Anything may have been missed: everyone looks again.
                self.inner.epoch.fetch_add(1, Ordering::AcqRel);
                if let Some(cache) = &self.inner.cache {
                    cache.invalidate_all();
                }
                let mut watchers = self.watchers();
                watchers.retain(|_, sender| sender.send(()).is_ok());
                self.inner.wake.notify_one();
            }
            Heard::Notification("r") => self.inner.wake.notify_one(),
            Heard::Notification(payload) => {
                if let Some(ids) = payload.strip_prefix("c:") {
                    for id in ids.split(',').filter_map(|id| Uuid::parse_str(id).ok()) {
                        self.changed(id);
                    }
                }
            }
        })
        .await;
    }

    fn watchers(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, broadcast::Sender<()>>> {
        // A panic while holding the map leaves it usable: entries are only senders.
        self.inner
            .watchers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
