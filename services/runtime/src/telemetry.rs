//! Structured logs on stderr (stdout is kept for the machine-readable startup line), and
//! OpenTelemetry traces over OTLP/gRPC when an endpoint is configured.
//!
//! Traces are configured by the standard variables, read once at startup:
//!
//! | variable | effect |
//! |---|---|
//! | `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT` | where spans go (`http://collector:4317`); unset: no tracing at all |
//! | `OTEL_SDK_DISABLED=true` | no tracing, whatever else is set |
//! | `OTEL_SERVICE_NAME` (or `service.name` in `OTEL_RESOURCE_ATTRIBUTES`) | the resource's `service.name`; default `waybill-<service>` for a process serving one service, else `waybill` |
//! | `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG` | the sampler; unset: `parentbased_traceidratio` with the ratio in `OTEL_TRACES_SAMPLER_ARG` (default 1.0) |
//! | `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, `OTEL_BSP_EXPORT_TIMEOUT` | the batch span processor |
//! | `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_COMPRESSION` | the exporter (gzip and TLS are not built in) |
//!
//! Parent-based sampling keeps a trace whole: the service where a trace starts decides, and
//! every later hop (gRPC metadata, event headers) follows the sampled flag it receives.
//!
//! With no endpoint, no OpenTelemetry layer is installed and no propagator either: the spans
//! that mesh-layer, the database helpers and the event consumer create are DEBUG spans no
//! layer enables, so they cost a cached interest check, and no trace headers are read or
//! written. With an endpoint, spans are batched on the SDK's own thread and exported over
//! the process's tonic; [`Telemetry::shutdown`] flushes what is queued.
//!
//! What the OpenTelemetry layer records: spans and events at INFO and above from everything,
//! DEBUG from waybill's crates and mesh-layer (the layers' decisions — retrying, shed,
//! injected fault, replayed — are DEBUG events inside the call's span, so they become span
//! events). Spans of long-running background loops (target [`BACKGROUND`]) are left out:
//! they would be traces that never end; the work they do per event starts its own spans.

use opentelemetry::{KeyValue, trace::TracerProvider as _};
use opentelemetry_sdk::{
    Resource,
    propagation::{BaggagePropagator, TraceContextPropagator},
    trace::{Sampler, SdkTracerProvider},
};
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

use crate::config::{LogConfig, LogFormat};

/// The target of spans that wrap a background loop for its whole life (a relay, a
/// consumer): logs show them, traces do not.
pub const BACKGROUND: &str = "waybill::background";

/// What the OpenTelemetry layer sees (see the module docs). Its own crates are off so that
/// exporting never traces itself.
const TRACE_FILTER: &str =
    "info,waybill=debug,mesh_layer=debug,waybill::background=off,opentelemetry=off";

/// The tracing half of telemetry, to flush at exit.
#[must_use = "call shutdown() at exit, or queued spans are lost"]
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn is_exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still queued and stops the exporter (at most a few seconds). It
    /// blocks: call it outside the async runtime's worker threads (after `block_on`, or in
    /// `spawn_blocking`) while the runtime is still alive, since the export runs on it.
    pub fn shutdown(self) {
        crate::otlp_metrics::shutdown();
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "could not flush the last spans");
        }
    }
}

/// Installs the global subscriber: logs filtered by `RUST_LOG` (default `info`), and traces
/// when configured (see the module docs), named `service_name` unless `OTEL_SERVICE_NAME`
/// says otherwise. Exporting needs a tokio runtime: call it inside one (`Runtime::enter`).
/// Calling it twice is harmless: the second call keeps the first subscriber.
pub fn init(config: &LogConfig, service_name: &str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match config.log_format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs.json().boxed(),
    };
    let (provider, setup_error) = match tracer_provider(service_name) {
        Ok(provider) => (provider, None),
        Err(error) => (None, Some(error)),
    };
    let traces = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("waybill"))
            // Fewer attributes per span: no code location, thread or busy/idle times, which
            // cost on every span and say little that the span's name does not.
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_filter(EnvFilter::new(TRACE_FILTER))
    });
    let installed = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(traces)
        .try_init()
        .is_ok();
    if let Some(error) = setup_error {
        tracing::error!(%error, "traces are not exported");
    }
    if !installed {
        // Another subscriber was there first (tests); its owner decides about traces.
        if let Some(provider) = provider {
            let _ = provider.shutdown();
        }
        return Telemetry::default();
    }
    if provider.is_some() {
        // W3C trace context and baggage, in gRPC metadata and event headers.
        opentelemetry::global::set_text_map_propagator(
            opentelemetry::propagation::TextMapCompositePropagator::new(vec![
                Box::new(TraceContextPropagator::new()),
                Box::new(BaggagePropagator::new()),
            ]),
        );
        tracing::info!(service = service_name, "exporting traces over OTLP");
    }
    Telemetry { provider }
}

/// The tracer provider the environment asks for; `None` when traces are off.
fn tracer_provider(service_name: &str) -> Result<Option<SdkTracerProvider>, String> {
    let var = |name: &str| {
        std::env::var(name)
            .ok()
            .filter(|value| !value.trim().is_empty())
    };
    if var("OTEL_SDK_DISABLED").is_some_and(|value| value.trim().eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    if var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .is_none()
    {
        return Ok(None);
    }
    if let Some(protocol) = var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .filter(|protocol| protocol != "grpc")
    {
        return Err(format!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={protocol} is not supported: waybill exports over grpc"
        ));
    }
    // The exporter's channel spawns its connection task on the current runtime.
    if tokio::runtime::Handle::try_current().is_err() {
        return Err("no async runtime to export on (a bug: init telemetry inside it)".into());
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|error| error.to_string())?;
    // The environment's service name wins; the SDK's fallback (`unknown_service:…`) does not.
    let named = Resource::builder()
        .build()
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
    let mut resource = Resource::builder();
    if !named {
        resource = resource.with_service_name(service_name.to_owned());
    }
    let mut builder = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            resource
                .with_attribute(KeyValue::new("service.namespace", "waybill"))
                .build(),
        );
    // With OTEL_TRACES_SAMPLER set, the SDK reads it (and its argument) itself.
    if var("OTEL_TRACES_SAMPLER").is_none() {
        let ratio = match var("OTEL_TRACES_SAMPLER_ARG") {
            None => 1.0,
            Some(text) => text
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|ratio| (0.0..=1.0).contains(ratio))
                .ok_or_else(|| {
                    format!("OTEL_TRACES_SAMPLER_ARG={text:?} is not a ratio between 0 and 1")
                })?,
        };
        builder = builder.with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))));
    }
    Ok(Some(builder.build()))
}

/// The W3C `traceparent` of the current span, for work that outlives it and may be resumed
/// elsewhere (a saga): `None` when the span is not traced.
pub fn current_traceparent() -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    let span = tracing::Span::current();
    if span.is_disabled() {
        return None;
    }
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            span_context.trace_id(),
            span_context.span_id(),
            span_context.trace_flags().to_u8()
        )
    })
}

/// Links `span` to the span a stored `traceparent` names: work resumed long after (or far
/// from) the call that started it belongs to a trace of its own, which points back to the
/// original. Does nothing for an empty or malformed value, or when `span` is not traced.
pub fn link(span: &tracing::Span, traceparent: &str) {
    use opentelemetry::{propagation::TextMapPropagator, trace::TraceContextExt};
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    if span.is_disabled() || traceparent.is_empty() {
        return;
    }
    let carrier =
        std::collections::HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    let linked = context.span().span_context().clone();
    if linked.is_valid() {
        span.add_link(linked);
    }
}
