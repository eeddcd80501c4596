//! The outbox, relay, Postgres bus, inbox and dead letters against a real Postgres.

// A failed unwrap is a failed test, which is what we want here.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Fixture, Recorder, TOPIC, event, init_logs, run_consumer, run_relay};
use waybill_api::events::v1::OrderConfirmed;
use waybill_events::{Bus, BusError, Consumer, Event, Relay, Subscription, dead_letters};
use waybill_test_support::eventually;

fn subscription(name: &str) -> Subscription {
    Subscription::new(name, [TOPIC]).unwrap()
}

/// Waits until `name` has registered (events before that are not delivered to it).
async fn registered(fx: &Fixture, name: &str) {
    let filter = format!("bus.subscriptions WHERE name = '{name}'");
    eventually(&format!("subscription {name} registered"), || async {
        (fx.count(&filter).await > 0).then_some(())
    })
    .await;
}

/// Runs a consumer of subscription `name` (on [`TOPIC`], inbox in `app`) handing events to
/// `recorder`.
fn consume(fx: &Fixture, bus: &Bus, name: &str, recorder: &Recorder) -> common::Running {
    run_consumer(
        Consumer::new(
            fx.db.clone(),
            bus.clone(),
            "app",
            subscription(name),
            recorder.clone(),
        )
        .unwrap(),
    )
}

/// Waits until `subscription` has dead letters, and returns them.
async fn dead_lettered(fx: &Fixture, subscription: &str) -> Vec<dead_letters::DeadLetter> {
    eventually(&format!("{subscription} has dead letters"), || async {
        let dead = dead_letters::list(&fx.db, Some(subscription))
            .await
            .unwrap();
        (!dead.is_empty()).then_some(dead)
    })
    .await
}

