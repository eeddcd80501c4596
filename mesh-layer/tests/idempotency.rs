//! The idempotency layer alone, with the in-memory store, on tokio's paused clock.

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

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use mesh_layer::{
    grpc,
    idempotency::{CALLER, IdempotencyLayer, KeyId, MemoryStore},
    policy::Policy,
};
use support::{marker, methods};
use tonic::{Code, Status, body::Body};
use tower::{Layer, Service, ServiceExt, service_fn};

/// A handler that takes 20 ms, counts its runs, and answers with the run number, or with the
/// code the request body names (`fail:<code>`).
#[derive(Clone, Default)]
struct Handler {
    runs: Arc<AtomicUsize>,
}

impl Handler {
    fn service(
        self,
    ) -> impl Service<
        Request<Body>,
        Response = Response<Body>,
        Error = Infallible,
        Future = impl Send,
    > + Clone
    + Send
    + 'static {
        service_fn(move |request: Request<Body>| {
            let runs = self.runs.clone();
            async move {
                let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
                let body = request.into_body().collect().await.unwrap().to_bytes();
                tokio::time::sleep(Duration::from_millis(20)).await;
                if let Some(code) = body.strip_prefix(b"fail:") {
                    let code: i32 = std::str::from_utf8(code).unwrap().parse().unwrap();
                    return Ok::<_, Infallible>(
                        Status::new(Code::from_i32(code), "failed").into_http(),
                    );
                }
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                let reply = Full::new(Bytes::from(format!("run {run}")))
                    .with_trailers(async move { Some(Ok(trailers)) })
                    .map_err(|never: Infallible| match never {});
                Ok(Response::new(Body::new(reply)))
            }
        })
    }

    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

fn keyed(path: &str, key: &str, body: &'static str) -> Request<Body> {
    Request::builder()
        .uri(format!("http://test{path}"))
        .header(grpc::IDEMPOTENCY_KEY, key)
        .header(CALLER, "tests")
        .body(Body::new(Full::new(Bytes::from_static(body.as_bytes()))))
        .unwrap()
}

/// (code, body text) of a response, from its headers or its trailers.
async fn outcome(response: Response<Body>) -> (Code, String) {
    if let Some(code) = grpc::status_code(response.headers()) {
        return (code, String::new());
    }
    let collected = response.into_body().collect().await.unwrap();
    let code = grpc::status_code(collected.trailers().unwrap()).unwrap();
    (
        code,
        String::from_utf8(collected.to_bytes().to_vec()).unwrap(),
    )
}

