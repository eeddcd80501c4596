//! The method table reads idempotency and streaming from descriptors.

#![allow(clippy::unwrap_used)]

mod support;

use support::methods;

#[test]
fn reads_idempotency_and_streaming_from_descriptors() {
    let table = methods();
    assert!(table.get("/s.S/Get").idempotent);
    assert!(table.get("/s.S/Put").idempotent);
    assert!(!table.get("/s.S/Buy").idempotent);
    assert!(table.get("/s.S/Buy").is_unary());
    assert!(table.get("/s.S/Watch").server_streaming);
    // Unknown methods get the assumptions under which no layer does anything unsafe.
    let unknown = table.get("/other.Svc/Call");
    assert!(!unknown.idempotent && !unknown.is_unary());
}
