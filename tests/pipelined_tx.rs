//! `waybill_runtime::pipeline::PipelinedTx` against a real primary, through a pool of one
//! connection: whatever way a transaction ends, the pool never hands out a connection that is
//! still inside it.

// A failed unwrap is a failed test, which is what we want here.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tokio_postgres::error::SqlState;
use waybill_runtime::{DatabaseConfig, Db, DbError, pipeline::PipelinedTx};
use waybill_test_support::TestDb;

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

/// A fresh database, a pool of one connection to it and that connection's backend.
async fn setup() -> (TestDb, Db, i32) {
    let db = TestDb::new().await;
    let pool = pool_of_one(&db).await;
    let (pid, _) = next_connection(&pool).await;
    (db, pool, pid)
}

/// A transaction begun with the insert of row 1, and that insert's answer.
async fn begin_inserting_one(pool: &Db) -> (PipelinedTx, Vec<Vec<tokio_postgres::Row>>) {
    PipelinedTx::begin(
        pool.primary().await.unwrap(),
        &[("INSERT INTO public.t VALUES (1) RETURNING n", &[])],
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn a_committed_transaction_writes_and_frees_its_connection() {
    let (db, pool, pid) = setup().await;
    let (tx, answers) = begin_inserting_one(&pool).await;
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
    let (db, pool, pid) = setup().await;
    let (tx, _) = begin_inserting_one(&pool).await;
    tx.rollback().await.unwrap();

    assert_eq!(rows(&db).await, Vec::<i32>::new());
    assert_eq!(next_connection(&pool).await, (pid, true));
}

#[tokio::test]
async fn a_failing_last_statement_rolls_the_whole_transaction_back() {
    let (db, pool, pid) = setup().await;
    let (tx, _) = begin_inserting_one(&pool).await;
    let error = tx
        .commit(&[("INSERT INTO public.t VALUES (1)", &[])])
        .await
        .unwrap_err();
    assert!(
        matches!(&error, DbError::Query(e) | DbError::Conflict(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION)),
        "the statement's own error, not the COMMIT's: {error:?}"
    );

    // The same backend serves next, outside any transaction: the rows are really gone, not
    // waiting in a transaction that nobody ended.
    assert_eq!(next_connection(&pool).await, (pid, true));
    assert_eq!(
        rows(&db).await,
        Vec::<i32>::new(),
        "the first insert went too"
    );
}

#[tokio::test]
async fn a_commit_with_nothing_to_send_along_is_refused() {
    let (db, pool, pid) = setup().await;
    let (tx, _) = begin_inserting_one(&pool).await;
    assert!(matches!(tx.commit(&[]).await, Err(DbError::Invariant(_))));
    assert_eq!(next_connection(&pool).await, (pid, true));
    assert_eq!(rows(&db).await, Vec::<i32>::new());
}

#[tokio::test]
async fn a_transaction_dropped_open_is_rolled_back_before_its_connection_serves_again() {
    let (db, pool, pid) = setup().await;
    let (tx, _) = begin_inserting_one(&pool).await;
    // As when a call is cancelled mid-transaction, or an error leaves with `?`.
    drop(tx);

    assert_eq!(next_connection(&pool).await, (pid, true));
    assert_eq!(rows(&db).await, Vec::<i32>::new());
}

/// A call cancelled at its deadline while its statement waits for a lock: the connection
/// stays out of the pool, still counted, until the statement ends and the rollback is done.
/// The pool never has more backends than its size.
#[tokio::test]
async fn a_transaction_cancelled_in_a_lock_wait_keeps_its_slot_until_rolled_back() {
    let (db, pool, pid) = setup().await;
    pool.primary()
        .await
        .unwrap()
        .batch_execute("INSERT INTO public.t VALUES (7)")
        .await
        .unwrap();
    let mut holder = db.primary().await;
    let holding = holder.transaction().await.unwrap();
    holding
        .execute("SELECT n FROM public.t WHERE n = 7 FOR UPDATE", &[])
        .await
        .unwrap();

    let waiting = tokio::time::timeout(
        Duration::from_millis(300),
        PipelinedTx::begin(
            pool.primary().await.unwrap(),
            &[
                ("INSERT INTO public.t VALUES (8)", &[]),
                ("SELECT n FROM public.t WHERE n = 7 FOR UPDATE", &[]),
            ],
        ),
    )
    .await;
    assert!(waiting.is_err(), "the lock wait outlived the deadline");

    // The one slot is still taken: no second backend while the first waits.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), pool.primary())
            .await
            .is_err(),
        "the pool handed out a connection while its only one was still in a transaction"
    );
    holding.rollback().await.unwrap();

    assert_eq!(next_connection(&pool).await, (pid, true));
    assert_eq!(rows(&db).await, [7], "the cancelled insert was rolled back");
}
