//! Connection pools for the primary and the read replicas, and how database failures become
//! gRPC statuses.
//!
//! Writes and reads that must see the latest state use [`Db::primary`]. Reads that tolerate
//! replication lag use [`Db::replica`], which spreads them over the replicas and falls back to
//! the primary when a replica cannot be reached (a stale read beats no read).
//!
//! # Database spans
//!
//! A store's operation (one statement or one transaction) is one span, a child of the call
//! it serves, declared on the store function with the fields this module fills in:
//!
//! ```ignore
//! #[tracing::instrument(name = "orders.insert", level = "debug", skip_all, fields(
//!     otel.kind = "client", db.system = "postgresql", db.operation.name = "insert",
//!     db.namespace, waybill.db.role))]
//! pub async fn insert(&self, …) -> Result<Order, DbError> { … }
//! ```
//!
//! Taking a connection records which node serves it (`waybill.db.role` = `primary` or
//! `replica`; a replica read that fell back says `primary`) and the database
//! (`db.namespace`) on the current span, if it declares them. Spans per statement would cost
//! more than they tell: a store function is a handful of statements with one purpose. With
//! tracing off the span is a disabled DEBUG span (see `telemetry`).

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use tokio_postgres::{NoTls, error::SqlState};
use tonic::Status;

use crate::DatabaseConfig;

/// A pooled connection.
pub type Client = Object;
/// A transaction on a pooled connection (with its statement cache).
pub type Transaction<'a> = deadpool_postgres::Transaction<'a>;

/// The pools of one process, cheap to clone.
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

struct Inner {
    primary: Pool,
    /// How to reach the primary, for connections outside the pool.
    primary_config: tokio_postgres::Config,
    replicas: Vec<Pool>,
    next_replica: AtomicUsize,
    /// The database's name, for spans (`db.namespace`).
    namespace: String,
}

/// Which node served the current span's connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Primary,
    Replica,
}

impl Db {
    /// Builds the pools. Connections open lazily, so this succeeds while a database is down;
    /// health reports that instead.
    pub fn connect(config: &DatabaseConfig, primary_url: &str) -> Result<Self, DbError> {
        let primary_config = pg_config(primary_url, config)?;
        let primary = pool(primary_url, config)?;
        let replicas = config
            .replica_urls
            .iter()
            .map(|url| pool(url, config))
            .collect::<Result<_, _>>()?;
        let namespace = primary_config.get_dbname().unwrap_or_default().to_owned();
        Ok(Self {
            inner: Arc::new(Inner {
                primary,
                primary_config,
                replicas,
                next_replica: AtomicUsize::new(0),
                namespace,
            }),
        })
    }

    /// A connection to the primary.
    pub async fn primary(&self) -> Result<Client, DbError> {
        self.record(Role::Primary);
        self.inner.primary.get().await.map_err(DbError::from)
    }

    /// Notes on the current span that the primary serves its work, for work another task
    /// does on its behalf (a group-commit writer).
    pub fn note_primary(&self) {
        self.record(Role::Primary);
    }

    /// Notes on the current span, if it is a database span, which node serves it.
    fn record(&self, role: Role) {
        let span = tracing::Span::current();
        if span.is_disabled() {
            return;
        }
        span.record(
            "waybill.db.role",
            match role {
                Role::Primary => "primary",
                Role::Replica => "replica",
            },
        );
        span.record("db.namespace", self.inner.namespace.as_str());
    }

    /// A connection to the primary outside the pools, for a session its owner must drive
    /// itself: LISTEN, whose notifications a pooled connection's driver task drops. The caller
    /// polls the returned connection (`poll_message`) and closes it by dropping the client.
    pub async fn connect_primary_unpooled(
        &self,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
        ),
        DbError,
    > {
        Ok(self.inner.primary_config.connect(NoTls).await?)
    }

    /// A connection for a read that tolerates replication lag: the next replica in turn, or
    /// the primary when there are no replicas or the chosen one is unreachable.
    pub async fn replica(&self) -> Result<Client, DbError> {
        let replicas = &self.inner.replicas;
        if replicas.is_empty() {
            return self.primary().await;
        }
        let index = self.inner.next_replica.fetch_add(1, Ordering::Relaxed) % replicas.len();
        match replicas[index].get().await {
            Ok(client) => {
                self.record(Role::Replica);
                Ok(client)
            }
            Err(error) => {
                tracing::warn!(replica = index, %error, "replica unavailable; reading from the primary");
                self.primary().await
            }
        }
    }

    /// How many replicas are configured.
    pub fn replica_count(&self) -> usize {
        self.inner.replicas.len()
    }

    /// A connection to replica `index` itself, with no fallback (for replication metrics).
    pub async fn replica_at(&self, index: usize) -> Result<Client, DbError> {
        let pool = self
            .inner
            .replicas
            .get(index)
            .ok_or_else(|| DbError::Config(format!("no replica {index}")))?;
        pool.get().await.map_err(DbError::from)
    }

    /// The pools' use now: the primary's first, then each replica's in configuration order.
    pub fn pool_statuses(&self) -> impl Iterator<Item = deadpool_postgres::Status> + '_ {
        std::iter::once(&self.inner.primary)
            .chain(&self.inner.replicas)
            .map(Pool::status)
    }

    /// Whether the primary answers a trivial query within `timeout`.
    pub async fn primary_is_up(&self, timeout: Duration) -> bool {
        let probe = async {
            let client = self.primary().await?;
            client.simple_query("SELECT 1").await?;
            Ok::<_, DbError>(())
        };
        matches!(tokio::time::timeout(timeout, probe).await, Ok(Ok(())))
    }
}

