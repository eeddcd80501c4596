//! What couriers and deliveries are, which inputs are valid, and which status changes a
//! delivery may make. No protobuf and no SQL here, so the rules are tested without either.

use chrono::{DateTime, Utc};
use uuid::Uuid;
use waybill_runtime::validate::Violations;

/// Largest courier capacity.
pub const MAX_CAPACITY: i32 = 1000;

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// A courier is assigned and on the way to pick up.
    Assigned,
    /// The courier has the goods.
    PickedUp,
    /// On the way to the customer.
    InTransit,
    /// Handed to the customer. Final.
    Delivered,
    /// Could not be delivered. Final.
    Failed,
    /// The order was cancelled before pick-up. Final.
    Cancelled,
}

/// What asking a delivery to move from one status to another amounts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// It is already there: nothing to do, so repeated updates are safe.
    Unchanged,
    /// A change the lifecycle allows.
    Allowed,
    /// A change the lifecycle forbids.
    Forbidden,
}

impl DeliveryStatus {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Assigned => "ASSIGNED",
            DeliveryStatus::PickedUp => "PICKED_UP",
            DeliveryStatus::InTransit => "IN_TRANSIT",
            DeliveryStatus::Delivered => "DELIVERED",
            DeliveryStatus::Failed => "FAILED",
            DeliveryStatus::Cancelled => "CANCELLED",
        }
    }

    /// Reads a stored name.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "ASSIGNED" => Some(DeliveryStatus::Assigned),
            "PICKED_UP" => Some(DeliveryStatus::PickedUp),
            "IN_TRANSIT" => Some(DeliveryStatus::InTransit),
            "DELIVERED" => Some(DeliveryStatus::Delivered),
            "FAILED" => Some(DeliveryStatus::Failed),
            "CANCELLED" => Some(DeliveryStatus::Cancelled),
            _ => None,
        }
    }

    /// Whether the delivery has ended: no further change, and its courier is free again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            DeliveryStatus::Delivered | DeliveryStatus::Failed | DeliveryStatus::Cancelled
        )
    }

    /// Whether the courier's location may be recorded in this state (the goods are moving).
    pub fn tracks_location(self) -> bool {
        matches!(self, DeliveryStatus::PickedUp | DeliveryStatus::InTransit)
    }

    /// The lifecycle: ASSIGNED → PICKED_UP → IN_TRANSIT → DELIVERED, FAILED from any state
    /// before DELIVERED, CANCELLED only from ASSIGNED.
    pub fn transition(self, to: DeliveryStatus) -> Transition {
        use DeliveryStatus::*;
        if self == to {
            return Transition::Unchanged;
        }
        match (self, to) {
            (Assigned, PickedUp)
            | (PickedUp, InTransit)
            | (InTransit, Delivered)
            | (Assigned | PickedUp | InTransit, Failed)
            | (Assigned, Cancelled) => Transition::Allowed,
            _ => Transition::Forbidden,
        }
    }
}

/// A point on Earth, in degrees (WGS 84).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Location {
    /// -90 to 90.
    pub latitude: f64,
    /// -180 to 180.
    pub longitude: f64,
}

impl Location {
    /// Checks the ranges (and that both are numbers at all: NaN and infinities are refused),
    /// naming `field.latitude` and `field.longitude`.
    pub fn check(&self, field: &str, violations: &mut Violations) {
        if !self.latitude.is_finite() || !(-90.0..=90.0).contains(&self.latitude) {
            violations.add(
                format!("{field}.latitude"),
                "must be a number from -90 to 90",
            );
        }
        if !self.longitude.is_finite() || !(-180.0..=180.0).contains(&self.longitude) {
            violations.add(
                format!("{field}.longitude"),
                "must be a number from -180 to 180",
            );
        }
    }
}

/// A courier as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Courier {
    /// Chosen by the caller.
    pub id: String,
    /// Display name.
    pub name: String,
    /// The zone served.
    pub zone: String,
    /// Most deliveries carried at once.
    pub capacity: i32,
    /// Deliveries carried now.
    pub active: i32,
}

impl Courier {
    /// Checks a courier to create or replace, reporting every problem at once.
    pub fn check_new(id: &str, name: &str, zone: &str, capacity: i32, violations: &mut Violations) {
        violations.check_id(id, "courier_id");
        violations.check_text(name, "name", false);
        violations.check_key(zone, "zone");
        if !(1..=MAX_CAPACITY).contains(&capacity) {
            violations.add(
                "capacity",
                format!("must be between 1 and {MAX_CAPACITY}, got {capacity}"),
            );
        }
    }
}

/// One order's delivery, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The order.
    pub order_id: Uuid,
    /// Who the order is for (empty for a cancellation recorded before any assignment).
    pub customer_id: String,
    /// The assigned courier; `None` for such a cancellation.
    pub courier_id: Option<String>,
    /// The zone (empty for such a cancellation).
    pub zone: String,
    /// Where it stands.
    pub status: DeliveryStatus,
    /// The courier's last reported location.
    pub location: Option<Location>,
    /// Why it failed or was cancelled; empty otherwise.
    pub reason: String,
    /// Increases by one with every change.
    pub version: i64,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

