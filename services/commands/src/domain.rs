//! What a command is, which statuses it passes through, and the rules of the pipeline that do
//! not need a database: validation, the user → shard hash, retry backoff, inverses for undo.

use std::time::Duration;

use chrono::{DateTime, Utc};
use prost::Message;
use uuid::Uuid;
use waybill_api::commands::v1::{self as pb, command_payload::Kind as PayloadKind};
use waybill_runtime::validate::Violations;

const MAX_RESTOCK: i32 = 1_000_000;

/// Where a command stands (the `status` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Accepted,
    Running,
    Succeeded,
    /// Only in the audit trail: an attempt failed, before RETRYING or DEAD is decided.
    Failed,
    Retrying,
    Dead,
    Cancelled,
    Undone,
}

impl Status {
    const ALL: [Status; 8] = [
        Status::Accepted,
        Status::Running,
        Status::Succeeded,
        Status::Failed,
        Status::Retrying,
        Status::Dead,
        Status::Cancelled,
        Status::Undone,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Accepted => "ACCEPTED",
            Status::Running => "RUNNING",
            Status::Succeeded => "SUCCEEDED",
            Status::Failed => "FAILED",
            Status::Retrying => "RETRYING",
            Status::Dead => "DEAD",
            Status::Cancelled => "CANCELLED",
            Status::Undone => "UNDONE",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == text)
    }

    /// No further change comes by itself: a watcher can stop. (DEAD can be requeued and
    /// SUCCEEDED undone, but only by a new call.)
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Status::Succeeded | Status::Dead | Status::Cancelled | Status::Undone
        )
    }

    pub fn to_proto(self) -> pb::CommandStatus {
        match self {
            Status::Accepted => pb::CommandStatus::Accepted,
            Status::Running => pb::CommandStatus::Running,
            Status::Succeeded => pb::CommandStatus::Succeeded,
            Status::Failed => pb::CommandStatus::Failed,
            Status::Retrying => pb::CommandStatus::Retrying,
            Status::Dead => pb::CommandStatus::Dead,
            Status::Cancelled => pb::CommandStatus::Cancelled,
            Status::Undone => pb::CommandStatus::Undone,
        }
    }
}

/// A command's kind (the `kind` column and the handler registry's key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    CancelOrder,
    ChangeDeliveryAddress,
    RestockItem,
    SendNotification,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::CancelOrder,
        Kind::ChangeDeliveryAddress,
        Kind::RestockItem,
        Kind::SendNotification,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::CancelOrder => "CANCEL_ORDER",
            Kind::ChangeDeliveryAddress => "CHANGE_DELIVERY_ADDRESS",
            Kind::RestockItem => "RESTOCK_ITEM",
            Kind::SendNotification => "SEND_NOTIFICATION",
        }
    }

    pub fn of(payload: &PayloadKind) -> Self {
        match payload {
            PayloadKind::CancelOrder(_) => Kind::CancelOrder,
            PayloadKind::ChangeDeliveryAddress(_) => Kind::ChangeDeliveryAddress,
            PayloadKind::RestockItem(_) => Kind::RestockItem,
            PayloadKind::SendNotification(_) => Kind::SendNotification,
        }
    }

    /// Whether a succeeded command of this kind can be undone.
    pub fn is_reversible(self) -> bool {
        matches!(self, Kind::ChangeDeliveryAddress | Kind::RestockItem)
    }
}

/// A validated payload: exactly one kind, its fields checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Payload(PayloadKind);

impl Payload {
    /// Checks a submitted payload, naming each bad field under `field` in `violations`.
    pub fn check(
        payload: Option<&pb::CommandPayload>,
        field: &str,
        violations: &mut Violations,
    ) -> Option<Self> {
        let Some(kind) = payload.and_then(|p| p.kind.as_ref()) else {
            violations.add(field, "must name one command kind");
            return None;
        };
        let before = violations.fields().len();
        match kind {
            PayloadKind::CancelOrder(c) => {
                violations.uuid(&c.order_id, &format!("{field}.cancel_order.order_id"));
                violations.check_text(&c.reason, &format!("{field}.cancel_order.reason"), false);
            }
            PayloadKind::ChangeDeliveryAddress(c) => {
                let prefix = format!("{field}.change_delivery_address");
                violations.uuid(&c.order_id, &format!("{prefix}.order_id"));
                violations.check_text(
                    &c.delivery_address,
                    &format!("{prefix}.delivery_address"),
                    true,
                );
            }
            PayloadKind::RestockItem(r) => {
                violations.check_id(&r.sku, &format!("{field}.restock_item.sku"));
                if !(1..=MAX_RESTOCK).contains(&r.quantity) {
                    violations.add(
                        format!("{field}.restock_item.quantity"),
                        format!("must be between 1 and {MAX_RESTOCK}, got {}", r.quantity),
                    );
                }
            }
            PayloadKind::SendNotification(s) => {
                let prefix = format!("{field}.send_notification");
                violations.check_key(&s.customer_id, &format!("{prefix}.customer_id"));
                violations.check_text(&s.message, &format!("{prefix}.message"), true);
            }
        }
        (violations.fields().len() == before).then(|| Payload(kind.clone()))
    }

