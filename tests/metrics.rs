//! The Prometheus endpoint end to end: real `waybill serve` processes, scraped over HTTP on
//! their admin port. What docs/metrics.md lists is what a scrape shows (both ways), the
//! counters and the duration histogram move under real calls, and `promtool check metrics`
//! (Debian package `prometheus`, `scripts/prereqs prometheus`) finds nothing to complain about.

// A failed unwrap is a failed test, which is what we want here.
#![allow(clippy::unwrap_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    path::PathBuf,
    process::{Command, Stdio},
};

use tonic::{Code, Request};
use waybill_api::{
    commands::v1::{self as commands_pb, command_service_client::CommandServiceClient},
    delivery::v1::{self as delivery, delivery_service_client::DeliveryServiceClient},
    echo::v1::{EchoRequest, echo_service_client::EchoServiceClient},
    inventory::v1::{self as inventory, inventory_service_client::InventoryServiceClient},
    orders::v1::{self as pb, orders_service_client::OrdersServiceClient},
};
use waybill_test_support::{ServeOptions, TestDb, Waybill, eventually};

const ORDERS: &str = "waybill.orders.v1.OrdersService";
const INVENTORY: &str = "waybill.inventory.v1.InventoryService";
const ECHO: &str = "waybill.echo.v1.EchoService";

/// Documented metrics this file's traffic does not provoke (each appears only on an event
/// that needs a fault, a failing peer or a poisoned event); the other tests cover them.
const NOT_PROVOKED: &[&str] = &[
    "mesh_client_retries_total",
    "mesh_client_retries_skipped_total",
    "mesh_client_deadline_exceeded_total",
    "mesh_server_deadline_exceeded_total",
    "mesh_breaker_transitions_total",
    "mesh_breaker_rejected_total",
    "mesh_fault_injected_total",
    "waybill_consumer_dead_letters_total",
    "waybill_command_purged_total",
];

// === a scrape, parsed ===

/// One scrape: the metric families (`# TYPE` lines) and every sample.
struct Scrape {
    text: String,
    families: BTreeMap<String, String>,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    fn parse(text: String) -> Self {
        let mut families = BTreeMap::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                families.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("value in {line:?}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
                None => (series, BTreeMap::new()),
            };
            samples.push((name.to_owned(), labels, value));
        }
        Self {
            text,
            families,
            samples,
        }
    }

    /// The sum of the samples of `name` whose labels include `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).is_some_and(|x| x == v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    /// Whether any sample of `name` has `labels`.
    fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.samples.iter().any(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).is_some_and(|x| x == v))
        })
    }
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(if escaped == 'n' { '\n' } else { escaped });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').to_owned(), value);
        rest = &after[end..];
    }
    labels
}

/// The metric names in docs/metrics.md's tables.
fn documented() -> BTreeSet<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md");
    let text = std::fs::read_to_string(path).unwrap();
    let names: BTreeSet<String> = text
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split_once('`'))
        .map(|(name, _)| name.to_owned())
        .collect();
    assert!(names.len() > 20, "docs/metrics.md lists {names:?}");
    names
}

// === promtool ===

fn promtool() -> PathBuf {
    if let Some(path) = std::env::var_os("WAYBILL_PROMTOOL") {
        return PathBuf::from(path);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("promtool"))
            .find(|path| path.is_file())
    });
    let path = on_path.unwrap_or_else(|| PathBuf::from("/usr/bin/promtool"));
    assert!(
        path.is_file(),
        "promtool is missing: install it with scripts/prereqs prometheus (Debian package prometheus)"
    );
    path
}

/// `promtool check metrics` on a scrape: no lint finding at all.
fn promtool_check(scrape: &Scrape) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}\n--- scrape ---\n{}",
        scrape.text
    );
}

async fn scrape(server: &Waybill) -> Scrape {
    Scrape::parse(server.scrape().await)
}

fn place_request(customer: &str, sku: &str) -> pb::PlaceOrderRequest {
    pb::PlaceOrderRequest {
        customer_id: customer.into(),
        items: vec![pb::LineItem {
            sku: sku.into(),
            quantity: 1,
        }],
        delivery_address: "1 Main St".into(),
        zone: "north".into(),
    }
}

// === tests ===

