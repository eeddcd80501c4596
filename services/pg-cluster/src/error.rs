use std::{io, path::PathBuf};

/// Why a local cluster could not be found, made, started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The PostgreSQL server binaries are not installed where we look.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup) not found on PATH or under \
         /usr/lib/postgresql/*/bin; install them (Debian/Ubuntu: `apt-get install postgresql`) \
         or point WAYBILL_PG_BINDIR at their folder"
    )]
    BinariesNotFound,
    /// We are root and the `postgres` system user, which must own the cluster, does not exist.
    #[error("running as root needs the `postgres` system user to own the cluster: {0}")]
    NoPostgresUser(String),
    /// The `postgres` user cannot reach the cluster folder (a parent is not traversable).
    #[error(
        "the postgres user cannot reach {0}; choose a cluster folder it can traverse \
         (for example under /tmp) with --dir or WAYBILL_DEV_DIR"
    )]
    Unreachable(PathBuf),
    /// A server command failed; its output is in the message.
    #[error("`{command}` failed: {output}")]
    Command {
        /// The command line that failed.
        command: String,
        /// What it printed, or its exit status.
        output: String,
    },
    /// The cluster's state file is missing or unreadable.
    #[error("no usable cluster state at {path}: {reason}")]
    State {
        /// Where the state file was expected.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// A file system or process-spawn error.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The underlying error.
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}
