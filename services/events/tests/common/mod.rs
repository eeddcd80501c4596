//! What the bus tests share: a fresh database with the `bus` schema and a test service
//! (`app`) whose outbox and inbox are created from the crate's DDL templates, a handler that
//! records what it sees, and background relays and consumers that stop when told.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use tokio::{sync::oneshot, task::JoinHandle};
use uuid::Uuid;
use waybill_events::{
    Consumer, Event, Handler, HandlerError, INBOX_TABLE_SQL, OUTBOX_TABLE_SQL, Relay, outbox,
};
use waybill_runtime::{DatabaseConfig, Db};
use waybill_test_support::{PATIENCE, Role, cluster, connect};

/// The test service's schema.
pub const APP: &str = "app";
/// The topic the tests publish on.
pub const TOPIC: &str = "app.thing_happened";

/// A database of one test's own.
pub struct Fixture {
    /// Pools on it.
    pub db: Db,
    /// Its URL.
    pub url: String,
}

impl Fixture {
    /// Creates the database, migrates the `bus` schema, and creates `app.outbox`,
    /// `app.inbox` (from the templates) and `app.effects` (what handlers write).
    pub async fn new() -> Self {
        let cluster = cluster();
        let name = format!("events_{}", Uuid::now_v7().simple());
        let admin = connect(&cluster.url(Role::Primary, "postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let url = cluster.url(Role::Primary, &name);
        waybill_runtime::migrate::run(&url, &[waybill_events::SCHEMA])
            .await
            .unwrap();
        connect(&url)
            .await
            .batch_execute(&format!(
                "CREATE SCHEMA {APP};\n{}\n{}\n
                 CREATE TABLE {APP}.effects (handler text NOT NULL, event_id uuid NOT NULL);",
                outbox::table_sql(OUTBOX_TABLE_SQL, APP),
                outbox::table_sql(INBOX_TABLE_SQL, APP),
            ))
            .await
            .unwrap();
        let config = DatabaseConfig {
            primary_url: Some(url.clone()),
            replica_urls: Vec::new(),
            db_pool_size: 8,
            db_timeout: Duration::from_secs(5),
        };
        let db = Db::connect(&config, &url).unwrap();
        Self { db, url }
    }

    /// Appends `event` to `app.outbox` in a transaction that commits or rolls back.
    pub async fn emit(&self, event: &Event, commit: bool) {
        let mut client = self.db.primary().await.unwrap();
        let tx = client.transaction().await.unwrap();
        outbox::append(&tx, APP, event).await.unwrap();
        if commit {
            tx.commit().await.unwrap();
        } else {
            tx.rollback().await.unwrap();
        }
    }

    /// Appends `events` to `app.outbox` in one committed transaction.
    pub async fn emit_all(&self, events: &[Event]) {
        let mut client = self.db.primary().await.unwrap();
        let tx = client.transaction().await.unwrap();
        for event in events {
            outbox::append(&tx, APP, event).await.unwrap();
        }
        tx.commit().await.unwrap();
    }

    /// `SELECT count(*) FROM <table> [WHERE <filter>]`.
    pub async fn count(&self, table: &str) -> i64 {
        connect(&self.url)
            .await
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0)
    }

    /// The events `handler` committed effects for, in commit order.
    pub async fn effects(&self, handler: &str) -> Vec<Uuid> {
        connect(&self.url)
            .await
            .query(
                "SELECT event_id FROM app.effects WHERE handler = $1",
                &[&handler],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect()
    }
}

/// A new event on [`TOPIC`].
pub fn event(key: &str) -> Event {
    Event::from_payload(TOPIC, key, key.as_bytes().to_vec()).with_header("traceparent", "00-t-s-01")
}

/// A handler that writes an effect row through the consumer's transaction and remembers
/// every call; it fails (retryably, or permanently) while told to.
#[derive(Clone)]
pub struct Recorder {
    name: &'static str,
    state: Arc<State>,
}

#[derive(Default)]
struct State {
    calls: AtomicU32,
    seen: Mutex<Vec<Event>>,
    failing: AtomicBool,
    permanent: AtomicBool,
    poisoned: Mutex<Option<String>>,
    swallowing: Mutex<Option<String>>,
    /// How long each call takes, in milliseconds.
    slow_ms: std::sync::atomic::AtomicU64,
}

impl Recorder {
    /// A recorder whose effects are tagged `name`.
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            state: Arc::default(),
        }
    }

