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
