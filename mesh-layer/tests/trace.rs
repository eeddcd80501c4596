//! The trace layers with a real OpenTelemetry pipeline in the test: a client stack calling a
//! server stack in memory, W3C trace context and baggage crossing in the headers.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use http::Request;
use mesh_layer::trace::{ClientTraceLayer, ServerTraceLayer};
use opentelemetry::{
    Context, KeyValue,
    baggage::BaggageExt,
    trace::{SpanKind, Status, TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{
    error::OTelSdkResult,
    propagation::{BaggagePropagator, TraceContextPropagator},
    trace::{SdkTracerProvider, SpanData, SpanExporter},
};
use tonic::body::Body;
use tower::{Layer, ServiceExt};
use tracing_subscriber::layer::SubscriberExt;

/// Keeps every exported span.
#[derive(Clone, Debug, Default)]
struct Keep(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Keep {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().unwrap().extend(batch);
        Ok(())
    }
}

fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a opentelemetry::Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

/// One test at a time: `tracing` caches each callsite's interest process-wide, and a test that
/// runs with no subscriber on another thread can leave the trace layers' spans disabled for
/// the one that has a subscriber (seen once in a run of the workspace's tests).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn context_and_baggage_cross_from_client_span_to_server_span() {
    let _serial = SERIAL.lock().await;
    let kept = Keep::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(kept.clone())
        .build();
    opentelemetry::global::set_text_map_propagator(
        opentelemetry::propagation::TextMapCompositePropagator::new(vec![
            Box::new(TraceContextPropagator::new()),
            Box::new(BaggagePropagator::new()),
        ]),
    );
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _default = tracing::subscriber::set_default(subscriber);

    // The server answers NOT_FOUND (the caller's problem, not the server's), after noting
    // what it received.
    let seen = Arc::new(Mutex::new(None));
    let seen_by_handler = seen.clone();
    let server = ServerTraceLayer.layer(tower::service_fn(move |request: Request<Body>| {
        let seen = seen_by_handler.clone();
        async move {
            let context = Context::current();
            *seen.lock().unwrap() = Some((
                context.span().span_context().trace_id(),
                context
                    .baggage()
                    .get("tenant")
                    .map(|value| value.to_string()),
                request.headers().contains_key("traceparent"),
            ));
            tracing::info!("handled");
            Ok::<_, std::convert::Infallible>(
                tonic::Status::not_found("no such thing").into_http::<Body>(),
            )
        }
    }));
    let client = ClientTraceLayer::for_target("http://10.1.2.3:50051").layer(server);

    let _baggage = Context::current_with_baggage(vec![KeyValue::new("tenant", "acme")]).attach();
    let caller = tracing::info_span!("caller");
    let response = {
        use tracing::Instrument;
        client
            .oneshot(
                Request::post("/waybill.orders.v1.OrdersService/GetOrder")
                    .body(Body::empty())
                    .unwrap(),
            )
            .instrument(caller)
            .await
            .unwrap()
    };
    drop(response);
    let _ = provider.force_flush();

    let spans = kept.0.lock().unwrap().clone();
    let named = |kind: SpanKind| {
        spans
            .iter()
            .find(|span| {
                span.span_kind == kind && span.name == "waybill.orders.v1.OrdersService/GetOrder"
            })
            .unwrap_or_else(|| panic!("no {kind:?} span in {spans:#?}"))
    };
    let client_span = named(SpanKind::Client);
    let server_span = named(SpanKind::Server);
    assert_eq!(
        server_span.parent_span_id,
        client_span.span_context.span_id()
    );
    assert!(server_span.parent_span_is_remote);
    let (trace_id, baggage, had_header) = seen.lock().unwrap().clone().unwrap();
    assert_eq!(trace_id, client_span.span_context.trace_id());
    assert_eq!(baggage.as_deref(), Some("acme"), "baggage crossed");
    assert!(had_header);

    for span in [client_span, server_span] {
        assert_eq!(
            attribute(span, "rpc.system").map(|v| v.as_str().into_owned()),
            Some("grpc".to_owned())
        );
        assert_eq!(
            attribute(span, "rpc.method").map(|v| v.as_str().into_owned()),
            Some("GetOrder".to_owned())
        );
        assert_eq!(
            attribute(span, "rpc.grpc.status_code"),
            Some(&opentelemetry::Value::I64(5))
        );
    }
    assert_eq!(
        attribute(client_span, "server.address").map(|v| v.as_str().into_owned()),
        Some("10.1.2.3".to_owned())
    );
    // NOT_FOUND fails the client's call but is no failure of the server.
    assert!(matches!(client_span.status, Status::Error { .. }));
    assert!(!matches!(server_span.status, Status::Error { .. }));
    assert!(server_span.events.iter().any(|e| e.name == "handled"));
}

#[tokio::test]
async fn without_a_subscriber_no_header_is_written() {
    let _serial = SERIAL.lock().await;
    let server = tower::service_fn(|request: Request<Body>| async move {
        assert!(!request.headers().contains_key("traceparent"));
        Ok::<_, std::convert::Infallible>(http::Response::new(Body::empty()))
    });
    let client = ClientTraceLayer::new().layer(ServerTraceLayer.layer(server));
    client
        .oneshot(Request::post("/a.B/C").body(Body::empty()).unwrap())
        .await
        .unwrap();
}
