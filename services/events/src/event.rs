//! The event envelope: what travels on either bus around an opaque payload.

use std::collections::BTreeMap;

use chrono::{DateTime, SubsecRound, Utc};
use uuid::Uuid;

/// One event: an envelope around a protobuf payload the bus never looks into.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Unique and time-ordered (UUIDv7); consumers deduplicate on it (the inbox), and NATS on
    /// it as `Nats-Msg-Id`.
    pub id: Uuid,
    /// What happened, `<service>.<event>` in snake case, like `orders.order_confirmed`.
    pub topic: String,
    /// The ordering key: the order id for order events.
    pub key: String,
    /// The encoded protobuf message (`waybill_api::events::v1`).
    pub payload: Vec<u8>,
    /// Metadata beside the payload (W3C `traceparent` and the like).
    pub headers: BTreeMap<String, String>,
    /// When the event was created (in the emitting transaction), to the microsecond.
    pub created_at: DateTime<Utc>,
}

impl Event {
    /// A new event carrying `message`, encoded.
    pub fn new(
        topic: impl Into<String>,
        key: impl Into<String>,
        message: &impl prost::Message,
    ) -> Self {
        Self::from_payload(topic, key, message.encode_to_vec())
    }

    /// A new event carrying an already encoded payload.
    pub fn from_payload(
        topic: impl Into<String>,
        key: impl Into<String>,
        payload: Vec<u8>,
    ) -> Self {
        Self {
            id: Uuid::now_v7(),
            topic: topic.into(),
            key: key.into(),
            payload,
            headers: BTreeMap::new(),
            // Microseconds, as Postgres keeps it, so an event reads back equal to itself.
            created_at: Utc::now().trunc_subsecs(6),
        }
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Decodes the payload as `M`.
    pub fn decode<M: prost::Message + Default>(&self) -> Result<M, prost::DecodeError> {
        M::decode(self.payload.as_slice())
    }
}

/// `headers` with the current span's trace context added (W3C `traceparent`, `tracestate`,
/// `baggage`), unless they carry one already. Without tracing (no propagator installed, or a
/// disabled span) they come back as they are, borrowed.
pub(crate) fn with_trace_context(
    headers: &BTreeMap<String, String>,
) -> std::borrow::Cow<'_, BTreeMap<String, String>> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    let span = tracing::Span::current();
    if span.is_disabled() || headers.contains_key(TRACEPARENT) {
        return std::borrow::Cow::Borrowed(headers);
    }
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return std::borrow::Cow::Borrowed(headers);
    }
    let mut headers = headers.clone();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut MapInjector(&mut headers));
    });
    std::borrow::Cow::Owned(headers)
}

/// The trace context `headers` carry (empty when none, or when this process does not trace).
pub(crate) fn trace_context(headers: &BTreeMap<String, String>) -> opentelemetry::Context {
    if !headers.contains_key(TRACEPARENT) {
        return opentelemetry::Context::new();
    }
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&MapExtractor(headers))
    })
}

/// The W3C header that carries the emitting span.
const TRACEPARENT: &str = "traceparent";

/// Event headers being written by a propagator.
struct MapInjector<'a>(&'a mut BTreeMap<String, String>);

impl opentelemetry::propagation::Injector for MapInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

/// Event headers being read by a propagator.
struct MapExtractor<'a>(&'a BTreeMap<String, String>);

impl opentelemetry::propagation::Extractor for MapExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Headers as stored in `jsonb` columns (passed as text, so tokio-postgres needs no JSON
/// feature).
pub(crate) fn headers_to_json(headers: &BTreeMap<String, String>) -> String {
    // A map of strings always serializes.
    serde_json::to_string(headers).unwrap_or_else(|_| "{}".to_owned())
}

/// The inverse of [`headers_to_json`]; a malformed value (a manual edit) becomes no headers.
pub(crate) fn headers_from_json(text: &str) -> BTreeMap<String, String> {
    serde_json::from_str(text).unwrap_or_else(|error| {
        tracing::warn!(%error, "event headers are not a JSON object of strings; dropping them");
        BTreeMap::new()
    })
}

/// Whether `name` is a plain SQL identifier (lowercase letters, digits, `_`), so it can be
/// spliced into a statement as a schema name.
pub(crate) fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn headers_round_trip_through_json() {
        let event = Event::from_payload("t.x", "k", vec![1, 2]).with_header("traceparent", "00-1");
        let back = headers_from_json(&headers_to_json(&event.headers));
        assert_eq!(back, event.headers);
        assert!(headers_from_json("[1]").is_empty());
    }

    #[test]
    fn ids_are_time_ordered() {
        let a = Event::from_payload("t.x", "k", vec![]);
        let b = Event::from_payload("t.x", "k", vec![]);
        assert!(a.id < b.id);
    }

    #[test]
    fn identifiers_are_checked() {
        assert!(is_identifier("orders"));
        assert!(is_identifier("test_1"));
        assert!(!is_identifier("1x"));
        assert!(!is_identifier("Orders"));
        assert!(!is_identifier("a; DROP TABLE x"));
        assert!(!is_identifier(""));
    }
}
