//! mesh-layer end to end: real `waybill serve` processes on loopback, real tonic clients
//! through the mesh client stack, faults injected by the servers' policies.

// A failed unwrap is a failed test, which is what we want here.
#![allow(clippy::unwrap_used)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use mesh_layer::{method::MethodTable, policy::Policy};
use tonic::{Code, Request, Status};
use tower::Layer;
use tower::util::MapRequestLayer;
use waybill_api::{
    echo::v1::{EchoRequest, echo_service_client::EchoServiceClient},
    orders::v1::{self as pb, orders_service_client::OrdersServiceClient},
};
use waybill_test_support::{ServeOptions, TestDb, Waybill, eventually};

fn methods() -> MethodTable {
    MethodTable::from_descriptor_sets(&[waybill_api::FILE_DESCRIPTOR_SET]).unwrap()
}

fn policy(json: &str) -> Policy {
    Policy::from_json(json).unwrap()
}

fn echo_server(db: &TestDb, policy: &str) -> Waybill {
    Waybill::start(
        db,
        ServeOptions {
            services: Some("echo"),
            policy: Some(policy),
            ..ServeOptions::default()
        },
    )
}

fn echo(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.into(),
        relay: vec![],
        delay_ms: 0,
    }
}

fn mesh_marker(status: &Status) -> Option<String> {
    status
        .metadata()
        .get("waybill-mesh")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Retries with room to spare. The circuit breaker is set so it does not open: at the default
/// 50 % failure rate it would (rightly) take a half-failing server out of rotation, which is
/// the breaker's test, not this one's.
const RETRY_UNAVAILABLE: &str = r#"{"methodConfig": [{"name": [{}],
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.01s", "maxBackoff": "0.05s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}],
    "retryBudget": {"retryRatio": 2.0, "minRetriesPerSecond": 100},
    "breaker": {"consecutiveFailures": 1000, "minimumCalls": 100000}}"#;

const HALF_UNAVAILABLE: &str = r#"{"methodConfig": [{"name": [{}],
    "faults": {"abort": {"code": "UNAVAILABLE", "percent": 50}}}]}"#;

#[tokio::test]
async fn retries_recover_from_injected_unavailable() {
    let db = TestDb::new().await;
    let server = echo_server(&db, HALF_UNAVAILABLE);

    let mut bare = EchoServiceClient::new(server.channel().await);
    let mut bare_ok = 0;
    for i in 0..200 {
        if bare.echo(echo(&i.to_string())).await.is_ok() {
            bare_ok += 1;
        }
    }

    let client =
        mesh_layer::client::balanced(&server.endpoint(), &policy(RETRY_UNAVAILABLE), &methods())
            .unwrap();
    let mut meshed = EchoServiceClient::new(client);
    let mut meshed_ok = 0;
    for i in 0..200 {
        if meshed.echo(echo(&i.to_string())).await.is_ok() {
            meshed_ok += 1;
        }
    }

    // Half the attempts fail. Without retries about 100 of 200 calls succeed; with up to 5
    // attempts a call fails only 1 time in 32 (about 6 of 200). The bounds are set where
    // chance alone breaks them less than once in 100,000 runs.
    assert!((50..=150).contains(&bare_ok), "bare client: {bare_ok}/200");
    assert!(meshed_ok >= 180, "mesh client: {meshed_ok}/200");
}

#[tokio::test]
async fn place_order_is_retried_only_with_an_idempotency_key_and_runs_once() {
    let db = TestDb::new().await;
    let server = Waybill::start(
        &db,
        ServeOptions {
            policy: Some(HALF_UNAVAILABLE),
            ..ServeOptions::default()
        },
    );
    let client =
        mesh_layer::client::balanced(&server.endpoint(), &policy(RETRY_UNAVAILABLE), &methods())
            .unwrap();
    let mut orders = OrdersServiceClient::new(client);
    let place = || pb::PlaceOrderRequest {
        customer_id: "c-retry".into(),
        items: vec![pb::LineItem {
            sku: "SKU-1".into(),
            quantity: 1,
        }],
        delivery_address: "1 Main St".into(),
        zone: String::new(),
    };

    let mut unkeyed_ok = 0;
    for _ in 0..60 {
        match orders.place_order(place()).await {
            Ok(_) => unkeyed_ok += 1,
            Err(status) => assert_eq!(status.code(), Code::Unavailable),
        }
    }
    assert!(
        unkeyed_ok <= 48,
        "PlaceOrder has no idempotency level: not retried ({unkeyed_ok}/60 ok)"
    );
    assert_eq!(db.count("orders.orders").await, unkeyed_ok);

    let mut keyed_ok = 0;
    for i in 0..60 {
        let mut request = Request::new(place());
        request
            .metadata_mut()
            .insert("idempotency-key", format!("place-{i}").parse().unwrap());
        if orders.place_order(request).await.is_ok() {
            keyed_ok += 1;
        }
    }
    // Retried, a keyed call fails 1 time in 32 (about 2 of 60); without retries, 30 of 60.
    assert!(keyed_ok >= 49, "keyed calls are retried: {keyed_ok}/60");
    assert_eq!(
        db.count("orders.orders").await,
        unkeyed_ok + keyed_ok,
        "every successful call stored exactly one order"
    );
}