/// Waits until the bus holds nothing for anyone: every delivery settled, every message gone.
async fn drained(fx: &Fixture) {
    eventually("the bus drained", || async {
        let left = fx.count("app.outbox").await
            + fx.count("bus.deliveries").await
            + fx.count("bus.messages").await;
        (left == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_committed_event_reaches_each_subscription_once_and_a_rolled_back_one_never() {
    init_logs();
    let fx = Fixture::new().await;
    let bus = Bus::postgres(fx.db.clone());
    let _relay = run_relay(Relay::new(fx.db.clone(), "app", bus.clone()).unwrap());
    let (a, b) = (Recorder::new("a"), Recorder::new("b"));
    let _a = consume(&fx, &bus, "a", &a);
    let _b = consume(&fx, &bus, "b", &b);
    registered(&fx, "a").await;
    registered(&fx, "b").await;

    let rolled_back = event("o-rolled-back");
    fx.emit(&rolled_back, false).await;
    let confirmed = OrderConfirmed {
        order_id: "o-1".into(),
        customer_id: "c-1".into(),
        courier_id: "k-1".into(),
    };
    let committed = Event::new(TOPIC, "o-1", &confirmed);
    fx.emit(&committed, true).await;

    eventually("both subscriptions handled the event", || async {
        (a.calls() >= 1 && b.calls() >= 1).then_some(())
    })
    .await;
    drained(&fx).await;
    for recorder in [&a, &b] {
        let seen = recorder.seen();
        assert_eq!(seen.len(), 1, "exactly once: {seen:?}");
        assert_eq!(seen[0], committed, "the envelope arrives intact");
        assert_eq!(seen[0].decode::<OrderConfirmed>().unwrap(), confirmed);
    }
    assert_eq!(fx.effects("a").await, vec![committed.id]);
    assert_eq!(fx.effects("b").await, vec![committed.id]);
    assert_eq!(fx.count("app.inbox").await, 2);
}

#[tokio::test]
async fn a_redelivery_after_a_restart_does_not_run_the_handler_again() {
    init_logs();
    let fx = Fixture::new().await;
    let bus = Bus::postgres(fx.db.clone());
    let _relay = run_relay(Relay::new(fx.db.clone(), "app", bus.clone()).unwrap());
    let recorder = Recorder::new("a");
    let start = || {
        run_consumer(
            Consumer::new(
                fx.db.clone(),
                bus.clone(),
                "app",
                subscription("a"),
                recorder.clone(),
            )
            .unwrap(),
        )
    };
    let consumer = start();
    registered(&fx, "a").await;
    let first = event("o-1");
    fx.emit(&first, true).await;
    eventually("handled", || async {
        (recorder.calls() == 1).then_some(())
    })
    .await;
    drained(&fx).await;
    consumer.stop().await;

    // The crash between commit and ack: the handler's transaction committed (inbox row and
    // all) but the delivery was never deleted, so the bus delivers it again.
    let client = waybill_test_support::connect(&fx.url).await;
    client
        .execute(
            "WITH m AS (
                 INSERT INTO bus.messages (event_id, topic, key, payload, created_at)
                 VALUES ($1, $2, $3, $4, $5) RETURNING seq
             )
             INSERT INTO bus.deliveries (subscription, seq) SELECT 'a', seq FROM m",
            &[
                &first.id,
                &first.topic,
                &first.key,
                &first.payload,
                &first.created_at,
            ],
        )
        .await
        .unwrap();

    let _consumer = start();
    drained(&fx).await;
    assert_eq!(recorder.calls(), 1, "the inbox absorbed the redelivery");

    let second = event("o-2");
    fx.emit(&second, true).await;
    eventually("the restarted consumer handles new events", || async {
        (recorder.calls() == 2).then_some(())
    })
    .await;
    // The handler has run; its transaction (effects, inbox row, settled delivery) commits
    // just after.
    drained(&fx).await;
    assert_eq!(fx.effects("a").await, vec![first.id, second.id]);
}

#[tokio::test]
async fn a_failing_event_is_dead_lettered_listed_and_replayed_once() {
    init_logs();
    let fx = Fixture::new().await;
    let bus = Bus::postgres(fx.db.clone());
    let _relay = run_relay(Relay::new(fx.db.clone(), "app", bus.clone()).unwrap());
    let recorder = Recorder::new("a");
    recorder.fail(true, false);
    let sub = subscription("a")
        .with_max_attempts(3)
        .with_backoff(Duration::from_millis(20), Duration::from_millis(100));
    let _consumer = run_consumer(
        Consumer::new(fx.db.clone(), bus.clone(), "app", sub, recorder.clone()).unwrap(),
    );
    registered(&fx, "a").await;
    let doomed = event("o-doomed");
    fx.emit(&doomed, true).await;

    let dead = dead_lettered(&fx, "a").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].event_id, doomed.id);
    assert_eq!(dead[0].subscription, "a");
    assert_eq!(dead[0].topic, TOPIC);
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(dead[0].last_error, "boom on o-doomed");
    assert_eq!(recorder.calls(), 3);
    assert_eq!(dead_letters::list(&fx.db, None).await.unwrap(), dead);
    assert!(
        dead_letters::list(&fx.db, Some("b"))
            .await
            .unwrap()
            .is_empty()
    );
    drained(&fx).await;
    assert!(
        fx.effects("a").await.is_empty(),
        "failed attempts rolled back"
    );

    recorder.fail(false, false);
    dead_letters::replay(&fx.db, &bus, "a", doomed.id)
        .await
        .unwrap();
    eventually("the replay is handled", || async {
        (fx.effects("a").await == vec![doomed.id]).then_some(())
    })
    .await;
    drained(&fx).await;
    assert_eq!(recorder.calls(), 4, "handled once after the replay");
    assert_eq!(recorder.seen()[3], doomed);
    assert!(dead_letters::list(&fx.db, None).await.unwrap().is_empty());

    let again = dead_letters::replay(&fx.db, &bus, "a", doomed.id).await;
    assert!(matches!(again, Err(BusError::NotFound { .. })), "{again:?}");
}

#[tokio::test]
async fn a_permanent_failure_is_dead_lettered_at_once() {
    init_logs();
    let fx = Fixture::new().await;
    let bus = Bus::postgres(fx.db.clone());
    let _relay = run_relay(Relay::new(fx.db.clone(), "app", bus.clone()).unwrap());
    let recorder = Recorder::new("a");
    recorder.fail(true, true);
    let _consumer = consume(&fx, &bus, "a", &recorder);
    registered(&fx, "a").await;
    let bad = event("o-bad");
    fx.emit(&bad, true).await;
    let dead = dead_lettered(&fx, "a").await;
    assert_eq!(dead[0].event_id, bad.id);
    assert_eq!(dead[0].attempts, 1);
    assert_eq!(recorder.calls(), 1);
}

#[tokio::test]
async fn a_poisoned_event_in_a_batch_is_dead_lettered_and_the_rest_are_handled_once() {
    init_logs();
    let fx = Fixture::new().await;
    let bus = Bus::postgres(fx.db.clone());
    let recorder = Recorder::new("a");
    recorder.poison("o-3");
    let _consumer = consume(&fx, &bus, "a", &recorder);
    registered(&fx, "a").await;
    // Committed together and moved by one relay pass, so the consumer claims them as one
    // batch and handles it in one transaction, the poisoned event's handler under a savepoint
    // of its own.
    let events: Vec<Event> = (1..=6).map(|n| event(&format!("o-{n}"))).collect();
    fx.emit_all(&events).await;
    let _relay = run_relay(Relay::new(fx.db.clone(), "app", bus.clone()).unwrap());

    let dead = dead_lettered(&fx, "a").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].event_id, events[2].id);
    assert_eq!(dead[0].last_error, "poisoned o-3");
    drained(&fx).await;
    let mut effects = fx.effects("a").await;
    effects.sort();
    let mut expected: Vec<_> = events
        .iter()
        .filter(|event| event.key != "o-3")
        .map(|event| event.id)
        .collect();
    expected.sort();
    assert_eq!(effects, expected, "every other event handled exactly once");
    assert_eq!(
        recorder.calls(),
        6,
        "each handler ran once: the failed one was rolled back alone, not the batch"
    );
}

