//! The mesh policy of one service: what every layer does, per method.
//!
//! The document is JSON in the shape of the gRPC service config, so a `methodConfig` that
//! grpc-go and grpc-java clients already read works here unchanged (`name`, `timeout`,
//! `retryPolicy`). waybill's own fields sit beside it: `retryBudget`, `breaker`,
//! `loadShedding`, `idempotency`, `deadlineMargin`, `maxRetryBufferBytes`, and `faults` inside a
//! method entry. Every value is checked when the document is read; an error names the field
//! (`methodConfig[1].retryPolicy.maxAttempts: …`).
//!
//! ```
//! let policy = mesh_layer::policy::Policy::from_json(r#"{
//!   "methodConfig": [{
//!     "name": [{ "service": "waybill.orders.v1.OrdersService", "method": "GetOrder" }],
//!     "timeout": "0.5s",
//!     "retryPolicy": {
//!       "maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "1s",
//!       "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]
//!     }
//!   }],
//!   "retryBudget": { "retryRatio": 0.2, "minRetriesPerSecond": 10 }
//! }"#).unwrap();
//! let get = policy.method("/waybill.orders.v1.OrdersService/GetOrder");
//! assert_eq!(get.timeout, Some(std::time::Duration::from_millis(500)));
//! assert_eq!(get.retry.as_ref().map(|r| r.max_attempts), Some(3));
//! ```

mod document;
mod duration;

use std::{sync::Arc, time::Duration};

use tonic::Code;

pub use duration::parse_duration;

use crate::method::{PathMap, split_path};

/// Why a policy document was refused: the field, and what is wrong with it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {problem}")]
pub struct PolicyError {
    /// The path of the offending field in the document.
    pub field: String,
    /// What is wrong.
    pub problem: String,
}

impl PolicyError {
    pub(crate) fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// A validated policy, with per-method entries resolved by path. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Policy {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// By path, `/service/method`: looked up with the request's path as it is.
    by_method: PathMap<Arc<MethodPolicy>>,
    by_service: PathMap<Arc<MethodPolicy>>,
    default: Arc<MethodPolicy>,
    retry_budget: BudgetPolicy,
    breaker: BreakerPolicy,
    load_shedding: Option<ShedPolicy>,
    idempotency: IdempotencyPolicy,
    deadline_margin: Duration,
    max_retry_buffer_bytes: usize,
}

/// What applies to one method.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MethodPolicy {
    /// Deadline for outgoing calls when the caller sets none.
    pub timeout: Option<Duration>,
    /// Retries; `None` means no retries.
    pub retry: Option<RetryPolicy>,
    /// Injected faults (off unless configured).
    pub faults: FaultPolicy,
}

/// gRPC A6 retry policy.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (2 to 5; larger values are treated as 5, as in A6).
    pub max_attempts: u32,
    /// The first backoff's upper bound.
    pub initial_backoff: Duration,
    /// No backoff exceeds this.
    pub max_backoff: Duration,
    /// Each backoff's bound grows by this factor.
    pub backoff_multiplier: f64,
    /// Codes meaning the server did not process the call.
    pub retryable_codes: Vec<Code>,
}

/// How many retries the client may add: `retry_ratio` of recent requests, plus
/// `min_per_second` so that low traffic can still retry (Finagle's and linkerd's budget).
#[derive(Clone, Debug, PartialEq)]
pub struct BudgetPolicy {
    /// Retries allowed per original request (0.2 = at most 20 % extra load in an outage).
    pub retry_ratio: f32,
    /// Retries allowed per second regardless of traffic.
    pub min_per_second: u32,
    /// How long a request counts toward the budget.
    pub ttl: Duration,
}

/// When an endpoint's circuit opens, and how it recovers.
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerPolicy {
    /// Opens after this many failures in a row.
    pub consecutive_failures: u32,
    /// Opens when at least this fraction of calls in the window failed...
    pub failure_rate: f64,
    /// ...or at least this fraction was slower than `slow_call_duration`...
    pub slow_call_rate: f64,
    /// What counts as a slow call.
    pub slow_call_duration: Duration,
    /// ...once the window holds at least this many calls.
    pub minimum_calls: u32,
    /// The sliding window's length.
    pub window: Duration,
    /// The first open period; each reopening doubles it, up to `max_open`.
    pub base_open: Duration,
    /// The longest open period.
    pub max_open: Duration,
    /// Calls let through at once while half-open; this many successes close the circuit.
    pub half_open_probes: u32,
}

/// Server-side adaptive concurrency limit (Netflix Gradient2).
#[derive(Clone, Debug, PartialEq)]
pub struct ShedPolicy {
    /// Limit at start.
    pub initial_limit: u32,
    /// The limit never drops below this.
    pub min_limit: u32,
    /// The limit never rises above this.
    pub max_limit: u32,
    /// How much slower recent calls may be than the long-run average before the limit drops
    /// (1.5 = 50 % slower)...
    pub rtt_tolerance: f64,
    /// ...plus this much in absolute terms. Sub-millisecond handlers see scheduler jitter of
    /// the same size as their work; without a slack, that noise reads as queueing and the
    /// limit collapses under load the server handles easily.
    pub latency_slack: Duration,
}

