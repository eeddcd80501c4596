//! What items and reservations are, and which requests are valid. No protobuf, no SQL.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;
use waybill_runtime::validate::Violations;

/// Most lines in one reservation.
pub const MAX_LINES: usize = 100;
/// Most units of one line.
pub const MAX_QUANTITY: i32 = 10_000;
/// Most units of one item on hand.
pub const MAX_ON_HAND: i32 = 1_000_000_000;

/// A catalog item and its stock.
#[derive(Debug, Clone)]
pub struct Item {
    pub sku: String,
    pub name: String,
    pub on_hand: i32,
    pub reserved: i32,
    pub updated_at: DateTime<Utc>,
}

/// Where a reservation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationState {
    Held,
    Committed,
    Released,
}

impl ReservationState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReservationState::Held => "HELD",
            ReservationState::Committed => "COMMITTED",
            ReservationState::Released => "RELEASED",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "HELD" => Some(ReservationState::Held),
            "COMMITTED" => Some(ReservationState::Committed),
            "RELEASED" => Some(ReservationState::Released),
            _ => None,
        }
    }
}

/// Stock held for one order.
#[derive(Debug, Clone)]
pub struct Reservation {
    pub order_id: Uuid,
    /// SKU → units, in SKU order.
    pub lines: BTreeMap<String, i32>,
    pub state: ReservationState,
    pub expires_at: Option<DateTime<Utc>>,
}

/// A validated Reserve request: lines merged per SKU and sorted, which is also the order in
/// which item rows are locked (one global order means concurrent reservations never
/// deadlock).
#[derive(Debug, Clone)]
pub struct NewReservation {
    pub order_id: Uuid,
    pub lines: BTreeMap<String, i32>,
}

impl NewReservation {
    pub fn validate(order_id: &str, lines: Vec<(String, i32)>) -> Result<Self, Violations> {
        let mut violations = Violations::default();
        let order_id = violations.uuid(order_id, "order_id");
        if lines.is_empty() {
            violations.add("lines", "at least one line is required");
        } else if lines.len() > MAX_LINES {
            violations.add(
                "lines",
                format!("at most {MAX_LINES} lines, got {}", lines.len()),
            );
        }
        let mut merged = BTreeMap::new();
        for (index, (sku, quantity)) in lines.into_iter().enumerate().take(MAX_LINES) {
            violations.check_id(&sku, &format!("lines[{index}].sku"));
            if !(1..=MAX_QUANTITY).contains(&quantity) {
                violations.add(
                    format!("lines[{index}].quantity"),
                    format!("must be between 1 and {MAX_QUANTITY}, got {quantity}"),
                );
                continue;
            }
            // At most 100 lines of at most 10 000 units: the sum fits an i32.
            *merged.entry(sku).or_insert(0) += quantity;
        }
        match order_id {
            Some(order_id) if violations.is_empty() => Ok(Self {
                order_id,
                lines: merged,
            }),
            _ => Err(violations),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_of_one_sku_add_up_and_sort() {
        let reservation = NewReservation::validate(
            &Uuid::now_v7().to_string(),
            vec![("B".into(), 2), ("A".into(), 1), ("B".into(), 3)],
        )
        .unwrap();
        assert_eq!(
            reservation.lines.into_iter().collect::<Vec<_>>(),
            [("A".to_string(), 1), ("B".to_string(), 5)]
        );
    }

    #[test]
    fn every_bad_field_is_named() {
        let violations =
            NewReservation::validate("not-a-uuid", vec![("ok".into(), 1), ("bad sku".into(), 0)])
                .unwrap_err();
        assert_eq!(
            violations.fields(),
            ["order_id", "lines[1].sku", "lines[1].quantity"]
        );
        let empty = NewReservation::validate(&Uuid::now_v7().to_string(), vec![]).unwrap_err();
        assert_eq!(empty.fields(), ["lines"]);
    }
}
