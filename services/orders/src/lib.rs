//! The orders service: places orders (running each one's saga across inventory and delivery),
//! answers for them, cancels them.
//!
//! `domain` holds the rules (what a valid order is, which states may change), `store` the
//! SQL, `saga` the orchestration of PlaceOrder, `outbox` the events it publishes, `api` the
//! gRPC edge where protobuf types meet domain types. Writes go to the primary; listing a
//! customer's orders reads a replica.

mod api;
mod domain;
mod outbox;
mod saga;
mod store;

use std::time::Duration;

use mesh_layer::{method::MethodTable, policy::Policy};
use waybill_api::{
    delivery::v1::delivery_service_client::DeliveryServiceClient,
    inventory::v1::inventory_service_client::InventoryServiceClient,
    orders::v1::orders_service_server::OrdersServiceServer,
};
use waybill_runtime::{Db, Schema, TargetsConfig, config::parse_duration};

pub use api::OrdersApi;

refinery::embed_migrations!("migrations");

/// The `orders` schema and its migrations.
pub const SCHEMA: Schema = Schema {
    name: "orders",
    runner: migrations::runner,
};

/// PlaceOrder's path, which the server caps at [`OrdersConfig::saga_max_placing`] calls at
/// once (`Services::cap`).
///
/// This is the edge's admission control. Every saga step is a transaction in another
/// service, on a database they share, so past the database's capacity more sagas at once only
/// wait longer. Shed at the door, before the idempotency claim, the excess costs nothing,
/// admitted orders keep their latency, and no saga is left half-way (a step shed by a
/// participant defers its saga). The services' adaptive limits cannot do this alone: each sees
/// its own latency rise with the shared bottleneck, but none sees the bottleneck.
pub const PLACE_ORDER: &str = "/waybill.orders.v1.OrdersService/PlaceOrder";

/// The orders service's settings.
#[derive(Clone, Debug, clap::Args)]
pub struct OrdersConfig {
    /// How long an orchestrator owns a saga before another may resume it. A killed
    /// orchestrator's sagas resume after at most this long.
    #[arg(long, env = "WAYBILL_SAGA_LEASE", default_value = "10s", value_parser = parse_duration)]
    pub saga_lease: Duration,
    /// The deadline of each saga call to inventory or delivery.
    #[arg(long, env = "WAYBILL_SAGA_STEP_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub saga_step_timeout: Duration,
    /// Transient failures going forward before a saga gives up and compensates.
    #[arg(long, env = "WAYBILL_SAGA_MAX_ATTEMPTS", default_value_t = 5)]
    pub saga_max_attempts: i32,
    /// Most PlaceOrder calls (each running its saga) at once; more are shed at once with
    /// RESOURCE_EXHAUSTED, before anything is written (see [`PLACE_ORDER`]).
    #[arg(long, env = "WAYBILL_SAGA_MAX_PLACING", default_value_t = 32)]
    pub saga_max_placing: usize,
    /// How often to look for sagas to resume.
    #[arg(long, env = "WAYBILL_SAGA_POLL", default_value = "1s", value_parser = parse_duration)]
    pub saga_poll: Duration,
}

/// Why the orders service could not be built.
#[derive(Debug, thiserror::Error)]
pub enum OrdersError {
    /// A participant's target is malformed.
    #[error("{which} target: {error}")]
    Target {
        which: &'static str,
        error: mesh_layer::balance::TargetError,
    },
    /// The method descriptors did not decode (a build problem).
    #[error("descriptors: {0}")]
    Descriptors(#[from] prost::DecodeError),
}

/// The gRPC server for the orders service, and the saga driver to run beside it.
/// `own_target` is this process's address, used for participants with no target configured.
pub fn server(
    db: Db,
    config: &OrdersConfig,
    policy: &Policy,
    targets: &TargetsConfig,
    own_target: &str,
) -> Result<
    (
        OrdersServiceServer<OrdersApi>,
        impl Future<Output = ()> + Send + 'static,
    ),
    OrdersError,
> {
    let methods = MethodTable::from_descriptor_sets(&[waybill_api::FILE_DESCRIPTOR_SET])?;
    let client = |which: &'static str, target: &Option<String>| {
        let target = TargetsConfig::or_own(target, own_target);
        mesh_layer::client::balanced(target, policy, &methods)
            .map_err(|error| OrdersError::Target { which, error })
    };
    let inventory = InventoryServiceClient::new(client("inventory", &targets.inventory_target)?);
    let delivery = DeliveryServiceClient::new(client("delivery", &targets.delivery_target)?);
    let store = store::OrderStore::new(db);
    let sagas = saga::Orchestrator::new(
        store.clone(),
        inventory,
        delivery,
        saga::SagaSettings {
            lease: config.saga_lease,
            step_timeout: config.saga_step_timeout,
            max_attempts: config.saga_max_attempts,
            poll: config.saga_poll,
            concurrency: 64,
        },
    );
    let driver = sagas.clone().drive_forever();
    Ok((
        OrdersServiceServer::new(OrdersApi::new(store, sagas)),
        driver,
    ))
}
