//! A real OTLP/gRPC receiver (the collector's `TraceService` and `MetricsService`) on a
//! loopback port, that keeps every span and metric it is sent, so a test can point
//! `OTEL_EXPORTER_OTLP_ENDPOINT` of `waybill serve` children at it and inspect what they
//! export.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use opentelemetry_proto::tonic::collector::{
    metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
        metrics_service_server::{MetricsService, MetricsServiceServer},
    },
    trace::v1::trace_service_server::{TraceService, TraceServiceServer},
};
pub use opentelemetry_proto::tonic::metrics::v1::{
    Metric, metric::Data as MetricData, number_data_point::Value as NumberValue,
};
pub use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse},
    common::v1::{AnyValue, KeyValue, any_value::Value},
    trace::v1::{Span, span::SpanKind},
};

/// One received metric with the `service.name` of the process that sent it.
#[derive(Clone, Debug)]
pub struct ReceivedMetric {
    /// The resource's `service.name`.
    pub service: String,
    /// The metric as sent (one export's data points).
    pub metric: Metric,
}

/// One received span with the `service.name` of the process that sent it.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    /// The resource's `service.name`.
    pub service: String,
    /// The span as sent.
    pub span: Span,
}

impl ReceivedSpan {
    /// The span's trace id, in hex.
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    /// The span's id, in hex.
    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    /// The parent's span id, in hex (empty for a root span).
    pub fn parent_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    /// The span's kind.
    pub fn kind(&self) -> SpanKind {
        SpanKind::try_from(self.span.kind).unwrap_or(SpanKind::Unspecified)
    }

    /// An attribute's value.
    pub fn attribute(&self, key: &str) -> Option<&Value> {
        find(&self.span.attributes, key)
    }

    /// A string attribute's value.
    pub fn str(&self, key: &str) -> Option<&str> {
        match self.attribute(key)? {
            Value::StringValue(text) => Some(text),
            _ => None,
        }
    }

    /// An integer attribute's value.
    pub fn int(&self, key: &str) -> Option<i64> {
        match self.attribute(key)? {
            Value::IntValue(value) => Some(*value),
            _ => None,
        }
    }

    /// A floating-point attribute's value.
    pub fn double(&self, key: &str) -> Option<f64> {
        match self.attribute(key)? {
            Value::DoubleValue(value) => Some(*value),
            _ => None,
        }
    }
}

fn find<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()
}

/// Lowercase hex of an id.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The receiver; stops when dropped.
pub struct Collector {
    addr: SocketAddr,
    received: Arc<Received>,
    server: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Received {
    /// Whether spans are kept, or only counted (a benchmark's receiver).
    keep: bool,
    spans: Mutex<Vec<ReceivedSpan>>,
    metrics: Mutex<Vec<ReceivedMetric>>,
    count: AtomicU64,
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_metrics in request.into_inner().resource_metrics {
            let service = resource_metrics
                .resource
                .as_ref()
                .and_then(|resource| find(&resource.attributes, "service.name"))
                .and_then(|value| match value {
                    Value::StringValue(name) => Some(name.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope_metrics in resource_metrics.scope_metrics {
                received.extend(
                    scope_metrics
                        .metrics
                        .into_iter()
                        .map(|metric| ReceivedMetric {
                            service: service.clone(),
                            metric,
                        }),
                );
            }
        }
        self.received
            .metrics
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .extend(received);
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

struct Receiver {
    received: Arc<Received>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if !self.received.keep {
            let spans = request
                .get_ref()
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len() as u64)
                .sum();
            self.received.count.fetch_add(spans, Ordering::Relaxed);
            return Ok(tonic::Response::new(ExportTraceServiceResponse::default()));
        }
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .as_ref()
                .and_then(|resource| find(&resource.attributes, "service.name"))
                .and_then(|value| match value {
                    Value::StringValue(name) => Some(name.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                received.extend(scope_spans.spans.into_iter().map(|span| ReceivedSpan {
                    service: service.clone(),
                    span,
                }));
            }
        }
        self.received
            .count
            .fetch_add(received.len() as u64, Ordering::Relaxed);
        self.received
            .spans
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Starts the receiver on a free loopback port (in the current tokio runtime, which
    /// should be multi-threaded so that blocking test code does not stall it).
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|error| panic!("bind the OTLP receiver: {error}"));
        Self::serve(listener, true)
    }

    /// A receiver on `listener` that only counts the spans it is sent ([`Self::received`]).
    pub fn counting(listener: tokio::net::TcpListener) -> Self {
        Self::serve(listener, false)
    }

    fn serve(listener: tokio::net::TcpListener, keep: bool) -> Self {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|error| panic!("the OTLP receiver's address: {error}"));
        let received = Arc::new(Received {
            keep,
            ..Received::default()
        });
        let service = TraceServiceServer::new(Receiver {
            received: received.clone(),
        });
        let metrics = MetricsServiceServer::new(Receiver {
            received: received.clone(),
        });
        let server = tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            if let Err(error) = tonic::transport::Server::builder()
                .add_service(service)
                .add_service(metrics)
                .serve_with_incoming(incoming)
                .await
            {
                eprintln!("OTLP receiver stopped: {error}");
            }
        });
        Self {
            addr,
            received,
            server,
        }
    }

    /// `http://127.0.0.1:PORT`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many spans were received so far.
    pub fn received(&self) -> u64 {
        self.received.count.load(Ordering::Relaxed)
    }

    /// Every metric received so far.
    pub fn metrics(&self) -> Vec<ReceivedMetric> {
        self.received
            .metrics
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Every span received so far (none when only counting).
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.received
            .spans
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.server.abort();
    }
}
