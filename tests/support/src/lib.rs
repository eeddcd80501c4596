//! The end-to-end test harness.
//!
//! - [`cluster`]: one Postgres primary + streaming replica per test binary, on free ports,
//!   stopped and deleted when the binary exits (however it exits).
//! - [`TestDb`]: a fresh database per test on that cluster, migrated by `waybill migrate`, and
//!   already present on the replica.
//! - [`Waybill`]: a `waybill serve` child process on an ephemeral port, killed when dropped;
//!   its log is printed if the test fails.
//! - [`otlp::Collector`]: an OTLP/gRPC trace receiver that keeps the spans children export.
//!
//! The harness runs the real `waybill` binary, which `cargo test` does not build for the root
//! package's tests: `scripts/test` builds it first (or run `cargo build -p waybill`).
//! Set `TEST_LOG=1` to see service logs live.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{OnceLock, mpsc},
    time::{Duration, Instant},
};

use tokio_postgres::NoTls;
pub use waybill_pg_cluster::{Cluster, Role};

pub mod otlp;

/// Settings for test clusters: durability is not under test here, speed is welcome.
const TEST_SETTINGS: &[(&str, &str)] = &[("fsync", "off"), ("full_page_writes", "off")];
/// How long any wait in the harness may take before the test fails instead of hanging.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// This test binary's cluster, started on first use.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        Cluster::ephemeral(TEST_SETTINGS)
            .unwrap_or_else(|error| panic!("cannot start a test Postgres cluster: {error}"))
    })
}

/// A database of its own for one test, on both nodes of [`cluster`].
pub struct TestDb {
    /// The database's name.
    pub name: String,
    /// Its URL on the primary.
    pub primary_url: String,
    /// Its URL on the replica.
    pub replica_url: String,
}

