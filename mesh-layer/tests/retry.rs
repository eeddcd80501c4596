//! The retry layer alone, on tokio's paused clock.

#![allow(clippy::unwrap_used)]

mod support;

use std::{
    collections::VecDeque,
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use mesh_layer::{context::CallContext, grpc, policy::Policy, retry::RetryLayer};
use support::{code, methods, ok, send, status};
use tokio::time::Instant;
use tonic::{Code, body::Body};
use tower::{Layer, Service, service_fn};

/// What the server saw of one attempt.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    previous_attempts: Option<String>,
    /// The `grpc-timeout` the attempt carried.
    timeout: Option<Duration>,
    body: Bytes,
    at: Instant,
}

/// A server that answers attempts from a script (then OK), recording each.
#[derive(Clone, Default)]
struct Scripted {
    script: Arc<Mutex<VecDeque<Response<Body>>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    fail_forever: Option<Code>,
}

impl Scripted {
    fn answering(responses: Vec<Response<Body>>) -> Self {
        Self {
            script: Arc::new(Mutex::new(responses.into())),
            ..Self::default()
        }
    }

    fn always(code: Code) -> Self {
        Self {
            fail_forever: Some(code),
            ..Self::default()
        }
    }

    fn attempts(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

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
        let this = self;
        service_fn(move |request: Request<Body>| {
            let this = this.clone();
            async move {
                let previous_attempts = request
                    .headers()
                    .get(grpc::PREVIOUS_ATTEMPTS)
                    .map(|v| v.to_str().unwrap().to_owned());
                let timeout = request
                    .headers()
                    .get(grpc::GRPC_TIMEOUT)
                    .and_then(grpc::parse_timeout);
                let body = request.into_body().collect().await.unwrap().to_bytes();
                this.seen.lock().unwrap().push(Seen {
                    previous_attempts,
                    timeout,
                    body,
                    at: Instant::now(),
                });
                let response = match this.fail_forever {
                    Some(code) => status(code),
                    None => this.script.lock().unwrap().pop_front().unwrap_or_else(ok),
                };
                Ok::<_, Infallible>(response)
            }
        })
    }
}

fn policy(extra: &str) -> Policy {
    Policy::from_json(&format!(
        r#"{{"methodConfig": [{{"name": [{{"service": "s.S"}}],
            "retryPolicy": {{"maxAttempts": 4, "initialBackoff": "0.01s", "maxBackoff": "0.1s",
                            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}}}]
            {extra}}}"#
    ))
    .unwrap()
}

fn call(path: &str, body: &'static str) -> Request<Body> {
    Request::builder()
        .uri(format!("http://test{path}"))
        .body(Body::new(Full::new(Bytes::from_static(body.as_bytes()))))
        .unwrap()
}

/// A response whose status is in the trailers, as for any call that sent headers first.
fn in_trailers(code: Code, pushback: Option<&'static str>) -> Response<Body> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(code as i32));
    if let Some(ms) = pushback {
        trailers.insert(grpc::RETRY_PUSHBACK, HeaderValue::from_static(ms));
    }
    let body = Full::new(Bytes::from_static(b"partial"))
        .with_trailers(async move { Some(Ok(trailers)) })
        .map_err(|never: Infallible| match never {});
    Response::new(Body::new(body))
}

/// UNAVAILABLE in trailers-only form, with `grpc-retry-pushback-ms: ms`.
fn unavailable_with_pushback(ms: &'static str) -> Response<Body> {
    let mut response = status(Code::Unavailable);
    response
        .headers_mut()
        .insert(grpc::RETRY_PUSHBACK, HeaderValue::from_static(ms));
    response
}

/// A call of `/s.S/Get` whose caller has `timeout` (a `grpc-timeout` value) left.
fn call_with_timeout(timeout: &'static str) -> Request<Body> {
    let mut request = call("/s.S/Get", "");
    request
        .headers_mut()
        .insert(grpc::GRPC_TIMEOUT, HeaderValue::from_static(timeout));
    request
}

