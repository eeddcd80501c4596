//! The command pipeline: commands submitted asynchronously, stored durably in a log sharded
//! by user, run later by workers through the platform's services, retried with backoff,
//! audited, cancellable, and undoable where the kind allows.
//!
//! `domain` holds the rules (kinds, statuses, validation, the shard hash), `store` the SQL,
//! `ingest` SubmitCommand's group commit, `worker` the claim/run/record loop, `handlers` the
//! registry of kinds to service calls, `hub` the one LISTEN session that wakes workers and
//! tells watchers and the cache about changes, `api` the gRPC edge, `retention` the purge of
//! old finished commands.

mod api;
pub mod domain;
pub mod handlers;
mod hub;
mod ingest;
mod jetstream;
mod retention;
mod store;
mod worker;

use std::{pin::Pin, time::Duration};

use mesh_layer::{method::MethodTable, policy::Policy};
use waybill_api::{
    commands::v1::command_service_server::CommandServiceServer,
    inventory::v1::inventory_service_client::InventoryServiceClient,
    notifications::v1::notifications_service_client::NotificationsServiceClient,
    orders::v1::orders_service_client::OrdersServiceClient,
};
use waybill_runtime::{Db, Schema, TargetsConfig, config::parse_duration, server::Drain};

pub use api::CommandsApi;
pub use handlers::{Execution, Failure, Handler, Registry};

refinery::embed_migrations!("migrations");

/// The `commands` schema and its migrations.
pub const SCHEMA: Schema = Schema {
    name: "commands",
    runner: migrations::runner,
};

/// Idempotency keys the service gives undo commands; refused from clients.
pub const UNDO_KEY_PREFIX: &str = "waybill-undo:";

