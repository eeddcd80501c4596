use std::{
    fmt,
    fs::{self, OpenOptions},
    io::Write,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use serde::{Deserialize, Serialize};

use crate::{Error, PgBinaries};

/// The superuser every local cluster is created with.
const SUPERUSER: &str = "postgres";
/// The file in a cluster's folder that records its ports, so a later `open` finds it.
const STATE_FILE: &str = "cluster.json";

/// Which of the two nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Takes writes.
    Primary,
    /// Streams WAL from the primary; read-only.
    Replica,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        })
    }
}

/// One PostgreSQL server of the cluster.
#[derive(Clone, Debug)]
pub struct Node {
    /// Primary or replica.
    pub role: Role,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its data directory.
    pub data_dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct State {
    primary_port: u16,
    replica_port: u16,
}

/// A primary and a streaming replica under one folder.
#[derive(Debug)]
pub struct Cluster {
    root: PathBuf,
    bins: PgBinaries,
    primary: Node,
    replica: Node,
    /// For clusters that must not outlive this process: a child that stops the servers and
    /// deletes the folder once its stdin closes, which happens when the cluster is dropped or
    /// when this process ends in any way (static values are never dropped; a killed process
    /// runs no destructors; the kernel still closes the pipe).
    watchdog: Option<Child>,
}

impl Cluster {
    /// Creates and starts a new cluster in `root` (which must not exist or be empty).
    ///
    /// `settings` are extra `postgresql.conf` lines (`name`, `value`) for both nodes.
    pub fn create(root: &Path, bins: PgBinaries, settings: &[(&str, &str)]) -> Result<Self, Error> {
        fs::create_dir_all(root).map_err(Error::io(format!("create {}", root.display())))?;
        let root = root
            .canonicalize()
            .map_err(Error::io(format!("resolve {}", root.display())))?;
        bins.chown(&root)?;
        check_reachable(&bins, &root)?;

        let (primary_port, replica_port) = free_ports()?;
        let primary = Node {
            role: Role::Primary,
            port: primary_port,
            data_dir: root.join("primary"),
        };
        let replica = Node {
            role: Role::Replica,
            port: replica_port,
            data_dir: root.join("replica"),
        };

        run(bins
            .command("initdb")
            .arg("--pgdata")
            .arg(&primary.data_dir)
            .args(["--username", SUPERUSER, "--auth", "trust"])
            .args([
                "--encoding",
                "UTF8",
                "--locale",
                "C.UTF-8",
                "--no-instructions",
            ]))?;
        let mut conf = vec![
            ("listen_addresses", "'127.0.0.1'".to_owned()),
            ("port", primary_port.to_string()),
            // No unix socket: two clusters (or the system's) would fight over the same path.
            ("unix_socket_directories", "''".to_owned()),
            ("max_connections", "300".to_owned()),
        ];
        conf.extend(settings.iter().map(|(k, v)| (*k, (*v).to_owned())));
        append_conf(&primary.data_dir, &conf)?;

        let cluster = Self {
            root,
            bins,
            primary,
            replica,
            watchdog: None,
        };
        cluster.start_node(&cluster.primary)?;

        // `-R` writes standby.signal and primary_conninfo; `-X stream` copies the WAL the backup
        // needs over a second connection so the replica starts consistent.
        run(cluster
            .bins
            .command("pg_basebackup")
            .args(["--host", "127.0.0.1", "--username", SUPERUSER])
            .args(["--port", &primary_port.to_string()])
            .arg("--pgdata")
            .arg(&cluster.replica.data_dir)
            .args([
                "--write-recovery-conf",
                "--wal-method=stream",
                "--checkpoint=fast",
            ]))?;
        // The backup copied the primary's port; the last setting in the file wins.
        append_conf(
            &cluster.replica.data_dir,
            &[("port", replica_port.to_string())],
        )?;
        cluster.start_node(&cluster.replica)?;

        let state = State {
            primary_port,
            replica_port,
        };
        let state_path = cluster.root.join(STATE_FILE);
        let json = serde_json::to_vec_pretty(&state).map_err(|e| Error::State {
            path: state_path.clone(),
            reason: e.to_string(),
        })?;
        fs::write(&state_path, json)
            .map_err(Error::io(format!("write {}", state_path.display())))?;
        Ok(cluster)
    }

