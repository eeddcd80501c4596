use std::path::PathBuf;

use anyhow::Context;
use waybill_runtime::{DatabaseConfig, Db, MeshConfig, ServerConfig, admin::Admin, server};

use crate::{
    dev,
    registry::{ServiceDeps, ServiceName, Settings},
};

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
    #[command(flatten)]
    settings: Settings,
    #[command(flatten)]
    bus: waybill_events::BusConfig,
    /// Relay this process's services' outboxes to the bus. Turn off when the relays run
    /// elsewhere (or to inspect outbox rows in a test).
    #[arg(long, env = "WAYBILL_OUTBOX_RELAY", default_value_t = true, action = clap::ArgAction::Set)]
    outbox_relay: bool,
    /// Folder of the `waybill dev up` cluster, used when no database URL is configured.
    #[arg(long, env = "WAYBILL_DEV_DIR", default_value = dev::DEFAULT_DIR)]
    dev_dir: PathBuf,
}

impl ServeArgs {
    /// The name this process reports in traces: `waybill-<service>` when it serves one
    /// service (one Deployment each), else `waybill`.
    pub fn service_name(&self) -> String {
        match self.services.as_slice() {
            [only] => format!("waybill-{only}"),
            _ => "waybill".to_owned(),
        }
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let policy = args.mesh.load().map_err(anyhow::Error::msg)?;
    // First: the recorder must be installed before servers and clients cache their handles.
    let admin = Admin::bind(args.server.admin_listen, &args.service_name()).await?;
    let admin_address = admin.local_addr()?;
    let (primary, replicas) = dev::resolve_database(&args.database, &args.dev_dir)?;
    let database = DatabaseConfig {
        replica_urls: replicas,
        ..args.database
    };
    let db = Db::connect(&database, &primary)?;

    let listener = tokio::net::TcpListener::bind(args.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.server.listen))?;
    let address = listener.local_addr()?;
    // A wildcard listen address is reached on loopback from inside the process.
    let own_ip = match address.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => std::net::Ipv4Addr::LOCALHOST.into(),
        ip if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    let own_target = format!(
        "http://{}",
        std::net::SocketAddr::new(own_ip, address.port())
    );

    let bus = args.bus.connect(db.clone()).await?;
    let mut services = server::Services::default();
    let deps = ServiceDeps {
        db: &db,
        policy: &policy,
        settings: &args.settings,
        own_target: &own_target,
        bus: &bus,
        outbox_relay: args.outbox_relay,
        nats_url: args.bus.nats_url.as_deref(),
    };
    if bus.kind() == waybill_events::BusKind::Nats
        && args.outbox_relay
        && args.services.iter().any(|name| name.outbox().is_some())
    {
        register_subscriptions(&bus).await?;
    }
    for name in &args.services {
        name.register(&mut services, &deps).await?;
    }
    // The one line on stdout: scripts and the test harness read the bound address from it.
    println!(
        "listening on {address} services={}",
        services.names().join(",")
    );
    tracing::info!(%address, services = ?services.names(), replicas = database.replica_urls.len(), "serving");
    // On stderr, never stdout (whose one line scripts parse); the test harness reads this.
    tracing::info!("admin listening on http://{admin_address}/metrics");
    tokio::spawn(admin.serve());

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

/// Registers every subscription of the platform on the NATS bus before this process's relays
/// publish anything. JetStream keeps a message only for the consumers that exist when it is
/// published, and in a deployment the consumers may start after the publishers (each service
/// is its own Deployment). The Postgres bus needs none of this: `waybill migrate` registered
/// them there; on NATS only a process that can reach the server can, and the migrate hook runs
/// before the bundled nats-server exists. With NATS down, the bus registers them before its
/// first publish. (The stream then keeps events for a subscription whose service is never
/// deployed, up to its 7-day limit.)
async fn register_subscriptions(bus: &waybill_events::Bus) -> anyhow::Result<()> {
    let mut subscriptions = Vec::new();
    for name in ServiceName::all() {
        subscriptions.extend(name.subscription()?);
    }
    bus.register_before_publishing(subscriptions).await;
    Ok(())
}