/// The command pipeline's settings.
#[derive(Clone, Debug, clap::Args)]
pub struct CommandsConfig {
    /// Shards of the command log (users are hashed onto them). Fixed when the log is
    /// created: a different count later is refused at startup.
    #[arg(long, env = "WAYBILL_COMMAND_SHARDS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub command_shards: u32,
    /// Run workers in this process (turn off for a process that only ingests).
    #[arg(long, env = "WAYBILL_COMMAND_WORKERS", default_value_t = true, action = clap::ArgAction::Set)]
    pub command_workers: bool,
    /// The shards this process's workers take commands from (default: all). Workers of
    /// several processes may share shards: claims never overlap.
    #[arg(long, env = "WAYBILL_COMMAND_WORKER_SHARDS", value_delimiter = ',')]
    pub command_worker_shards: Vec<u32>,
    /// Commands running at once in this process.
    #[arg(long, env = "WAYBILL_COMMAND_CONCURRENCY", default_value_t = 256)]
    pub command_concurrency: usize,
    /// How long a worker's claim holds; a worker that dies mid-command is replaced after at
    /// most this long. A handler gets half of it.
    #[arg(long, env = "WAYBILL_COMMAND_LEASE", default_value = "30s", value_parser = parse_duration)]
    pub command_lease: Duration,
    /// Attempts before a command is DEAD.
    #[arg(long, env = "WAYBILL_COMMAND_MAX_ATTEMPTS", default_value_t = 5)]
    pub command_max_attempts: i32,
    /// The first retry's backoff ceiling; it doubles per attempt (full jitter).
    #[arg(long, env = "WAYBILL_COMMAND_RETRY_BASE", default_value = "1s", value_parser = parse_duration)]
    pub command_retry_base: Duration,
    /// The largest backoff.
    #[arg(long, env = "WAYBILL_COMMAND_RETRY_MAX", default_value = "5m", value_parser = parse_duration)]
    pub command_retry_max: Duration,
    /// How often workers look for due work when no notification came (expired leases,
    /// retries scheduled by other processes).
    #[arg(long, env = "WAYBILL_COMMAND_POLL", default_value = "1s", value_parser = parse_duration)]
    pub command_poll: Duration,
    /// After a claim scan that finds fewer commands than it has slots for and takes at least
    /// this long, the next scan that also finds fewer marks queued commands (behind an older
    /// command of their user) blocked, so that later scans skip them. Deep per-user queues
    /// need it; marking costs two row updates per command, so it waits for a long walk.
    #[arg(long, env = "WAYBILL_COMMAND_MARK_AFTER", default_value = "20ms", value_parser = parse_duration)]
    pub command_mark_after: Duration,
    /// The deadline of each call a handler makes.
    #[arg(long, env = "WAYBILL_COMMAND_CALL_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub command_call_timeout: Duration,
    /// Finished commands (SUCCEEDED, CANCELLED, UNDONE) older than this are deleted with
    /// their audit rows. DEAD commands are kept until requeued.
    #[arg(long, env = "WAYBILL_COMMAND_RETENTION", default_value = "168h", value_parser = parse_duration)]
    pub command_retention: Duration,
    /// How often retention runs, with the sweep that releases commands left marked blocked
    /// (`waybill_command_stranded_total`; none are expected).
    #[arg(long, env = "WAYBILL_COMMAND_RETENTION_SWEEP", default_value = "1m", value_parser = parse_duration)]
    pub command_retention_sweep: Duration,
    /// How long GetCommand may answer from this process's cache if a change notification
    /// is lost (changes normally evict at once). 0 turns the cache off.
    #[arg(long, env = "WAYBILL_COMMAND_CACHE_TTL", default_value = "5s", value_parser = parse_duration)]
    pub command_cache_ttl: Duration,
    /// Most commands GetCommand's cache holds.
    #[arg(long, env = "WAYBILL_COMMAND_CACHE_SIZE", default_value_t = 100_000)]
    pub command_cache_size: u64,
    /// Transactions storing submissions at once (group commit writers). Two keep one batch
    /// gathering while the other commits; more split the same load into smaller batches
    /// (measured: 8,000/s took p99 25 ms with 2 writers, 160 ms with 1, 870 ms with 8).
    #[arg(long, env = "WAYBILL_COMMAND_INGEST_WRITERS", default_value_t = 2)]
    pub command_ingest_writers: usize,
    /// Most submissions stored in one transaction.
    #[arg(long, env = "WAYBILL_COMMAND_INGEST_BATCH", default_value_t = 512)]
    pub command_ingest_batch: usize,
    /// Workers record every command SUCCEEDED without calling any service: for measuring
    /// the pipeline itself (claiming, recording, the audit trail), never for real traffic.
    #[arg(long, env = "WAYBILL_COMMAND_DRY_RUN")]
    pub command_dry_run: bool,
    /// How workers learn which commands to run: `postgres` (notifications and a scan of the
    /// log) or `nats` (a JetStream subject per shard, needs --nats-url; the scan stays as a
    /// slow fallback for dispatches that were lost).
    #[arg(
        long,
        env = "WAYBILL_COMMAND_QUEUE",
        value_enum,
        default_value = "postgres"
    )]
    pub command_queue: QueueKind,
    /// Submissions waiting to be stored before SubmitCommand refuses with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "WAYBILL_COMMAND_INGEST_QUEUE", default_value_t = 20_000)]
    pub command_ingest_queue: usize,
}

/// See [`CommandsConfig::command_queue`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueKind {
    Postgres,
    Nats,
}

/// Why the command service could not be built.
#[derive(Debug, thiserror::Error)]
pub enum CommandsError {
    #[error("{which} target: {error}")]
    Target {
        which: &'static str,
        error: mesh_layer::balance::TargetError,
    },
    #[error("descriptors: {0}")]
    Descriptors(#[from] prost::DecodeError),
    #[error("--command-worker-shards: shard {0} is not below --command-shards")]
    WorkerShard(u32),
    #[error("command log: {0}")]
    Shards(String),
    #[error("--command-queue nats: {0}")]
    Queue(String),
}

/// The platform's handler registry: every kind, calling the services at `targets` (this
/// process's own address for those not configured).
pub fn platform_registry(
    config: &CommandsConfig,
    policy: &Policy,
    targets: &TargetsConfig,
    own_target: &str,
) -> Result<Registry, CommandsError> {
    let methods = MethodTable::from_descriptor_sets(&[waybill_api::FILE_DESCRIPTOR_SET])?;
    let client = |which: &'static str, target: &Option<String>| {
        mesh_layer::client::balanced(TargetsConfig::or_own(target, own_target), policy, &methods)
            .map_err(|error| CommandsError::Target { which, error })
    };
    Ok(Registry::platform(handlers::Clients {
        orders: OrdersServiceClient::new(client("orders", &targets.orders_target)?),
        inventory: InventoryServiceClient::new(client("inventory", &targets.inventory_target)?),
        notifications: NotificationsServiceClient::new(client(
            "notifications",
            &targets.notifications_target,
        )?),
        timeout: config.command_call_timeout,
    }))
}

