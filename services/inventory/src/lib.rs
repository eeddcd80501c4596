//! The inventory service: the item catalog, its stock, and reservations of stock for orders.
//!
//! `domain` holds the rules, `store` the SQL (where "stock never goes negative" is enforced,
//! under row locks taken in one global order), `api` the gRPC edge, `expiry` the sweeper that
//! returns the stock of reservations nobody committed.

mod api;
mod domain;
mod expiry;
mod store;

use std::time::Duration;

use waybill_api::inventory::v1::inventory_service_server::InventoryServiceServer;
use waybill_runtime::{Db, Schema};

pub use api::InventoryApi;

refinery::embed_migrations!("migrations");

/// The `inventory` schema and its migrations.
pub const SCHEMA: Schema = Schema {
    name: "inventory",
    runner: migrations::runner,
};

/// The inventory service's settings.
#[derive(Clone, Debug, clap::Args)]
pub struct InventoryConfig {
    /// How long a reservation holds stock before it expires if not committed.
    #[arg(long, env = "WAYBILL_RESERVATION_TTL", default_value = "15m", value_parser = waybill_runtime::config::parse_duration)]
    pub reservation_ttl: Duration,
    /// How often expired reservations are looked for.
    #[arg(long, env = "WAYBILL_RESERVATION_SWEEP", default_value = "5s", value_parser = waybill_runtime::config::parse_duration)]
    pub reservation_sweep: Duration,
}

/// The gRPC server for the inventory service, and the sweeper to run beside it.
pub fn server(
    db: Db,
    config: &InventoryConfig,
) -> (
    InventoryServiceServer<InventoryApi>,
    impl Future<Output = ()> + Send + 'static,
) {
    let api = InventoryApi::new(db, config.reservation_ttl);
    let sweeper = expiry::sweep_forever(api.store().clone(), config.reservation_sweep);
    (InventoryServiceServer::new(api), sweeper)
}
