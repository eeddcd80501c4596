//! The shared runtime of every waybill service: one configuration, the database pools and
//! their read routing, per-service schema migrations, health, serving with graceful drain,
//! structured logs, and metrics on an admin port.
//!
//! A service crate brings only its gRPC implementation, its storage and its migrations; how a
//! process starts, connects, reports health and stops lives here, once.

pub mod admin;
pub mod config;
pub mod consistency;
pub mod db;
pub mod group_commit;
pub mod health;
pub mod idempotency;
pub mod listen;
pub mod metrics;
pub mod migrate;
pub mod nats;
pub mod otlp_metrics;
pub mod page_token;
pub mod pipeline;
pub mod purge;
pub mod server;
pub mod telemetry;
pub mod validate;

pub use config::{DatabaseConfig, LogConfig, MeshConfig, ServerConfig, TargetsConfig};
pub use consistency::ConsistencyToken;
pub use db::{Client, Db, DbError, Transaction};
pub use idempotency::{MESH_SCHEMA, PgIdempotencyStore};
pub use migrate::Schema;
