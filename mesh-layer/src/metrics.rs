//! Every metric the layers record, in one place so their names stay consistent and
//! documented (docs/metrics.md lists them with the rest of waybill's). Recorded through the
//! `metrics` facade; the process installs an exporter (waybill's runtime serves Prometheus
//! text on its admin port), and without one recording costs next to nothing.
//!
//! Labels: `service` and `method` are the two halves of the gRPC path
//! (`/waybill.orders.v1.OrdersService/PlaceOrder` → `waybill.orders.v1.OrdersService`,
//! `PlaceOrder`); `code` is the gRPC status code's canonical name (`OK`, `UNAVAILABLE`, …).
//!
//! The per-call metrics (requests and their duration) go through [`MethodMetrics`], whose
//! handles are resolved once per method and code, so the hot path does no registry lookup
//! and no allocation. The other functions are called only when a layer makes a decision,
//! never on the plain path.

use std::sync::{Arc, OnceLock};

use metrics::{
    Counter, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge,
    histogram,
};
use tonic::Code;

use crate::method::{MethodTable, PathMap, split_path};

/// `mesh_server_requests_total{service,method,code}`: calls answered by the server, by
/// status code (shed, failed-fast and replayed calls included).
pub const SERVER_REQUESTS: &str = "mesh_server_requests_total";
/// `mesh_server_request_duration_seconds{service,method}`: from the request's arrival at
/// the mesh stack to the call's status, for unary and client-streaming calls (a response
/// stream lasts as long as its subscriber wants, which says nothing about latency).
pub const SERVER_DURATION: &str = "mesh_server_request_duration_seconds";
/// `mesh_client_requests_total{service,method}`: calls made through a mesh client, first
/// attempts only (retries are `mesh_client_retries_total`).
pub const CLIENT_REQUESTS: &str = "mesh_client_requests_total";

/// Histogram buckets (seconds) for call durations: 0.5 ms to 10 s, roughly ×2–2.5 apart.
pub const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Describes every metric above to the installed recorder (the HELP and unit of each), so
/// the exposition documents itself. Call once, after installing the recorder.
pub fn describe() {
    describe_counter!(
        SERVER_REQUESTS,
        "Calls answered by the server, by gRPC status code."
    );
    describe_histogram!(
        SERVER_DURATION,
        Unit::Seconds,
        "Server-side duration of unary calls, from arrival at the mesh stack to the status."
    );
    describe_counter!(
        CLIENT_REQUESTS,
        "Calls made through a mesh client (first attempts; retries are counted apart)."
    );
    describe_counter!(
        "mesh_server_deadline_exceeded_total",
        "Handlers cancelled at their deadline."
    );
    describe_counter!(
        "mesh_client_deadline_exceeded_total",
        "Outgoing calls failed by their deadline, before sending or in flight."
    );
    describe_counter!(
        "mesh_server_shed_total",
        "Calls refused with RESOURCE_EXHAUSTED by the adaptive concurrency limit."
    );
    describe_gauge!(
        "mesh_server_concurrency_limit",
        "The adaptive concurrency limit of the gRPC service now."
    );
    describe_counter!(
        "mesh_fault_injected_total",
        "Faults injected by the mesh policy (aborts and delays)."
    );
    describe_counter!("mesh_client_retries_total", "Retry attempts sent.");
    describe_gauge!(
        "mesh_client_retry_budget_available",
        "Retries the client's retry budget would allow now (sampled every 64 calls and at each retry decision)."
    );
    describe_counter!(
        "mesh_client_retries_skipped_total",
        "Retryable failures not retried, by reason (budget = the retry budget is spent)."
    );
    describe_gauge!(
        "mesh_breaker_open",
        "1 while the endpoint's circuit breaker is open or half-open, else 0."
    );
    describe_counter!(
        "mesh_breaker_transitions_total",
        "Circuit breaker state changes, by the state entered."
    );
    describe_counter!(
        "mesh_breaker_rejected_total",
        "Calls failed fast by an open circuit breaker."
    );
    describe_counter!(
        "mesh_idempotency_total",
        "Calls carrying an idempotency key, by outcome (executed, replayed, in_progress, mismatch)."
    );
}

/// The `service` and `method` label values of a path; anything that is not a gRPC path is
/// `unknown` (so a client sending junk paths cannot grow the label set by much).
fn labels(path: &str) -> (String, String) {
    match split_path(path) {
        Some((service, method)) => (service.to_owned(), method.to_owned()),
        None => ("unknown".to_owned(), "unknown".to_owned()),
    }
}

/// The canonical name of a gRPC status code, as the `code` label.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

// === impl MethodMetrics ===

/// Per-method metric handles for the calls of one stack, resolved on first use (so a stack
/// built before the exporter is installed still records) and then reused: recording is an
/// atomic add, no lookup by name, no allocation.
#[derive(Debug)]
pub struct MethodMetrics {
    methods: PathMap<Arc<Handles>>,
    /// Paths not in the method table share one entry (`service="unknown"`).
    unknown: Arc<Handles>,
}

/// One method's handles. Codes are 0–16, so the counters are an array indexed by code.
#[derive(Debug)]
pub struct Handles {
    service: String,
    method: String,
    /// Whether the call's duration is recorded (not for response streams).
    timed: bool,
    server_requests: [OnceLock<Counter>; 17],
    server_duration: OnceLock<Histogram>,
    client_requests: OnceLock<Counter>,
}

impl MethodMetrics {
    /// Handles for every method in `methods`.
    pub fn new(methods: &MethodTable) -> Self {
        Self {
            methods: methods
                .iter()
                .map(|(path, info)| {
                    let handles = Handles::new(path, !info.server_streaming);
                    (path.to_owned(), Arc::new(handles))
                })
                .collect(),
            unknown: Arc::new(Handles::new("", false)),
        }
    }

