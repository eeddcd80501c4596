use std::{
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

/// How fast old latency is forgotten.
const DECAY: Duration = Duration::from_secs(10);
/// What an endpoint with no samples is assumed to cost.
const INITIAL_RTT: Duration = Duration::from_millis(10);

/// Peak-EWMA load (Finagle, tower, linkerd): an average of response times that jumps to any
/// slower sample at once and decays back slowly, times the calls in flight. A slowing endpoint
/// becomes expensive immediately instead of after many samples.
#[derive(Debug)]
pub struct PeakEwma {
    rtt: Mutex<(f64, Instant)>,
    pending: AtomicU32,
}

impl Default for PeakEwma {
    fn default() -> Self {
        Self {
            rtt: Mutex::new((INITIAL_RTT.as_secs_f64(), Instant::now())),
            pending: AtomicU32::new(0),
        }
    }
}

impl PeakEwma {
    /// The endpoint's cost now: lower is better.
    pub fn cost(&self) -> f64 {
        let rtt = self.rtt.lock().map(|r| r.0).unwrap_or(f64::MAX);
        rtt * f64::from(self.pending.load(Ordering::Relaxed) + 1)
    }

    /// Calls in flight.
    #[cfg(test)]
    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
    }

    pub fn start(&self) {
        self.pending.fetch_add(1, Ordering::Relaxed);
    }

    pub fn finish(&self, rtt: Duration) {
        self.pending.fetch_sub(1, Ordering::Relaxed);
        let Ok(mut state) = self.rtt.lock() else {
            return;
        };
        let now = Instant::now();
        let sample = rtt.as_secs_f64();
        let (average, last) = *state;
        let next = if sample > average {
            sample
        } else {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            let weight = (-elapsed / DECAY.as_secs_f64()).exp();
            average * weight + sample * (1.0 - weight)
        };
        *state = (next, now);
    }
}
