use std::{collections::HashMap, sync::Mutex, time::Duration};

use bytes::Bytes;
use tokio::time::Instant;

use crate::BoxFuture;

/// Which call a key belongs to: keys are scoped per caller and method, so two callers (or
/// two methods) may use the same key without meeting.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyId {
    /// Who calls (the `waybill-caller` metadata until mTLS identities exist).
    pub caller: String,
    /// The method path.
    pub method: String,
    /// The caller's key.
    pub key: String,
}

impl KeyId {
    /// A SHA-256 of (caller, method, key): the same for every repeat of the call, different
    /// for any other. Handlers whose own writes must be exactly-once store it with their row
    /// under a unique index, so a repeat the layer let through after all (its claim released when the
    /// database failed to confirm a commit, or expired) finds the first call's row. The layer
    /// puts the `KeyId` of a keyed call in the request's extensions.
    pub fn digest(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        // Metadata values are visible ASCII, so NUL separators cannot be forged.
        let mut hash = Sha256::new();
        for part in [&self.caller, &self.method, &self.key] {
            hash.update(part.as_bytes());
            hash.update([0u8]);
        }
        hash.finalize().into()
    }
}

/// A SHA-256 of the request message, to tell a true repeat from a reused key.
pub type Fingerprint = [u8; 32];

/// A finished call's response, as replayed to repeats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResponse {
    /// The request's fingerprint.
    pub fingerprint: Fingerprint,
    /// The gRPC status code.
    pub code: i32,
    /// The status message (empty for OK).
    pub message: String,
    /// `grpc-status-details-bin` of an error (google.rpc details), if any.
    pub details: Bytes,
    /// The response message, length-prefixed as on the wire (empty for errors).
    pub body: Bytes,
}

/// What [`IdempotencyStore::begin`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Begin {
    /// The key is ours now: run the call, then `complete` or `release` it.
    Started,
    /// Another call with this key is running.
    Running {
        /// That call's request fingerprint.
        fingerprint: Fingerprint,
    },
    /// A call with this key finished.
    Done(StoredResponse),
}

/// A store failure. The layer then refuses keyed calls (UNAVAILABLE) rather than risk a
/// second execution.
#[derive(Debug, thiserror::Error)]
#[error("idempotency store: {0}")]
pub struct StoreError(pub String);

/// Where keys and their outcomes live. `waybill-runtime` has the Postgres implementation (one
/// table in the service's database); [`MemoryStore`] is for tests and single-process use.
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims `key` for a new call unless a call with it is running (with an unexpired lease)
    /// or finished (and not yet expired). A running claim whose lease ran out (its process
    /// died) is taken over when the fingerprint matches.
    fn begin(
        &self,
        key: &KeyId,
        fingerprint: Fingerprint,
        lease: Duration,
        retention: Duration,
    ) -> BoxFuture<Result<Begin, StoreError>>;

    /// Records the outcome of a claimed call, kept for `retention`.
    fn complete(
        &self,
        key: &KeyId,
        response: StoredResponse,
        retention: Duration,
    ) -> BoxFuture<Result<(), StoreError>>;

    /// Gives a claimed key up (the call failed in a way a retry may fix).
    fn release(&self, key: &KeyId) -> BoxFuture<Result<(), StoreError>>;

    /// Deletes expired keys; returns how many.
    fn purge_expired(&self) -> BoxFuture<Result<u64, StoreError>>;
}

/// An in-memory store, for tests of the layer alone and single-process deployments.
#[derive(Debug, Default)]
pub struct MemoryStore {
    entries: Mutex<HashMap<KeyId, Entry>>,
}

#[derive(Debug)]
enum Entry {
    Running {
        fingerprint: Fingerprint,
        lease_until: Instant,
        expires_at: Instant,
    },
    Done {
        response: StoredResponse,
        expires_at: Instant,
    },
}

fn poisoned<T>(_: T) -> StoreError {
    StoreError("memory store lock poisoned".into())
}

impl IdempotencyStore for MemoryStore {
    fn begin(
        &self,
        key: &KeyId,
        fingerprint: Fingerprint,
        lease: Duration,
        retention: Duration,
    ) -> BoxFuture<Result<Begin, StoreError>> {
        let result = self.entries.lock().map_err(poisoned).map(|mut entries| {
            let now = Instant::now();
            let claim = Entry::Running {
                fingerprint,
                lease_until: now + lease,
                expires_at: now + retention,
            };
            match entries.get(key) {
                Some(Entry::Done { expires_at, .. } | Entry::Running { expires_at, .. })
                    if *expires_at <= now =>
                {
                    entries.insert(key.clone(), claim);
                    Begin::Started
                }
                Some(Entry::Running {
                    fingerprint: theirs,
                    lease_until,
                    ..
                }) if *lease_until <= now && *theirs == fingerprint => {
                    entries.insert(key.clone(), claim);
                    Begin::Started
                }
                Some(Entry::Running {
                    fingerprint: theirs,
                    ..
                }) => Begin::Running {
                    fingerprint: *theirs,
                },
                Some(Entry::Done { response, .. }) => Begin::Done(response.clone()),
                None => {
                    entries.insert(key.clone(), claim);
                    Begin::Started
                }
            }
        });
        Box::pin(async move { result })
    }

    fn complete(
        &self,
        key: &KeyId,
        response: StoredResponse,
        retention: Duration,
    ) -> BoxFuture<Result<(), StoreError>> {
        let result = self.entries.lock().map_err(poisoned).map(|mut entries| {
            entries.insert(
                key.clone(),
                Entry::Done {
                    response,
                    expires_at: Instant::now() + retention,
                },
            );
        });
        Box::pin(async move { result })
    }

    fn release(&self, key: &KeyId) -> BoxFuture<Result<(), StoreError>> {
        let result = self.entries.lock().map_err(poisoned).map(|mut entries| {
            if matches!(entries.get(key), Some(Entry::Running { .. })) {
                entries.remove(key);
            }
        });
        Box::pin(async move { result })
    }

    fn purge_expired(&self) -> BoxFuture<Result<u64, StoreError>> {
        let result = self.entries.lock().map_err(poisoned).map(|mut entries| {
            let now = Instant::now();
            let before = entries.len();
            entries.retain(|_, entry| match entry {
                Entry::Running { expires_at, .. } | Entry::Done { expires_at, .. } => {
                    *expires_at > now
                }
            });
            (before - entries.len()) as u64
        });
        Box::pin(async move { result })
    }
}
