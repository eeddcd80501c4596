use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use crate::{metrics, policy::BreakerPolicy};

/// Buckets the sliding window is divided into.
const BUCKETS: u32 = 10;

/// One endpoint's circuit: closed (calls flow), open (calls fail fast), half-open (a few
/// probes decide).
#[derive(Debug)]
pub struct Breaker {
    endpoint: String,
    policy: BreakerPolicy,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    circuit: Circuit,
    /// Bumped at every transition, so an outcome from before it is ignored.
    epoch: u64,
    /// How long the next opening lasts (before jitter); doubles on each reopening.
    open_for: Duration,
}

#[derive(Debug)]
enum Circuit {
    Closed {
        window: Window,
        consecutive_failures: u32,
    },
    Open {
        until: Instant,
    },
    HalfOpen {
        probing: u32,
        successes: u32,
    },
}

/// What an outcome does to the circuit.
enum Next {
    Stay,
    Open(&'static str),
    Reopen,
    Close,
}

/// Which circuit state a [`Breaker`] is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow.
    Closed,
    /// Calls fail fast.
    Open,
    /// A bounded number of probes decides.
    HalfOpen,
}

/// A call let through; report how it ended with [`Admission::record`]. Dropped without a
/// record (the caller gave up, for example at its deadline), it counts as a failure: the
/// endpoint did not answer in time.
#[derive(Debug)]
pub struct Admission {
    breaker: Arc<Breaker>,
    epoch: u64,
    probe: bool,
    started: Instant,
    recorded: bool,
}

/// A sliding window of call counts in time buckets.
#[derive(Debug)]
struct Window {
    buckets: Vec<Bucket>,
    bucket_length: Duration,
}

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    index: u64,
    calls: u32,
    failures: u32,
    slow: u32,
}

impl Window {
    fn new(length: Duration) -> Self {
        Self {
            buckets: vec![Bucket::default(); BUCKETS as usize],
            bucket_length: (length / BUCKETS).max(Duration::from_millis(1)),
        }
    }

    fn record(&mut self, now: Instant, epoch_start: Instant, failed: bool, slow: bool) {
        let index =
            (now.duration_since(epoch_start).as_nanos() / self.bucket_length.as_nanos()) as u64;
        let bucket = &mut self.buckets[(index % u64::from(BUCKETS)) as usize];
        if bucket.index != index {
            *bucket = Bucket {
                index,
                ..Bucket::default()
            };
        }
        bucket.calls += 1;
        bucket.failures += u32::from(failed);
        bucket.slow += u32::from(slow);
    }

    /// (calls, failures, slow) over the buckets still inside the window.
    fn totals(&self, now: Instant, epoch_start: Instant) -> (u32, u32, u32) {
        let current =
            (now.duration_since(epoch_start).as_nanos() / self.bucket_length.as_nanos()) as u64;
        self.buckets
            .iter()
            .filter(|b| b.calls > 0 && current.saturating_sub(b.index) < u64::from(BUCKETS))
            .fold((0, 0, 0), |(c, f, s), b| {
                (c + b.calls, f + b.failures, s + b.slow)
            })
    }
}

