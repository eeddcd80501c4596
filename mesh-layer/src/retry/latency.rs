use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

/// The typical latency of one method's successful calls (an exponentially weighted moving
/// average), so a retry is not started when too little time is left for it to succeed.
///
/// Lock-free: the average is an `f64` in an atomic, and two calls finishing at once may each
/// apply their sample to the same old value, losing one. For an estimate that is fine, and it
/// keeps a mutex off every call's path.
#[derive(Debug, Default)]
pub struct TypicalLatency {
    /// Seconds, as `f64` bits; 0 until the first sample.
    seconds: AtomicU64,
}

/// Weight of a new sample.
const ALPHA: f64 = 0.1;

impl TypicalLatency {
    pub fn record(&self, latency: Duration) {
        let sample = latency.as_secs_f64();
        let average = f64::from_bits(self.seconds.load(Ordering::Relaxed));
        let next = if average == 0.0 {
            sample
        } else {
            average + ALPHA * (sample - average)
        };
        self.seconds.store(next.to_bits(), Ordering::Relaxed);
    }

    pub fn get(&self) -> Duration {
        Duration::try_from_secs_f64(f64::from_bits(self.seconds.load(Ordering::Relaxed)))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_at_the_first_sample_and_moves_a_tenth_of_the_way() {
        let latency = TypicalLatency::default();
        assert_eq!(latency.get(), Duration::ZERO);
        latency.record(Duration::from_millis(100));
        assert_eq!(latency.get(), Duration::from_millis(100));
        latency.record(Duration::from_millis(200));
        let got = latency.get().as_secs_f64();
        assert!((got - 0.110).abs() < 1e-9, "{got}");
    }
}
