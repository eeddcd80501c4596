use std::path::PathBuf;

use anyhow::Context;
use waybill_runtime::{DatabaseConfig, Db, MeshConfig, ServerConfig, server};

use crate::{dev, registry::ServiceName};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Which services to run in this process.
    #[arg(long, env = "WAYBILL_SERVICES", value_delimiter = ',', default_values_t = ServiceName::all())]
    services: Vec<ServiceName>,
    #[command(flatten)]
    server: ServerConfig,
    #[command(flatten)]
    database: DatabaseConfig,
    #[command(flatten)]
    mesh: MeshConfig,
    /// Folder of the `waybill dev up` cluster, used when no database URL is configured.
    #[arg(long, env = "WAYBILL_DEV_DIR", default_value = dev::DEFAULT_DIR)]
    dev_dir: PathBuf,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let policy = args.mesh.load().map_err(anyhow::Error::msg)?;
    let (primary, replicas) = dev::resolve_database(&args.database, &args.dev_dir)?;
    let database = DatabaseConfig {
        replica_urls: replicas,
        ..args.database
    };
    let db = Db::connect(&database, &primary)?;

    let mut services = server::Services::default();
    for name in &args.services {
        name.register(&mut services, &db, &policy)?;
    }

    let listener = tokio::net::TcpListener::bind(args.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.server.listen))?;
    let address = listener.local_addr()?;
    // The one line on stdout: scripts and the test harness read the bound address from it.
    println!(
        "listening on {address} services={}",
        services.names().join(",")
    );
    tracing::info!(%address, services = ?services.names(), replicas = database.replica_urls.len(), "serving");

    server::serve(
        listener,
        services,
        db,
        &args.server,
        &policy,
        server::shutdown_signal(),
    )
    .await?;
    Ok(())
}