    /// Creates a cluster in a fresh folder under the system temp directory that is stopped
    /// and deleted when the returned value is dropped or this process exits.
    pub fn ephemeral(settings: &[(&str, &str)]) -> Result<Self, Error> {
        static SEQUENCE: AtomicU32 = AtomicU32::new(0);
        let bins = PgBinaries::locate()?;
        let root = std::env::temp_dir().join(format!(
            "waybill-pg-{}-{}",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        ));
        if root.exists() {
            fs::remove_dir_all(&root).map_err(Error::io(format!("clear {}", root.display())))?;
        }
        let watchdog_root = root.clone();
        match Self::create(&root, bins, settings) {
            Ok(mut cluster) => {
                cluster.watchdog = Some(cluster.spawn_watchdog()?);
                Ok(cluster)
            }
            Err(error) => {
                // Half-made: stop whatever started before the failure.
                if let Ok(bins) = PgBinaries::locate() {
                    for node in ["replica", "primary"] {
                        let _ = bins
                            .command("pg_ctl")
                            .arg("--pgdata")
                            .arg(watchdog_root.join(node))
                            .args(["stop", "--mode=immediate"])
                            .output();
                    }
                }
                let _ = fs::remove_dir_all(&watchdog_root);
                Err(error)
            }
        }
    }

    /// Opens the cluster previously created in `root`, running or not.
    pub fn open(root: &Path, bins: PgBinaries) -> Result<Self, Error> {
        let state_path = root.join(STATE_FILE);
        let bytes = fs::read(&state_path).map_err(|e| Error::State {
            path: state_path.clone(),
            reason: e.to_string(),
        })?;
        let state: State = serde_json::from_slice(&bytes).map_err(|e| Error::State {
            path: state_path.clone(),
            reason: e.to_string(),
        })?;
        let root = root
            .canonicalize()
            .map_err(Error::io(format!("resolve {}", root.display())))?;
        Ok(Self {
            primary: Node {
                role: Role::Primary,
                port: state.primary_port,
                data_dir: root.join("primary"),
            },
            replica: Node {
                role: Role::Replica,
                port: state.replica_port,
                data_dir: root.join("replica"),
            },
            root,
            bins,
            watchdog: None,
        })
    }

    /// Whether `root` holds a cluster made by [`Cluster::create`].
    pub fn exists(root: &Path) -> bool {
        root.join(STATE_FILE).is_file()
    }

    /// The cluster's folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// One of the two nodes.
    pub fn node(&self, role: Role) -> &Node {
        match role {
            Role::Primary => &self.primary,
            Role::Replica => &self.replica,
        }
    }

    /// A connection URL for `database` on the given node, as the superuser.
    pub fn url(&self, role: Role, database: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@127.0.0.1:{}/{database}",
            self.node(role).port
        )
    }

