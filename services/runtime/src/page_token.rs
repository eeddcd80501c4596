//! Page tokens of per-customer listings (orders, notifications): opaque to clients, and bound
//! to the customer they were issued for, so a token cannot be replayed against another
//! customer's listing.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use uuid::Uuid;

/// Where the next page starts: after this order id, for this customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// Whose listing.
    pub customer_id: String,
    /// The last id of the previous page (ids are UUIDv7: newest first is id order).
    pub after: Uuid,
}

impl Cursor {
    /// The token to hand out.
    pub fn encode(&self) -> String {
        let mut bytes = Vec::with_capacity(16 + self.customer_id.len());
        bytes.extend_from_slice(self.after.as_bytes());
        bytes.extend_from_slice(self.customer_id.as_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// `None` for a token this service did not issue.
    pub fn decode(token: &str) -> Option<Self> {
        let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
        let (id, customer) = bytes.split_at_checked(16)?;
        Some(Self {
            after: Uuid::from_slice(id).ok()?,
            customer_id: String::from_utf8(customer.to_vec()).ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let cursor = Cursor {
            customer_id: "ä-customer".into(),
            after: Uuid::now_v7(),
        };
        assert_eq!(Cursor::decode(&cursor.encode()), Some(cursor));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(Cursor::decode("not base64!"), None);
        assert_eq!(Cursor::decode("c2hvcnQ"), None);
    }
}
