//! grpc.health.v1 tied to the primary database: a service that cannot write is not serving,
//! so load balancers and Kubernetes readiness take the process out of rotation until the
//! primary is back.

use std::time::Duration;

use tonic_health::{ServingStatus, server::HealthReporter};

use crate::Db;

/// A health entry that is SERVING for as long as the process answers, whatever the database
/// does: what a liveness probe should ask for. A liveness probe on "" would restart every pod
/// during a database outage, which helps nothing and loses the in-memory state (limits,
/// circuits) that the outage needs.
pub const LIVENESS: &str = "liveness";

/// Probes the primary every `interval` and reports every name in `services` (and the
/// whole-server entry "") as SERVING or NOT_SERVING. Runs until aborted.
pub async fn monitor(
    db: Db,
    reporter: HealthReporter,
    services: Vec<&'static str>,
    interval: Duration,
) {
    // A probe slower than the interval counts as down: a primary that slow cannot take writes.
    let probe_timeout = interval.max(Duration::from_millis(500));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<ServingStatus> = None;
    loop {
        ticker.tick().await;
        let up = db.primary_is_up(probe_timeout).await;
        crate::metrics::primary_up(up);
        let status = if up {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(status) {
            match status {
                ServingStatus::Serving => tracing::info!("primary database reachable: serving"),
                _ => tracing::warn!("primary database unreachable: not serving"),
            }
            set_all(&reporter, &services, status).await;
            last = Some(status);
        }
    }
}

/// Sets every listed service and the whole-server entry to `status`.
pub async fn set_all(reporter: &HealthReporter, services: &[&'static str], status: ServingStatus) {
    for name in services.iter().copied().chain([""]) {
        reporter.set_service_status(name, status).await;
    }
}
