//! Distributed tracing end to end: one `waybill serve` process per service, each exporting
//! over OTLP/gRPC to a receiver inside this test, and one PlaceOrder whose trace must cross
//! orders, inventory, delivery and, through the outboxes and the bus, notifications.
//!
//! The exporters batch with a one-minute delay, so the spans arrive only through the flush at
//! graceful shutdown (SIGTERM): that is tested too.

// A failed unwrap is a failed test, which is what we want here.
#![allow(clippy::unwrap_used)]

use std::{collections::HashMap, time::Duration};

use tonic::Request;
use waybill_api::{
    notifications::v1::{
        self as notifications, notifications_service_client::NotificationsServiceClient,
    },
    orders::v1::{self as pb, orders_service_client::OrdersServiceClient},
};
use waybill_test_support::{
    ServeOptions, TestDb, Waybill, eventually,
    otlp::{Collector, ReceivedSpan, SpanKind},
};

/// The spans of one trace, by span id.
struct Trace {
    spans: HashMap<String, ReceivedSpan>,
}

impl Trace {
    fn new(spans: Vec<ReceivedSpan>, trace_id: &str) -> Self {
        Self {
            spans: spans
                .into_iter()
                .filter(|span| span.trace_id() == trace_id)
                .map(|span| (span.span_id(), span))
                .collect(),
        }
    }

    /// The one span `matches` picks, failing the test with the trace's outline otherwise.
    #[track_caller]
    fn one(&self, what: &str, matches: impl Fn(&ReceivedSpan) -> bool) -> &ReceivedSpan {
        let found: Vec<_> = self.spans.values().filter(|span| matches(span)).collect();
        assert_eq!(
            found.len(),
            1,
            "expected one {what}, found {}; the trace:\n{}",
            found.len(),
            self.outline()
        );
        found[0]
    }

    /// The span `name` of `service`.
    #[track_caller]
    fn named(&self, service: &str, name: &str) -> &ReceivedSpan {
        self.one(&format!("{name} in {service}"), |span| {
            span.service == service && span.span.name == name
        })
    }

    fn parent(&self, span: &ReceivedSpan) -> Option<&ReceivedSpan> {
        self.spans.get(&span.parent_id())
    }

    /// Whether `ancestor` is `span`'s parent, grandparent, …
    fn descends(&self, span: &ReceivedSpan, ancestor: &ReceivedSpan) -> bool {
        let mut current = self.parent(span);
        while let Some(parent) = current {
            if parent.span_id() == ancestor.span_id() {
                return true;
            }
            current = self.parent(parent);
        }
        false
    }

    fn outline(&self) -> String {
        let mut lines: Vec<String> = self
            .spans
            .values()
            .map(|span| {
                format!(
                    "  {} {:?} {} (span {}, parent {})",
                    span.service,
                    span.kind(),
                    span.span.name,
                    span.span_id(),
                    span.parent_id()
                )
            })
            .collect();
        lines.sort();
        lines.join("\n")
    }
}

/// The names of a span's events (the messages of the log lines inside it).
fn events(span: &ReceivedSpan) -> Vec<&str> {
    span.span.events.iter().map(|e| e.name.as_str()).collect()
}

/// OTLP's status code for an error.
const STATUS_ERROR: i32 = 2;

fn status(span: &ReceivedSpan) -> i32 {
    span.span.status.as_ref().map_or(0, |status| status.code)
}

/// A W3C traceparent for the test's own (imaginary) client span.
fn traceparent(trace_id: &str, span_id: &str) -> String {
    format!("00-{trace_id}-{span_id}-01")
}

fn traced<T>(message: T, traceparent: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    request.set_timeout(Duration::from_secs(20));
    request
}

/// The tracing environment of every process: export to `endpoint`, and only at shutdown
/// (the batch delay is a minute; a full batch would export sooner, but these runs are small).
fn otel_env(endpoint: &str) -> [(&'static str, &str); 3] {
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "60000"),
        ("OTEL_TRACES_SAMPLER", "parentbased_always_on"),
    ]
}

