//! The inventory service: the item catalog, its stock, and reservations of stock for orders.
//!
//! `domain` holds the rules, `store` the SQL (where "stock never goes negative" is enforced,
//! under row locks taken in one global order), `api` the gRPC edge, `expiry` the sweeper that
//! returns the stock of reservations nobody committed.

mod api;
mod cache;
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
    /// How long GetItem may answer from this process's cache (catalog changes invalidate at
    /// once; stock held by reservations may lag by up to this). 0 turns the cache off.
    #[arg(long, env = "WAYBILL_CATALOG_CACHE_TTL", default_value = "1s", value_parser = waybill_runtime::config::parse_duration)]
    pub catalog_cache_ttl: Duration,
    /// Most items the catalog cache holds.
    #[arg(long, env = "WAYBILL_CATALOG_CACHE_SIZE", default_value_t = 100_000)]
    pub catalog_cache_size: u64,
}

/// The gRPC server for the inventory service, and the work to run beside it (the expiry
/// sweeper and the cache's invalidation).
pub fn server(
    db: Db,
    config: &InventoryConfig,
) -> (
    InventoryServiceServer<InventoryApi>,
    impl Future<Output = ()> + Send + 'static,
) {
    let cache = cache::ItemCache::new(config.catalog_cache_ttl, config.catalog_cache_size);
    let api = InventoryApi::new(db.clone(), config.reservation_ttl, cache.clone());
    let sweeper = expiry::sweep_forever(api.store().clone(), config.reservation_sweep);
    let background = async move {
        tokio::join!(sweeper, cache.invalidate_forever(db));
    };
    (InventoryServiceServer::new(api), background)
}