    /// Makes every call fail with `Retry` (or `Permanent`) until told otherwise.
    pub fn fail(&self, failing: bool, permanent: bool) {
        self.state.permanent.store(permanent, Ordering::SeqCst);
        self.state.failing.store(failing, Ordering::SeqCst);
    }

    /// Makes every call for events keyed `key` fail permanently, and no other.
    pub fn poison(&self, key: &str) {
        *self.state.poisoned.lock().unwrap() = Some(key.to_owned());
    }

    /// Makes every call for events keyed `key` run a failing statement, ignore its error and
    /// report success: a buggy handler, which leaves its transaction aborted.
    pub fn swallow(&self, key: &str) {
        *self.state.swallowing.lock().unwrap() = Some(key.to_owned());
    }

    /// Makes every call take `delay` (a slow webhook, say).
    pub fn slow(&self, delay: std::time::Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap();
        self.state.slow_ms.store(ms, Ordering::SeqCst);
    }

    /// How many times the handler ran.
    pub fn calls(&self) -> u32 {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// The events the handler was called with, in order (failed calls included).
    pub fn seen(&self) -> Vec<Event> {
        self.state.seen.lock().unwrap().clone()
    }
}

#[tonic::async_trait]
impl Handler for Recorder {
    async fn handle(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        event: &Event,
    ) -> Result<(), HandlerError> {
        self.state.calls.fetch_add(1, Ordering::SeqCst);
        self.state.seen.lock().unwrap().push(event.clone());
        let slow_ms = self.state.slow_ms.load(Ordering::SeqCst);
        if slow_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(slow_ms)).await;
        }
        tx.execute(
            "INSERT INTO app.effects (handler, event_id) VALUES ($1, $2)",
            &[&self.name, &event.id],
        )
        .await?;
        let swallowing = self.state.swallowing.lock().unwrap().clone();
        if swallowing.as_deref() == Some(event.key.as_str()) {
            let failed = tx.execute("SELECT 1 / 0", &[]).await;
            assert!(failed.is_err(), "the statement fails");
            return Ok(());
        }
        if self.state.poisoned.lock().unwrap().as_deref() == Some(event.key.as_str()) {
            return Err(HandlerError::Permanent(format!("poisoned {}", event.key)));
        }
        if self.state.failing.load(Ordering::SeqCst) {
            let message = format!("boom on {}", event.key);
            return Err(if self.state.permanent.load(Ordering::SeqCst) {
                HandlerError::Permanent(message)
            } else {
                HandlerError::Retry(message)
            });
        }
        Ok(())
    }
}

/// A relay or consumer running in the background until stopped (or dropped).
pub struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    /// Asks it to stop and waits (bounded) until it has.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(PATIENCE, &mut self.task)
            .await
            .expect("stops in time")
            .unwrap();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn spawn<F: Future<Output = ()> + Send + 'static>(
    run: impl FnOnce(oneshot::Receiver<()>) -> F,
) -> Running {
    let (stop, stopped) = oneshot::channel();
    Running {
        stop: Some(stop),
        task: tokio::spawn(run(stopped)),
    }
}

/// Runs `relay` in the background.
pub fn run_relay(relay: Relay) -> Running {
    spawn(|stopped| relay.run(stopped))
}

/// Runs `consumer` in the background.
pub fn run_consumer(consumer: Consumer) -> Running {
    spawn(|stopped| consumer.run(stopped))
}

/// Shows the crate's logs with `TEST_LOG=1`.
pub fn init_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("waybill_events=debug,info")
            .with_test_writer()
            .try_init();
    }
}