/// Stops `processes` with SIGTERM and waits for each to exit cleanly (flushing its spans).
async fn stop(processes: &mut [&mut Waybill]) {
    for process in processes.iter() {
        process.terminate();
    }
    for process in processes.iter_mut() {
        let status = process.wait_for_exit(Duration::from_secs(30)).await;
        assert!(status.is_some_and(|s| s.success()), "exit: {status:?}");
    }
}

fn new_trace() -> (String, String) {
    let trace_id = uuid::Uuid::now_v7().simple().to_string();
    let caller_span = uuid::Uuid::now_v7().simple().to_string()[16..].to_owned();
    (trace_id, caller_span)
}

fn place_request() -> pb::PlaceOrderRequest {
    pb::PlaceOrderRequest {
        customer_id: "c-1".into(),
        items: vec![pb::LineItem {
            sku: "SKU-1".into(),
            quantity: 2,
        }],
        delivery_address: "1 Main St".into(),
        zone: "north".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placed_order_is_one_trace_across_services_and_the_bus() {
    let collector = Collector::start().await;
    let endpoint = collector.endpoint();
    let env = otel_env(&endpoint);
    let db = TestDb::new().await;
    let start = |services: &'static str, args: &[&str]| {
        Waybill::start(
            &db,
            ServeOptions {
                services: Some(services),
                args,
                env: &env,
                ..ServeOptions::default()
            },
        )
    };
    let mut inventory = start("inventory", &[]);
    let mut delivery = start("delivery", &[]);
    let mut notifications = start("notifications", &[]);
    let (inventory_target, delivery_target) = (inventory.endpoint(), delivery.endpoint());
    let mut orders = start(
        "orders",
        &[
            "--inventory-target",
            &inventory_target,
            "--delivery-target",
            &delivery_target,
        ],
    );
    waybill_test_support::stock(&inventory.channel().await, "SKU-1", 5).await;
    waybill_test_support::courier(&delivery.channel().await, "bike-1", "north", 2).await;

    let (trace_id, caller_span) = new_trace();
    let parent = traceparent(&trace_id, &caller_span);
    let mut orders_client = OrdersServiceClient::new(orders.channel().await);
    let order = orders_client
        .place_order(traced(place_request(), &parent))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(order.status, pb::OrderStatus::Confirmed as i32, "{order:?}");
    // A replica read in the same trace.
    orders_client
        .list_orders(traced(
            pb::ListOrdersRequest {
                customer_id: "c-1".into(),
                page_size: 10,
                page_token: String::new(),
                consistency_token: String::new(),
            },
            &parent,
        ))
        .await
        .unwrap();

    // Both events went through the outboxes, the bus and the consumer.
    let notified = NotificationsServiceClient::new(notifications.channel().await);
    eventually(
        "the customer is notified of the courier and the confirmation",
        || {
            let mut client = notified.clone();
            async move {
                let mut kinds: Vec<i32> = client
                    .list_notifications(notifications::ListNotificationsRequest {
                        customer_id: "c-1".into(),
                        page_size: 0,
                        page_token: String::new(),
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .notifications
                    .iter()
                    .map(|n| n.kind)
                    .collect();
                kinds.sort_unstable();
                let mut want = vec![
                    notifications::NotificationKind::OrderConfirmed as i32,
                    notifications::NotificationKind::CourierAssigned as i32,
                ];
                want.sort_unstable();
                (kinds == want).then_some(())
            }
        },
    )
    .await;

    // Graceful shutdown flushes each process's queued spans.
    for process in [&orders, &inventory, &delivery, &notifications] {
        process.terminate();
    }
    for process in [
        &mut orders,
        &mut inventory,
        &mut delivery,
        &mut notifications,
    ] {
        let status = process.wait_for_exit(Duration::from_secs(30)).await;
        assert!(status.is_some_and(|s| s.success()), "exit: {status:?}");
    }
    let trace = eventually("the spans of every service arrive", || {
        let trace = Trace::new(collector.spans(), &trace_id);
        async move {
            let services: std::collections::BTreeSet<_> =
                trace.spans.values().map(|s| s.service.as_str()).collect();
            let all = [
                "waybill-delivery",
                "waybill-inventory",
                "waybill-notifications",
                "waybill-orders",
            ];
            all.iter().all(|s| services.contains(s)).then_some(trace)
        }
    })
    .await;

    // The call from the test: a server span, child of the caller's span, with the RPC
    // conventions' attributes.
    let place = trace.named(
        "waybill-orders",
        "waybill.orders.v1.OrdersService/PlaceOrder",
    );
    assert_eq!(place.kind(), SpanKind::Server);
    assert_eq!(place.parent_id(), caller_span);
    assert_eq!(place.str("rpc.system"), Some("grpc"));
    assert_eq!(
        place.str("rpc.service"),
        Some("waybill.orders.v1.OrdersService")
    );
    assert_eq!(place.str("rpc.method"), Some("PlaceOrder"));
    assert_eq!(place.int("rpc.grpc.status_code"), Some(0));
    assert_eq!(place.str("server.address"), Some("127.0.0.1"));
    assert_eq!(
        place.int("server.port"),
        Some(i64::from(orders.addr.port()))
    );
    let insert = trace.named("waybill-orders", "orders.insert");
    assert_eq!(insert.kind(), SpanKind::Client);
    assert_eq!(insert.parent_id(), place.span_id());
    assert_eq!(insert.str("db.system"), Some("postgresql"));
    assert_eq!(insert.str("waybill.db.role"), Some("primary"));
    assert_eq!(insert.str("db.namespace"), Some(db.name.as_str()));
    // Time queued for a group-commit writer is told apart from the statement's.
    assert!(
        insert.int("waybill.group_commit.batch_size") >= Some(1),
        "{insert:?}"
    );
    // The queueing is part of the span, never more than all of it.
    let span_ms = insert
        .span
        .end_time_unix_nano
        .saturating_sub(insert.span.start_time_unix_nano) as f64
        / 1e6;
    assert!(
        insert
            .double("waybill.group_commit.queued_ms")
            .is_some_and(|ms| (0.0..=span_ms).contains(&ms)),
        "{insert:?}"
    );
    let listing = trace.named("waybill-orders", "orders.list_by_customer");
    assert_eq!(listing.str("waybill.db.role"), Some("replica"));

    // The saga runs under the call, and each step is a client span in orders whose server
    // span, in the participant's process, is its child.
    let saga = trace.named("waybill-orders", "saga");
    assert_eq!(saga.parent_id(), place.span_id());
    for (service, method, server) in [
        (
            "waybill.inventory.v1.InventoryService",
            "Reserve",
            ("waybill-inventory", &inventory),
        ),
        (
            "waybill.delivery.v1.DeliveryService",
            "AssignCourier",
            ("waybill-delivery", &delivery),
        ),
        (
            "waybill.inventory.v1.InventoryService",
            "Commit",
            ("waybill-inventory", &inventory),
        ),
    ] {
        let name = format!("{service}/{method}");
        let client = trace.one(&format!("{name} client span"), |span| {
            span.service == "waybill-orders" && span.span.name == name
        });
        assert_eq!(client.kind(), SpanKind::Client, "{name}");
        assert!(trace.descends(client, saga), "{name} under the saga");
        assert_eq!(client.str("rpc.method"), Some(method));
        assert_eq!(client.int("rpc.grpc.status_code"), Some(0), "{name}");
        assert_eq!(client.str("server.address"), Some("127.0.0.1"));
        assert_eq!(
            client.int("server.port"),
            Some(i64::from(server.1.addr.port()))
        );
        let handled = trace.named(server.0, &name);
        assert_eq!(handled.kind(), SpanKind::Server, "{name}");
        assert_eq!(
            handled.parent_id(),
            client.span_id(),
            "{name}: parent is the client span"
        );
        assert_eq!(handled.int("rpc.grpc.status_code"), Some(0), "{name}");
    }
    let reserve = trace.named(
        "waybill-inventory",
        "waybill.inventory.v1.InventoryService/Reserve",
    );
    let reserved = trace.named("waybill-inventory", "inventory.reserve");
    assert_eq!(reserved.parent_id(), reserve.span_id());
    assert_eq!(reserved.str("waybill.db.role"), Some("primary"));

    // The asynchronous hops: each event's consumer span in notifications is a child of the
    // span that wrote the event to its service's outbox.
    for (topic, emitter, writer) in [
        ("orders.order_confirmed", "waybill-orders", "orders.confirm"),
        (
            "delivery.courier_assigned",
            "waybill-delivery",
            "delivery.assign",
        ),
    ] {
        let processed = trace.one(&format!("{topic} consumer span"), |span| {
            span.service == "waybill-notifications"
                && span.str("messaging.destination.name") == Some(topic)
        });
        assert_eq!(processed.kind(), SpanKind::Consumer, "{topic}");
        assert_eq!(processed.span.name, format!("process {topic}"));
        assert_eq!(processed.str("messaging.system"), Some("postgresql"));
        assert_eq!(processed.str("waybill.event.outcome"), Some("handled"));
        let written = trace.named(emitter, writer);
        assert_eq!(
            processed.parent_id(),
            written.span_id(),
            "{topic}: parent is {writer}"
        );
        assert!(trace.descends(written, place), "{writer} under PlaceOrder");
        let handled = trace.one(&format!("{topic} handler transaction"), |span| {
            span.span.name == "events.handle" && span.parent_id() == processed.span_id()
        });
        assert_eq!(handled.str("db.system"), Some("postgresql"));
    }
}

/// The mesh layers' decisions on a call are on its spans: a participant failing every call
/// (an injected UNAVAILABLE) shows as server spans marked `fault` with the fault's event, and
/// as an orders client span whose retries are events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_injected_faults_are_on_the_call_spans() {
    let collector = Collector::start().await;
    let endpoint = collector.endpoint();
    let env = otel_env(&endpoint);
    let db = TestDb::new().await;
    let mut inventory = Waybill::start(
        &db,
        ServeOptions {
            services: Some("inventory"),
            policy: Some(
                r#"{"methodConfig": [{"name": [{"service": "waybill.inventory.v1.InventoryService", "method": "Reserve"}],
                    "faults": {"abort": {"code": "UNAVAILABLE", "percent": 100}}}]}"#,
            ),
            env: &env,
            ..ServeOptions::default()
        },
    );
    let inventory_target = inventory.endpoint();
    let mut orders = Waybill::start(
        &db,
        ServeOptions {
            services: Some("orders"),
            // Delivery is never reached: the saga fails at its first step.
            args: &[
                "--inventory-target",
                &inventory_target,
                "--delivery-target",
                &inventory_target,
            ],
            env: &env,
            ..ServeOptions::default()
        },
    );
    let (trace_id, caller_span) = new_trace();
    let order = OrdersServiceClient::new(orders.channel().await)
        .place_order(traced(
            place_request(),
            &traceparent(&trace_id, &caller_span),
        ))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(
        order.status,
        pb::OrderStatus::Pending as i32,
        "deferred: {order:?}"
    );
    stop(&mut [&mut orders, &mut inventory]).await;

    let trace = Trace::new(collector.spans(), &trace_id);
    let reserve = "waybill.inventory.v1.InventoryService/Reserve";
    let mut clients: Vec<_> = trace
        .spans
        .values()
        .filter(|span| span.service == "waybill-orders" && span.span.name == reserve)
        .collect();
    clients.sort_by_key(|span| span.span.start_time_unix_nano);
    let first = clients
        .first()
        .unwrap_or_else(|| panic!("no Reserve client span:\n{}", trace.outline()));
    assert_eq!(first.kind(), SpanKind::Client);
    assert_eq!(first.int("rpc.grpc.status_code"), Some(14));
    assert_eq!(status(first), STATUS_ERROR);
    assert!(events(first).contains(&"retrying"), "{:?}", events(first));
    let servers: Vec<_> = trace
        .spans
        .values()
        .filter(|span| span.service == "waybill-inventory" && span.span.name == reserve)
        .collect();
    assert!(servers.len() >= 2, "retried: {}", trace.outline());
    for server in servers {
        assert_eq!(server.kind(), SpanKind::Server);
        assert!(
            clients
                .iter()
                .any(|client| client.span_id() == server.parent_id())
        );
        assert_eq!(server.str("waybill.mesh.decision"), Some("fault"));
        assert_eq!(server.int("rpc.grpc.status_code"), Some(14));
        assert_eq!(status(server), STATUS_ERROR);
        assert!(
            events(server).contains(&"injected fault: abort"),
            "{:?}",
            events(server)
        );
    }
    let saga = trace.named("waybill-orders", "saga");
    assert!(
        events(saga).contains(&"saga step failed; retrying later"),
        "{:?}",
        events(saga)
    );
}