/// Sends one keyed call through `service`.
async fn send<S>(service: &S, path: &str, key: &str, body: &'static str) -> Response<Body>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone,
{
    service
        .clone()
        .oneshot(keyed(path, key, body))
        .await
        .unwrap()
}

fn layer(retention: &str) -> IdempotencyLayer {
    let policy = Policy::from_json(&format!(
        r#"{{"idempotency": {{"retention": "{retention}"}}}}"#
    ))
    .unwrap();
    IdempotencyLayer::new(Arc::new(MemoryStore::default()), &policy, methods())
}

#[tokio::test(start_paused = true)]
async fn fifty_concurrent_duplicates_run_once_and_repeats_replay() {
    let handler = Handler::default();
    let service = layer("24h").layer(handler.clone().service());

    let calls: Vec<_> = (0..50)
        .map(|_| tokio::spawn(service.clone().oneshot(keyed("/s.S/Buy", "k-1", "order"))))
        .collect();
    let mut outcomes = Vec::new();
    for call in calls {
        outcomes.push(outcome(call.await.unwrap().unwrap()).await);
    }
    assert_eq!(handler.runs(), 1);
    assert_eq!(outcomes.iter().filter(|o| o.0 == Code::Ok).count(), 1);
    assert!(
        outcomes
            .iter()
            .filter(|o| o.0 != Code::Ok)
            .all(|o| o.0 == Code::Aborted),
        "duplicates during the run are ABORTED: {outcomes:?}"
    );

    let response = send(&service, "/s.S/Buy", "k-1", "order").await;
    assert_eq!(marker(&response), Some("replayed"));
    assert_eq!(outcome(response).await, (Code::Ok, "run 1".into()));
    assert_eq!(handler.runs(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_reused_key_with_another_request_is_refused() {
    let handler = Handler::default();
    let service = layer("24h").layer(handler.clone().service());
    send(&service, "/s.S/Buy", "k", "order A").await;

    let response = send(&service, "/s.S/Buy", "k", "order B").await;
    assert_eq!(outcome(response).await.0, Code::InvalidArgument);
    assert_eq!(handler.runs(), 1);

    // The same key on another method, or from another caller, is another key.
    let other_method = send(&service, "/s.S/Put", "k", "order B").await;
    assert_eq!(outcome(other_method).await.0, Code::Ok);
    let mut other_caller = keyed("/s.S/Buy", "k", "order B");
    other_caller
        .headers_mut()
        .insert(CALLER, HeaderValue::from_static("someone-else"));
    assert_eq!(
        outcome(service.clone().oneshot(other_caller).await.unwrap())
            .await
            .0,
        Code::Ok
    );
    assert_eq!(handler.runs(), 3);
}

#[tokio::test(start_paused = true)]
async fn errors_are_replayed_but_transient_ones_release_the_key() {
    let handler = Handler::default();
    let service = layer("24h").layer(handler.clone().service());

    // FAILED_PRECONDITION (9) is an answer: stored and replayed.
    for _ in 0..2 {
        let response = send(&service, "/s.S/Buy", "a", "fail:9").await;
        assert_eq!(outcome(response).await.0, Code::FailedPrecondition);
    }
    assert_eq!(handler.runs(), 1);

    // UNAVAILABLE (14) may succeed on retry: the key is released and the call runs again.
    for _ in 0..2 {
        let response = send(&service, "/s.S/Buy", "b", "fail:14").await;
        assert_eq!(outcome(response).await.0, Code::Unavailable);
    }
    assert_eq!(handler.runs(), 3);
}

#[tokio::test(start_paused = true)]
async fn keys_expire_after_the_retention() {
    let handler = Handler::default();
    let service = layer("1h").layer(handler.clone().service());
    send(&service, "/s.S/Buy", "k", "x").await;
    tokio::time::sleep(Duration::from_secs(3601)).await;
    let response = send(&service, "/s.S/Buy", "k", "x").await;
    assert_eq!(outcome(response).await, (Code::Ok, "run 2".into()));
}

#[tokio::test(start_paused = true)]
async fn an_abandoned_call_releases_its_key() {
    let handler = Handler::default();
    let service = layer("24h").layer(handler.clone().service());
    let abandoned = tokio::time::timeout(
        Duration::from_millis(5),
        service.clone().oneshot(keyed("/s.S/Buy", "k", "x")),
    )
    .await;
    assert!(
        abandoned.is_err(),
        "gave up before the 20 ms handler finished"
    );
    tokio::task::yield_now().await;

    let response = send(&service, "/s.S/Buy", "k", "x").await;
    assert_eq!(outcome(response).await, (Code::Ok, "run 2".into()));
}

#[tokio::test(start_paused = true)]
async fn bad_keys_and_streaming_methods_are_refused() {
    let handler = Handler::default();
    let service = layer("24h").layer(handler.clone().service());
    let long = "k".repeat(129);
    let response = send(&service, "/s.S/Buy", &long, "x").await;
    assert_eq!(outcome(response).await.0, Code::InvalidArgument);
    let response = send(&service, "/s.S/Watch", "k", "x").await;
    assert_eq!(outcome(response).await.0, Code::InvalidArgument);
    assert_eq!(handler.runs(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_handler_sees_the_calls_key_and_its_digest_is_stable_across_repeats() {
    // Answers UNAVAILABLE, so every repeat runs again, and records the key it was handed.
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorder = {
        let seen = seen.clone();
        service_fn(move |request: Request<Body>| {
            let key = request.extensions().get::<KeyId>().cloned();
            seen.lock().unwrap().push(key);
            async { Ok::<_, Infallible>(Status::unavailable("try again").into_http()) }
        })
    };
    let service = layer("24h").layer(recorder);
    send(&service, "/s.S/Buy", "k", "order").await;
    send(&service, "/s.S/Buy", "k", "order").await;
    send(&service, "/s.S/Buy", "other", "order").await;
    send(&service, "/s.S/Put", "k", "order").await;
    let mut unkeyed = keyed("/s.S/Buy", "k", "order");
    unkeyed.headers_mut().remove(grpc::IDEMPOTENCY_KEY);
    service.clone().oneshot(unkeyed).await.unwrap();

    let seen = seen.lock().unwrap();
    let keys: Vec<&KeyId> = seen.iter().flatten().collect();
    assert_eq!(keys.len(), 4, "the unkeyed call carries no key: {seen:?}");
    assert_eq!(
        keys[0],
        &KeyId {
            caller: "tests".into(),
            method: "/s.S/Buy".into(),
            key: "k".into(),
        }
    );
    assert_eq!(
        keys[0].digest(),
        keys[1].digest(),
        "a repeat has the same digest"
    );
    assert_ne!(keys[0].digest(), keys[2].digest(), "another key");
    assert_ne!(keys[0].digest(), keys[3].digest(), "another method");
    // The parts are separated: ("ab", "c") is not ("a", "bc").
    let split = |caller: &str, method: &str| KeyId {
        caller: caller.into(),
        method: method.into(),
        key: "k".into(),
    };
    assert_ne!(split("ab", "c").digest(), split("a", "bc").digest());
}
