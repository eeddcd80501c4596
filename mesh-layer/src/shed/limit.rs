use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use crate::{metrics, policy::ShedPolicy};

/// An adaptive concurrency limit (Gradient2, after Netflix concurrency-limits).
#[derive(Debug)]
pub struct GradientLimit {
    in_flight: AtomicU32,
    limit: AtomicU32,
    state: Mutex<State>,
    policy: ShedPolicy,
    /// The gRPC service it limits, for its gauge.
    service: String,
}

#[derive(Debug)]
struct State {
    estimate: f64,
    /// Long-run latency in seconds: what an unloaded call costs.
    long_rtt: Ewma,
    /// Recent latency in seconds.
    short_rtt: Ewma,
}

/// An exponentially weighted moving average with a warm-up (a plain mean for the first
/// `window` samples, so early samples do not dominate).
#[derive(Debug)]
struct Ewma {
    value: f64,
    samples: u32,
    window: u32,
}

impl Ewma {
    fn new(window: u32) -> Self {
        Self {
            value: 0.0,
            samples: 0,
            window,
        }
    }

    fn add(&mut self, sample: f64) -> f64 {
        if self.samples < self.window {
            self.samples += 1;
            self.value += (sample - self.value) / f64::from(self.samples);
        } else {
            let factor = 2.0 / (f64::from(self.window) + 1.0);
            self.value += factor * (sample - self.value);
        }
        self.value
    }
}

/// Admission to run one call; returns its slot when dropped. [`Permit::complete`] also feeds
/// the call's latency to the limit.
#[derive(Debug)]
pub struct Permit {
    limit: Arc<GradientLimit>,
    in_flight_at_start: u32,
}

impl GradientLimit {
    /// A limit starting at `policy.initial_limit`, for the gRPC service named `service`.
    pub fn new(policy: &ShedPolicy, service: &str) -> Self {
        metrics::concurrency_limit(service, policy.initial_limit);
        Self {
            in_flight: AtomicU32::new(0),
            limit: AtomicU32::new(policy.initial_limit),
            state: Mutex::new(State {
                estimate: f64::from(policy.initial_limit),
                long_rtt: Ewma::new(600),
                short_rtt: Ewma::new(10),
            }),
            policy: policy.clone(),
            service: service.to_owned(),
        }
    }

    /// The limit now.
    pub fn current(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Calls running now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// A permit if fewer than the limit are in flight.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let limit = self.current();
        let previous = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()?;
        Some(Permit {
            limit: self.clone(),
            in_flight_at_start: previous + 1,
        })
    }

    fn on_sample(&self, rtt: Duration, in_flight: u32) {
        let rtt = rtt.as_secs_f64().max(1e-6);
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let short = state.short_rtt.add(rtt);
        let mut long = state.long_rtt.add(rtt);
        // After a long overload the long-run average has absorbed the slow samples; let it
        // drift back down so the limit can recover.
        if long / short > 2.0 {
            long *= 0.95;
            state.long_rtt.value = long;
        }
        // An application-limited server says nothing about capacity: do not grow on idle.
        if f64::from(in_flight) < state.estimate / 2.0 {
            return;
        }
        let allowed = self.policy.rtt_tolerance * long + self.policy.latency_slack.as_secs_f64();
        let gradient = (allowed / short).clamp(0.5, 1.0);
        let queue = state.estimate.sqrt();
        let target = state.estimate * gradient + queue;
        let smoothed = state.estimate * 0.8 + target * 0.2;
        state.estimate = smoothed.clamp(
            f64::from(self.policy.min_limit),
            f64::from(self.policy.max_limit),
        );
        let new_limit = state.estimate as u32;
        if self.limit.swap(new_limit, Ordering::Relaxed) != new_limit {
            metrics::concurrency_limit(&self.service, new_limit);
        }
    }
}

impl Permit {
    /// Ends the call, reporting how long it took.
    pub fn complete(self, rtt: Duration) {
        self.limit.on_sample(rtt, self.in_flight_at_start);
        // Drop returns the slot.
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limit.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> ShedPolicy {
        ShedPolicy {
            initial_limit: 20,
            min_limit: 2,
            max_limit: 100,
            rtt_tolerance: 1.5,
            latency_slack: Duration::from_millis(1),
        }
    }

    #[test]
    fn admits_up_to_the_limit_and_frees_slots_on_drop() {
        let limit = Arc::new(GradientLimit::new(
            &ShedPolicy {
                initial_limit: 2,
                ..policy()
            },
            "s.S",
        ));
        let a = limit.try_acquire().unwrap();
        let _b = limit.try_acquire().unwrap();
        assert!(
            limit.try_acquire().is_none(),
            "third call over a limit of 2"
        );
        drop(a);
        assert!(limit.try_acquire().is_some());
    }

    #[test]
    fn shrinks_when_latency_rises_and_regrows_when_it_falls() {
        let limit = Arc::new(GradientLimit::new(&policy(), "s.S"));
        // Steady state at full use: 10 ms calls.
        for _ in 0..200 {
            limit.on_sample(Duration::from_millis(10), 20);
        }
        let steady = limit.current();
        assert!(steady >= 20, "grows while latency holds: {steady}");

        // Queueing: latency triples.
        for _ in 0..50 {
            limit.on_sample(Duration::from_millis(30), steady);
        }
        let loaded = limit.current();
        assert!(
            loaded < steady / 2,
            "shrinks under queueing: {steady} -> {loaded}"
        );

        for _ in 0..300 {
            limit.on_sample(Duration::from_millis(10), limit.current());
        }
        assert!(
            limit.current() > loaded,
            "recovers: {loaded} -> {}",
            limit.current()
        );
    }

    #[test]
    fn sub_slack_jitter_does_not_shrink_the_limit() {
        let limit = Arc::new(GradientLimit::new(&policy(), "s.S"));
        // A 50 µs handler whose latency jitters to 500 µs under load: noise, not queueing.
        for i in 0..500 {
            let rtt = if i % 2 == 0 { 50 } else { 500 };
            limit.on_sample(Duration::from_micros(rtt), limit.current());
        }
        assert_eq!(limit.current(), 100);
    }

    #[test]
    fn stays_within_bounds() {
        let limit = Arc::new(GradientLimit::new(
            &ShedPolicy {
                min_limit: 5,
                ..policy()
            },
            "s.S",
        ));
        for _ in 0..1000 {
            limit.on_sample(Duration::from_millis(1), 1000);
        }
        assert_eq!(limit.current(), 100, "capped at max_limit");
        // A burst 10,000 times slower: the limit falls to the floor, not below. (Sustained,
        // such latency becomes the new long-run normal and the limit grows back; that is
        // Gradient2's design: it reacts to change, not to absolute latency.)
        for _ in 0..60 {
            limit.on_sample(Duration::from_secs(10), 1000);
        }
        assert_eq!(limit.current(), 5, "held at min_limit");
    }
}
