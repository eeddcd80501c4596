//! The events this service publishes, written to `orders.outbox` in the caller's
//! transaction; the relay publishes them to the bus.

use waybill_api::events::v1 as events;
use waybill_events::Event;
pub use waybill_events::outbox::OutboxRow;
use waybill_runtime::DbError;
use waybill_runtime::Transaction;

use crate::domain::Order;

/// The schema whose outbox this service writes.
pub const SCHEMA: &str = "orders";

pub fn order_confirmed(order: &Order) -> Event {
    Event::new(
        "orders.order_confirmed",
        order.id.to_string(),
        &events::OrderConfirmed {
            order_id: order.id.to_string(),
            customer_id: order.customer_id.clone(),
            courier_id: order.courier_id.clone(),
        },
    )
}

pub fn order_cancelled(order: &Order) -> Event {
    Event::new(
        "orders.order_cancelled",
        order.id.to_string(),
        &events::OrderCancelled {
            order_id: order.id.to_string(),
            customer_id: order.customer_id.clone(),
            reason: order.cancel_reason.clone(),
        },
    )
}

/// Writes `event` in `transaction`.
pub async fn append(transaction: &Transaction<'_>, event: &Event) -> Result<(), DbError> {
    waybill_events::outbox::append(transaction, SCHEMA, event).await
}
