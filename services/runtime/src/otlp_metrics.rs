//! The same metrics over OTLP: a `metrics` recorder that writes into an OpenTelemetry meter,
//! installed beside the Prometheus recorder (a fanout), so every `counter!`/`gauge!`/
//! `histogram!` in waybill reaches both the `/metrics` endpoint and an OTLP collector under
//! the same names and labels (labels become attributes).
//!
//! On when an OTLP endpoint is configured (`OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_ENDPOINT`), unless `OTEL_METRICS_EXPORTER=none` or
//! `OTEL_SDK_DISABLED=true`; exported every `OTEL_METRIC_EXPORT_INTERVAL` ms (the SDK's default,
//! 60 s) and at shutdown.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use opentelemetry::{
    KeyValue,
    metrics::{Meter, MeterProvider as _},
};
use opentelemetry_sdk::{Resource, metrics::SdkMeterProvider};

/// The provider of this process, kept to flush it at shutdown.
static PROVIDER: OnceLock<SdkMeterProvider> = OnceLock::new();

/// Whether the environment asks for OTLP metrics.
pub fn wanted() -> bool {
    let var = |name: &str| {
        std::env::var(name)
            .ok()
            .filter(|value| !value.trim().is_empty())
    };
    let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        || var("OTEL_METRICS_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none"));
    !disabled
        && var("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
            .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .is_some()
}

/// The recorder for `service_name`, exporting over OTLP/gRPC as the environment says.
pub fn recorder(
    service_name: &str,
    bucket_bounds: fn(&str) -> Option<&'static [f64]>,
) -> Result<OtlpRecorder, String> {
    let exporter = opentelemetry_otlp::MetricExporter::builder()
        .with_tonic()
        .build()
        .map_err(|error| format!("OTLP metric exporter: {error}"))?;
    let provider = SdkMeterProvider::builder()
        .with_periodic_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(service_name.to_owned())
                .build(),
        )
        .build();
    let meter = provider.meter("waybill");
    let _ = PROVIDER.set(provider);
    Ok(OtlpRecorder {
        meter,
        bucket_bounds,
        descriptions: Mutex::default(),
        instruments: Mutex::default(),
    })
}

/// Exports what is pending and stops the exporter (at process exit).
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get()
        && let Err(error) = provider.shutdown()
    {
        eprintln!("OTLP metrics: {error}");
    }
}

/// A `metrics` recorder over an OpenTelemetry meter.
pub struct OtlpRecorder {
    meter: Meter,
    bucket_bounds: fn(&str) -> Option<&'static [f64]>,
    descriptions: Mutex<HashMap<String, (SharedString, Option<Unit>)>>,
    /// One instrument per metric name, shared by its label sets.
    instruments: Mutex<HashMap<String, Instrument>>,
}

#[derive(Clone)]
enum Instrument {
    Counter(opentelemetry::metrics::Counter<u64>),
    Gauge(opentelemetry::metrics::Gauge<f64>),
    Histogram(opentelemetry::metrics::Histogram<f64>),
}

impl OtlpRecorder {
    fn describe(&self, name: KeyName, unit: Option<Unit>, description: SharedString) {
        lock(&self.descriptions).insert(name.as_str().to_owned(), (description, unit));
    }

    fn instrument(
        &self,
        name: &str,
        make: impl FnOnce(String, Option<String>) -> Instrument,
    ) -> Instrument {
        let mut instruments = lock(&self.instruments);
        if let Some(instrument) = instruments.get(name) {
            return instrument.clone();
        }
        let description = lock(&self.descriptions).get(name).map(|(text, unit)| {
            (
                text.to_string(),
                unit.map(|u| u.as_canonical_label().to_owned()),
            )
        });
        let (description, unit) = description.unwrap_or_default();
        let instrument = make(description, unit);
        instruments.insert(name.to_owned(), instrument.clone());
        instrument
    }
}

fn attributes(key: &Key) -> Vec<KeyValue> {
    key.labels()
        .map(|label| KeyValue::new(label.key().to_owned(), label.value().to_owned()))
        .collect()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Recorder for OtlpRecorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.describe(key, unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.describe(key, unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.describe(key, unit, description);
    }

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let meter = &self.meter;
        let Instrument::Counter(counter) = self.instrument(key.name(), |description, unit| {
            let mut builder = meter
                .u64_counter(key.name().to_owned())
                .with_description(description);
            if let Some(unit) = unit {
                builder = builder.with_unit(unit);
            }
            Instrument::Counter(builder.build())
        }) else {
            return Counter::noop();
        };
        Counter::from_arc(Arc::new(OtlpCounter {
            counter,
            attributes: attributes(key),
            total: AtomicU64::new(0),
        }))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let meter = &self.meter;
        let Instrument::Gauge(gauge) = self.instrument(key.name(), |description, unit| {
            let mut builder = meter
                .f64_gauge(key.name().to_owned())
                .with_description(description);
            if let Some(unit) = unit {
                builder = builder.with_unit(unit);
            }
            Instrument::Gauge(builder.build())
        }) else {
            return Gauge::noop();
        };
        Gauge::from_arc(Arc::new(OtlpGauge {
            gauge,
            attributes: attributes(key),
            value: AtomicU64::new(0.0_f64.to_bits()),
        }))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let meter = &self.meter;
        let bounds = (self.bucket_bounds)(key.name());
        let Instrument::Histogram(histogram) = self.instrument(key.name(), |description, unit| {
            let mut builder = meter
                .f64_histogram(key.name().to_owned())
                .with_description(description);
            if let Some(unit) = unit {
                builder = builder.with_unit(unit);
            }
            if let Some(bounds) = bounds {
                builder = builder.with_boundaries(bounds.to_vec());
            }
            Instrument::Histogram(builder.build())
        }) else {
            return Histogram::noop();
        };
        Histogram::from_arc(Arc::new(OtlpHistogram {
            histogram,
            attributes: attributes(key),
        }))
    }
}

struct OtlpCounter {
    counter: opentelemetry::metrics::Counter<u64>,
    attributes: Vec<KeyValue>,
    /// For `absolute`: OpenTelemetry counters only add.
    total: AtomicU64,
}

impl CounterFn for OtlpCounter {
    fn increment(&self, value: u64) {
        self.total.fetch_add(value, Ordering::Relaxed);
        self.counter.add(value, &self.attributes);
    }

    fn absolute(&self, value: u64) {
        let before = self.total.fetch_max(value, Ordering::Relaxed);
        if value > before {
            self.counter.add(value - before, &self.attributes);
        }
    }
}

struct OtlpGauge {
    gauge: opentelemetry::metrics::Gauge<f64>,
    attributes: Vec<KeyValue>,
    /// The value, for increments (an OpenTelemetry gauge only records values).
    value: AtomicU64,
}

impl OtlpGauge {
    fn update(&self, change: impl Fn(f64) -> f64) {
        let mut now = 0.0;
        let _ = self
            .value
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                now = change(f64::from_bits(bits));
                Some(now.to_bits())
            });
        self.gauge.record(now, &self.attributes);
    }
}

impl GaugeFn for OtlpGauge {
    fn increment(&self, value: f64) {
        self.update(|now| now + value);
    }

    fn decrement(&self, value: f64) {
        self.update(|now| now - value);
    }

    fn set(&self, value: f64) {
        self.update(|_| value);
    }
}

struct OtlpHistogram {
    histogram: opentelemetry::metrics::Histogram<f64>,
    attributes: Vec<KeyValue>,
}

impl HistogramFn for OtlpHistogram {
    fn record(&self, value: f64) {
        self.histogram.record(value, &self.attributes);
    }
}