#[tokio::test]
async fn in_a_full_outage_the_retry_budget_caps_attempts() {
    let db = TestDb::new().await;
    let server = echo_server(
        &db,
        r#"{"methodConfig": [{"name": [{}], "faults": {"abort": {"code": "UNAVAILABLE", "percent": 100}}}]}"#,
    );
    let attempts = Arc::new(AtomicUsize::new(0));
    let counter = attempts.clone();
    let counted = MapRequestLayer::new(move |request| {
        counter.fetch_add(1, Ordering::Relaxed);
        request
    })
    .layer(server.channel().await);
    let client_policy = policy(
        r#"{"methodConfig": [{"name": [{}],
            "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.001s", "maxBackoff": "0.002s",
                            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}],
            "retryBudget": {"retryRatio": 0.2, "minRetriesPerSecond": 1, "ttl": "10s"}}"#,
    );
    let mut client = EchoServiceClient::new(mesh_layer::client::wrap(
        &client_policy,
        &methods(),
        counted,
    ));

    let calls = 300;
    for i in 0..calls {
        let status = client.echo(echo(&i.to_string())).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
    }
    let attempts = attempts.load(Ordering::Relaxed);
    // Unbudgeted, 5 attempts each would be 1500. The budget allows 20 % of the calls plus
    // minRetriesPerSecond × ttl in reserve.
    assert!(
        attempts <= calls + calls / 5 + 10,
        "{attempts} attempts for {calls} calls"
    );
    assert!(
        attempts > calls,
        "some retries are still allowed: {attempts}"
    );
}

#[tokio::test]
async fn the_breaker_opens_fails_fast_and_closes_through_half_open() {
    let db = TestDb::new().await;
    let mut server = echo_server(&db, "{}");
    let address = server.addr;
    let client_policy = policy(
        r#"{"methodConfig": [{"name": [{}], "timeout": "2s"}],
            "breaker": {"consecutiveFailures": 3, "baseOpen": "300ms", "maxOpen": "1s",
                        "halfOpenProbes": 1}}"#,
    );
    let mut client = EchoServiceClient::new(
        mesh_layer::client::balanced(&server.endpoint(), &client_policy, &methods()).unwrap(),
    );
    client.echo(echo("up")).await.unwrap();

    server.kill();
    for _ in 0..3 {
        let status = client.echo(echo("down")).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            mesh_marker(&status),
            None,
            "a real failure, not the breaker"
        );
    }
    let started = Instant::now();
    let status = client.echo(echo("fail fast")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(mesh_marker(&status).as_deref(), Some("breaker-open"));
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "failed fast"
    );

    let _restarted = Waybill::start(
        &db,
        ServeOptions {
            services: Some("echo"),
            listen: Some(address),
            ..ServeOptions::default()
        },
    );
    // Half-open after the open period: a probe succeeds and closes the circuit.
    eventually("the circuit closes once the endpoint is back", || {
        let mut client = client.clone();
        async move { client.echo(echo("back")).await.ok() }
    })
    .await;
    for _ in 0..5 {
        client.echo(echo("closed")).await.unwrap();
    }
}

#[tokio::test]
async fn a_deadline_shrinks_across_three_hops() {
    let db = TestDb::new().await;
    let hops: Vec<Waybill> = (0..3).map(|_| echo_server(&db, "{}")).collect();
    let mut client = EchoServiceClient::new(hops[0].channel().await);

    let mut request = Request::new(EchoRequest {
        message: "through".into(),
        relay: vec![hops[1].endpoint(), hops[2].endpoint()],
        delay_ms: 0,
    });
    request.set_timeout(Duration::from_secs(2));
    let response = client.echo(request).await.unwrap().into_inner();

    assert_eq!(response.message, "through");
    let left: Vec<i64> = response
        .hops
        .iter()
        .map(|h| h.deadline_remaining_ms)
        .collect();
    assert_eq!(left.len(), 3, "{left:?}");
    assert!(left[0] <= 2000 && left[0] > 1000, "{left:?}");
    // Each hop forwards what it has left minus the 5 ms margin.
    assert!(left[1] <= left[0] - 5 && left[2] <= left[1] - 5, "{left:?}");
    assert!(left[2] > 0, "{left:?}");

    // A deadline already spent at the first hop is not forwarded at all.
    let mut request = Request::new(EchoRequest {
        message: "late".into(),
        relay: vec![hops[1].endpoint()],
        delay_ms: 0,
    });
    request.set_timeout(Duration::from_millis(3));
    let status = client.echo(request).await.unwrap_err();
    // The server answers DEADLINE_EXCEEDED; on a loaded machine this plain tonic client's own
    // timer may fire first, which tonic reports as CANCELLED. Either way the call ended at its
    // deadline (the not-forwarding itself is covered by the deadline layer's unit tests).
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
}

