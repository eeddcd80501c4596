//! What an order is and which inputs make a valid one. No protobuf and no SQL here.

use chrono::{DateTime, Utc};
use uuid::Uuid;
use waybill_runtime::validate::Violations;

/// Most line items in one order.
pub const MAX_ITEMS: usize = 100;
/// The zone of an order placed without one.
pub const DEFAULT_ZONE: &str = "default";
/// Most units of one SKU in one line.
pub const MAX_QUANTITY: i32 = 10_000;

/// Where an order stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderStatus {
    /// Stored; fulfilment not finished.
    Pending,
    /// Stock reserved and courier assigned.
    Confirmed,
    /// Cancelled, with a reason.
    Cancelled,
}

impl OrderStatus {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "PENDING",
            OrderStatus::Confirmed => "CONFIRMED",
            OrderStatus::Cancelled => "CANCELLED",
        }
    }

    /// Reads a stored name.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "PENDING" => Some(OrderStatus::Pending),
            "CONFIRMED" => Some(OrderStatus::Confirmed),
            "CANCELLED" => Some(OrderStatus::Cancelled),
            _ => None,
        }
    }

    /// Whether an order in this state may still be cancelled.
    pub fn is_cancellable(self) -> bool {
        matches!(self, OrderStatus::Pending | OrderStatus::Confirmed)
    }
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Stock keeping unit.
    pub sku: String,
    /// Units, 1 to [`MAX_QUANTITY`].
    pub quantity: i32,
}

/// A validated request to place an order.
#[derive(Debug, Clone)]
pub struct NewOrder {
    /// Who orders.
    pub customer_id: String,
    /// What, in the given order.
    pub items: Vec<Item>,
    /// Where to.
    pub delivery_address: String,
    /// Whose couriers may deliver it.
    pub zone: String,
}

impl NewOrder {
    /// Whether `order` is what this request places (a repeat), whatever became of it since:
    /// the fields that never change after placement (the delivery address may).
    pub fn placed_as(&self, order: &Order) -> bool {
        self.customer_id == order.customer_id
            && self.items == order.items
            && self.zone == order.zone
    }
}

/// A stored order.
#[derive(Debug, Clone)]
pub struct Order {
    /// Server-assigned UUIDv7.
    pub id: Uuid,
    /// Who ordered.
    pub customer_id: String,
    /// What was ordered.
    pub items: Vec<Item>,
    /// Where to.
    pub delivery_address: String,
    /// Where it stands.
    pub status: OrderStatus,
    /// Why it was cancelled; empty otherwise.
    pub cancel_reason: String,
    /// When it was placed.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// Whose couriers deliver it.
    pub zone: String,
    /// The assigned courier, once CONFIRMED.
    pub courier_id: String,
}

impl NewOrder {
    /// Checks every field and reports every problem at once, so a caller fixes its request in
    /// one round trip.
    pub fn validate(
        customer_id: String,
        items: Vec<Item>,
        delivery_address: String,
        zone: String,
    ) -> Result<Self, tonic::Status> {
        let mut violations = Violations::default();
        violations.check_key(&customer_id, "customer_id");
        if items.is_empty() {
            violations.add("items", "an order needs at least one item");
        } else if items.len() > MAX_ITEMS {
            violations.add(
                "items",
                format!("at most {MAX_ITEMS} items per order, got {}", items.len()),
            );
        }
        for (index, item) in items.iter().enumerate().take(MAX_ITEMS) {
            violations.check_id(&item.sku, &format!("items[{index}].sku"));
            if item.quantity <= 0 || item.quantity > MAX_QUANTITY {
                violations.add(
                    format!("items[{index}].quantity"),
                    format!(
                        "must be between 1 and {MAX_QUANTITY}, got {}",
                        item.quantity
                    ),
                );
            }
        }
        violations.check_text(&delivery_address, "delivery_address", true);
        let zone = if zone.is_empty() {
            DEFAULT_ZONE.to_owned()
        } else {
            violations.check_id(&zone, "zone");
            zone
        };
        violations.into_result(Self {
            customer_id,
            items,
            delivery_address,
            zone,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(sku: &str, quantity: i32) -> Item {
        Item {
            sku: sku.into(),
            quantity,
        }
    }

    fn fields(result: Result<NewOrder, tonic::Status>) -> Vec<String> {
        use tonic_types::StatusExt;
        match result {
            Ok(_) => Vec::new(),
            Err(status) => status
                .get_error_details()
                .bad_request()
                .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
                .unwrap_or_default(),
        }
    }

    #[test]
    fn a_valid_order_passes() {
        let order = NewOrder::validate(
            "c-1".into(),
            vec![item("SKU-1", 2)],
            "1 Main St".into(),
            String::new(),
        );
        assert!(order.is_ok());
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let result = NewOrder::validate(
            String::new(),
            vec![item("ok", 1), item("bad sku", 0), item("", 10_001)],
            "x".repeat(waybill_runtime::validate::MAX_TEXT + 1),
            "bad zone".into(),
        );
        assert_eq!(
            fields(result),
            [
                "customer_id",
                "items[1].sku",
                "items[1].quantity",
                "items[2].sku",
                "items[2].quantity",
                "delivery_address",
                "zone"
            ]
        );
    }

    #[test]
    fn no_items_and_too_many_items_are_rejected() {
        assert_eq!(
            fields(NewOrder::validate(
                "c".into(),
                vec![],
                "a".into(),
                String::new()
            )),
            ["items"]
        );
        let many = vec![item("s", 1); MAX_ITEMS + 1];
        assert_eq!(
            fields(NewOrder::validate(
                "c".into(),
                many,
                "a".into(),
                String::new()
            )),
            ["items"]
        );
    }

    #[test]
    fn nul_and_control_characters_are_rejected() {
        let result = NewOrder::validate(
            "c\0".into(),
            vec![item("s", 1)],
            "a\u{7}".into(),
            String::new(),
        );
        assert_eq!(fields(result), ["customer_id", "delivery_address"]);
        let multiline =
            NewOrder::validate("c".into(), vec![item("s", 1)], "a\nb".into(), String::new());
        assert!(multiline.is_ok());
    }

    #[test]
    fn limits_count_characters_not_bytes() {
        let customer = "é".repeat(waybill_runtime::validate::MAX_ID);
        assert!(
            NewOrder::validate(customer, vec![item("s", 1)], "a".into(), String::new()).is_ok()
        );
    }
}