    /// The handles for `path`.
    pub fn get(&self, path: &str) -> &Arc<Handles> {
        self.methods.get(path).unwrap_or(&self.unknown)
    }
}

impl Handles {
    fn new(path: &str, timed: bool) -> Self {
        let (service, method) = labels(path);
        Self {
            service,
            method,
            timed,
            server_requests: Default::default(),
            server_duration: OnceLock::new(),
            client_requests: OnceLock::new(),
        }
    }

    /// Records a call the server answered with `code` after `elapsed`.
    pub fn server_call(&self, code: Code, elapsed: std::time::Duration) {
        let index = (code as usize).min(16);
        self.server_requests[index]
            .get_or_init(|| {
                counter!(SERVER_REQUESTS, "service" => self.service.clone(),
                    "method" => self.method.clone(), "code" => code_name(code))
            })
            .increment(1);
        if self.timed {
            self.server_duration
                .get_or_init(|| {
                    histogram!(SERVER_DURATION, "service" => self.service.clone(),
                        "method" => self.method.clone())
                })
                .record(elapsed.as_secs_f64());
        }
    }

    /// Records a call made through a mesh client.
    pub fn client_call(&self) {
        self.client_requests
            .get_or_init(|| {
                counter!(CLIENT_REQUESTS, "service" => self.service.clone(),
                    "method" => self.method.clone())
            })
            .increment(1);
    }
}

// === decisions ===

/// `mesh_server_deadline_exceeded_total{service,method}`: handlers cancelled at their deadline.
pub fn server_deadline_exceeded(path: &str) {
    let (service, method) = labels(path);
    counter!("mesh_server_deadline_exceeded_total", "service" => service, "method" => method)
        .increment(1);
}

/// `mesh_client_deadline_exceeded_total{service,method,when}`: outgoing calls failed by their
/// deadline, `when` = `before_send` (never sent) or `in_flight`.
pub fn client_deadline_exceeded(path: &str, when: &'static str) {
    let (service, method) = labels(path);
    counter!("mesh_client_deadline_exceeded_total", "service" => service, "method" => method,
        "when" => when)
    .increment(1);
}

/// `mesh_server_shed_total{service,method}`: calls refused with RESOURCE_EXHAUSTED.
pub fn shed(path: &str) {
    let (service, method) = labels(path);
    counter!("mesh_server_shed_total", "service" => service, "method" => method).increment(1);
}

/// `mesh_server_concurrency_limit{service}`: the adaptive limit of one gRPC service now (set
/// when the limit is created, then on every change).
pub fn concurrency_limit(service: &str, limit: u32) {
    gauge!("mesh_server_concurrency_limit", "service" => service.to_owned()).set(f64::from(limit));
}

/// `mesh_fault_injected_total{service,method,kind}`: injected aborts and delays.
pub fn fault_injected(path: &str, kind: &'static str) {
    let (service, method) = labels(path);
    counter!("mesh_fault_injected_total", "service" => service, "method" => method,
        "kind" => kind)
    .increment(1);
}

/// `mesh_client_retries_total{service,method}`: retry attempts sent.
pub fn retried(path: &str) {
    let (service, method) = labels(path);
    counter!("mesh_client_retries_total", "service" => service, "method" => method).increment(1);
}

/// `mesh_client_retry_budget_available{service}`: the retries the budget of the client
/// calling `path`'s service would allow now.
pub fn retry_budget(path: &str, available: u64) {
    let (service, _) = labels(path);
    gauge!("mesh_client_retry_budget_available", "service" => service).set(available as f64);
}

/// `mesh_client_retries_skipped_total{service,method,reason}`: retryable failures not
/// retried, and why (`budget` — the retry budget is spent —, `deadline`, `pushback`,
/// `attempts`, `upstream_retry`, `buffer`).
pub fn retry_skipped(path: &str, reason: &'static str) {
    let (service, method) = labels(path);
    counter!("mesh_client_retries_skipped_total", "service" => service, "method" => method,
        "reason" => reason)
    .increment(1);
}

/// `mesh_breaker_open{endpoint}` at 0: a circuit was created closed, so the gauge exists
/// before anything fails.
pub fn breaker_created(endpoint: &str) {
    gauge!("mesh_breaker_open", "endpoint" => endpoint.to_owned()).set(0.0);
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

/// `mesh_idempotency_total{service,method,outcome}`: keyed calls by outcome (`executed`,
/// `replayed`, `in_progress`, `mismatch`).
pub fn idempotency(path: &str, outcome: &'static str) {
    let (service, method) = labels(path);
    counter!("mesh_idempotency_total", "service" => service, "method" => method,
        "outcome" => outcome)
    .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_canonical_name() {
        assert_eq!(code_name(Code::from_i32(0)), "OK");
        assert_eq!(code_name(Code::from_i32(14)), "UNAVAILABLE");
        assert_eq!(code_name(Code::from_i32(16)), "UNAUTHENTICATED");
        // Codes past 16 are UNKNOWN in tonic, so the counter array is always in bounds.
        assert_eq!(Code::from_i32(99) as usize, Code::Unknown as usize);
    }

    #[test]
    fn paths_split_into_labels() {
        assert_eq!(labels("/a.B/C"), ("a.B".to_owned(), "C".to_owned()));
        assert_eq!(labels("junk"), ("unknown".to_owned(), "unknown".to_owned()));
    }

    #[test]
    fn buckets_span_half_a_millisecond_to_ten_seconds() {
        assert_eq!(DURATION_BUCKETS.first(), Some(&0.0005));
        assert_eq!(DURATION_BUCKETS.last(), Some(&10.0));
        assert!(DURATION_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }
}
