//! The delivery service: keeps couriers, assigns them to orders, and tracks each delivery
//! from assignment to its end, live, whichever replica of the service made the change.
//!
//! `domain` holds the rules (valid input, the status lifecycle), `store` the SQL (one
//! transaction per change, with its history row, its outbox event and its notification),
//! `tracking` the one listening session per process that wakes TrackDelivery streams,
//! `outbox` the events written with each change, and `api` the gRPC edge. Writes and the
//! reads that watchers build on go to the primary; GetDelivery reads a replica.

mod api;
mod domain;
mod outbox;
mod store;
mod tracking;

use waybill_api::delivery::v1::delivery_service_server::DeliveryServiceServer;
use waybill_runtime::{Db, Schema};

pub use api::DeliveryApi;

refinery::embed_migrations!("migrations");

/// The `delivery` schema and its migrations.
pub const SCHEMA: Schema = Schema {
    name: "delivery",
    runner: migrations::runner,
};

/// The gRPC server for the delivery service.
pub fn server(db: Db) -> DeliveryServiceServer<DeliveryApi> {
    DeliveryServiceServer::new(DeliveryApi::new(db))
}