    /// Whether the node's postmaster is running.
    pub fn is_running(&self, role: Role) -> bool {
        self.bins
            .command("pg_ctl")
            .arg("--pgdata")
            .arg(&self.node(role).data_dir)
            .arg("status")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|status| status.success())
            .unwrap_or(false)
    }

    /// Starts whichever nodes are not running (primary first) and waits until they accept
    /// connections.
    pub fn start(&self) -> Result<(), Error> {
        for node in [&self.primary, &self.replica] {
            if !self.is_running(node.role) {
                self.start_node(node)?;
            }
        }
        Ok(())
    }

    /// Stops one node at once (`immediate`: no checkpoint, as a crash would), for fault tests.
    pub fn kill(&self, role: Role) -> Result<(), Error> {
        self.stop_node(self.node(role), "immediate")
    }

    /// Stops both nodes cleanly (replica first, so it does not log a lost primary).
    pub fn stop(&self) -> Result<(), Error> {
        for node in [&self.replica, &self.primary] {
            if self.is_running(node.role) {
                self.stop_node(node, "fast")?;
            }
        }
        Ok(())
    }

    fn start_node(&self, node: &Node) -> Result<(), Error> {
        let log = self.root.join(format!("{}.log", node.role));
        let result = run(self
            .bins
            .command("pg_ctl")
            .arg("--pgdata")
            .arg(&node.data_dir)
            .arg("--log")
            .arg(&log)
            .args(["--wait", "--timeout=60", "start"]));
        result.map_err(|error| match error {
            Error::Command { command, output } => Error::Command {
                command,
                output: format!("{output}\n--- {} ---\n{}", log.display(), tail(&log, 20)),
            },
            other => other,
        })
    }

    fn stop_node(&self, node: &Node, mode: &str) -> Result<(), Error> {
        run(self
            .bins
            .command("pg_ctl")
            .arg("--pgdata")
            .arg(&node.data_dir)
            .args(["--wait", "--timeout=60", &format!("--mode={mode}"), "stop"]))
    }

    fn spawn_watchdog(&self) -> Result<Child, Error> {
        let pg_ctl = self.bins.bin_dir().join("pg_ctl");
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(
                r#"cat >/dev/null
                "$0" --pgdata "$1/replica" --mode=immediate stop
                "$0" --pgdata "$1/primary" --mode=immediate stop
                rm -rf "$1""#,
            )
            .arg(&pg_ctl)
            .arg(&self.root)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.bins.drop_privileges(&mut command);
        command
            .spawn()
            .map_err(Error::io("spawn the cluster watchdog"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            drop(watchdog.stdin.take());
            // Wait, so that a test that drops a cluster leaves nothing behind when it returns.
            let _ = watchdog.wait();
        }
    }
}

/// Two distinct free ports. Both sockets stay bound until both ports are known: picked one
/// after the other, the kernel may hand out the same port twice, and the replica then fails
/// to start on its primary's port.
fn free_ports() -> Result<(u16, u16), Error> {
    let bind = || TcpListener::bind("127.0.0.1:0").map_err(Error::io("find a free port"));
    let port = |listener: &TcpListener| {
        listener
            .local_addr()
            .map(|address| address.port())
            .map_err(Error::io("find a free port"))
    };
    let (first, second) = (bind()?, bind()?);
    Ok((port(&first)?, port(&second)?))
}

fn check_reachable(bins: &PgBinaries, root: &Path) -> Result<(), Error> {
    if bins.run_as().is_none() {
        return Ok(());
    }
    let mut probe = Command::new("test");
    probe.arg("-w").arg(root);
    bins.drop_privileges(&mut probe);
    match probe.status() {
        Ok(status) if status.success() => Ok(()),
        _ => Err(Error::Unreachable(root.to_owned())),
    }
}

fn append_conf(data_dir: &Path, settings: &[(&str, String)]) -> Result<(), Error> {
    let path = data_dir.join("postgresql.conf");
    let mut file = OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(Error::io(format!("open {}", path.display())))?;
    let mut text = String::from("\n# --- waybill local cluster ---\n");
    for (name, value) in settings {
        text.push_str(&format!("{name} = {value}\n"));
    }
    file.write_all(text.as_bytes())
        .map_err(Error::io(format!("write {}", path.display())))
}

fn run(command: &mut Command) -> Result<(), Error> {
    let line = format!("{command:?}");
    let Output {
        status,
        stdout,
        stderr,
    } = command
        .stdin(Stdio::null())
        .output()
        .map_err(Error::io(format!("run {line}")))?;
    if status.success() {
        return Ok(());
    }
    Err(Error::Command {
        command: line,
        output: format!(
            "{status}\n{}{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    })
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
