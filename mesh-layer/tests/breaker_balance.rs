//! The circuit breaker and the balancer alone, on tokio's paused clock.

#![allow(clippy::unwrap_used)]

mod support;

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use http::{Request, Response};
use mesh_layer::{
    balance::Balancer,
    breaker::{BreakerLayer, BreakerState},
    policy::BreakerPolicy,
};
use support::{code, marker, ok, request, status};
use tonic::{Code, body::Body};
use tower::{Layer, Service, ServiceExt, service_fn};

fn policy() -> BreakerPolicy {
    BreakerPolicy {
        consecutive_failures: 3,
        failure_rate: 0.5,
        slow_call_rate: 0.8,
        slow_call_duration: Duration::from_millis(100),
        minimum_calls: 10,
        window: Duration::from_secs(10),
        base_open: Duration::from_secs(1),
        max_open: Duration::from_secs(8),
        half_open_probes: 2,
    }
}

/// An endpoint whose health a test switches, counting the calls that reach it.
#[derive(Clone, Default)]
struct Switch {
    failing: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
    latency: Duration,
}

impl Switch {
    fn service(
        self,
    ) -> impl Service<
        Request<Body>,
        Response = Response<Body>,
        Error = Infallible,
        Future = impl Send,
    > + Clone
    + Send
    + Sync
    + 'static {
        service_fn(move |_request: Request<Body>| {
            let this = self.clone();
            async move {
                this.calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(this.latency).await;
                Ok::<_, Infallible>(if this.failing.load(Ordering::SeqCst) {
                    status(Code::Unavailable)
                } else {
                    ok()
                })
            }
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

async fn send<S>(service: &mut S) -> Response<Body>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    service
        .ready()
        .await
        .unwrap()
        .call(request("/s.S/M", None))
        .await
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn opens_fails_fast_then_closes_through_half_open() {
    let endpoint = Switch::default();
    endpoint.failing.store(true, Ordering::SeqCst);
    let mut service = BreakerLayer::new("a", policy()).layer(endpoint.clone().service());

    for _ in 0..3 {
        assert_eq!(code(&send(&mut service).await), Code::Unavailable);
    }
    assert_eq!(service.breaker().state(), BreakerState::Open);

    // Open: fails fast, marked, without reaching the endpoint.
    let rejected = send(&mut service).await;
    assert_eq!(code(&rejected), Code::Unavailable);
    assert_eq!(marker(&rejected), Some("breaker-open"));
    assert_eq!(endpoint.calls(), 3);

    // After the open period (1 s ± 20 %) probes go through; two successes close it.
    endpoint.failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(service.breaker().state(), BreakerState::HalfOpen);
    assert_eq!(code(&send(&mut service).await), Code::Ok);
    assert_eq!(service.breaker().state(), BreakerState::HalfOpen);
    assert_eq!(code(&send(&mut service).await), Code::Ok);
    assert_eq!(service.breaker().state(), BreakerState::Closed);
    assert_eq!(endpoint.calls(), 5);
}

/// A shed call (RESOURCE_EXHAUSTED) is a busy but healthy endpoint: it neither opens the
/// circuit nor breaks a failure streak, nor counts as a successful probe.
#[tokio::test(start_paused = true)]
async fn load_shedding_counts_neither_way() {
    let answers = Arc::new(std::sync::Mutex::new(Vec::<Code>::new()));
    let next = answers.clone();
    let endpoint = service_fn(move |_request: Request<Body>| {
        let code = next.lock().unwrap().pop().unwrap_or(Code::Ok);
        async move { Ok::<_, Infallible>(if code == Code::Ok { ok() } else { status(code) }) }
    });
    let mut service = BreakerLayer::new("a", policy()).layer(endpoint);
    let script = |codes: &[Code]| {
        // Popped from the end: reverse so they are answered in the order given.
        *answers.lock().unwrap() = codes.iter().rev().copied().collect();
    };

    script(&[Code::ResourceExhausted; 10]);
    for _ in 0..10 {
        assert_eq!(code(&send(&mut service).await), Code::ResourceExhausted);
    }
    assert_eq!(
        service.breaker().state(),
        BreakerState::Closed,
        "shedding is not a failure"
    );

    // UNAVAILABLE, shed, UNAVAILABLE, shed, UNAVAILABLE: the streak of three is not reset.
    script(&[
        Code::Unavailable,
        Code::ResourceExhausted,
        Code::Unavailable,
        Code::ResourceExhausted,
        Code::Unavailable,
    ]);
    for _ in 0..5 {
        send(&mut service).await;
    }
    assert_eq!(service.breaker().state(), BreakerState::Open);

    // Half-open: a shed probe neither closes nor reopens; two real successes close.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    script(&[Code::ResourceExhausted, Code::Ok, Code::Ok]);
    send(&mut service).await;
    assert_eq!(service.breaker().state(), BreakerState::HalfOpen);
    send(&mut service).await;
    send(&mut service).await;
    assert_eq!(service.breaker().state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_a_bounded_number_of_probes_and_a_failure_doubles_the_wait() {
    let endpoint = Switch {
        latency: Duration::from_millis(10),
        ..Switch::default()
    };
    endpoint.failing.store(true, Ordering::SeqCst);
    let service = BreakerLayer::new("a", policy()).layer(endpoint.clone().service());
    for _ in 0..3 {
        send(&mut service.clone()).await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // Three calls at once while half-open: two probes pass, the third fails fast.
    let calls: Vec<_> = (0..3)
        .map(|_| tokio::spawn(service.clone().oneshot(request("/s.S/M", None))))
        .collect();
    let mut markers = Vec::new();
    for call in calls {
        markers.push(marker(&call.await.unwrap().unwrap()).map(str::to_owned));
    }
    assert_eq!(
        markers.iter().filter(|m| m.is_some()).count(),
        1,
        "{markers:?}"
    );
    assert_eq!(
        service.breaker().state(),
        BreakerState::Open,
        "failed probes reopen"
    );

    // Reopened for 2 s ± 20 %: still open after 1.5 s, half-open after 2.5 s.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(service.breaker().state(), BreakerState::Open);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(service.breaker().state(), BreakerState::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn a_failure_rate_trips_only_with_enough_volume() {
    let endpoint = Switch::default();
    let mut service = BreakerLayer::new(
        "a",
        BreakerPolicy {
            consecutive_failures: 100,
            ..policy()
        },
    )
    .layer(endpoint.clone().service());

    // Alternate failure and success: 50 % failures, never three in a row.
    for i in 0..9 {
        endpoint.failing.store(i % 2 == 0, Ordering::SeqCst);
        send(&mut service).await;
    }
    assert_eq!(
        service.breaker().state(),
        BreakerState::Closed,
        "9 calls < minimumCalls"
    );
    endpoint.failing.store(false, Ordering::SeqCst);
    send(&mut service).await;
    endpoint.failing.store(true, Ordering::SeqCst);
    send(&mut service).await;
    assert_eq!(
        service.breaker().state(),
        BreakerState::Open,
        "11 calls, 6 failed"
    );
}

#[tokio::test(start_paused = true)]
async fn slow_calls_trip_the_circuit() {
    let endpoint = Switch {
        latency: Duration::from_millis(150),
        ..Switch::default()
    };
    let mut service = BreakerLayer::new("a", policy()).layer(endpoint.clone().service());
    for _ in 0..10 {
        assert_eq!(code(&send(&mut service).await), Code::Ok);
    }
    assert_eq!(
        service.breaker().state(),
        BreakerState::Open,
        "all calls over 100 ms"
    );
}

#[tokio::test(start_paused = true)]
async fn the_balancer_routes_around_an_open_circuit() {
    let good = Switch::default();
    let bad = Switch::default();
    bad.failing.store(true, Ordering::SeqCst);
    let mut balancer = Balancer::new(
        policy(),
        [
            ("good".to_owned(), good.clone().service()),
            ("bad".to_owned(), bad.clone().service()),
        ],
    );

    let mut failures = 0;
    for _ in 0..100 {
        if code(&send(&mut balancer).await) != Code::Ok {
            failures += 1;
        }
    }
    assert!(
        failures <= 3,
        "only until the bad circuit opens: {failures}"
    );
    assert_eq!(
        bad.calls(),
        3,
        "the bad endpoint left the rotation after 3 failures"
    );
    assert_eq!(good.calls(), 97);
    let states = balancer.endpoints();
    assert!(
        states.contains(&("bad".to_owned(), BreakerState::Open)),
        "{states:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_balancer_prefers_the_faster_endpoint_and_fails_fast_when_all_are_open() {
    let fast = Switch {
        latency: Duration::from_millis(1),
        ..Switch::default()
    };
    let slow = Switch {
        latency: Duration::from_millis(50),
        ..Switch::default()
    };
    let mut balancer = Balancer::new(
        BreakerPolicy {
            slow_call_duration: Duration::from_secs(1),
            ..policy()
        },
        [
            ("fast".to_owned(), fast.clone().service()),
            ("slow".to_owned(), slow.clone().service()),
        ],
    );
    for _ in 0..200 {
        send(&mut balancer).await;
    }
    assert!(
        fast.calls() > 180,
        "fast {} slow {}",
        fast.calls(),
        slow.calls()
    );

    fast.failing.store(true, Ordering::SeqCst);
    slow.failing.store(true, Ordering::SeqCst);
    for _ in 0..10 {
        send(&mut balancer).await;
    }
    let before = fast.calls() + slow.calls();
    let response = send(&mut balancer).await;
    assert_eq!(code(&response), Code::Unavailable);
    assert_eq!(marker(&response), Some("breaker-open"));
    assert_eq!(
        fast.calls() + slow.calls(),
        before,
        "failed fast, nothing sent"
    );
}
