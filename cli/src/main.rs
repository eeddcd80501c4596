//! `waybill`: one binary for every role. `serve` runs services, `migrate` applies schema
//! migrations, `dev` runs a local Postgres primary + replica, `orders` calls the API.

mod call;
mod commands;
mod dev;
mod events;
mod loadgen;
mod registry;
mod serve;

use clap::{Parser, Subcommand};

/// The process allocator: see cli/Cargo.toml (glibc malloc cost a fifth of the server's CPU).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use waybill_runtime::{DatabaseConfig, LogConfig};

/// waybill: a delivery platform of gRPC services on one resilience layer.
///
/// Quick start: `waybill dev up && waybill migrate && waybill serve`, then
/// `waybill orders place --customer c-1 --item SKU-1:2 --address "1 Main St"`.
#[derive(Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: LogConfig,
}

#[derive(Subcommand)]
enum Command {
    /// Serve gRPC services (all of them, or those named) until SIGTERM or SIGINT.
    Serve(Box<serve::ServeArgs>),
    /// Apply pending schema migrations for the named services (default: all) and exit.
    Migrate(MigrateArgs),
    /// A local PostgreSQL primary and streaming replica for development.
    #[command(subcommand)]
    Dev(dev::DevCommand),
    /// Call the orders service.
    #[command(subcommand)]
    Orders(call::OrdersCommand),
    /// Submit and inspect commands (the command pipeline).
    #[command(subcommand)]
    Commands(commands::CommandsCommand),
    /// Call the diagnostic echo service, optionally through a chain of echo servers.
    Echo(call::EchoArgs),
    /// Inspect the event bus: list and replay dead letters.
    Events(events::EventsArgs),
    /// Send open-loop load (fixed arrival rate) and report throughput and latency percentiles.
    Loadgen(loadgen::LoadgenArgs),
}

#[derive(clap::Args)]
struct MigrateArgs {
    /// Which services' schemas to migrate.
    #[arg(long, env = "WAYBILL_SERVICES", value_delimiter = ',', default_values_t = registry::ServiceName::all())]
    services: Vec<registry::ServiceName>,
    #[command(flatten)]
    database: DatabaseConfig,
    /// Folder of the `waybill dev up` cluster, used when no database URL is configured.
    #[arg(long, env = "WAYBILL_DEV_DIR", default_value = dev::DEFAULT_DIR)]
    dev_dir: std::path::PathBuf,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let service_name = match &cli.command {
        Command::Serve(args) => args.service_name(),
        _ => "waybill-cli".to_owned(),
    };
    // Inside the runtime: the trace exporter's connection runs on it.
    let telemetry = {
        let _entered = runtime.enter();
        waybill_runtime::telemetry::init(&cli.log, &service_name)
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::run(*args).await,
            Command::Migrate(args) => {
                let (primary, _) = dev::resolve_database(&args.database, &args.dev_dir)?;
                // The mesh schema (idempotency keys) and the bus (Postgres bus tables, dead
                // letters of either bus) come first: every service uses them.
                let schemas: Vec<_> = [waybill_runtime::MESH_SCHEMA, waybill_events::SCHEMA]
                    .into_iter()
                    .chain(args.services.iter().filter_map(|s| s.schema()))
                    .collect();
                waybill_runtime::migrate::run(&primary, &schemas).await?;
                let names: Vec<_> = schemas.iter().map(|s| s.name).collect();
                eprintln!("migrated schemas: {}", names.join(", "));
                // Subscriptions exist before any service publishes: the Postgres bus drops
                // events of topics nobody subscribes to, and in a deployment with a process
                // per service the publishers may start before the consumers.
                let subscriptions = args
                    .services
                    .iter()
                    .filter_map(|service| service.subscription().transpose())
                    .collect::<Result<Vec<_>, _>>()?;
                if !subscriptions.is_empty() {
                    let bus = waybill_events::Bus::postgres(waybill_runtime::Db::connect(
                        &args.database,
                        &primary,
                    )?);
                    for subscription in &subscriptions {
                        bus.register(subscription).await?;
                        eprintln!("registered subscription: {}", subscription.name());
                    }
                }
                Ok(())
            }
            Command::Dev(command) => dev::run(command).await,
            Command::Orders(command) => call::run(command).await,
            Command::Commands(command) => commands::run(command).await,
            Command::Echo(args) => call::echo(args).await,
            Command::Loadgen(args) => loadgen::run(args).await,
            Command::Events(args) => events::run(args).await,
        }
    });
    // Here, on the main thread, while the runtime still runs: the last spans (a drained
    // server's included) are exported before the process exits.
    telemetry.shutdown();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