async fn trailer_code(response: Response<Body>) -> Code {
    let collected = response.into_body().collect().await.unwrap();
    grpc::status_code(collected.trailers().unwrap()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn unavailable_is_retried_with_the_same_body_and_attempt_headers() {
    let server = Scripted::answering(vec![status(Code::Unavailable), status(Code::Unavailable)]);
    let mut client = RetryLayer::new(policy(""), methods()).layer(server.clone().service());

    let response = send(&mut client, call("/s.S/Get", "hello")).await;

    assert_eq!(code(&response), Code::Ok);
    let attempts = server.attempts();
    assert_eq!(attempts.len(), 3);
    assert!(attempts.iter().all(|a| a.body == "hello"), "{attempts:?}");
    let headers: Vec<_> = attempts
        .iter()
        .map(|a| a.previous_attempts.clone())
        .collect();
    assert_eq!(headers, [None, Some("1".into()), Some("2".into())]);
}

#[tokio::test(start_paused = true)]
async fn a_status_in_the_trailers_is_read_and_the_body_survives() {
    let server = Scripted::answering(vec![
        in_trailers(Code::Unavailable, None),
        in_trailers(Code::InvalidArgument, None),
    ]);
    let mut client = RetryLayer::new(policy(""), methods()).layer(server.clone().service());

    let response = send(&mut client, call("/s.S/Put", "x")).await;

    assert_eq!(
        server.attempts().len(),
        2,
        "UNAVAILABLE retried, INVALID_ARGUMENT not"
    );
    assert_eq!(trailer_code(response).await, Code::InvalidArgument);
}

#[tokio::test(start_paused = true)]
async fn non_idempotent_methods_retry_only_with_an_idempotency_key() {
    let server = Scripted::always(Code::Unavailable);
    let mut client = RetryLayer::new(policy(""), methods()).layer(server.clone().service());

    let response = send(&mut client, call("/s.S/Buy", "order")).await;
    assert_eq!(code(&response), Code::Unavailable);
    assert_eq!(server.attempts().len(), 1, "no key: never retried");

    let mut keyed = call("/s.S/Buy", "order");
    keyed
        .headers_mut()
        .insert(grpc::IDEMPOTENCY_KEY, HeaderValue::from_static("k-1"));
    send(&mut client, keyed).await;
    assert_eq!(
        server.attempts().len(),
        1 + 4,
        "with a key: up to maxAttempts"
    );
}

#[tokio::test(start_paused = true)]
async fn server_pushback_delays_or_forbids_the_retry() {
    let never = unavailable_with_pushback("-1");
    let server = Scripted::answering(vec![never]);
    let mut client = RetryLayer::new(policy(""), methods()).layer(server.clone().service());
    let response = send(&mut client, call("/s.S/Get", "")).await;
    assert_eq!(code(&response), Code::Unavailable);
    assert_eq!(server.attempts().len(), 1);

    let server = Scripted::answering(vec![in_trailers(Code::Unavailable, Some("300"))]);
    let mut client = RetryLayer::new(policy(""), methods()).layer(server.clone().service());
    send(&mut client, call("/s.S/Get", "")).await;
    let attempts = server.attempts();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[1].at - attempts[0].at, Duration::from_millis(300));
}

/// The server of a retry learns the time the caller has left, not the time it had at first.
#[tokio::test(start_paused = true)]
async fn each_retry_carries_the_time_left_in_grpc_timeout() {
    let pushback = unavailable_with_pushback("300");
    let server = Scripted::answering(vec![pushback]);
    let mut client = RetryLayer::new(policy(""), methods()).layer(server.clone().service());

    let request = call_with_timeout("1S");
    assert_eq!(code(&send(&mut client, request).await), Code::Ok);

    let timeouts: Vec<_> = server.attempts().iter().map(|a| a.timeout).collect();
    assert_eq!(
        timeouts,
        [
            Some(Duration::from_secs(1)),
            Some(Duration::from_millis(700))
        ],
        "the second attempt starts 300 ms (the pushback) into the call"
    );
}

#[tokio::test(start_paused = true)]
async fn no_retry_when_the_deadline_leaves_no_room() {
    let pushback = unavailable_with_pushback("100");
    let server = Scripted::answering(vec![pushback]);
    let mut client = RetryLayer::new(policy(""), methods()).layer(server.clone().service());

    let request = call_with_timeout("50m");
    let response = send(&mut client, request).await;

    assert_eq!(code(&response), Code::Unavailable);
    assert_eq!(
        server.attempts().len(),
        1,
        "a 100 ms wait does not fit in 50 ms"
    );
}

#[tokio::test(start_paused = true)]
async fn a_call_made_by_a_retried_call_is_not_retried_again() {
    let server = Scripted::always(Code::Unavailable);
    let mut client = RetryLayer::new(policy(""), methods()).layer(server.clone().service());
    let upstream_retry = CallContext {
        deadline: None,
        previous_attempts: 1,
    };
    let response = upstream_retry
        .scope(send(&mut client, call("/s.S/Get", "")))
        .await;
    assert_eq!(code(&response), Code::Unavailable);
    assert_eq!(server.attempts().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn in_a_full_outage_the_budget_caps_retries_near_twenty_percent() {
    let server = Scripted::always(Code::Unavailable);
    let policy =
        policy(r#", "retryBudget": {"retryRatio": 0.2, "minRetriesPerSecond": 1, "ttl": "10s"}"#);
    let mut client = RetryLayer::new(policy, methods()).layer(server.clone().service());

    let calls = 1000;
    for _ in 0..calls {
        send(&mut client, call("/s.S/Get", "")).await;
    }

    let attempts = server.attempts().len();
    let retries = attempts - calls;
    // Without the budget: 3 retries each, 3000. With it: 20 % of the calls plus the reserve
    // of minRetriesPerSecond × ttl.
    assert!(retries <= 200 + 10, "{retries} retries for {calls} calls");
    assert!(retries >= 150, "the budget still allows retries: {retries}");
}

#[tokio::test(start_paused = true)]
async fn streaming_responses_are_committed_once_headers_arrive() {
    let server = Scripted::answering(vec![in_trailers(Code::Unavailable, None)]);
    let mut client = RetryLayer::new(policy(""), methods()).layer(server.clone().service());
    let response = send(&mut client, call("/s.S/Watch", "")).await;
    assert_eq!(trailer_code(response).await, Code::Unavailable);
    assert_eq!(server.attempts().len(), 1);
}
