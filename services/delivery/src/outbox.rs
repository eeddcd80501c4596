//! The transactional outbox: an event is a row written in the same transaction as the state
//! change it describes, so it is published if and only if the change commits. The events
//! relay moves `delivery.outbox` to the bus.

use deadpool_postgres::GenericClient;
use prost::Message;
use waybill_events::Event;
use waybill_runtime::DbError;

pub use waybill_events::outbox::OutboxRow;

/// The schema whose outbox this service writes.
pub const SCHEMA: &str = "delivery";

/// Topic of [`waybill_api::events::v1::CourierAssigned`].
pub const COURIER_ASSIGNED: &str = "delivery.courier_assigned";
/// Topic of [`waybill_api::events::v1::DeliveryStatusChanged`].
pub const STATUS_CHANGED: &str = "delivery.status_changed";

/// Appends one event (`message`, protobuf-encoded) to the outbox through `tx`, which must be
/// the transaction making the change the event announces, keyed by `key` (the order id, so
/// one order's events stay in order on the bus).
pub async fn append(
    tx: &impl GenericClient,
    topic: &str,
    key: &str,
    message: &impl Message,
) -> Result<(), DbError> {
    waybill_events::outbox::append(tx, SCHEMA, &Event::new(topic, key, message)).await
}
