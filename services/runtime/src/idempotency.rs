//! mesh-layer's idempotency store in Postgres: one table, `mesh.idempotency_keys`, in the
//! service's database (on the primary), shared by the services of that database and keyed by
//! method so they never meet.

use std::time::Duration;

use mesh_layer::{
    BoxFuture,
    idempotency::{Begin, Fingerprint, IdempotencyStore, KeyId, StoreError, StoredResponse},
};

use crate::{Db, DbError, Schema};

refinery::embed_migrations!("migrations");

/// The `mesh` schema (idempotency keys), migrated with every service.
pub const MESH_SCHEMA: Schema = Schema {
    name: "mesh",
    runner: migrations::runner,
};

/// How many expired keys one purge statement deletes, so a purge never holds locks long.
const PURGE_BATCH: i64 = 1000;

/// Keys in `mesh.idempotency_keys` on the primary.
#[derive(Clone)]
pub struct PgIdempotencyStore {
    db: Db,
}

impl PgIdempotencyStore {
    /// A store over the process's pools.
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Deletes expired keys every `interval` until aborted, in batches.
    pub async fn purge_forever(self, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        loop {
            ticker.tick().await;
            match self.purge_expired().await {
                Ok(0) => {}
                Ok(count) => tracing::debug!(count, "purged expired idempotency keys"),
                Err(error) => tracing::warn!(%error, "purging idempotency keys failed"),
            }
        }
    }
}

fn store_error(error: impl Into<DbError>) -> StoreError {
    StoreError(error.into().to_string())
}

fn seconds(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

impl IdempotencyStore for PgIdempotencyStore {
    fn begin(
        &self,
        key: &KeyId,
        fingerprint: Fingerprint,
        lease: Duration,
        retention: Duration,
    ) -> BoxFuture<Result<Begin, StoreError>> {
        let db = self.db.clone();
        let key = key.clone();
        Box::pin(async move {
            let client = db.primary().await.map_err(store_error)?;
            // Claim the key if it is free, expired, or held by a dead claim (lease over) for
            // the same request; otherwise report what holds it. One statement, so two racing
            // claims cannot both win.
            let claimed = client
                .query_opt(
                    &client
                        .prepare_cached(
                            "INSERT INTO mesh.idempotency_keys
                         (caller, method, key, fingerprint, state, lease_until, expires_at)
                     VALUES ($1, $2, $3, $4, 'running',
                             now() + make_interval(secs => $5), now() + make_interval(secs => $6))
                     ON CONFLICT (caller, method, key) DO UPDATE
                     SET fingerprint = EXCLUDED.fingerprint, state = 'running',
                         lease_until = EXCLUDED.lease_until, expires_at = EXCLUDED.expires_at,
                         code = NULL, message = NULL, details = NULL, body = NULL
                     WHERE mesh.idempotency_keys.expires_at < now()
                        OR (mesh.idempotency_keys.state = 'running'
                            AND mesh.idempotency_keys.lease_until < now()
                            AND mesh.idempotency_keys.fingerprint = EXCLUDED.fingerprint)
                     RETURNING 1",
                        )
                        .await
                        .map_err(store_error)?,
                    &[
                        &key.caller,
                        &key.method,
                        &key.key,
                        &fingerprint.as_slice(),
                        &seconds(lease),
                        &seconds(retention),
                    ],
                )
                .await
                .map_err(store_error)?;
            if claimed.is_some() {
                return Ok(Begin::Started);
            }
            let row = client
                .query_opt(
                    &client
                        .prepare_cached(
                            "SELECT fingerprint, state, code, message, details, body
                     FROM mesh.idempotency_keys WHERE caller = $1 AND method = $2 AND key = $3",
                        )
                        .await
                        .map_err(store_error)?,
                    &[&key.caller, &key.method, &key.key],
                )
                .await
                .map_err(store_error)?
                // Purged between the two statements: it is free now, but claiming it again
                // here would race; the caller's retry will claim it.
                .ok_or_else(|| StoreError("key vanished while being read; retry".into()))?;
            let stored: Vec<u8> = row.try_get(0).map_err(store_error)?;
            let theirs: Fingerprint = stored
                .as_slice()
                .try_into()
                .map_err(|_| StoreError("stored fingerprint is not 32 bytes".into()))?;
            let state: String = row.try_get(1).map_err(store_error)?;
            if state == "running" {
                return Ok(Begin::Running {
                    fingerprint: theirs,
                });
            }
            Ok(Begin::Done(StoredResponse {
                fingerprint: theirs,
                code: row
                    .try_get::<_, Option<i32>>(2)
                    .map_err(store_error)?
                    .unwrap_or(2),
                message: row
                    .try_get::<_, Option<String>>(3)
                    .map_err(store_error)?
                    .unwrap_or_default(),
                details: row
                    .try_get::<_, Option<Vec<u8>>>(4)
                    .map_err(store_error)?
                    .unwrap_or_default()
                    .into(),
                body: row
                    .try_get::<_, Option<Vec<u8>>>(5)
                    .map_err(store_error)?
                    .unwrap_or_default()
                    .into(),
            }))
        })
    }

    fn complete(
        &self,
        key: &KeyId,
        response: StoredResponse,
        retention: Duration,
    ) -> BoxFuture<Result<(), StoreError>> {
        let db = self.db.clone();
        let key = key.clone();
        Box::pin(async move {
            let client = db.primary().await.map_err(store_error)?;
            client
                .execute(
                    &client
                        .prepare_cached(
                            "UPDATE mesh.idempotency_keys
                     SET state = 'done', lease_until = NULL, code = $4, message = $5,
                         details = $6, body = $7, expires_at = now() + make_interval(secs => $8)
                     WHERE caller = $1 AND method = $2 AND key = $3",
                        )
                        .await
                        .map_err(store_error)?,
                    &[
                        &key.caller,
                        &key.method,
                        &key.key,
                        &response.code,
                        &response.message,
                        &response.details.as_ref(),
                        &response.body.as_ref(),
                        &seconds(retention),
                    ],
                )
                .await
                .map_err(store_error)?;
            Ok(())
        })
    }

    fn release(&self, key: &KeyId) -> BoxFuture<Result<(), StoreError>> {
        let db = self.db.clone();
        let key = key.clone();
        Box::pin(async move {
            let client = db.primary().await.map_err(store_error)?;
            client
                .execute(
                    &client
                        .prepare_cached(
                            "DELETE FROM mesh.idempotency_keys
                     WHERE caller = $1 AND method = $2 AND key = $3 AND state = 'running'",
                        )
                        .await
                        .map_err(store_error)?,
                    &[&key.caller, &key.method, &key.key],
                )
                .await
                .map_err(store_error)?;
            Ok(())
        })
    }

    fn purge_expired(&self) -> BoxFuture<Result<u64, StoreError>> {
        let db = self.db.clone();
        Box::pin(async move {
            let client = db.primary().await.map_err(store_error)?;
            let mut total = 0;
            loop {
                let deleted = client
                    .execute(
                        &client
                            .prepare_cached(
                                "DELETE FROM mesh.idempotency_keys WHERE ctid IN (
                             SELECT ctid FROM mesh.idempotency_keys
                             WHERE expires_at < now() LIMIT $1)",
                            )
                            .await
                            .map_err(store_error)?,
                        &[&PURGE_BATCH],
                    )
                    .await
                    .map_err(store_error)?;
                total += deleted;
                if deleted < PURGE_BATCH as u64 {
                    return Ok(total);
                }
            }
        })
    }
}