#[tokio::test]
async fn documented_metrics_are_exported_and_move_under_traffic() {
    let db = TestDb::new().await;
    let server = Waybill::start(
        &db,
        ServeOptions {
            args: &[
                "--admin-listen",
                "127.0.0.1:0",
                "--health-interval",
                "200ms",
            ],
            ..ServeOptions::default()
        },
    );
    let channel = server.channel().await;
    let mut orders = OrdersServiceClient::new(channel.clone());
    let mut stock = InventoryServiceClient::new(channel.clone());
    let mut couriers = DeliveryServiceClient::new(channel.clone());
    let mut commands = CommandServiceClient::new(channel);

    // Exposed from the start: the pools, the replica, the concurrency limit, the outboxes.
    let before = eventually("the first database samples", || {
        let server = &server;
        async move {
            let scrape = scrape(server).await;
            (scrape.value("waybill_db_up", &[("pool", "replica-0")]) == 1.0
                && scrape.has("waybill_outbox_backlog_events", &[("schema", "orders")]))
            .then_some(scrape)
        }
    })
    .await;
    promtool_check(&before);
    assert_eq!(
        before.value("waybill_db_pool_max_connections", &[("pool", "primary")]),
        16.0
    );
    assert!(before.has("waybill_db_pool_idle_connections", &[("pool", "replica-0")]));
    assert!(before.has("waybill_db_replica_lag_bytes", &[("pool", "replica-0")]));

    stock
        .put_item(inventory::PutItemRequest {
            sku: "SKU-1".into(),
            name: "item".into(),
            on_hand: 100,
        })
        .await
        .unwrap();
    couriers
        .put_courier(delivery::PutCourierRequest {
            courier_id: "bike-1".into(),
            name: "courier".into(),
            zone: "north".into(),
            capacity: 100,
        })
        .await
        .unwrap();
    let placed = |labels: &[(&str, &str)], scrape: &Scrape| {
        let mut all = vec![("service", ORDERS), ("method", "PlaceOrder")];
        all.extend_from_slice(labels);
        scrape.value("mesh_server_requests_total", &all)
    };
    let ok_before = placed(&[("code", "OK")], &before);
    let timed_before = before.value(
        "mesh_server_request_duration_seconds_count",
        &[("service", ORDERS), ("method", "PlaceOrder")],
    );

    // Three confirmed orders, one for an unknown item (cancelled), one placed twice with the
    // same key (executed, then replayed), one lookup of an order that does not exist.
    for n in 0..3 {
        orders
            .place_order(place_request(&format!("c-{n}"), "SKU-1"))
            .await
            .unwrap();
    }
    orders
        .place_order(place_request("c-9", "NO-SUCH-SKU"))
        .await
        .unwrap();
    for _ in 0..2 {
        let mut request = Request::new(place_request("c-k", "SKU-1"));
        request
            .metadata_mut()
            .insert("idempotency-key", "metrics-1".parse().unwrap());
        orders.place_order(request).await.unwrap();
    }
    let missing = orders
        .get_order(pb::GetOrderRequest {
            order_id: uuid::Uuid::now_v7().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    // A command, run by a worker.
    commands
        .submit_command(commands_pb::SubmitCommandRequest {
            user_id: "c-k".into(),
            payload: Some(commands_pb::CommandPayload {
                kind: Some(commands_pb::command_payload::Kind::SendNotification(
                    commands_pb::SendNotification {
                        customer_id: "c-k".into(),
                        message: "hello".into(),
                    },
                )),
            }),
            idempotency_key: "metrics".into(),
        })
        .await
        .unwrap();

    // Events go through the outbox, the relay, the bus and the notifications consumer.
    let after = eventually("the events to be relayed and consumed", || {
        let server = &server;
        async move {
            let scrape = scrape(server).await;
            (scrape.value("waybill_consumer_events_total", &[("outcome", "handled")]) >= 5.0
                && scrape.value("waybill_outbox_relayed_events_total", &[]) >= 5.0
                && scrape.value(
                    "waybill_command_attempts_total",
                    &[("kind", "SEND_NOTIFICATION"), ("outcome", "succeeded")],
                ) == 1.0)
                .then_some(scrape)
        }
    })
    .await;
    promtool_check(&after);

    // RED: requests by code, and the duration histogram, moved by the calls just made.
    assert_eq!(placed(&[("code", "OK")], &after) - ok_before, 6.0);
    let timed = after.value(
        "mesh_server_request_duration_seconds_count",
        &[("service", ORDERS), ("method", "PlaceOrder")],
    );
    assert_eq!(timed - timed_before, 6.0);
    assert_eq!(
        after.value(
            "mesh_server_request_duration_seconds_bucket",
            &[
                ("service", ORDERS),
                ("method", "PlaceOrder"),
                ("le", "+Inf")
            ],
        ),
        timed
    );
    assert!(
        after.value(
            "mesh_server_request_duration_seconds_sum",
            &[("service", ORDERS), ("method", "PlaceOrder")],
        ) > 0.0
    );
    assert_eq!(
        after.families["mesh_server_request_duration_seconds"],
        "histogram"
    );
    assert_eq!(
        after.value(
            "mesh_server_requests_total",
            &[
                ("service", ORDERS),
                ("method", "GetOrder"),
                ("code", "NOT_FOUND")
            ],
        ),
        1.0
    );
    // The saga's calls to inventory went through a mesh client, and were served.
    assert!(
        after.value(
            "mesh_client_requests_total",
            &[("service", INVENTORY), ("method", "Reserve")],
        ) >= 5.0
    );
    assert!(
        after.value(
            "mesh_server_requests_total",
            &[
                ("service", INVENTORY),
                ("method", "Reserve"),
                ("code", "OK")
            ],
        ) >= 4.0
    );
    assert_eq!(
        after.value(
            "mesh_idempotency_total",
            &[("method", "PlaceOrder"), ("outcome", "replayed")],
        ),
        1.0
    );
    assert_eq!(
        after.value("waybill_saga_outcomes_total", &[("outcome", "confirmed")]),
        4.0
    );
    assert_eq!(
        after.value("waybill_saga_outcomes_total", &[("outcome", "cancelled")]),
        1.0
    );
    // Each service's concurrency limit, from its first call on.
    assert_eq!(
        after.value("mesh_server_concurrency_limit", &[("service", ORDERS)]),
        64.0
    );
    assert_eq!(after.families["mesh_server_concurrency_limit"], "gauge");
    assert!(after.has("mesh_breaker_open", &[]));
    assert_eq!(after.value("mesh_breaker_open", &[]), 0.0);

    // docs/metrics.md and the scrape agree, both ways.
    let exported: BTreeSet<&str> = after
        .families
        .keys()
        .map(String::as_str)
        .filter(|name| name.starts_with("mesh_") || name.starts_with("waybill_"))
        .collect();
    let documented = documented();
    let undocumented: Vec<_> = exported
        .iter()
        .filter(|name| !documented.contains(**name))
        .collect();
    assert!(
        undocumented.is_empty(),
        "exported but not in docs/metrics.md: {undocumented:?}"
    );
    let missing: Vec<_> = documented
        .iter()
        .filter(|name| !exported.contains(name.as_str()))
        .filter(|name| !NOT_PROVOKED.contains(&name.as_str()))
        .filter(|name| name.as_str() != "mesh_server_shed_total") // the next test
        .collect();
    assert!(
        missing.is_empty(),
        "in docs/metrics.md but not exported: {missing:?}"
    );
}

#[tokio::test]
async fn shed_calls_are_counted_with_their_code() {
    let db = TestDb::new().await;
    let server = Waybill::start(
        &db,
        ServeOptions {
            services: Some("echo"),
            policy: Some(r#"{"loadShedding": {"initialLimit": 4, "minLimit": 4, "maxLimit": 4}}"#),
            args: &["--admin-listen", "127.0.0.1:0"],
            ..ServeOptions::default()
        },
    );
    let client = EchoServiceClient::new(server.channel().await);
    let calls: Vec<_> = (0..32)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move {
                client
                    .echo(EchoRequest {
                        message: i.to_string(),
                        relay: vec![],
                        delay_ms: 300,
                    })
                    .await
            })
        })
        .collect();
    let mut shed = 0.0;
    for call in calls {
        if let Err(status) = call.await.unwrap() {
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            shed += 1.0;
        }
    }
    assert!(shed >= 8.0, "{shed} shed");

    let scrape = scrape(&server).await;
    promtool_check(&scrape);
    let echo = [("service", ECHO), ("method", "Echo")];
    assert_eq!(scrape.value("mesh_server_shed_total", &echo), shed);
    assert_eq!(
        scrape.value(
            "mesh_server_requests_total",
            &[echo[0], echo[1], ("code", "RESOURCE_EXHAUSTED")],
        ),
        shed
    );
    assert_eq!(
        scrape.value(
            "mesh_server_requests_total",
            &[echo[0], echo[1], ("code", "OK")]
        ),
        32.0 - shed
    );
    assert_eq!(
        scrape.value("mesh_server_concurrency_limit", &[("service", ECHO)]),
        4.0
    );
}

