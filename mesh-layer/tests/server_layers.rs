//! The deadline, load-shedding and fault layers alone, on tokio's paused clock.

#![allow(clippy::unwrap_used)]

mod support;

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use http::{HeaderValue, Request};
use mesh_layer::{
    context::CallContext,
    deadline::{DeadlineLayer, ServerDeadlineLayer},
    fault::FaultLayer,
    grpc,
    policy::{Policy, ShedPolicy},
    shed::{LoadShedLayer, MethodCaps},
};
use support::{code, echo_timeout, marker, ok, request, send, sent_timeout};
use tokio::{sync::Notify, time::Instant};
use tonic::{Code, body::Body};
use tower::{Layer, ServiceExt, service_fn};

#[tokio::test(start_paused = true)]
async fn the_handler_sees_the_deadline_and_is_cancelled_when_it_passes() {
    let seen = Arc::new(std::sync::Mutex::new(None));
    let seen_by_handler = seen.clone();
    let handler = service_fn(move |_request: Request<Body>| {
        let seen = seen_by_handler.clone();
        async move {
            *seen.lock().unwrap() = CallContext::current();
            std::future::pending::<()>().await;
            Ok::<_, Infallible>(ok())
        }
    });
    let mut service = ServerDeadlineLayer.layer(handler);

    let mut req = request("/s.S/M", Some("100m"));
    req.headers_mut()
        .insert(grpc::PREVIOUS_ATTEMPTS, HeaderValue::from_static("2"));
    let started = Instant::now();
    let response = send(&mut service, req).await;

    assert_eq!(code(&response), Code::DeadlineExceeded);
    assert_eq!(marker(&response), Some("deadline"));
    assert_eq!(started.elapsed(), Duration::from_millis(100));
    let context = seen
        .lock()
        .unwrap()
        .expect("the handler ran inside a call context");
    assert_eq!(context.deadline, Some(started + Duration::from_millis(100)));
    assert_eq!(context.previous_attempts, 2);
}

#[tokio::test(start_paused = true)]
async fn a_malformed_timeout_is_refused_and_no_timeout_means_no_deadline() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let handler = service_fn(move |_request: Request<Body>| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            assert_eq!(CallContext::current().unwrap().deadline, None);
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, Infallible>(ok())
        }
    });
    let mut service = ServerDeadlineLayer.layer(handler);

    let response = send(&mut service, request("/s.S/M", Some("ten"))).await;
    assert_eq!(code(&response), Code::InvalidArgument);
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    let response = send(&mut service, request("/s.S/M", None)).await;
    assert_eq!(
        code(&response),
        Code::Ok,
        "an hour-long call without a deadline completes"
    );
}

#[tokio::test(start_paused = true)]
async fn outgoing_calls_get_the_earliest_deadline_minus_the_margin() {
    let policy = Policy::from_json(
        r#"{"deadlineMargin": "5ms",
            "methodConfig": [{"name": [{"service": "s.S", "method": "Short"}], "timeout": "200ms"}]}"#,
    )
    .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut client = DeadlineLayer::new(policy).layer(echo_timeout(calls.clone()));

    // No deadline anywhere: none is invented.
    let response = send(&mut client, request("/s.S/Long", None)).await;
    assert_eq!(sent_timeout(&response), None);

    // Handling an incoming call with 1 s left: the outgoing call gets 1 s minus the margin, or
    // the method's own shorter timeout.
    let incoming = CallContext {
        deadline: Some(Instant::now() + Duration::from_secs(1)),
        previous_attempts: 0,
    };
    let (long, short) = incoming
        .scope(async {
            let long = send(&mut client, request("/s.S/Long", None)).await;
            let short = send(&mut client, request("/s.S/Short", None)).await;
            (long, short)
        })
        .await;
    assert_eq!(sent_timeout(&long), Some(Duration::from_millis(995)));
    assert_eq!(sent_timeout(&short), Some(Duration::from_millis(200)));

    // The caller's own shorter timeout wins too.
    let response = send(&mut client, request("/s.S/Long", Some("50m"))).await;
    assert_eq!(sent_timeout(&response), Some(Duration::from_millis(50)));
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn an_expired_deadline_fails_without_sending() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut client = DeadlineLayer::new(Policy::default()).layer(echo_timeout(calls.clone()));
    let expired = CallContext {
        deadline: Some(Instant::now() + Duration::from_millis(3)),
        previous_attempts: 0,
    };
    let response = expired
        .scope(async { send(&mut client, request("/s.S/M", None)).await })
        .await;
    assert_eq!(
        code(&response),
        Code::DeadlineExceeded,
        "3 ms left is less than the 5 ms margin"
    );
    assert_eq!(marker(&response), Some("deadline"));
    assert_eq!(calls.load(Ordering::SeqCst), 0, "never sent");
}

