//! `waybill_runtime::pipeline::PipelinedTx` against a real primary, through a pool of one
//! connection: whatever way a transaction ends, the pool never hands out a connection that is
//! still inside it.

// A failed unwrap is a failed test, which is what we want here.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tokio_postgres::error::SqlState;
use waybill_runtime::{DatabaseConfig, Db, DbError, pipeline::PipelinedTx};
use waybill_test_support::{TestDb, eventually};

async fn pool_of_one(db: &TestDb) -> Db {
    let config = DatabaseConfig {
        primary_url: Some(db.primary_url.clone()),
        replica_urls: Vec::new(),
        db_pool_size: 1,
        db_timeout: Duration::from_secs(5),
    };
    let pool = Db::connect(&config, &db.primary_url).unwrap();
    pool.primary()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE IF NOT EXISTS public.t (n int PRIMARY KEY)")
        .await
        .unwrap();
    pool
}

/// The next connection the pool hands out: its backend, and whether it is outside any
/// transaction block (where SAVEPOINT is refused).
async fn next_connection(pool: &Db) -> (i32, bool) {
    let client = pool.primary().await.unwrap();
    let pid = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let outside = match client.batch_execute("SAVEPOINT probe").await {
        Ok(()) => false,
        Err(error) => error.code() == Some(&SqlState::NO_ACTIVE_SQL_TRANSACTION),
    };
    (pid, outside)
}

async fn rows(db: &TestDb) -> Vec<i32> {
    db.primary()
        .await
        .query("SELECT n FROM public.t ORDER BY n", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test]
async fn a_committed_transaction_writes_and_frees_its_connection() {
    let db = TestDb::new().await;
    let pool = pool_of_one(&db).await;
    let (pid, _) = next_connection(&pool).await;

    let (tx, answers) = PipelinedTx::begin(
        pool.primary().await.unwrap(),
        &[("INSERT INTO public.t VALUES (1) RETURNING n", &[])],
    )
    .await
    .unwrap();
    assert_eq!(answers[0][0].get::<_, i32>(0), 1);
    let answers = tx
        .commit(&[("INSERT INTO public.t VALUES (2) RETURNING n", &[])])
        .await
        .unwrap();
    assert_eq!(answers.len(), 1, "the COMMIT's answer is not returned");

    assert_eq!(rows(&db).await, [1, 2]);
    assert_eq!(
        next_connection(&pool).await,
        (pid, true),
        "same connection, no transaction"
    );
}

#[tokio::test]
async fn a_rolled_back_transaction_writes_nothing_and_frees_its_connection() {
    let db = TestDb::new().await;
    let pool = pool_of_one(&db).await;
    let (pid, _) = next_connection(&pool).await;

    let (tx, _) = PipelinedTx::begin(
        pool.primary().await.unwrap(),
        &[("INSERT INTO public.t VALUES (1)", &[])],
    )
    .await
    .unwrap();
    tx.rollback().await.unwrap();

    assert_eq!(rows(&db).await, Vec::<i32>::new());
    assert_eq!(next_connection(&pool).await, (pid, true));
}

#[tokio::test]
async fn a_failing_last_statement_rolls_the_whole_transaction_back() {
    let db = TestDb::new().await;
    let pool = pool_of_one(&db).await;

    let (tx, _) = PipelinedTx::begin(
        pool.primary().await.unwrap(),
        &[("INSERT INTO public.t VALUES (1)", &[])],
    )
    .await
    .unwrap();
    let error = tx
        .commit(&[("INSERT INTO public.t VALUES (1)", &[])])
        .await
        .unwrap_err();
    assert!(
        matches!(&error, DbError::Query(e) | DbError::Conflict(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION)),
        "the statement's own error, not the COMMIT's: {error:?}"
    );

    assert_eq!(
        rows(&db).await,
        Vec::<i32>::new(),
        "the first insert went too"
    );
    assert!(next_connection(&pool).await.1, "no transaction left open");
}

#[tokio::test]
async fn a_transaction_dropped_open_takes_its_connection_out_of_the_pool() {
    let db = TestDb::new().await;
    let pool = pool_of_one(&db).await;
    let (pid, _) = next_connection(&pool).await;

    let (tx, _) = PipelinedTx::begin(
        pool.primary().await.unwrap(),
        &[("INSERT INTO public.t VALUES (1)", &[])],
    )
    .await
    .unwrap();
    // As when a call is cancelled mid-transaction, or an error leaves with `?`.
    drop(tx);

    let (next_pid, clean) = next_connection(&pool).await;
    assert_ne!(next_pid, pid, "a new connection");
    assert!(clean);
    // The closed connection's transaction is rolled back as its backend exits.
    eventually("the old backend is gone", || async {
        let gone = db
            .primary()
            .await
            .query_one(
                "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)",
                &[&pid],
            )
            .await
            .ok()?
            .get::<_, bool>(0);
        gone.then_some(())
    })
    .await;
    assert_eq!(rows(&db).await, Vec::<i32>::new());
}