impl TestDb {
    /// Creates a database, applies every service's migrations, and waits until the replica
    /// has replayed all of it.
    pub async fn new() -> Self {
        let cluster = cluster();
        let name = format!("test_{}", uuid::Uuid::now_v7().simple());
        let admin = connect(&cluster.url(Role::Primary, "postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|error| panic!("CREATE DATABASE {name}: {error}"));
        let db = Self {
            primary_url: cluster.url(Role::Primary, &name),
            replica_url: cluster.url(Role::Replica, &name),
            name,
        };
        let output = Command::new(waybill_bin())
            .args(["migrate", "--primary-url", &db.primary_url])
            .output()
            .unwrap_or_else(|error| panic!("run waybill migrate: {error}"));
        assert!(
            output.status.success(),
            "waybill migrate failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        wait_for_replica().await;
        db
    }

    /// A connection to this database on the primary.
    pub async fn primary(&self) -> tokio_postgres::Client {
        connect(&self.primary_url).await
    }

    /// A connection to this database on the replica.
    pub async fn replica(&self) -> tokio_postgres::Client {
        connect(&self.replica_url).await
    }

    /// `schema.table`'s updates and, of those, HOT updates (`pg_stat_user_tables`), once at
    /// least `updates` are counted: the server's backends report their table statistics when
    /// idle, within seconds.
    pub async fn update_counts(&self, schema: &str, table: &str, updates: i64) -> (i64, i64) {
        let primary = self.primary().await;
        eventually(
            &format!("{updates} updates of {schema}.{table} counted"),
            || async {
                let row = primary
                    .query_one(
                        "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables
                     WHERE schemaname = $1 AND relname = $2",
                        &[&schema, &table],
                    )
                    .await
                    .ok()?;
                let counts: (i64, i64) = (row.get(0), row.get(1));
                (counts.0 >= updates).then_some(counts)
            },
        )
        .await
    }

    /// A statistics counter read by `query` (one `bigint`), once it has settled. Call it after
    /// the server process is gone: a backend that goes idle within a second of its last report
    /// holds its counts for up to 10 s, but one that exits reports them. So this reads until
    /// two readings a second apart agree (and are not 0), which then means all have arrived.
    pub async fn settled_statistic(&self, query: &str) -> i64 {
        let primary = self.primary().await;
        let mut previous = -1;
        let settled_by = Instant::now() + Duration::from_secs(30);
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let read: i64 = primary
                .query_one(query, &[])
                .await
                .unwrap_or_else(|error| panic!("{query}: {error}"))
                .get(0);
            if read > 0 && read == previous {
                return read;
            }
            assert!(
                Instant::now() < settled_by,
                "statistics did not settle: {query} read {read}"
            );
            previous = read;
        }
    }

    /// How many rows `table` (schema-qualified) has on the primary.
    pub async fn count(&self, table: &str) -> i64 {
        self.primary()
            .await
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap_or_else(|error| panic!("count {table}: {error}"))
            .get(0)
    }
}

/// Opens a connection, panicking with the URL on failure.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|error| panic!("connect to {url}: {error}"));
    tokio::spawn(connection);
    client
}

/// Waits until the replica has replayed everything the primary has written so far.
pub async fn wait_for_replica() {
    let cluster = cluster();
    let primary = connect(&cluster.url(Role::Primary, "postgres")).await;
    let replica = connect(&cluster.url(Role::Replica, "postgres")).await;
    let target: String = primary
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap_or_else(|error| panic!("read the primary's LSN: {error}"))
        .get(0);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let caught_up: bool = replica
            .query_one(
                "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)",
                &[&target],
            )
            .await
            .unwrap_or_else(|error| panic!("read the replica's LSN: {error}"))
            .get(0);
        if caught_up {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replica did not reach {target} in {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `waybill` binary built next to this test binary (or `$WAYBILL_BIN`).
pub fn waybill_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("WAYBILL_BIN") {
        return PathBuf::from(path);
    }
    // Test binaries live in target/<profile>/deps; the binary one folder up.
    let path = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("waybill")))
        .unwrap_or_else(|| PathBuf::from("target/debug/waybill"));
    assert!(
        path.is_file(),
        "{} is missing: build it first with `cargo build -p waybill` (scripts/test does)",
        path.display()
    );
    path
}

/// A running `waybill serve` process.
pub struct Waybill {
    child: Child,
    /// Where it serves gRPC.
    pub addr: SocketAddr,
    log_path: PathBuf,
    policy_path: Option<PathBuf>,
}

/// How to start a `waybill serve` process beyond the defaults.
#[derive(Default)]
pub struct ServeOptions<'a> {
    /// `--services` (default: the binary's default set).
    pub services: Option<&'a str>,
    /// A mesh policy document, written to a file for `--mesh-policy`.
    pub policy: Option<&'a str>,
    /// A fixed address instead of an ephemeral port (to restart a server where it was).
    pub listen: Option<SocketAddr>,
    /// Further arguments.
    pub args: &'a [&'a str],
    /// Environment variables for the process (beyond the harness's own).
    pub env: &'a [(&'a str, &'a str)],
}

impl Waybill {
    /// Starts `waybill serve` on an ephemeral loopback port against `db`, with extra
    /// arguments, and waits until it listens.
    pub fn serve(db: &TestDb, extra_args: &[&str]) -> Self {
        Self::start(
            db,
            ServeOptions {
                args: extra_args,
                ..ServeOptions::default()
            },
        )
    }