/// A saga whose orchestrator was killed midway is resumed by another process's driver in a
/// trace of its own, linked to the PlaceOrder call that started it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_saga_links_to_the_call_that_started_it() {
    let collector = Collector::start().await;
    let endpoint = collector.endpoint();
    let env = otel_env(&endpoint);
    let db = TestDb::new().await;
    // The first process's AssignCourier hangs, so its saga is stuck after reserving.
    let mut first = Waybill::start(
        &db,
        ServeOptions {
            policy: Some(
                r#"{"methodConfig": [{"name": [{"service": "waybill.delivery.v1.DeliveryService", "method": "AssignCourier"}],
                    "faults": {"delay": {"duration": "60s", "percent": 100}}}]}"#,
            ),
            args: &["--saga-lease", "2s", "--saga-step-timeout", "30s"],
            env: &env,
            ..ServeOptions::default()
        },
    );
    let channel = first.channel().await;
    waybill_test_support::stock(&channel, "SKU-1", 5).await;
    waybill_test_support::courier(&channel, "bike-1", "north", 5).await;
    let (trace_id, caller_span) = new_trace();
    let mut orders = OrdersServiceClient::new(channel);
    let placing = tokio::spawn(async move {
        orders
            .place_order(traced(
                place_request(),
                &traceparent(&trace_id, &caller_span),
            ))
            .await
    });
    let stored: String = eventually("the saga is stuck after reserving", || async {
        let row = db
            .primary()
            .await
            .query_opt(
                "SELECT s.traceparent FROM orders.sagas s, inventory.items i
                 WHERE i.sku = 'SKU-1' AND i.reserved = 2",
                &[],
            )
            .await
            .unwrap()?;
        Some(row.get(0))
    })
    .await;
    first.kill();
    assert!(placing.await.unwrap().is_err(), "the caller saw the crash");
    let (_, original_trace, original_span, _) = {
        let parts: Vec<&str> = stored.split('-').collect();
        assert_eq!(parts.len(), 4, "a W3C traceparent: {stored:?}");
        (parts[0], parts[1].to_owned(), parts[2].to_owned(), parts[3])
    };
    assert_eq!(original_trace.len(), 32);

    let mut second = Waybill::start(
        &db,
        ServeOptions {
            args: &["--saga-poll", "100ms"],
            env: &env,
            ..ServeOptions::default()
        },
    );
    eventually("the resumed saga confirms the order", || async {
        let status: String = db
            .primary()
            .await
            .query_one("SELECT status FROM orders.orders", &[])
            .await
            .unwrap()
            .get(0);
        (status == "CONFIRMED").then_some(())
    })
    .await;
    stop(&mut [&mut second]).await;

    let spans = collector.spans();
    let resumed: Vec<_> = spans
        .iter()
        .filter(|span| {
            span.span.name == "saga" && span.str("waybill.saga.started_by") == Some("driver")
        })
        .collect();
    let resumed = resumed
        .iter()
        .find(|span| {
            span.span.links.iter().any(|link| {
                waybill_test_support::otlp::hex(&link.trace_id) == original_trace
                    && waybill_test_support::otlp::hex(&link.span_id) == original_span
            })
        })
        .unwrap_or_else(|| panic!("no resumed saga span links to {stored}: {resumed:#?}"));
    assert_ne!(resumed.trace_id(), original_trace, "a trace of its own");
    assert!(resumed.parent_id().is_empty(), "a root span");
    // Its steps continue the new trace.
    let trace = Trace::new(spans.clone(), &resumed.trace_id());
    let assign = trace.one("the resumed AssignCourier client span", |span| {
        span.kind() == SpanKind::Client
            && span.span.name == "waybill.delivery.v1.DeliveryService/AssignCourier"
    });
    assert!(trace.descends(assign, resumed));
}

