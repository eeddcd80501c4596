//! The orders service: places orders, answers for them, cancels them.
//!
//! `domain` holds the rules (what a valid order is, which states may change), `store` the
//! SQL, `api` the gRPC edge where protobuf types meet domain types. Writes go to the
//! primary; listing a customer's orders reads a replica.

mod api;
mod domain;
mod page_token;
mod store;

use waybill_api::orders::v1::orders_service_server::OrdersServiceServer;
use waybill_runtime::{Db, Schema};

pub use api::OrdersApi;

refinery::embed_migrations!("migrations");

/// The `orders` schema and its migrations.
pub const SCHEMA: Schema = Schema {
    name: "orders",
    runner: migrations::runner,
};

/// The gRPC server for the orders service.
pub fn server(db: Db) -> OrdersServiceServer<OrdersApi> {
    OrdersServiceServer::new(OrdersApi::new(db))
}