#[tokio::test]
async fn the_admin_endpoint_serves_only_metrics() {
    let db = TestDb::new().await;
    let server = Waybill::start(
        &db,
        ServeOptions {
            services: Some("echo"),
            ..ServeOptions::default()
        },
    );
    let admin = server.admin_addr().await;
    assert_ne!(admin.port(), 0);
    assert_ne!(admin, server.addr);
    let (status, _) = waybill_test_support::http_get(admin, "/").await;
    assert_eq!(status, 404);
    eventually("the pool size in a scrape", || async move {
        let (status, body) = waybill_test_support::http_get(admin, "/metrics").await;
        assert_eq!(status, 200);
        body.contains("waybill_db_pool_max_connections{pool=\"primary\"} 16")
            .then_some(())
    })
    .await;
}

/// The same metrics over OTLP: a process with an OTLP endpoint configured sends them to a real
/// receiver (at the latest when it stops), under the Prometheus names, labels as attributes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_also_exported_over_otlp() {
    use waybill_test_support::otlp::{Collector, MetricData, NumberValue, Value};

    let collector = Collector::start().await;
    let endpoint = collector.endpoint();
    let db = TestDb::new().await;
    let mut server = Waybill::start(
        &db,
        ServeOptions {
            services: Some("inventory"),
            env: &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
                // Only the flush at shutdown exports: the test sees the final totals.
                ("OTEL_METRIC_EXPORT_INTERVAL", "600000"),
                ("OTEL_TRACES_SAMPLER", "always_off"),
            ],
            ..ServeOptions::default()
        },
    );
    let mut stock = InventoryServiceClient::new(server.channel().await);
    for sku in ["A", "B", "C"] {
        stock
            .put_item(inventory::PutItemRequest {
                sku: sku.into(),
                name: "item".into(),
                on_hand: 1,
            })
            .await
            .unwrap();
    }
    server.terminate();
    let status = server
        .wait_for_exit(std::time::Duration::from_secs(30))
        .await;
    assert!(status.is_some_and(|s| s.success()), "exit: {status:?}");

    let metrics = collector.metrics();
    let named = |name: &str| {
        metrics
            .iter()
            .filter(|m| m.metric.name == name)
            .collect::<Vec<_>>()
    };
    let attribute = |attributes: &[waybill_test_support::otlp::KeyValue], key: &str| {
        attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
            match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(text)) => Some(text.clone()),
                _ => None,
            }
        })
    };
    let requests = named("mesh_server_requests_total");
    assert!(
        !requests.is_empty(),
        "no mesh_server_requests_total among {} metrics",
        metrics.len()
    );
    assert_eq!(requests[0].service, "waybill-inventory");
    let put_items: f64 = requests
        .iter()
        .filter_map(|m| match &m.metric.data {
            Some(MetricData::Sum(sum)) => Some(sum),
            _ => None,
        })
        .flat_map(|sum| &sum.data_points)
        .filter(|point| {
            attribute(&point.attributes, "method").as_deref() == Some("PutItem")
                && attribute(&point.attributes, "code").as_deref() == Some("OK")
        })
        .map(|point| match point.value {
            Some(NumberValue::AsInt(v)) => v as f64,
            Some(NumberValue::AsDouble(v)) => v,
            None => 0.0,
        })
        .fold(0.0, f64::max);
    assert_eq!(put_items, 3.0, "{requests:#?}");
    let durations = named("mesh_server_request_duration_seconds");
    let histogram = durations
        .iter()
        .find_map(|m| match &m.metric.data {
            Some(MetricData::Histogram(h)) => h.data_points.first(),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no duration histogram: {durations:#?}"));
    assert_eq!(
        histogram.explicit_bounds,
        mesh_layer::metrics::DURATION_BUCKETS
    );
    assert!(histogram.count >= 3);
    // Gauges too: the pools, sampled from the start.
    assert!(!named("waybill_db_pool_max_connections").is_empty());
}