/// One change in a delivery's history.
#[derive(Debug, Clone, PartialEq)]
pub struct TrackingEvent {
    /// The delivery's version after the change.
    pub version: i64,
    /// The status after the change.
    pub status: DeliveryStatus,
    /// The location reported with the change.
    pub location: Option<Location>,
    /// When it happened.
    pub at: DateTime<Utc>,
}

impl Delivery {
    /// The delivery as it was right after `event`, given the delivery as it was just before
    /// it (`self`): watchers replay the history so that they send every change, even when
    /// several landed between two reads. A location carries over from earlier changes; a
    /// reason exists only with the final FAILED or CANCELLED status.
    pub fn after(&self, event: &TrackingEvent, current: &Delivery) -> Delivery {
        Delivery {
            status: event.status,
            location: event.location.or(self.location),
            reason: if matches!(
                event.status,
                DeliveryStatus::Failed | DeliveryStatus::Cancelled
            ) {
                current.reason.clone()
            } else {
                String::new()
            },
            version: event.version,
            updated_at: event.at,
            ..current.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeliveryStatus::*;

    const ALL: [DeliveryStatus; 6] = [Assigned, PickedUp, InTransit, Delivered, Failed, Cancelled];

    #[test]
    fn the_lifecycle_allows_exactly_these_changes() {
        let allowed = [
            (Assigned, PickedUp),
            (PickedUp, InTransit),
            (InTransit, Delivered),
            (Assigned, Failed),
            (PickedUp, Failed),
            (InTransit, Failed),
            (Assigned, Cancelled),
        ];
        for from in ALL {
            for to in ALL {
                let expected = if from == to {
                    Transition::Unchanged
                } else if allowed.contains(&(from, to)) {
                    Transition::Allowed
                } else {
                    Transition::Forbidden
                };
                assert_eq!(from.transition(to), expected, "{from:?} -> {to:?}");
            }
        }
    }

    #[test]
    fn final_states_allow_nothing_but_themselves() {
        for from in ALL.into_iter().filter(|s| s.is_final()) {
            for to in ALL.into_iter().filter(|&to| to != from) {
                assert_eq!(
                    from.transition(to),
                    Transition::Forbidden,
                    "{from:?} -> {to:?}"
                );
            }
        }
        assert_eq!(
            ALL.into_iter().filter(|s| s.is_final()).collect::<Vec<_>>(),
            [Delivered, Failed, Cancelled]
        );
    }

    #[test]
    fn going_back_is_forbidden() {
        assert_eq!(PickedUp.transition(Assigned), Transition::Forbidden);
        assert_eq!(InTransit.transition(PickedUp), Transition::Forbidden);
        assert_eq!(Assigned.transition(InTransit), Transition::Forbidden);
        assert_eq!(Assigned.transition(Delivered), Transition::Forbidden);
        assert_eq!(PickedUp.transition(Cancelled), Transition::Forbidden);
    }

    #[test]
    fn stored_names_round_trip() {
        for status in ALL {
            assert_eq!(DeliveryStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(DeliveryStatus::parse("LOST"), None);
    }

    #[test]
    fn locations_must_be_finite_and_in_range() {
        let mut violations = Violations::default();
        Location {
            latitude: 90.0,
            longitude: -180.0,
        }
        .check("location", &mut violations);
        assert!(violations.is_empty());
        Location {
            latitude: f64::NAN,
            longitude: 180.5,
        }
        .check("location", &mut violations);
        Location {
            latitude: f64::INFINITY,
            longitude: 0.0,
        }
        .check("loc", &mut violations);
        assert_eq!(
            violations.fields(),
            ["location.latitude", "location.longitude", "loc.latitude"]
        );
    }

    #[test]
    fn couriers_are_checked_field_by_field() {
        let mut violations = Violations::default();
        Courier::check_new("c-1", "Ann", "north", 3, &mut violations);
        assert!(violations.is_empty());
        Courier::check_new("bad id", "\u{7}", "", 0, &mut violations);
        Courier::check_new("c", "", "z", MAX_CAPACITY + 1, &mut violations);
        assert_eq!(
            violations.fields(),
            ["courier_id", "name", "zone", "capacity", "capacity"]
        );
    }

    #[test]
    fn replaying_an_event_carries_the_location_and_keeps_reasons_for_final_states() {
        let now = Utc::now();
        let here = Location {
            latitude: 1.0,
            longitude: 2.0,
        };
        let before = Delivery {
            order_id: Uuid::nil(),
            customer_id: "c".into(),
            courier_id: Some("k".into()),
            zone: "z".into(),
            status: PickedUp,
            location: Some(here),
            reason: String::new(),
            version: 2,
            created_at: now,
            updated_at: now,
        };
        let current = Delivery {
            status: Failed,
            location: None,
            reason: "dog".into(),
            version: 4,
            ..before.clone()
        };
        let transit = before.after(
            &TrackingEvent {
                version: 3,
                status: InTransit,
                location: None,
                at: now,
            },
            &current,
        );
        assert_eq!(transit.location, Some(here));
        assert_eq!(transit.reason, "");
        assert_eq!(transit.version, 3);
        let failed = transit.after(
            &TrackingEvent {
                version: 4,
                status: Failed,
                location: None,
                at: now,
            },
            &current,
        );
        assert_eq!(failed.reason, "dog");
        assert_eq!(failed.status, Failed);
    }
}
