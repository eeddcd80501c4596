use std::{collections::HashMap, sync::Mutex, time::Duration};

/// The typical latency of each method's successful calls (an exponentially weighted moving
/// average), so a retry is not started when too little time is left for it to succeed.
#[derive(Debug, Default)]
pub struct TypicalLatency {
    by_method: Mutex<HashMap<String, f64>>,
}

/// Weight of a new sample.
const ALPHA: f64 = 0.1;

impl TypicalLatency {
    pub fn record(&self, method: &str, latency: Duration) {
        let Ok(mut map) = self.by_method.lock() else {
            return;
        };
        let sample = latency.as_secs_f64();
        match map.get_mut(method) {
            Some(average) => *average += ALPHA * (sample - *average),
            None => {
                map.insert(method.to_owned(), sample);
            }
        }
    }

    pub fn get(&self, method: &str) -> Duration {
        self.by_method
            .lock()
            .ok()
            .and_then(|map| map.get(method).copied())
            .map(Duration::from_secs_f64)
            .unwrap_or_default()
    }
}
