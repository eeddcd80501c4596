//! The admin HTTP endpoint: Prometheus text exposition of every metric the process records, at
//! `GET /metrics`, on its own port (`--admin-listen`), apart from gRPC so that scraping never
//! competes with calls for the mesh's concurrency limit and never needs a gRPC client.
//!
//! [`install`] sets the process's metrics recorder (metrics-exporter-prometheus) once; the
//! layers and services record through the `metrics` facade, which does nothing until then.
//! Install before building servers and clients, so their cached handles point at it.

use std::{convert::Infallible, net::SocketAddr, sync::OnceLock, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

/// How often histograms are drained into their buckets when nobody scrapes (memory bound).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);
/// How long a scraper may take to send its request line and headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The Prometheus text exposition format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Why the admin endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The recorder could not be built or another recorder is installed.
    #[error("metrics recorder: {0}")]
    Recorder(String),
    /// The address could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// Installs the Prometheus recorder as the process's global metrics recorder, once; later
/// calls return the same handle. When the environment configures an OTLP endpoint (see
/// [`crate::otlp_metrics`]), every metric also goes to it, as `service_name` (unless
/// `OTEL_SERVICE_NAME` says otherwise).
pub fn install(service_name: &str) -> Result<PrometheusHandle, AdminError> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let prometheus = build().map_err(|e| e.to_string())?.build_recorder();
            let handle = prometheus.handle();
            let installed = if crate::otlp_metrics::wanted() {
                let name = std::env::var("OTEL_SERVICE_NAME")
                    .ok()
                    .filter(|name| !name.trim().is_empty())
                    .unwrap_or_else(|| service_name.to_owned());
                match crate::otlp_metrics::recorder(&name, bucket_bounds) {
                    Ok(otlp) => metrics::set_global_recorder(
                        metrics_util::layers::FanoutBuilder::default()
                            .add_recorder(prometheus)
                            .add_recorder(otlp)
                            .build(),
                    )
                    .map_err(|e| e.to_string()),
                    Err(error) => {
                        tracing::error!(%error, "metrics are not exported over OTLP");
                        metrics::set_global_recorder(prometheus).map_err(|e| e.to_string())
                    }
                }
            } else {
                metrics::set_global_recorder(prometheus).map_err(|e| e.to_string())
            };
            installed?;
            mesh_layer::metrics::describe();
            crate::metrics::describe();
            Ok(handle)
        })
        .clone()
        .map_err(AdminError::Recorder)
}

/// The bucket bounds of a histogram (the same for both exporters).
fn bucket_bounds(name: &str) -> Option<&'static [f64]> {
    if name.ends_with("_duration_seconds") {
        Some(mesh_layer::metrics::DURATION_BUCKETS)
    } else if name == "waybill_group_commit_batch_writes" {
        Some(BATCH_BUCKETS)
    } else {
        None
    }
}

/// Group-commit batch sizes: 1 when idle, up to the largest batch (512 by default) under load.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

fn build() -> Result<PrometheusBuilder, BuildError> {
    // Without buckets the exporter renders a histogram as a summary, which cannot be
    // aggregated across pods: every histogram gets buckets. Durations get the call-duration
    // buckets (0.5 ms to 10 s).
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_duration_seconds".to_owned()),
            mesh_layer::metrics::DURATION_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full("waybill_group_commit_batch_writes".to_owned()),
            BATCH_BUCKETS,
        )
}

/// The admin endpoint, bound and ready to serve.
#[derive(Debug)]
pub struct Admin {
    listener: TcpListener,
    handle: PrometheusHandle,
}

impl Admin {
    /// Installs the recorder (see [`install`]) and binds `address` (port 0 picks one).
    pub async fn bind(address: SocketAddr, service_name: &str) -> Result<Self, AdminError> {
        let handle = install(service_name)?;
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| AdminError::Bind { address, source })?;
        Ok(Self { listener, handle })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves `GET /metrics` (HTTP/1.1) until the process exits.
    pub async fn serve(self) {
        let Self { listener, handle } = self;
        let upkeep = handle.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(UPKEEP_INTERVAL);
            loop {
                ticker.tick().await;
                upkeep.run_upkeep();
            }
        });
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(%error, "admin endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let response = respond(&handle, &request);
                    async move { Ok::<_, Infallible>(response) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "admin endpoint: connection ended");
                }
            });
        }
    }
}

fn respond<B>(handle: &PrometheusHandle, request: &Request<B>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, CONTENT_TYPE, handle.render()),
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; metrics are at /metrics\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}