#[tokio::test]
async fn the_relay_and_consumer_wake_on_notify_not_on_their_sweeps() {
    init_logs();
    let fx = Fixture::new().await;
    let bus = Bus::postgres(fx.db.clone());
    let _relay = run_relay(
        Relay::new(fx.db.clone(), "app", bus.clone())
            .unwrap()
            .with_sweep_interval(Duration::from_secs(60)),
    );
    let recorder = Recorder::new("a");
    let _consumer = consume(&fx, &bus, "a", &recorder);
    registered(&fx, "a").await;
    // A first event proves everything is up (it may ride on the startup sweep).
    fx.emit(&event("o-warm-up"), true).await;
    eventually("warm-up handled", || async {
        (recorder.calls() == 1).then_some(())
    })
    .await;
    drained(&fx).await;

    for n in 0..3 {
        let started = Instant::now();
        fx.emit(&event(&format!("o-{n}")), true).await;
        eventually("handled", || async {
            (recorder.calls() == 2 + n).then_some(())
        })
        .await;
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "event {n} took {took:?}: not woken by NOTIFY"
        );
    }
}

#[tokio::test]
async fn two_relays_deliver_everything_once_in_outbox_order() {
    init_logs();
    let fx = Fixture::new().await;
    let bus = Bus::postgres(fx.db.clone());
    let relays: Vec<_> = (0..2)
        .map(|_| {
            run_relay(
                Relay::new(fx.db.clone(), "app", bus.clone())
                    .unwrap()
                    .with_batch_size(7),
            )
        })
        .collect();
    let recorder = Recorder::new("a");
    let _consumer = consume(&fx, &bus, "a", &recorder);
    registered(&fx, "a").await;

    let mut sent = Vec::new();
    for n in 0..60 {
        let event = event(&format!("o-{n}"));
        sent.push(event.id);
        fx.emit(&event, true).await;
    }
    eventually("all handled", || async {
        (recorder.calls() == 60).then_some(())
    })
    .await;
    drained(&fx).await;
    let received: Vec<_> = recorder.seen().iter().map(|event| event.id).collect();
    assert_eq!(received, sent);
    for relay in relays {
        relay.stop().await;
    }
}

#[tokio::test]
async fn a_dropped_listen_connection_is_reopened_and_catches_up() {
    init_logs();
    let fx = Fixture::new().await;
    let bus = Bus::postgres(fx.db.clone());
    let _relay = run_relay(
        Relay::new(fx.db.clone(), "app", bus.clone())
            .unwrap()
            .with_sweep_interval(Duration::from_secs(60)),
    );
    let recorder = Recorder::new("a");
    let _consumer = consume(&fx, &bus, "a", &recorder);
    registered(&fx, "a").await;
    fx.emit(&event("o-warm-up"), true).await;
    eventually("warm-up handled", || async {
        (recorder.calls() == 1).then_some(())
    })
    .await;

    // Cut every LISTEN connection to this database (the relay's and the consumer's), then
    // emit while they are down: the notification is lost, the reconnection catches up.
    let admin = waybill_test_support::connect(&fx.url).await;
    let listening = "FROM pg_stat_activity
                     WHERE datname = current_database() AND query LIKE 'LISTEN%'";
    eventually("the relay and the consumer listen", || async {
        let n: i64 = admin
            .query_one(&format!("SELECT count(*) {listening}"), &[])
            .await
            .unwrap()
            .get(0);
        (n == 2).then_some(())
    })
    .await;
    admin
        .execute(
            &format!("SELECT pg_terminate_backend(pid) {listening}"),
            &[],
        )
        .await
        .unwrap();
    let started = Instant::now();
    fx.emit(&event("o-after-cut"), true).await;
    eventually("handled after the cut", || async {
        (recorder.calls() == 2).then_some(())
    })
    .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "took {took:?}: not caught up on reconnection"
    );
}
