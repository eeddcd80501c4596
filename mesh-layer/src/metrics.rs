//! Every counter and gauge the layers record, in one place so their names stay consistent and
//! documented. Recorded through the `metrics` facade; the process installs an exporter
//! (Prometheus, OTLP), and without one recording costs next to nothing.
//!
//! Each function is called only when a layer makes a decision, never on the plain path.

use metrics::{counter, gauge};

/// `mesh_server_deadline_exceeded_total{method}`: handlers cancelled at their deadline.
pub fn server_deadline_exceeded(method: &str) {
    counter!("mesh_server_deadline_exceeded_total", "method" => method.to_owned()).increment(1);
}

/// `mesh_client_deadline_exceeded_total{method,when}`: outgoing calls failed by their deadline,
/// `when` = `before_send` (never sent) or `in_flight`.
pub fn client_deadline_exceeded(method: &str, when: &'static str) {
    counter!("mesh_client_deadline_exceeded_total", "method" => method.to_owned(), "when" => when)
        .increment(1);
}

/// `mesh_server_shed_total{method}`: calls refused with RESOURCE_EXHAUSTED.
pub fn shed(method: &str) {
    counter!("mesh_server_shed_total", "method" => method.to_owned()).increment(1);
}

/// `mesh_server_concurrency_limit`: the adaptive limit now.
pub fn concurrency_limit(limit: u32) {
    gauge!("mesh_server_concurrency_limit").set(f64::from(limit));
}

/// `mesh_fault_injected_total{method,kind}`: injected aborts and delays.
pub fn fault_injected(method: &str, kind: &'static str) {
    counter!("mesh_fault_injected_total", "method" => method.to_owned(), "kind" => kind)
        .increment(1);
}

/// `mesh_client_retries_total{method}`: retry attempts sent.
pub fn retried(method: &str) {
    counter!("mesh_client_retries_total", "method" => method.to_owned()).increment(1);
}

/// `mesh_client_retries_skipped_total{method,reason}`: retryable failures not retried, and why
/// (`budget`, `deadline`, `pushback`, `attempts`, `upstream_retry`, `buffer`).
pub fn retry_skipped(method: &str, reason: &'static str) {
    counter!("mesh_client_retries_skipped_total", "method" => method.to_owned(), "reason" => reason)
        .increment(1);
}

/// `mesh_breaker_transitions_total{endpoint,to}` and `mesh_breaker_open{endpoint}` (1 while
/// open or half-open).
pub fn breaker_transition(endpoint: &str, to: &'static str) {
    counter!("mesh_breaker_transitions_total", "endpoint" => endpoint.to_owned(), "to" => to)
        .increment(1);
    gauge!("mesh_breaker_open", "endpoint" => endpoint.to_owned()).set(if to == "closed" {
        0.0
    } else {
        1.0
    });
}

/// `mesh_breaker_rejected_total{endpoint}`: calls failed fast by an open breaker.
pub fn breaker_rejected(endpoint: &str) {
    counter!("mesh_breaker_rejected_total", "endpoint" => endpoint.to_owned()).increment(1);
}

/// `mesh_idempotency_total{method,outcome}`: keyed calls by outcome (`executed`, `replayed`,
/// `in_progress`, `mismatch`).
pub fn idempotency(method: &str, outcome: &'static str) {
    counter!("mesh_idempotency_total", "method" => method.to_owned(), "outcome" => outcome)
        .increment(1);
}
