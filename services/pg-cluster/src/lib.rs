//! A local PostgreSQL primary and one streaming replica, made from the server binaries with
//! `initdb` and `pg_basebackup -R`, for `waybill dev up` and for the test harness.
//!
//! Both nodes listen on 127.0.0.1 only, on ports chosen free at creation, with trust
//! authentication: this is a development and test cluster, never a production one.
//!
//! PostgreSQL refuses to run as root. When we are root, every server binary runs as the
//! `postgres` system user (which the Debian package creates) and the cluster folder is handed
//! to that user.

mod binaries;
mod cluster;
mod error;

pub use binaries::PgBinaries;
pub use cluster::{Cluster, Node, Role};
pub use error::Error;
