//! `waybill dev`: a local Postgres primary + streaming replica in a project-local folder, and
//! how `serve` and `migrate` find it when no database is configured.
//!
//! Falling back to the dev cluster only when it exists (never creating one implicitly) keeps a
//! production process with a missing `WAYBILL_PRIMARY_URL` from quietly starting a database of
//! its own: it fails with a message instead.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use waybill_pg_cluster::{Cluster, PgBinaries, Role};
use waybill_runtime::DatabaseConfig;

/// Where the dev cluster lives unless `--dir`/`WAYBILL_DEV_DIR` says otherwise (git-ignored).
pub const DEFAULT_DIR: &str = ".waybill/dev";
/// The database the services use inside the dev cluster.
const DATABASE: &str = "waybill";

#[derive(clap::Subcommand)]
pub enum DevCommand {
    /// Start the local primary + replica, creating them on first use; a running pair is reused.
    Up(DirArg),
    /// Stop the local primary + replica.
    Down {
        #[command(flatten)]
        dir: DirArg,
        /// Also delete the cluster's data.
        #[arg(long)]
        destroy: bool,
    },
    /// Show whether the local cluster runs and its URLs.
    Status(DirArg),
}

#[derive(clap::Args)]
pub struct DirArg {
    /// The cluster's folder.
    #[arg(long = "dir", env = "WAYBILL_DEV_DIR", default_value = DEFAULT_DIR)]
    path: PathBuf,
}

pub async fn run(command: DevCommand) -> anyhow::Result<()> {
    match command {
        DevCommand::Up(dir) => {
            let path = dir.path.clone();
            let cluster = tokio::task::spawn_blocking(move || up(&path)).await??;
            ensure_database(&cluster).await?;
            print_urls(&cluster);
            Ok(())
        }
        DevCommand::Down { dir, destroy } => {
            if !Cluster::exists(&dir.path) {
                println!("no dev cluster in {}", dir.path.display());
                return Ok(());
            }
            let cluster = Cluster::open(&dir.path, PgBinaries::locate()?)?;
            tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                cluster.stop()?;
                println!("stopped the dev cluster in {}", cluster.root().display());
                if destroy {
                    std::fs::remove_dir_all(cluster.root())
                        .with_context(|| format!("delete {}", cluster.root().display()))?;
                    println!("deleted {}", cluster.root().display());
                }
                Ok(())
            })
            .await?
        }
        DevCommand::Status(dir) => {
            if !Cluster::exists(&dir.path) {
                println!(
                    "no dev cluster in {} (run `waybill dev up`)",
                    dir.path.display()
                );
                return Ok(());
            }
            let cluster = Cluster::open(&dir.path, PgBinaries::locate()?)?;
            for role in [Role::Primary, Role::Replica] {
                let state = if cluster.is_running(role) {
                    "running"
                } else {
                    "stopped"
                };
                println!("{role:8} {state:8} {}", cluster.url(role, DATABASE));
            }
            Ok(())
        }
    }
}

fn up(path: &Path) -> anyhow::Result<Cluster> {
    let bins = PgBinaries::locate()?;
    if Cluster::exists(path) {
        let cluster = Cluster::open(path, bins)?;
        cluster.start()?;
        println!("dev cluster in {} is running", cluster.root().display());
        return Ok(cluster);
    }
    println!(
        "creating a dev cluster (primary + streaming replica) in {}",
        path.display()
    );
    Ok(Cluster::create(path, bins, &[])?)
}

async fn ensure_database(cluster: &Cluster) -> anyhow::Result<()> {
    let (client, connection) = tokio_postgres::connect(
        &cluster.url(Role::Primary, "postgres"),
        tokio_postgres::NoTls,
    )
    .await
    .context("connect to the dev primary")?;
    tokio::spawn(connection);
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&DATABASE])
        .await?
        .is_some();
    if !exists {
        client
            .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
            .await?;
    }
    Ok(())
}

fn print_urls(cluster: &Cluster) {
    println!("primary  {}", cluster.url(Role::Primary, DATABASE));
    println!("replica  {}", cluster.url(Role::Replica, DATABASE));
    println!(
        "`waybill migrate` and `waybill serve` use it when WAYBILL_PRIMARY_URL is unset; \
         `waybill dev down` stops it"
    );
}

/// The primary URL and replica URLs to use: the configured ones, else the running dev cluster.
pub fn resolve_database(
    config: &DatabaseConfig,
    dev_dir: &Path,
) -> anyhow::Result<(String, Vec<String>)> {
    if let Some(primary) = &config.primary_url {
        return Ok((primary.clone(), config.replica_urls.clone()));
    }
    if !Cluster::exists(dev_dir) {
        bail!(
            "no database configured: set WAYBILL_PRIMARY_URL (and WAYBILL_REPLICA_URLS), \
             or run `waybill dev up` for a local primary + replica"
        );
    }
    let cluster = Cluster::open(dev_dir, PgBinaries::locate()?)?;
    if !cluster.is_running(Role::Primary) {
        bail!(
            "the dev cluster in {} is stopped: run `waybill dev up`",
            dev_dir.display()
        );
    }
    Ok((
        cluster.url(Role::Primary, DATABASE),
        vec![cluster.url(Role::Replica, DATABASE)],
    ))
}