/// The reference point bucket indices count from; any fixed instant works.
fn clock_origin() -> Instant {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

impl Breaker {
    /// A closed circuit for `endpoint` (the name used in logs and metrics).
    pub fn new(endpoint: impl Into<String>, policy: BreakerPolicy) -> Arc<Self> {
        let open_for = policy.base_open;
        let endpoint = endpoint.into();
        metrics::breaker_created(&endpoint);
        Arc::new(Self {
            endpoint,
            state: Mutex::new(State {
                circuit: Circuit::Closed {
                    window: Window::new(policy.window),
                    consecutive_failures: 0,
                },
                epoch: 0,
                open_for,
            }),
            policy,
        })
    }

    /// The endpoint's name.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The state now (an open circuit whose time is up reports half-open).
    pub fn state(&self) -> BreakerState {
        let Ok(state) = self.state.lock() else {
            return BreakerState::Open;
        };
        match state.circuit {
            Circuit::Closed { .. } => BreakerState::Closed,
            Circuit::Open { until } if Instant::now() >= until => BreakerState::HalfOpen,
            Circuit::Open { .. } => BreakerState::Open,
            Circuit::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether a call would be let through now (for load balancers choosing an endpoint).
    pub fn is_available(&self) -> bool {
        let Ok(state) = self.state.lock() else {
            return false;
        };
        match state.circuit {
            Circuit::Closed { .. } => true,
            Circuit::Open { until } => Instant::now() >= until,
            Circuit::HalfOpen { probing, .. } => probing < self.policy.half_open_probes,
        }
    }

    /// Lets a call through, or refuses it while the circuit is open.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Admission> {
        let mut state = self.state.lock().ok()?;
        let now = Instant::now();
        let probe = match &mut state.circuit {
            Circuit::Closed { .. } => false,
            Circuit::Open { until } if now < *until => return None,
            Circuit::Open { .. } => {
                self.transition(
                    &mut state,
                    Circuit::HalfOpen {
                        probing: 1,
                        successes: 0,
                    },
                );
                true
            }
            Circuit::HalfOpen { probing, .. } => {
                if *probing >= self.policy.half_open_probes {
                    return None;
                }
                *probing += 1;
                true
            }
        };
        Some(Admission {
            breaker: self.clone(),
            epoch: state.epoch,
            probe,
            started: now,
            recorded: false,
        })
    }

    /// A call that says nothing about the endpoint's health (it shed the call): no outcome
    /// is counted, but a half-open probe's slot is given back.
    fn on_neutral(&self, epoch: u64, probe: bool) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        if state.epoch != epoch {
            return;
        }
        if let Circuit::HalfOpen { probing, .. } = &mut state.circuit
            && probe
        {
            *probing = probing.saturating_sub(1);
        }
    }

    fn on_outcome(&self, epoch: u64, probe: bool, failed: bool, latency: Duration) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        if state.epoch != epoch {
            return;
        }
        let now = Instant::now();
        let slow = latency >= self.policy.slow_call_duration;
        let policy = &self.policy;
        let next = match &mut state.circuit {
            Circuit::Closed {
                window,
                consecutive_failures,
            } => {
                *consecutive_failures = if failed { *consecutive_failures + 1 } else { 0 };
                window.record(now, clock_origin(), failed, slow);
                let (calls, failures, slow_calls) = window.totals(now, clock_origin());
                let rate = |n: u32| f64::from(n) / f64::from(calls.max(1));
                if *consecutive_failures >= policy.consecutive_failures {
                    Next::Open("consecutive failures")
                } else if calls >= policy.minimum_calls && rate(failures) >= policy.failure_rate {
                    Next::Open("failure rate")
                } else if calls >= policy.minimum_calls && rate(slow_calls) >= policy.slow_call_rate
                {
                    Next::Open("slow call rate")
                } else {
                    Next::Stay
                }
            }
            Circuit::HalfOpen { probing, successes } if probe => {
                *probing = probing.saturating_sub(1);
                if failed {
                    Next::Reopen
                } else {
                    *successes += 1;
                    if *successes >= policy.half_open_probes {
                        Next::Close
                    } else {
                        Next::Stay
                    }
                }
            }
            _ => Next::Stay,
        };
        match next {
            Next::Stay => {}
            Next::Open(reason) => {
                tracing::warn!(endpoint = %self.endpoint, reason, "circuit opened");
                let until = now + jitter(state.open_for);
                self.transition(&mut state, Circuit::Open { until });
            }
            Next::Reopen => {
                let open_for = (state.open_for * 2).min(policy.max_open);
                state.open_for = open_for;
                tracing::warn!(endpoint = %self.endpoint, ?open_for, "probe failed; circuit reopened");
                self.transition(
                    &mut state,
                    Circuit::Open {
                        until: now + jitter(open_for),
                    },
                );
            }
            Next::Close => {
                tracing::info!(endpoint = %self.endpoint, "probes succeeded; circuit closed");
                state.open_for = policy.base_open;
                let closed = Circuit::Closed {
                    window: Window::new(policy.window),
                    consecutive_failures: 0,
                };
                self.transition(&mut state, closed);
            }
        }
    }

    fn transition(&self, state: &mut State, to: Circuit) {
        let name = match to {
            Circuit::Closed { .. } => "closed",
            Circuit::Open { .. } => "open",
            Circuit::HalfOpen { .. } => "half_open",
        };
        if name == "half_open" {
            tracing::info!(endpoint = %self.endpoint, "circuit half-open: probing");
        }
        metrics::breaker_transition(&self.endpoint, name);
        state.circuit = to;
        state.epoch += 1;
    }
}

/// ±20 %, so the circuits of many clients that opened together do not probe together.
fn jitter(duration: Duration) -> Duration {
    duration.mul_f64(0.8 + 0.4 * fastrand::f64())
}

impl Admission {
    /// Reports that the call's outcome says nothing about the endpoint's health.
    pub fn ignore(mut self) {
        self.recorded = true;
        self.breaker.on_neutral(self.epoch, self.probe);
    }

    /// Reports the call's outcome.
    pub fn record(mut self, failed: bool) {
        self.recorded = true;
        self.breaker
            .on_outcome(self.epoch, self.probe, failed, self.started.elapsed());
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if !self.recorded {
            self.breaker
                .on_outcome(self.epoch, self.probe, true, self.started.elapsed());
        }
    }
}