    /// Starts `waybill serve` against `db` as `options` say, and waits until it listens.
    pub fn start(db: &TestDb, options: ServeOptions<'_>) -> Self {
        static SEQUENCE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log_path = std::env::temp_dir().join(format!("{}-{n}-waybill.log", db.name));
        let listen = options
            .listen
            .map_or_else(|| "127.0.0.1:0".to_owned(), |a| a.to_string());
        let mut command = Command::new(waybill_bin());
        command
            .arg("serve")
            .args(["--listen", &listen])
            .args(["--primary-url", &db.primary_url])
            .args(["--replica-url", &db.replica_url]);
        if let Some(services) = options.services {
            command.args(["--services", services]);
        }
        let policy_path = options.policy.map(|policy| {
            let path = std::env::temp_dir().join(format!("{}-{n}-policy.json", db.name));
            std::fs::write(&path, policy)
                .unwrap_or_else(|error| panic!("write {}: {error}", path.display()));
            command.arg("--mesh-policy").arg(&path);
            path
        });
        command
            .args(options.args)
            // An ephemeral admin port unless the test names one (a flag wins over this), so
            // that parallel servers never fight over the default 9464.
            .env("WAYBILL_ADMIN_LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "info")
            .envs(options.env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        if std::env::var_os("TEST_LOG").is_some() {
            command.stderr(Stdio::inherit());
        } else {
            let log = std::fs::File::create(&log_path)
                .unwrap_or_else(|error| panic!("create {}: {error}", log_path.display()));
            command.stderr(log);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|error| panic!("spawn waybill serve: {error}"));

        // The first stdout line names the bound address; keep draining stdout afterwards so
        // the child never blocks on a full pipe.
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let mut process = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log_path,
            policy_path,
        };
        let line = rx.recv_timeout(PATIENCE).unwrap_or_else(|_| {
            panic!(
                "waybill serve did not report its address in {PATIENCE:?}:\n{}",
                process.log()
            )
        });
        process.addr = line
            .strip_prefix("listening on ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from waybill serve: {line:?}"));
        process
    }

    /// `http://ADDR`, for tonic channels.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A connected channel to the process.
    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.endpoint())
            .expect("a valid endpoint")
            .connect_timeout(Duration::from_secs(5))
            .timeout(PATIENCE)
            .connect()
            .await
            .unwrap_or_else(|error| panic!("connect to {}: {error}", self.endpoint()))
    }

    /// Kills the process at once (SIGKILL), as a crash would, and waits for it to go.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM, as Kubernetes does before stopping a pod.
    pub fn terminate(&self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("a valid pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .unwrap_or_else(|error| panic!("SIGTERM {pid:?}: {error}"));
    }

    /// The exit status if the process has exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `limit` for the process to exit.
    pub async fn wait_for_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.try_exit_status() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    /// What the process has logged so far (empty with `TEST_LOG`, which prints it live).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The admin endpoint's address, read from the line the process logs at startup
    /// (waits for it). Not available with `TEST_LOG`, which sends the log to the terminal.
    pub async fn admin_addr(&self) -> SocketAddr {
        const PREFIX: &str = "admin listening on http://";
        self.wait_for_log(PREFIX).await;
        let log = self.log();
        let rest = &log[log.find(PREFIX).expect("the line was just seen") + PREFIX.len()..];
        rest.split('/')
            .next()
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("unexpected admin line in the log: {rest:.80}"))
    }

    /// `GET /metrics` from the admin endpoint: the Prometheus text exposition.
    pub async fn scrape(&self) -> String {
        let addr = self.admin_addr().await;
        let (status, body) = http_get(addr, "/metrics").await;
        assert_eq!(status, 200, "GET http://{addr}/metrics: {body}");
        body
    }

    /// Waits up to [`PATIENCE`] until the log contains `text`.
    pub async fn wait_for_log(&self, text: &str) {
        let deadline = Instant::now() + PATIENCE;
        while !self.log().contains(text) {
            assert!(
                Instant::now() < deadline,
                "waybill did not log {text:?} in {PATIENCE:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Waybill {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- waybill serve log ({}) ---\n{}", self.addr, self.log());
        }
        let _ = std::fs::remove_file(&self.log_path);
        if let Some(path) = &self.policy_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The value of one series in a Prometheus scrape; `series` is the name with its labels,
/// exactly as the exporter writes them. `None` when the scrape has no such series.
pub fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// A plain HTTP/1.1 GET (the admin endpoint speaks nothing fancier): status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(PATIENCE, exchange)
        .await
        .unwrap_or_else(|_| panic!("GET http://{addr}{path}: no answer in {PATIENCE:?}"))
        .unwrap_or_else(|error| panic!("GET http://{addr}{path}: {error}"));
    let text = String::from_utf8(response).expect("a UTF-8 response");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {text:.200}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "chunked responses are not read here: {head}"
    );
    (status, body.to_owned())
}

