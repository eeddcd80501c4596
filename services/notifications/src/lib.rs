//! The notifications service: consumes the platform's events and records one notification
//! per customer and event (order confirmed, courier assigned, delivered, cancelled), then
//! hands it to the sink; SendNotification records and sends a message directly (the command
//! pipeline's SendNotification kind); ListNotifications answers from a replica.
//!
//! `handler` turns events into notifications inside the consumer's transaction (the inbox
//! row and the notification commit together), `sink` sends them on (log or webhook), `api`
//! is the gRPC edge.

mod api;
mod handler;
mod sink;

pub use sink::SinkConfig;

use waybill_api::notifications::v1::notifications_service_server::NotificationsServiceServer;
use waybill_events::{Bus, BusError, Consumer, Subscription};
use waybill_runtime::{Db, Schema};

pub use api::NotificationsApi;

refinery::embed_migrations!("migrations");

/// The `notifications` schema and its migrations.
pub const SCHEMA: Schema = Schema {
    name: "notifications",
    runner: migrations::runner,
};

/// The subscription's name: every notifications process shares its events.
pub const SUBSCRIPTION: &str = "notifications";

/// The topics notifications listens to.
pub const TOPICS: [&str; 4] = [
    "orders.order_confirmed",
    "orders.order_cancelled",
    "delivery.courier_assigned",
    "delivery.status_changed",
];

/// The subscription the notifications consumer reads (`waybill migrate` registers it too).
pub fn subscription() -> Result<Subscription, BusError> {
    Subscription::new(SUBSCRIPTION, TOPICS).map_err(|error| BusError::Config(error.to_string()))
}

/// The gRPC server and the event consumer to run beside it. The consumer's subscription is
/// registered before this returns (see [`waybill_events::Consumer::register`]).
pub async fn server(
    db: Db,
    bus: Bus,
    config: &SinkConfig,
) -> Result<
    (
        NotificationsServiceServer<NotificationsApi>,
        impl Future<Output = ()> + Send + 'static,
    ),
    BusError,
> {
    let sink = std::sync::Arc::new(sink::Sink::from_config(config).map_err(BusError::Config)?);
    let consumer = Consumer::new(
        db.clone(),
        bus,
        "notifications",
        subscription()?,
        handler::Notifier { sink: sink.clone() },
    )?;
    consumer.register().await;
    Ok((
        NotificationsServiceServer::new(NotificationsApi::new(db, sink)),
        consumer.run(std::future::pending::<()>()),
    ))
}