fn pg_config(url: &str, config: &DatabaseConfig) -> Result<tokio_postgres::Config, DbError> {
    let mut pg: tokio_postgres::Config = url
        .parse()
        .map_err(|e| DbError::Config(format!("invalid database URL: {e}")))?;
    pg.connect_timeout(config.db_timeout);
    if pg.get_application_name().is_none() {
        pg.application_name("waybill");
    }
    // JIT compiles a plan once its estimated cost passes a threshold that batch statements
    // over unnest() arrays and the queue gauges cross: measured, it spent ~290 ms compiling a
    // query that runs in 30 ms. Our statements are short OLTP ones; a URL may still turn it on.
    let options = pg.get_options().unwrap_or_default();
    if !options.contains("jit") {
        pg.options(format!("{options} -c jit=off").trim_start());
    }
    Ok(pg)
}

fn pool(url: &str, config: &DatabaseConfig) -> Result<Pool, DbError> {
    let pg = pg_config(url, config)?;
    let manager = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            // `Fast` only checks that the socket is open; a dead server shows as a failed query,
            // which is reported as UNAVAILABLE anyway, and we save a round trip per checkout.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(config.db_pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(config.db_timeout))
        .create_timeout(Some(config.db_timeout))
        .recycle_timeout(Some(config.db_timeout))
        .build()
        .map_err(|e| DbError::Config(e.to_string()))
}

/// A database failure, classified by what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// No connection could be had (server down, pool exhausted, connection lost): retryable.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The transaction lost a serialization race or a deadlock: retryable as a whole.
    #[error("transaction conflict: {}", describe(.0))]
    Conflict(tokio_postgres::Error),
    /// Any other database error: a bug or a broken invariant, not the caller's fault.
    #[error("database error: {}", describe(.0))]
    Query(tokio_postgres::Error),
    /// The pool configuration is invalid.
    #[error("database configuration: {0}")]
    Config(String),
    /// Stored data breaks an invariant the code relies on (a bug or a bad manual edit).
    #[error("database invariant broken: {0}")]
    Invariant(String),
}

impl DbError {
    /// The SQLSTATE the server answered with, if the failure is a statement's.
    pub fn sqlstate(&self) -> Option<&SqlState> {
        match self {
            DbError::Query(error) | DbError::Conflict(error) => error.code(),
            _ => None,
        }
    }

    /// The same failure for each of `n` callers (a batch's writes), of the same kind for a
    /// client: retryable (UNAVAILABLE) if this one is, otherwise an internal error. DbError is
    /// not Clone (a driver error is not).
    pub fn copies(&self, n: usize) -> Vec<DbError> {
        let message = self.to_string();
        let retryable = matches!(self, DbError::Unavailable(_) | DbError::Conflict(_));
        (0..n)
            .map(|_| {
                if retryable {
                    DbError::Unavailable(message.clone())
                } else {
                    DbError::Invariant(message.clone())
                }
            })
            .collect()
    }
}

/// The server's message and SQLSTATE, which tokio-postgres's own Display ("db error") hides
/// in the error's source.
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}

fn is_io(error: &tokio_postgres::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if cause.is::<std::io::Error>() {
            return true;
        }
        source = cause.source();
    }
    false
}

impl From<PoolError> for DbError {
    fn from(error: PoolError) -> Self {
        DbError::Unavailable(error.to_string())
    }
}

impl From<tokio_postgres::Error> for DbError {
    fn from(error: tokio_postgres::Error) -> Self {
        if error.is_closed() {
            return DbError::Unavailable(error.to_string());
        }
        match error.code() {
            Some(code)
                if *code == SqlState::T_R_SERIALIZATION_FAILURE
                    || *code == SqlState::T_R_DEADLOCK_DETECTED =>
            {
                DbError::Conflict(error)
            }
            Some(code)
                if *code == SqlState::ADMIN_SHUTDOWN
                    || *code == SqlState::CRASH_SHUTDOWN
                    || *code == SqlState::CANNOT_CONNECT_NOW
                    || *code == SqlState::READ_ONLY_SQL_TRANSACTION =>
            {
                DbError::Unavailable(error.to_string())
            }
            // No SQLSTATE: the connection failed (an I/O error underneath), or the client
            // refused the query itself (a parameter or column of the wrong type: a bug).
            None if is_io(&error) => DbError::Unavailable(error.to_string()),
            None => DbError::Query(error),
            Some(_) => DbError::Query(error),
        }
    }
}

impl From<DbError> for Status {
    /// The edge where database errors meet clients: the code says what the client may do,
    /// and no SQL text crosses it. Unexpected errors are logged with a reference the client
    /// can quote.
    fn from(error: DbError) -> Self {
        match error {
            DbError::Unavailable(detail) => {
                tracing::warn!(%detail, "database unavailable");
                Status::unavailable("database unavailable; retry later")
            }
            DbError::Conflict(detail) => {
                tracing::info!(%detail, "transaction conflict");
                Status::aborted("concurrent update; retry the call")
            }
            DbError::Query(_) | DbError::Config(_) | DbError::Invariant(_) => {
                let reference = uuid::Uuid::now_v7();
                tracing::error!(%reference, %error, "database error");
                Status::internal(format!("internal error (reference {reference})"))
            }
        }
    }
}
