use std::time::Duration;

use crate::policy::RetryPolicy;

/// gRPC A6 backoff: the n-th retry waits a uniformly random time between zero and
/// `min(initial * multiplier^(n-1), max)`. Full jitter spreads the retries of many clients
/// that failed together, so they do not return together.
#[derive(Debug)]
pub struct Backoff {
    ceiling: Duration,
    multiplier: f64,
    max: Duration,
}

impl Backoff {
    pub fn new(policy: &RetryPolicy) -> Self {
        Self {
            ceiling: policy.initial_backoff,
            multiplier: policy.backoff_multiplier,
            max: policy.max_backoff,
        }
    }

    /// The next wait.
    pub fn next(&mut self) -> Duration {
        let wait = self.ceiling.mul_f64(fastrand::f64());
        self.ceiling = self.ceiling.mul_f64(self.multiplier).min(self.max);
        wait
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn waits_grow_to_the_cap_with_jitter() {
        let policy = RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(300),
            backoff_multiplier: 2.0,
            retryable_codes: vec![Code::Unavailable],
        };
        let mut backoff = Backoff::new(&policy);
        let caps = [100, 200, 300, 300];
        for cap in caps {
            let wait = backoff.next();
            assert!(wait <= Duration::from_millis(cap), "{wait:?} > {cap} ms");
        }
    }
}