/// Idempotency keys.
#[derive(Clone, Debug, PartialEq)]
pub struct IdempotencyPolicy {
    /// How long a key's outcome is kept and replayed.
    pub retention: Duration,
}

/// Faults to inject for a method.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultPolicy {
    /// Fail this percentage of calls with this code.
    pub abort: Option<(Code, f64)>,
    /// Delay this percentage of calls by this long.
    pub delay: Option<(Duration, f64)>,
}

impl FaultPolicy {
    /// Whether any fault is configured.
    pub fn is_active(&self) -> bool {
        self.abort.is_some() || self.delay.is_some()
    }
}

impl Default for BudgetPolicy {
    fn default() -> Self {
        Self {
            retry_ratio: 0.2,
            min_per_second: 10,
            ttl: Duration::from_secs(10),
        }
    }
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            failure_rate: 0.5,
            slow_call_rate: 0.8,
            slow_call_duration: Duration::from_secs(2),
            minimum_calls: 20,
            window: Duration::from_secs(10),
            base_open: Duration::from_secs(1),
            max_open: Duration::from_secs(30),
            half_open_probes: 3,
        }
    }
}

impl Default for ShedPolicy {
    fn default() -> Self {
        Self {
            initial_limit: 64,
            min_limit: 8,
            max_limit: 2048,
            rtt_tolerance: 1.5,
            latency_slack: Duration::from_millis(5),
        }
    }
}

impl Default for IdempotencyPolicy {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(24 * 3600),
        }
    }
}

impl MethodPolicy {
    /// What applies to a method no entry names, unless the document has a default entry
    /// (`"name": [{}]`): retry UNAVAILABLE up to 3 attempts. The retry layer still retries
    /// only idempotent methods and keyed calls, within the budget.
    pub fn builtin_default() -> Self {
        Self {
            timeout: None,
            retry: Some(RetryPolicy {
                max_attempts: 3,
                initial_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_secs(1),
                backoff_multiplier: 2.0,
                retryable_codes: vec![Code::Unavailable],
            }),
            faults: FaultPolicy::default(),
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            inner: Arc::new(Inner {
                by_method: PathMap::default(),
                by_service: PathMap::default(),
                default: Arc::new(MethodPolicy::builtin_default()),
                retry_budget: BudgetPolicy::default(),
                breaker: BreakerPolicy::default(),
                load_shedding: Some(ShedPolicy::default()),
                idempotency: IdempotencyPolicy::default(),
                deadline_margin: Duration::from_millis(5),
                max_retry_buffer_bytes: 64 * 1024,
            }),
        }
    }
}

impl Policy {
    /// Reads and validates a JSON policy document.
    pub fn from_json(text: &str) -> Result<Self, PolicyError> {
        document::parse(text)
    }

    /// The policy for a method path (`/package.Service/Method`): its own entry, else its
    /// service's, else the default entry (`"name": [{}]`), else
    /// [`MethodPolicy::builtin_default`].
    pub fn method(&self, path: &str) -> Arc<MethodPolicy> {
        if let Some((service, _)) = split_path(path) {
            if let Some(policy) = self.inner.by_method.get(path) {
                return policy.clone();
            }
            if let Some(policy) = self.inner.by_service.get(service) {
                return policy.clone();
            }
        }
        self.inner.default.clone()
    }

    /// The retry budget.
    pub fn retry_budget(&self) -> &BudgetPolicy {
        &self.inner.retry_budget
    }

    /// The per-endpoint circuit breaker.
    pub fn breaker(&self) -> &BreakerPolicy {
        &self.inner.breaker
    }

    /// Load shedding, if enabled.
    pub fn load_shedding(&self) -> Option<&ShedPolicy> {
        self.inner.load_shedding.as_ref()
    }

    /// Idempotency keys.
    pub fn idempotency(&self) -> &IdempotencyPolicy {
        &self.inner.idempotency
    }

    /// Subtracted from an inherited deadline, for the time the response takes to travel back.
    pub fn deadline_margin(&self) -> Duration {
        self.inner.deadline_margin
    }

    /// The largest request body kept for replaying a retry; larger requests are not retried.
    pub fn max_retry_buffer_bytes(&self) -> usize {
        self.inner.max_retry_buffer_bytes
    }

    /// Whether any method has faults configured (so the fault layer can be left out).
    pub fn has_faults(&self) -> bool {
        self.inner.default.faults.is_active()
            || self.inner.by_service.values().any(|p| p.faults.is_active())
            || self.inner.by_method.values().any(|p| p.faults.is_active())
    }
}