    /// A payload read back from the log (written by [`Self::encode`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        pb::CommandPayload::decode(bytes)
            .ok()
            .and_then(|p| p.kind)
            .map(Payload)
            .ok_or_else(|| "stored payload does not decode".to_owned())
    }

    pub fn encode(&self) -> Vec<u8> {
        self.to_proto().encode_to_vec()
    }

    pub fn kind(&self) -> Kind {
        Kind::of(&self.0)
    }

    pub fn get(&self) -> &PayloadKind {
        &self.0
    }

    pub fn to_proto(&self) -> pb::CommandPayload {
        pb::CommandPayload {
            kind: Some(self.0.clone()),
        }
    }

    /// The payload that reverses this one, given what this one's run reported (`result`), or
    /// `None` when the kind cannot be undone. An undo command carries the inverse operation
    /// itself, so GetCommand shows exactly what it will do: a restock's inverse is a restock
    /// of the negative quantity, an address change's is a change back to the previous address.
    pub fn inverse(&self, result: &str) -> Option<Self> {
        match &self.0 {
            PayloadKind::RestockItem(r) => {
                Some(Payload(PayloadKind::RestockItem(pb::RestockItem {
                    sku: r.sku.clone(),
                    quantity: -r.quantity,
                })))
            }
            PayloadKind::ChangeDeliveryAddress(c) => Some(Payload(
                PayloadKind::ChangeDeliveryAddress(pb::ChangeDeliveryAddress {
                    order_id: c.order_id.clone(),
                    delivery_address: previous_address(result)?.to_owned(),
                }),
            )),
            PayloadKind::CancelOrder(_) | PayloadKind::SendNotification(_) => None,
        }
    }
}

/// The result a ChangeDeliveryAddress run records, from which its undo is built.
pub fn address_result(previous: &str) -> String {
    format!("previous delivery address: {previous}")
}

fn previous_address(result: &str) -> Option<&str> {
    result.strip_prefix("previous delivery address: ")
}

/// The shard of a user: FNV-1a (64 bit) of the user id modulo the shard count. Written out
/// rather than taken from std's `Hasher`, whose output may change between Rust releases: a
/// user must hash to the same shard in every process and every version, or their commands
/// could run out of order.
pub fn shard_of(user_id: &str, shard_count: u32) -> i32 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = user_id.bytes().fold(OFFSET, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    });
    // The count is at most 1,024, so the remainder fits an i32.
    i32::try_from(hash % u64::from(shard_count.max(1))).unwrap_or(0)
}

/// A command as stored, without its history.
#[derive(Debug, Clone)]
pub struct Command {
    pub id: Uuid,
    pub shard: i32,
    pub user_id: String,
    pub payload: Payload,
    pub status: Status,
    pub attempts: i32,
    pub result: String,
    pub last_error: String,
    pub undo_of: Option<Uuid>,
    pub undone_by: Option<Uuid>,
    /// The submitting call's W3C traceparent (empty when it was not traced).
    pub traceparent: String,
    pub run_after: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One audit row.
#[derive(Debug, Clone)]
pub struct Transition {
    /// The audit row's id: transitions sort by it.
    pub seq: i64,
    pub status: Status,
    pub attempt: i32,
    pub worker: String,
    pub error: String,
    pub at: DateTime<Utc>,
}

/// A command to store.
#[derive(Debug, Clone)]
pub struct NewCommand {
    pub id: Uuid,
    pub shard: i32,
    pub user_id: String,
    pub idempotency_key: String,
    pub payload: Payload,
    pub undo_of: Option<Uuid>,
    pub traceparent: String,
}

/// How long to wait before attempt `attempt + 1` after attempt `attempt` failed: exponential
/// from `base`, capped at `max`, with full jitter so that commands failing together (a
/// service down) do not retry together.
pub fn backoff(attempt: i32, base: Duration, max: Duration) -> Duration {
    let exponent = u32::try_from(attempt.saturating_sub(1))
        .unwrap_or(0)
        .min(20);
    let ceiling = base.saturating_mul(1 << exponent).min(max);
    ceiling.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_stable_and_spread() {
        // Fixed values: a change here would move users between shards.
        assert_eq!(shard_of("", 16), (0xcbf2_9ce4_8422_2325_u64 % 16) as i32);
        assert_eq!(shard_of("alice", 16), shard_of("alice", 16));
        let mut seen = [0_u32; 8];
        for user in 0..800 {
            seen[shard_of(&format!("user-{user}"), 8) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "uneven spread: {seen:?}");
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        for attempt in 1..30 {
            let wait = backoff(attempt, base, max);
            let exponent = u32::try_from(attempt - 1).unwrap_or(0).min(20);
            assert!(wait <= base.saturating_mul(1 << exponent).min(max));
        }
    }

    #[test]
    fn inverses() {
        let restock = Payload(PayloadKind::RestockItem(pb::RestockItem {
            sku: "A".into(),
            quantity: 3,
        }));
        assert_eq!(
            restock.inverse(""),
            Some(Payload(PayloadKind::RestockItem(pb::RestockItem {
                sku: "A".into(),
                quantity: -3
            })))
        );
        let change = Payload(PayloadKind::ChangeDeliveryAddress(
            pb::ChangeDeliveryAddress {
                order_id: "o".into(),
                delivery_address: "new".into(),
            },
        ));
        let undo = change.inverse(&address_result("old street 1"));
        assert!(matches!(
            undo.as_ref().map(Payload::get),
            Some(PayloadKind::ChangeDeliveryAddress(c)) if c.delivery_address == "old street 1"
        ));
        assert_eq!(change.inverse("garbage"), None);
    }
}
