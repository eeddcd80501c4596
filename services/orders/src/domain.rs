//! What an order is and which inputs make a valid one. No protobuf and no SQL here.

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Most line items in one order.
pub const MAX_ITEMS: usize = 100;
/// Longest customer id, in characters.
pub const MAX_CUSTOMER_ID: usize = 64;
/// Longest SKU, in characters.
pub const MAX_SKU: usize = 64;
/// Longest delivery address or cancel reason, in characters.
pub const MAX_TEXT: usize = 512;
/// Most units of one SKU in one line.
pub const MAX_QUANTITY: i32 = 10_000;

/// One offending field of a request: its path (AIP-193 style, `items[2].quantity`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The field path in the request message.
    pub field: String,
    /// What is wrong, for the caller to read.
    pub description: String,
}

impl Violation {
    fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

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
}

impl NewOrder {
    /// Checks every field and reports every problem at once, so a caller fixes its request in
    /// one round trip.
    pub fn validate(
        customer_id: String,
        items: Vec<Item>,
        delivery_address: String,
    ) -> Result<Self, Vec<Violation>> {
        let mut violations = Vec::new();
        check_customer_id(&customer_id, "customer_id", &mut violations);
        if items.is_empty() {
            violations.push(Violation::new("items", "an order needs at least one item"));
        } else if items.len() > MAX_ITEMS {
            violations.push(Violation::new(
                "items",
                format!("at most {MAX_ITEMS} items per order, got {}", items.len()),
            ));
        }
        for (index, item) in items.iter().enumerate().take(MAX_ITEMS) {
            check_sku(&item.sku, &format!("items[{index}].sku"), &mut violations);
            if item.quantity <= 0 || item.quantity > MAX_QUANTITY {
                violations.push(Violation::new(
                    format!("items[{index}].quantity"),
                    format!(
                        "must be between 1 and {MAX_QUANTITY}, got {}",
                        item.quantity
                    ),
                ));
            }
        }
        check_text(&delivery_address, "delivery_address", true, &mut violations);
        if violations.is_empty() {
            Ok(Self {
                customer_id,
                items,
                delivery_address,
            })
        } else {
            Err(violations)
        }
    }
}

/// Checks a customer id: required, at most [`MAX_CUSTOMER_ID`] characters, no control
/// characters.
pub fn check_customer_id(value: &str, field: &str, violations: &mut Vec<Violation>) {
    if value.is_empty() {
        violations.push(Violation::new(field, "required"));
    } else if value.chars().count() > MAX_CUSTOMER_ID {
        violations.push(Violation::new(
            field,
            format!("at most {MAX_CUSTOMER_ID} characters"),
        ));
    } else if value.chars().any(char::is_control) {
        violations.push(Violation::new(field, "must not contain control characters"));
    }
}

/// Checks free text: at most [`MAX_TEXT`] characters, no control characters but newlines
/// and tabs (Postgres cannot store NUL at all).
pub fn check_text(value: &str, field: &str, required: bool, violations: &mut Vec<Violation>) {
    if required && value.trim().is_empty() {
        violations.push(Violation::new(field, "required"));
    } else if value.chars().count() > MAX_TEXT {
        violations.push(Violation::new(
            field,
            format!("at most {MAX_TEXT} characters"),
        ));
    } else if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        violations.push(Violation::new(field, "must not contain control characters"));
    }
}

fn check_sku(value: &str, field: &str, violations: &mut Vec<Violation>) {
    if value.is_empty() {
        violations.push(Violation::new(field, "required"));
    } else if value.chars().count() > MAX_SKU {
        violations.push(Violation::new(
            field,
            format!("at most {MAX_SKU} characters"),
        ));
    } else if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        violations.push(Violation::new(
            field,
            "only letters, digits, '-', '_' and '.' are allowed",
        ));
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

    fn fields(result: Result<NewOrder, Vec<Violation>>) -> Vec<String> {
        match result {
            Ok(_) => Vec::new(),
            Err(violations) => violations.into_iter().map(|v| v.field).collect(),
        }
    }

    #[test]
    fn a_valid_order_passes() {
        let order = NewOrder::validate("c-1".into(), vec![item("SKU-1", 2)], "1 Main St".into());
        assert!(order.is_ok());
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let result = NewOrder::validate(
            String::new(),
            vec![item("ok", 1), item("bad sku", 0), item("", 10_001)],
            "x".repeat(MAX_TEXT + 1),
        );
        assert_eq!(
            fields(result),
            [
                "customer_id",
                "items[1].sku",
                "items[1].quantity",
                "items[2].sku",
                "items[2].quantity",
                "delivery_address"
            ]
        );
    }

    #[test]
    fn no_items_and_too_many_items_are_rejected() {
        assert_eq!(
            fields(NewOrder::validate("c".into(), vec![], "a".into())),
            ["items"]
        );
        let many = vec![item("s", 1); MAX_ITEMS + 1];
        assert_eq!(
            fields(NewOrder::validate("c".into(), many, "a".into())),
            ["items"]
        );
    }

    #[test]
    fn nul_and_control_characters_are_rejected() {
        let result = NewOrder::validate("c\0".into(), vec![item("s", 1)], "a\u{7}".into());
        assert_eq!(fields(result), ["customer_id", "delivery_address"]);
        let multiline = NewOrder::validate("c".into(), vec![item("s", 1)], "a\nb".into());
        assert!(multiline.is_ok());
    }

    #[test]
    fn limits_count_characters_not_bytes() {
        let customer = "é".repeat(MAX_CUSTOMER_ID);
        assert!(NewOrder::validate(customer, vec![item("s", 1)], "a".into()).is_ok());
    }
}
