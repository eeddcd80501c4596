//! The one configuration of a waybill process, read from flags and `WAYBILL_*` environment
//! variables (a flag wins over its variable). `waybill serve --help` prints all of it; the
//! Helm chart sets the variables.

use std::{net::SocketAddr, time::Duration};

/// Where the databases are and how to pool connections to them.
#[derive(Clone, Debug, clap::Args)]
pub struct DatabaseConfig {
    /// Primary database URL (postgres://user:password@host:port/db). All writes go here.
    /// Unset: use the local cluster of `waybill dev up`, if there is one.
    #[arg(long, env = "WAYBILL_PRIMARY_URL", hide_env_values = true)]
    pub primary_url: Option<String>,

    /// Read replica URLs, comma-separated. Stale-tolerant reads are spread over them; with none,
    /// reads go to the primary.
    #[arg(
        long = "replica-url",
        env = "WAYBILL_REPLICA_URLS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub replica_urls: Vec<String>,

    /// Most connections per pool (one pool for the primary, one per replica).
    #[arg(long, env = "WAYBILL_DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: usize,

    /// How long to wait for a connection (to open one, or for a free one in the pool) before
    /// the call fails with UNAVAILABLE.
    #[arg(long, env = "WAYBILL_DB_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub db_timeout: Duration,
}

/// How the gRPC server listens and stops.
#[derive(Clone, Debug, clap::Args)]
pub struct ServerConfig {
    /// Address to serve gRPC on; port 0 picks a free port (printed at startup).
    #[arg(long, env = "WAYBILL_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Address of the admin HTTP endpoint (Prometheus metrics at /metrics); port 0 picks a
    /// free port (logged on stderr at startup). Keep it off the public network.
    #[arg(long, env = "WAYBILL_ADMIN_LISTEN", default_value = "127.0.0.1:9464")]
    pub admin_listen: SocketAddr,

    /// After SIGTERM/SIGINT, how long in-flight calls may run before the process exits anyway.
    /// Keep it below the orchestrator's kill timeout (Kubernetes: terminationGracePeriodSeconds).
    #[arg(long, env = "WAYBILL_SHUTDOWN_GRACE", default_value = "25s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// How often the primary database is probed for grpc.health.v1, and database metrics
    /// (pool use, replica lag) are sampled.
    #[arg(long, env = "WAYBILL_HEALTH_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub health_interval: Duration,
}

/// Where the services a process calls are. Each is `http://host:port[,http://host:port…]` or
/// `dns://host:port` (all addresses of a name, as for a Kubernetes headless Service). Unset:
/// this process's own address (all services in one process).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct TargetsConfig {
    /// Where the orders service is.
    #[arg(long, env = "WAYBILL_ORDERS_TARGET")]
    pub orders_target: Option<String>,
    /// Where the inventory service is.
    #[arg(long, env = "WAYBILL_INVENTORY_TARGET")]
    pub inventory_target: Option<String>,
    /// Where the delivery service is.
    #[arg(long, env = "WAYBILL_DELIVERY_TARGET")]
    pub delivery_target: Option<String>,
    /// Where the notifications service is.
    #[arg(long, env = "WAYBILL_NOTIFICATIONS_TARGET")]
    pub notifications_target: Option<String>,
}

impl TargetsConfig {
    /// `target` if configured, else `own` (this process's address).
    pub fn or_own<'a>(target: &'a Option<String>, own: &'a str) -> &'a str {
        target.as_deref().unwrap_or(own)
    }
}
/// The mesh policy (deadlines, retries, breakers, shedding, idempotency, faults per method).
#[derive(Clone, Debug, clap::Args)]
pub struct MeshConfig {
    /// A JSON policy document in the gRPC service-config shape (`methodConfig`) plus waybill's
    /// fields; see mesh-layer's `policy` module. Unset: the built-in defaults.
    #[arg(long, env = "WAYBILL_MESH_POLICY")]
    pub mesh_policy: Option<std::path::PathBuf>,
}

impl MeshConfig {
    /// Reads and validates the policy; an error names the file and the offending field.
    pub fn load(&self) -> Result<mesh_layer::policy::Policy, String> {
        let Some(path) = &self.mesh_policy else {
            return Ok(mesh_layer::policy::Policy::default());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("mesh policy {}: {e}", path.display()))?;
        mesh_layer::policy::Policy::from_json(&text)
            .map_err(|e| format!("mesh policy {}: {e}", path.display()))
    }
}

/// How logs look.
#[derive(Clone, Debug, clap::Args)]
pub struct LogConfig {
    /// Log format on stderr. Filter with RUST_LOG (default: info).
    #[arg(long, env = "WAYBILL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Parses `250ms`, `5s`, `2m` or a bare number of seconds (the mesh policy's units, plus bare
/// numbers, which flags and environment variables commonly use).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    match text.parse::<f64>() {
        Ok(_) => mesh_layer::policy::parse_duration(&format!("{text}s")),
        Err(_) => mesh_layer::policy::parse_duration(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