/// Polls `check` until it returns `Some`, failing the test after [`PATIENCE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// === NATS ===

/// A `nats-server` with JetStream for one test: a free loopback port, a store in a temporary
/// folder, stopped and the folder deleted when dropped, and also when the test binary dies
/// (a watchdog shell stops it when its stdin, a pipe from this process, closes).
///
/// The binary is `$WAYBILL_NATS_SERVER`, else `nats-server` on `PATH`, else
/// `/usr/sbin/nats-server` (Debian's `nats-server` package; `scripts/prereqs nats`).
pub struct NatsServer {
    watchdog: Child,
    /// `nats://127.0.0.1:PORT`.
    pub url: String,
    dir: PathBuf,
}

impl NatsServer {
    /// Starts the server and waits (at most [`PATIENCE`]) until it accepts connections.
    pub async fn start() -> Self {
        Self::start_on(free_port()).await
    }

    /// [`NatsServer::start`] on `port` ([`free_port`]), for a test whose services start
    /// before their NATS does.
    pub async fn start_on(port: u16) -> Self {
        let bin = nats_server_bin();
        let dir =
            std::env::temp_dir().join(format!("waybill-nats-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(dir.join("store"))
            .unwrap_or_else(|error| panic!("create {}: {error}", dir.display()));
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(
                r#""$0" -js -a 127.0.0.1 -p "$1" -sd "$2/store" >"$2/nats.log" 2>&1 &
                server=$!
                cat >/dev/null
                kill "$server" 2>/dev/null
                wait "$server"
                rm -rf "$2""#,
            )
            .arg(&bin)
            .arg(port.to_string())
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("spawn {}: {error}", bin.display()));
        let server = Self {
            watchdog,
            url: format!("nats://127.0.0.1:{port}"),
            dir,
        };
        let deadline = Instant::now() + PATIENCE;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on {port} in {PATIENCE:?}:\n{}",
                server.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server
    }

    /// What the server has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nats.log")).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- nats-server log ({}) ---\n{}", self.url, self.log());
        }
        drop(self.watchdog.stdin.take());
        let _ = self.watchdog.wait();
    }
}

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .unwrap_or_else(|error| panic!("find a free port: {error}"))
        .port()
}

fn nats_server_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("WAYBILL_NATS_SERVER") {
        return PathBuf::from(path);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nats-server"))
            .find(|path| path.is_file())
    });
    let path = on_path.unwrap_or_else(|| PathBuf::from("/usr/sbin/nats-server"));
    assert!(
        path.is_file(),
        "nats-server is missing: install it with scripts/prereqs nats (Debian package nats-server)"
    );
    path
}

// === Seeding the platform ===

/// Puts `sku` in the catalog with `on_hand` units, through the inventory API.
pub async fn stock(channel: &tonic::transport::Channel, sku: &str, on_hand: i32) {
    use waybill_api::inventory::v1::{
        PutItemRequest, inventory_service_client::InventoryServiceClient,
    };
    InventoryServiceClient::new(channel.clone())
        .put_item(PutItemRequest {
            sku: sku.into(),
            name: format!("item {sku}"),
            on_hand,
        })
        .await
        .unwrap_or_else(|status| panic!("PutItem {sku}: {status:?}"));
}

/// Puts a courier in `zone` with room for `capacity` deliveries, through the delivery API.
pub async fn courier(channel: &tonic::transport::Channel, id: &str, zone: &str, capacity: i32) {
    use waybill_api::delivery::v1::{
        PutCourierRequest, delivery_service_client::DeliveryServiceClient,
    };
    DeliveryServiceClient::new(channel.clone())
        .put_courier(PutCourierRequest {
            courier_id: id.into(),
            name: format!("courier {id}"),
            zone: zone.into(),
            capacity,
        })
        .await
        .unwrap_or_else(|status| panic!("PutCourier {id}: {status:?}"));
}