/// A command's attempt is a trace of its own, linked to the SubmitCommand call, and the
/// handler's call to inventory continues that trace into the inventory process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_attempt_links_to_its_submit_and_reaches_the_service_it_calls() {
    use waybill_api::commands::v1::{
        self as commands, command_payload::Kind, command_service_client::CommandServiceClient,
    };

    let collector = Collector::start().await;
    let endpoint = collector.endpoint();
    let env = otel_env(&endpoint);
    let db = TestDb::new().await;
    let mut inventory = Waybill::start(
        &db,
        ServeOptions {
            services: Some("inventory"),
            env: &env,
            ..ServeOptions::default()
        },
    );
    waybill_test_support::stock(&inventory.channel().await, "SKU-1", 5).await;
    let inventory_target = inventory.endpoint();
    let mut pipeline = Waybill::start(
        &db,
        ServeOptions {
            services: Some("commands"),
            args: &["--inventory-target", &inventory_target],
            env: &env,
            ..ServeOptions::default()
        },
    );
    let mut client = CommandServiceClient::new(pipeline.channel().await);
    let (trace_id, caller_span) = new_trace();
    let command = client
        .submit_command(traced(
            commands::SubmitCommandRequest {
                user_id: "ops".into(),
                payload: Some(commands::CommandPayload {
                    kind: Some(Kind::RestockItem(commands::RestockItem {
                        sku: "SKU-1".into(),
                        quantity: 3,
                    })),
                }),
                idempotency_key: "traced".into(),
            },
            &traceparent(&trace_id, &caller_span),
        ))
        .await
        .unwrap()
        .into_inner()
        .command
        .unwrap();
    eventually("the command succeeds", || {
        let mut client = client.clone();
        let command_id = command.command_id.clone();
        async move {
            let status = client
                .get_command(commands::GetCommandRequest { command_id })
                .await
                .ok()?
                .into_inner()
                .command?
                .status();
            (status == commands::CommandStatus::Succeeded).then_some(())
        }
    })
    .await;
    stop(&mut [&mut pipeline, &mut inventory]).await;

    let spans = collector.spans();
    let submit_trace = Trace::new(spans.clone(), &trace_id);
    let submit = submit_trace.one("the SubmitCommand server span", |span| {
        span.kind() == SpanKind::Server
            && span.span.name == "waybill.commands.v1.CommandService/SubmitCommand"
    });
    assert_eq!(submit.parent_id(), caller_span);
    let attempt = spans
        .iter()
        .find(|span| span.span.name == "command RESTOCK_ITEM")
        .unwrap_or_else(|| panic!("no attempt span among {} spans", spans.len()));
    assert_eq!(
        attempt.str("waybill.command.id"),
        Some(command.command_id.as_str())
    );
    assert!(attempt.parent_id().is_empty(), "a root span");
    assert_ne!(attempt.trace_id(), trace_id, "a trace of its own");
    let linked = attempt
        .span
        .links
        .iter()
        .find(|link| waybill_test_support::otlp::hex(&link.trace_id) == trace_id)
        .unwrap_or_else(|| panic!("the attempt does not link to the submit's trace: {attempt:#?}"));
    assert!(
        submit_trace
            .spans
            .contains_key(&waybill_test_support::otlp::hex(&linked.span_id)),
        "the link names a span of the submit's trace"
    );
    let attempt_trace = Trace::new(spans.clone(), &attempt.trace_id());
    let adjust = attempt_trace.one("the AdjustStock server span in inventory", |span| {
        span.kind() == SpanKind::Server
            && span.span.name == "waybill.inventory.v1.InventoryService/AdjustStock"
    });
    assert!(attempt_trace.descends(adjust, attempt));
    assert_ne!(adjust.service, attempt.service, "two processes");
}
