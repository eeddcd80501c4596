//! Events in, notifications out. The notification row is written in the consumer's
//! transaction, together with the inbox row; the unique (event, customer) key makes a repeat
//! a no-op even without the inbox. A new notification then goes to the sink (see `sink`).

use uuid::Uuid;
use waybill_api::{delivery::v1::DeliveryStatus, events::v1 as events};
use waybill_events::{Event, Handler, HandlerError};

use crate::sink::Sink;

/// What a notification is about, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    OrderConfirmed,
    CourierAssigned,
    Delivered,
    OrderCancelled,
    DeliveryFailed,
    /// A message sent with SendNotification.
    Message,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::OrderConfirmed => "ORDER_CONFIRMED",
            Kind::CourierAssigned => "COURIER_ASSIGNED",
            Kind::Delivered => "DELIVERED",
            Kind::OrderCancelled => "ORDER_CANCELLED",
            Kind::DeliveryFailed => "DELIVERY_FAILED",
            Kind::Message => "MESSAGE",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            Kind::OrderConfirmed,
            Kind::CourierAssigned,
            Kind::Delivered,
            Kind::OrderCancelled,
            Kind::DeliveryFailed,
            Kind::Message,
        ]
        .into_iter()
        .find(|kind| kind.as_str() == text)
    }
}

/// One notification to record.
#[derive(Debug, PartialEq, Eq)]
pub struct Notice {
    pub customer_id: String,
    pub order_id: String,
    pub kind: Kind,
    pub message: String,
}

/// The notification an event calls for, if any.
pub fn notice_for(event: &Event) -> Result<Option<Notice>, HandlerError> {
    let notice = match event.topic.as_str() {
        "orders.order_confirmed" => {
            let e: events::OrderConfirmed = event.decode()?;
            Notice {
                message: format!("Your order {} is confirmed.", e.order_id),
                customer_id: e.customer_id,
                order_id: e.order_id,
                kind: Kind::OrderConfirmed,
            }
        }
        "orders.order_cancelled" => {
            let e: events::OrderCancelled = event.decode()?;
            Notice {
                message: format!("Your order {} was cancelled: {}", e.order_id, e.reason),
                customer_id: e.customer_id,
                order_id: e.order_id,
                kind: Kind::OrderCancelled,
            }
        }
        "delivery.courier_assigned" => {
            let e: events::CourierAssigned = event.decode()?;
            Notice {
                message: format!(
                    "Courier {} will deliver your order {}.",
                    e.courier_id, e.order_id
                ),
                customer_id: e.customer_id,
                order_id: e.order_id,
                kind: Kind::CourierAssigned,
            }
        }
        "delivery.status_changed" => {
            let e: events::DeliveryStatusChanged = event.decode()?;
            let (kind, message) = match DeliveryStatus::try_from(e.status) {
                Ok(DeliveryStatus::Delivered) => (
                    Kind::Delivered,
                    format!("Your order {} was delivered.", e.order_id),
                ),
                Ok(DeliveryStatus::Failed) => (
                    Kind::DeliveryFailed,
                    format!("Delivering your order {} failed: {}", e.order_id, e.reason),
                ),
                // Intermediate steps are visible live in TrackDelivery; no message for them.
                _ => return Ok(None),
            };
            Notice {
                customer_id: e.customer_id,
                order_id: e.order_id,
                kind,
                message,
            }
        }
        _ => return Ok(None),
    };
    if notice.customer_id.is_empty() || Uuid::parse_str(&notice.order_id).is_err() {
        return Err(HandlerError::Permanent(format!(
            "event {} ({}) names no customer or no valid order id",
            event.id, event.topic
        )));
    }
    Ok(Some(notice))
}

/// Records notifications and hands each new one to the sink.
pub struct Notifier {
    pub sink: std::sync::Arc<Sink>,
}

#[tonic::async_trait]
impl Handler for Notifier {
    async fn handle(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        event: &Event,
    ) -> Result<(), HandlerError> {
        let Some(notice) = notice_for(event)? else {
            return Ok(());
        };
        let inserted = tx
            .execute(
                "INSERT INTO notifications.notifications
                     (id, customer_id, order_id, kind, message, event_id)
                 VALUES ($1, $2, $3::text::uuid, $4, $5, $6)
                 ON CONFLICT (event_id, customer_id) DO NOTHING",
                &[
                    &Uuid::now_v7(),
                    &notice.customer_id,
                    &notice.order_id,
                    &notice.kind.as_str(),
                    &notice.message,
                    &event.id,
                ],
            )
            .await?;
        if inserted == 1 {
            self.sink.send(event.id, &notice).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn event(topic: &str, payload: Vec<u8>) -> Event {
        Event::from_payload(topic, "k", payload)
    }

    #[test]
    fn events_become_notices() {
        let order_id = Uuid::now_v7().to_string();
        let confirmed = events::OrderConfirmed {
            order_id: order_id.clone(),
            customer_id: "c-1".into(),
            courier_id: "bike-1".into(),
        };
        let notice = notice_for(&event("orders.order_confirmed", confirmed.encode_to_vec()))
            .unwrap()
            .unwrap();
        assert_eq!(notice.kind, Kind::OrderConfirmed);
        assert_eq!(notice.customer_id, "c-1");

        let picked_up = events::DeliveryStatusChanged {
            order_id,
            customer_id: "c-1".into(),
            status: DeliveryStatus::PickedUp as i32,
            reason: String::new(),
        };
        assert_eq!(
            notice_for(&event("delivery.status_changed", picked_up.encode_to_vec())).unwrap(),
            None
        );
    }

    #[test]
    fn garbage_is_permanent() {
        let garbage = event("orders.order_confirmed", vec![0xff, 0xff, 0xff]);
        assert!(matches!(
            notice_for(&garbage),
            Err(HandlerError::Permanent(_))
        ));
        let no_customer = events::OrderCancelled::default().encode_to_vec();
        assert!(matches!(
            notice_for(&event("orders.order_cancelled", no_customer)),
            Err(HandlerError::Permanent(_))
        ));
    }
}