/// A registry whose handlers succeed at once without calling anything (`--command-dry-run`).
pub fn dry_run_registry() -> Registry {
    struct DryRun;
    #[tonic::async_trait]
    impl Handler for DryRun {
        async fn run(&self, _: &Execution) -> Result<String, Failure> {
            Ok("dry run: nothing was called".to_owned())
        }
    }
    domain::Kind::ALL
        .into_iter()
        .fold(Registry::default(), |registry, kind| {
            registry.with(kind, DryRun)
        })
}

/// The gRPC server for the command service, and the work to run beside it (workers,
/// retention, the LISTEN session, queue metrics), to start with the process's [`Drain`]: when
/// draining starts the workers stop claiming, let the attempts in flight end and record them,
/// and the work ends. Checks the shard count first. `nats_url` is needed with
/// `--command-queue nats`.
pub async fn server(
    db: Db,
    config: &CommandsConfig,
    registry: Registry,
    nats_url: Option<&str>,
) -> Result<
    (
        CommandServiceServer<CommandsApi>,
        impl FnOnce(Drain) -> Pin<Box<dyn Future<Output = ()> + Send>>,
    ),
    CommandsError,
> {
    let store = store::CommandStore::new(db.clone());
    store
        .ensure_shards(config.command_shards)
        .await
        .map_err(CommandsError::Shards)?;
    let shards = if config.command_worker_shards.is_empty() {
        (0..config.command_shards).collect()
    } else {
        config.command_worker_shards.clone()
    };
    if let Some(&bad) = shards.iter().find(|&&s| s >= config.command_shards) {
        return Err(CommandsError::WorkerShard(bad));
    }
    let queue = match config.command_queue {
        QueueKind::Postgres => None,
        QueueKind::Nats => {
            let url = nats_url.ok_or_else(|| {
                CommandsError::Queue("needs --nats-url (WAYBILL_NATS_URL)".to_owned())
            })?;
            Some(
                jetstream::JetStream::connect(url)
                    .await
                    .map_err(CommandsError::Queue)?,
            )
        }
    };
    let dispatcher = queue.clone().map(jetstream::Dispatcher::start);
    let hub = hub::Hub::new(config.command_cache_ttl, config.command_cache_size);
    let ingest = ingest::Ingest::start(
        store.clone(),
        config.command_ingest_writers,
        config.command_ingest_batch,
        config.command_ingest_queue,
        dispatcher.clone(),
    );
    let api = CommandsApi::new(
        store.clone(),
        ingest,
        hub.clone(),
        config.command_shards,
        dispatcher,
    );
    let settings = worker::WorkerSettings {
        name: worker_name(),
        shards: shards
            .into_iter()
            .filter_map(|s| i32::try_from(s).ok())
            .collect(),
        concurrency: config.command_concurrency,
        lease: config.command_lease,
        max_attempts: config.command_max_attempts.max(1),
        retry_base: config.command_retry_base,
        retry_max: config.command_retry_max,
        poll: config.command_poll,
        mark_after: config.command_mark_after,
    };
    let run_workers = config.command_workers;
    let wake = hub.wake();
    let retention = retention::purge_forever(
        store.clone(),
        config.command_retention,
        config.command_retention_sweep,
    );
    let background = move |mut drain: Drain| -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move {
            let upkeep = async {
                tokio::join!(
                    hub.listen_forever(db.clone()),
                    retention,
                    retention::sample_queue_forever(db.clone()),
                );
            };
            let workers = async {
                if run_workers {
                    worker::work_forever(store.clone(), registry, settings, wake, queue, drain)
                        .await;
                } else {
                    drain.started().await;
                }
            };
            // The upkeep never ends by itself; the work ends when the workers have drained.
            tokio::select! {
                () = upkeep => {}
                () = workers => {}
            }
        })
    };
    Ok((CommandServiceServer::new(api), background))
}

/// This process's name in the audit trail: the host (the pod, under Kubernetes) and the
/// process id, so a worker that restarts in the same pod is a different worker.
fn worker_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".to_owned());
    format!("{host}/{}", std::process::id())
}
