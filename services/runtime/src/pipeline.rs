//! Several statements in one round trip.
//!
//! A round trip (a Postgres backend woken, two loopback sends) is the unit of cost on the
//! services' hot paths. tokio-postgres sends a request the moment its future is first polled,
//! so statements whose futures are polled together leave together, and Postgres runs them
//! in the order they arrived, each with a snapshot of its own: a later statement sees what an
//! earlier one waited for (a row lock, another transaction's commit).

use deadpool_postgres::GenericClient;
use futures_util::future::try_join_all;
use tokio_postgres::{Row, types::ToSql};

use crate::DbError;

/// One statement and its parameters.
pub type Statement<'a> = (&'a str, &'a [&'a (dyn ToSql + Sync)]);

/// Runs `statements` through `client` (typically a transaction) in one round trip, in order,
/// and returns each one's rows. On failure, the error is the first failing statement's (those
/// after it fail too, with "transaction is aborted"), and a transaction is left to roll back.
pub async fn pipeline(
    client: &impl GenericClient,
    statements: &[Statement<'_>],
) -> Result<Vec<Vec<Row>>, DbError> {
    // All prepared first (from the connection's cache after its first use): a statement still
    // to be prepared would send its parse ahead of the others but its execution only after
    // the answer, behind statements meant to run after it.
    let prepared =
        try_join_all(statements.iter().map(|(sql, _)| client.prepare_cached(sql))).await?;
    // `try_join_all` polls in order, so the requests leave in order, and when several have
    // failed by the time it looks, the first one's error is the one returned.
    Ok(try_join_all(
        prepared
            .iter()
            .zip(statements)
            .map(|(statement, (_, params))| client.query(statement, params)),
    )
    .await?)
}

/// A transaction whose `BEGIN` leaves with its first statements and whose `COMMIT` leaves
/// with its last: a transaction of two exchanges costs two round trips, where
/// tokio-postgres's `Transaction` spends one more at each end waiting for `BEGIN` and
/// `COMMIT` alone.
///
/// A `COMMIT` sent behind a statement that failed ends the transaction as a rollback
/// (Postgres answers it `ROLLBACK`). Paths that end a transaction early on purpose call
/// [`PipelinedTx::rollback`].
///
/// A transaction dropped open (an error returned with `?`, a call cancelled at its deadline)
/// must never serve another caller from inside the transaction. A task rolls it back and only
/// then frees the pool slot: behind a statement still running (a lock wait), the ROLLBACK
/// waits for it, and the connection keeps counting against the pool meanwhile, so a burst of
/// cancellations cannot open more backends than the pool allows. A connection that does not
/// answer the ROLLBACK within [`ROLLBACK_PATIENCE`] is closed instead. A call cancelled after
/// its `commit` sent the COMMIT may still have committed: callers on such paths are idempotent.
pub struct PipelinedTx {
    /// `None` once the transaction has ended and the connection went back to the pool.
    client: Option<crate::db::Client>,
}

impl PipelinedTx {
    /// Begins a transaction on `client` and runs `first` in it, in one round trip.
    pub async fn begin(
        client: crate::db::Client,
        first: &[Statement<'_>],
    ) -> Result<(Self, Vec<Vec<Row>>), DbError> {
        let tx = Self {
            client: Some(client),
        };
        let mut statements = Vec::with_capacity(first.len() + 1);
        statements.push(("BEGIN", &[][..]));
        statements.extend_from_slice(first);
        let mut rows = pipeline(tx.client(), &statements).await?;
        rows.remove(0);
        Ok((tx, rows))
    }

    /// The connection, for statements in the middle of the transaction.
    pub fn client(&self) -> &crate::db::Client {
        // Only `commit` and `rollback` take the client, and they consume `self`.
        self.client
            .as_ref()
            .unwrap_or_else(|| unreachable!("a PipelinedTx is used after it ended"))
    }

    /// Runs `last` and commits, in one round trip; returns `last`'s rows. `last` must not be
    /// empty: a COMMIT alone would answer `ROLLBACK` without an error if an earlier statement
    /// had failed unnoticed.
    pub async fn commit(mut self, last: &[Statement<'_>]) -> Result<Vec<Vec<Row>>, DbError> {
        if last.is_empty() {
            return Err(DbError::Invariant(
                "PipelinedTx::commit needs a statement to send with the COMMIT".to_owned(),
            ));
        }
        let mut statements = Vec::with_capacity(last.len() + 1);
        statements.extend_from_slice(last);
        statements.push(("COMMIT", &[][..]));
        let result = pipeline(self.client(), &statements).await;
        if result.is_ok() {
            // Committed: the connection can serve again.
            self.client = None;
        }
        // On failure the drop rolls back (the COMMIT may not have been sent: a statement that
        // failed to prepare) before the connection serves again.
        let mut rows = result?;
        rows.pop();
        Ok(rows)
    }

    /// Rolls back, keeping the connection for the pool.
    pub async fn rollback(mut self) -> Result<(), DbError> {
        self.client().batch_execute("ROLLBACK").await?;
        self.client = None;
        Ok(())
    }
}

/// How long a dropped transaction's ROLLBACK may take before its connection is closed.
pub const ROLLBACK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

impl Drop for PipelinedTx {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to roll back on: out of the pool, and closed when dropped.
            drop(deadpool_postgres::Object::take(client));
            return;
        };
        runtime.spawn(async move {
            let rolled_back =
                tokio::time::timeout(ROLLBACK_PATIENCE, client.batch_execute("ROLLBACK")).await;
            if !matches!(rolled_back, Ok(Ok(()))) {
                drop(deadpool_postgres::Object::take(client));
            }
            // Otherwise `client` goes back to the pool here, out of the transaction.
        });
    }
}