#[tokio::test]
async fn fifty_concurrent_duplicates_place_one_order_and_share_its_answer() {
    let db = TestDb::new().await;
    // Every call waits 200 ms before reaching the handler, so the 50 duplicates overlap.
    let server = Waybill::start(
        &db,
        ServeOptions {
            // Shedding off: this test is about idempotency, and a shed duplicate
            // (RESOURCE_EXHAUSTED, not retried by this client) would fail it for another reason.
            policy: Some(
                r#"{"methodConfig": [{"name": [{"service": "waybill.orders.v1.OrdersService"}],
                    "faults": {"delay": {"duration": "200ms", "percent": 100}}}],
                    "loadShedding": {"enabled": false}}"#,
            ),
            // PlaceOrder's own cap (32 by default) would shed some of the 50 too.
            args: &["--saga-max-placing", "64"],
            ..ServeOptions::default()
        },
    );
    let client_policy = policy(
        r#"{"methodConfig": [{"name": [{}], "timeout": "10s",
            "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "0.5s",
                            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE", "ABORTED"]}}],
            "retryBudget": {"retryRatio": 10, "minRetriesPerSecond": 100}}"#,
    );
    let client = OrdersServiceClient::new(
        mesh_layer::client::balanced(&server.endpoint(), &client_policy, &methods()).unwrap(),
    );

    let calls: Vec<_> = (0..50)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut request = Request::new(pb::PlaceOrderRequest {
                    customer_id: "c-dup".into(),
                    items: vec![pb::LineItem {
                        sku: "SKU-1".into(),
                        quantity: 3,
                    }],
                    delivery_address: "1 Main St".into(),
                    zone: String::new(),
                });
                request
                    .metadata_mut()
                    .insert("idempotency-key", "the-one-order".parse().unwrap());
                client.place_order(request).await
            })
        })
        .collect();
    let mut ids = Vec::new();
    for call in calls {
        ids.push(
            call.await
                .unwrap()
                .unwrap()
                .into_inner()
                .order
                .unwrap()
                .order_id,
        );
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "all 50 got the same order");
    assert_eq!(db.count("orders.orders").await, 1, "the handler ran once");
}

#[tokio::test]
async fn overload_is_shed_at_once_while_admitted_calls_keep_their_latency() {
    let db = TestDb::new().await;
    let server = echo_server(
        &db,
        r#"{"loadShedding": {"initialLimit": 8, "minLimit": 8, "maxLimit": 8}}"#,
    );
    let client = EchoServiceClient::new(server.channel().await);
    let work = Duration::from_millis(300);

    let calls: Vec<_> = (0..64)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let result = client
                    .echo(EchoRequest {
                        message: i.to_string(),
                        relay: vec![],
                        delay_ms: 300,
                    })
                    .await;
                (result, started.elapsed())
            })
        })
        .collect();
    let mut admitted = Vec::new();
    let mut shed = Vec::new();
    for call in calls {
        match call.await.unwrap() {
            (Ok(_), elapsed) => admitted.push(elapsed),
            (Err(status), elapsed) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert_eq!(mesh_marker(&status).as_deref(), Some("load-shed"));
                shed.push(elapsed);
            }
        }
    }
    // The limit admits 8 at once; a call that arrives after one of them finished may be
    // admitted too, so "at least".
    assert!(admitted.len() >= 8, "{} admitted", admitted.len());
    assert!(shed.len() >= 40, "{} shed", shed.len());
    let slowest_shed = shed.iter().max().unwrap();
    let fastest_admitted = admitted.iter().min().unwrap();
    assert!(
        slowest_shed < fastest_admitted,
        "every refusal came before any admitted call finished: {slowest_shed:?} vs {fastest_admitted:?}"
    );
    assert!(
        admitted.iter().all(|latency| *latency < work * 2),
        "admitted calls did not queue: {admitted:?}"
    );
}

#[tokio::test]
async fn a_dns_target_finds_its_endpoints() {
    let db = TestDb::new().await;
    let server = echo_server(&db, "{}");
    // `localhost` may resolve to ::1 as well, where nothing listens: that endpoint fails, its
    // circuit opens, and calls go to 127.0.0.1.
    let target = format!("dns://localhost:{}", server.addr.port());
    // One failure opens a dead endpoint's circuit for the rest of the test; retries cover
    // the call that found it.
    let client_policy = policy(
        r#"{"methodConfig": [{"name": [{}], "timeout": "5s",
            "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.01s", "maxBackoff": "0.05s",
                            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}],
            "breaker": {"consecutiveFailures": 1, "baseOpen": "60s", "maxOpen": "60s"}}"#,
    );
    let client = EchoServiceClient::new(
        mesh_layer::client::balanced(&target, &client_policy, &methods()).unwrap(),
    );
    eventually("the first resolution yields a working endpoint", || {
        let mut client = client.clone();
        async move { client.echo(echo("first")).await.ok() }
    })
    .await;
    for i in 0..20 {
        client.clone().echo(echo(&i.to_string())).await.unwrap();
    }
}