/// A handler whose calls all wait until `release.notify_waiters()`, then answer OK.
fn gated_handler() -> (
    Arc<Notify>,
    tower::util::BoxCloneService<Request<Body>, http::Response<Body>, Infallible>,
) {
    let release = Arc::new(Notify::new());
    let gate = release.clone();
    let handler = service_fn(move |_request: Request<Body>| {
        let gate = gate.clone();
        async move {
            gate.notified().await;
            Ok::<_, Infallible>(ok())
        }
    });
    (release, tower::util::BoxCloneService::new(handler))
}

/// A call of `path` through `service` is shed: RESOURCE_EXHAUSTED, marked `load-shed`, with
/// no time passing (the clock is paused, so any wait would show).
async fn assert_shed_at_once<S>(service: &S, path: &str)
where
    S: tower::Service<Request<Body>, Response = http::Response<Body>, Error = Infallible> + Clone,
{
    let started = Instant::now();
    let refused = service.clone().oneshot(request(path, None)).await.unwrap();
    assert_eq!(code(&refused), Code::ResourceExhausted);
    assert_eq!(marker(&refused), Some("load-shed"));
    assert_eq!(started.elapsed(), Duration::ZERO, "refused without waiting");
}

#[tokio::test(start_paused = true)]
async fn overload_is_refused_at_once_but_health_checks_pass() {
    let (release, handler) = gated_handler();
    let layer = LoadShedLayer::new(Some(&ShedPolicy {
        initial_limit: 2,
        min_limit: 1,
        max_limit: 10,
        rtt_tolerance: 1.5,
        latency_slack: Duration::from_millis(5),
    }));
    let service = layer.layer(handler);

    let mut held = Vec::new();
    for _ in 0..2 {
        let service = service.clone();
        held.push(tokio::spawn(service.oneshot(request("/s.S/M", None))));
    }
    let health = tokio::spawn(
        service
            .clone()
            .oneshot(request("/grpc.health.v1.Health/Check", None)),
    );
    tokio::task::yield_now().await;
    assert_eq!(
        layer.limit_for("/s.S/M").unwrap().in_flight(),
        2,
        "health checks hold no slot"
    );

    assert_shed_at_once(&service, "/s.S/M").await;

    // Another gRPC service on the same server has a limit of its own: the full one does not
    // starve it (a caller waiting on a callee in the same process must not shed the callee).
    let other = tokio::spawn(service.clone().oneshot(request("/s.Other/M", None)));
    tokio::task::yield_now().await;
    assert_eq!(layer.limit_for("/s.Other/M").unwrap().in_flight(), 1);
    held.push(other);

    release.notify_waiters();
    for call in held {
        assert_eq!(code(&call.await.unwrap().unwrap()), Code::Ok);
    }
    assert_eq!(code(&health.await.unwrap().unwrap()), Code::Ok);
    assert_eq!(layer.limit_for("/s.S/M").unwrap().in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_capped_method_is_refused_at_once_past_its_cap_even_with_adaptive_limits_off() {
    let (release, handler) = gated_handler();
    let caps = MethodCaps::default().with("/s.S/Capped", 2);
    let service = LoadShedLayer::new(None).with_caps(caps).layer(handler);

    let mut held: Vec<_> = (0..2)
        .map(|_| tokio::spawn(service.clone().oneshot(request("/s.S/Capped", None))))
        .collect();
    tokio::task::yield_now().await;

    assert_shed_at_once(&service, "/s.S/Capped").await;

    // Other methods, of the same service included, are not held to it.
    let other = tokio::spawn(service.clone().oneshot(request("/s.S/Other", None)));
    tokio::task::yield_now().await;
    held.push(other);
    release.notify_waiters();
    for call in held {
        assert_eq!(code(&call.await.unwrap().unwrap()), Code::Ok);
    }

    // The slots come back with the calls.
    let again = tokio::spawn(service.clone().oneshot(request("/s.S/Capped", None)));
    tokio::task::yield_now().await;
    release.notify_waiters();
    assert_eq!(code(&again.await.unwrap().unwrap()), Code::Ok);
}

#[tokio::test(start_paused = true)]
async fn faults_abort_and_delay_the_configured_methods_only() {
    let policy = Policy::from_json(
        r#"{"methodConfig": [
            {"name": [{"service": "s.S", "method": "Abort"}], "faults": {"abort": {"code": "UNAVAILABLE", "percent": 100}}},
            {"name": [{"service": "s.S", "method": "Slow"}], "faults": {"delay": {"duration": "250ms", "percent": 100}}}
        ]}"#,
    )
    .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut service = FaultLayer::new(policy).layer(echo_timeout(calls.clone()));

    let aborted = send(&mut service, request("/s.S/Abort", None)).await;
    assert_eq!(code(&aborted), Code::Unavailable);
    assert_eq!(marker(&aborted), Some("fault"));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "an aborted call never reaches the handler"
    );

    let started = Instant::now();
    let slow = send(&mut service, request("/s.S/Slow", None)).await;
    assert_eq!(code(&slow), Code::Ok);
    assert_eq!(started.elapsed(), Duration::from_millis(250));

    let started = Instant::now();
    let plain = send(&mut service, request("/s.S/Other", None)).await;
    assert_eq!(code(&plain), Code::Ok);
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}
