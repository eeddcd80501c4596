//! The outbox, relay, NATS JetStream bus, inbox and dead letters against a real Postgres and
//! a real nats-server of the test's own.

// A failed unwrap is a failed test, which is what we want here.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use common::{Fixture, Recorder, Running, TOPIC, event, init_logs, run_consumer, run_relay};
use waybill_events::{Bus, BusConfig, BusKind, Consumer, Relay, Subscription, dead_letters};
use waybill_test_support::{NatsServer, eventually};

async fn nats_bus(fx: &Fixture, nats: &NatsServer) -> Bus {
    let config = BusConfig {
        event_bus: BusKind::Nats,
        nats_url: Some(nats.url.clone()),
        inbox_retention: waybill_events::DEFAULT_INBOX_RETENTION,
    };
    let bus = config.connect(fx.db.clone()).await.unwrap();
    assert_eq!(bus.kind(), BusKind::Nats);
    bus
}

async fn stream(nats: &NatsServer) -> jetstream::stream::Stream {
    let client = async_nats::connect(&nats.url).await.unwrap();
    jetstream::new(client).get_stream("WAYBILL").await.unwrap()
}

/// Waits until `name`'s durable consumer exists (events before that are not delivered to it).
async fn registered(stream: &jetstream::stream::Stream, name: &str) {
    eventually(&format!("consumer {name} created"), || async {
        stream.consumer_info(name).await.ok().map(|_| ())
    })
    .await;
}

/// Waits until every consumer has acked everything (interest retention then empties the
/// stream).
async fn drained(fx: &Fixture, stream: &jetstream::stream::Stream) {
    eventually("outbox and stream drained", || async {
        let messages = stream.get_info().await.unwrap().state.messages;
        (fx.count("app.outbox").await == 0 && messages == 0).then_some(())
    })
    .await;
}

/// A test's own nats-server and database, and a consumer of subscription `sub` handling with
/// `recorder`, registered.
struct Consuming {
    // Fields drop in this order: the consumer stops first, the server last.
    _consumer: Running,
    fx: Fixture,
    bus: Bus,
    stream: jetstream::stream::Stream,
    _nats: NatsServer,
}

async fn consuming(recorder: &Recorder, sub: Subscription) -> Consuming {
    init_logs();
    let nats = NatsServer::start().await;
    let fx = Fixture::new().await;
    let bus = nats_bus(&fx, &nats).await;
    let stream = stream(&nats).await;
    let name = sub.name().to_owned();
    let consumer = run_consumer(
        Consumer::new(fx.db.clone(), bus.clone(), "app", sub, recorder.clone()).unwrap(),
    );
    registered(&stream, &name).await;
    Consuming {
        _consumer: consumer,
        fx,
        bus,
        stream,
        _nats: nats,
    }
}

#[tokio::test]
async fn a_committed_event_reaches_the_consumer_once_over_nats() {
    init_logs();
    let nats = NatsServer::start().await;
    let fx = Fixture::new().await;
    let bus = nats_bus(&fx, &nats).await;
    let stream = stream(&nats).await;
    let _relay = run_relay(Relay::new(fx.db.clone(), "app", bus.clone()).unwrap());
    let (a, b) = (Recorder::new("a"), Recorder::new("b"));
    let sub = |name| Subscription::new(name, [TOPIC]).unwrap();
    let _a = run_consumer(
        Consumer::new(fx.db.clone(), bus.clone(), "app", sub("a"), a.clone()).unwrap(),
    );
    let _b = run_consumer(
        Consumer::new(fx.db.clone(), bus.clone(), "app", sub("b"), b.clone()).unwrap(),
    );
    registered(&stream, "a").await;
    registered(&stream, "b").await;

    fx.emit(&event("o-rolled-back"), false).await;
    let committed = event("o-1");
    fx.emit(&committed, true).await;
    eventually("both handled", || async {
        (a.calls() == 1 && b.calls() == 1).then_some(())
    })
    .await;
    drained(&fx, &stream).await;
    assert_eq!(
        a.seen(),
        vec![committed.clone()],
        "the envelope arrives intact"
    );
    assert_eq!(b.seen(), vec![committed.clone()]);

    // A relay that crashed after publishing but before deleting its rows publishes them
    // again: the stream drops the copy (same Nats-Msg-Id).
    fx.emit(&committed, true).await;
    eventually("the outbox drained", || async {
        (fx.count("app.outbox").await == 0).then_some(())
    })
    .await;

    // Past the duplicate window the copy gets through; the inbox absorbs it.
    let client = async_nats::connect(&nats.url).await.unwrap();
    let ack = jetstream::new(client)
        .send_publish(
            format!("waybill.{TOPIC}"),
            PublishMessage::build()
                .payload(committed.payload.clone().into())
                .message_id(format!("{}-late", committed.id))
                .header("Waybill-Event-Id", committed.id.to_string())
                .header("Waybill-Key", committed.key.as_str()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(!ack.duplicate);
    drained(&fx, &stream).await;
    assert_eq!(a.calls(), 1, "no second run: {:?}", a.seen());
    assert_eq!(b.calls(), 1);
    assert_eq!(fx.effects("a").await, vec![committed.id]);
    assert_eq!(fx.effects("b").await, vec![committed.id]);
}

#[tokio::test]
async fn a_failing_event_is_dead_lettered_and_replayed_once_over_nats() {
    init_logs();
    let nats = NatsServer::start().await;
    let fx = Fixture::new().await;
    let bus = nats_bus(&fx, &nats).await;
    let stream = stream(&nats).await;
    let _relay = run_relay(Relay::new(fx.db.clone(), "app", bus.clone()).unwrap());
    let (a, b) = (Recorder::new("a"), Recorder::new("b"));
    a.fail(true, false);
    let sub = |name| {
        Subscription::new(name, [TOPIC])
            .unwrap()
            .with_max_attempts(3)
            .with_backoff(Duration::from_millis(20), Duration::from_millis(100))
    };
    let _a = run_consumer(
        Consumer::new(fx.db.clone(), bus.clone(), "app", sub("a"), a.clone()).unwrap(),
    );
    let _b = run_consumer(
        Consumer::new(fx.db.clone(), bus.clone(), "app", sub("b"), b.clone()).unwrap(),
    );
    registered(&stream, "a").await;
    registered(&stream, "b").await;

    let doomed = event("o-doomed");
    fx.emit(&doomed, true).await;
    let dead = eventually("dead-lettered", || async {
        let dead = dead_letters::list(&fx.db, Some("a")).await.unwrap();
        (!dead.is_empty()).then_some(dead)
    })
    .await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].event_id, doomed.id);
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(dead[0].last_error, "boom on o-doomed");
    assert_eq!(a.calls(), 3);
    drained(&fx, &stream).await;
    assert_eq!(b.calls(), 1, "the other subscription is unaffected");

    a.fail(false, false);
    dead_letters::replay(&fx.db, &bus, "a", doomed.id)
        .await
        .unwrap();
    eventually("the replay is handled", || async {
        (fx.effects("a").await == vec![doomed.id]).then_some(())
    })
    .await;
    drained(&fx, &stream).await;
    assert_eq!(a.calls(), 4, "handled once after the replay");
    assert_eq!(a.seen()[3], doomed);
    assert_eq!(b.calls(), 1, "a replay is for its subscription only");
    assert!(dead_letters::list(&fx.db, None).await.unwrap().is_empty());
}

/// A handler that catches a database error and reports success leaves its transaction
/// aborted, and COMMIT then rolls back without an error. The consumer must not take that for
/// success: on NATS nothing else would notice, and the event would be acked with nothing
/// stored. It is retried and dead-lettered instead; the events beside it are handled once.
#[tokio::test]
async fn a_handler_that_swallows_a_failed_statement_does_not_lose_its_event() {
    let a = Recorder::new("a");
    a.swallow("o-swallowed");
    let sub = Subscription::new("a", [TOPIC])
        .unwrap()
        .with_max_attempts(3)
        .with_backoff(Duration::from_millis(20), Duration::from_millis(100));
    let setup = consuming(&a, sub).await;
    let (fx, bus, stream) = (&setup.fx, &setup.bus, &setup.stream);

    // In one transaction, so that they are relayed, pulled and handled as one batch.
    let events = [event("o-before"), event("o-swallowed"), event("o-after")];
    fx.emit_all(&events).await;
    let _relay = run_relay(Relay::new(fx.db.clone(), "app", bus.clone()).unwrap());
    let dead = eventually("the swallowed event is dead-lettered", || async {
        let dead = dead_letters::list(&fx.db, Some("a")).await.unwrap();
        (!dead.is_empty()).then_some(dead)
    })
    .await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].event_id, events[1].id);
    assert!(
        dead[0].last_error.contains("transaction had failed"),
        "{}",
        dead[0].last_error
    );
    drained(fx, stream).await;
    let mut handled = fx.effects("a").await;
    handled.sort();
    let mut expected = vec![events[0].id, events[2].id];
    expected.sort();
    assert_eq!(handled, expected, "the others are handled, once each");
}

/// Events that wait behind slow handlers keep their ack wait: none is delivered again while
/// it waits its turn in this consumer (a redelivery counts as an attempt, and enough of them
/// would dead-letter an event that never failed).
#[tokio::test]
async fn events_waiting_behind_slow_handlers_are_not_delivered_again() {
    let a = Recorder::new("a");
    // Five events of 400 ms each: 2 s of handling, twice the ack wait.
    a.slow(Duration::from_millis(400));
    let sub = Subscription::new("a", [TOPIC])
        .unwrap()
        .with_ack_wait(Duration::from_secs(1))
        .with_max_attempts(2);
    let setup = consuming(&a, sub).await;
    let (fx, bus, stream) = (&setup.fx, &setup.bus, &setup.stream);
    // Idle for longer than a pull's heartbeat would be: the first message after a quiet
    // spell is read at once (async-nats drops the wake-up after a heartbeat).
    tokio::time::sleep(Duration::from_secs(6)).await;

    let events: Vec<_> = (0..5).map(|n| event(&format!("o-slow-{n}"))).collect();
    fx.emit_all(&events).await;
    let _relay = run_relay(Relay::new(fx.db.clone(), "app", bus.clone()).unwrap());
    let mut handled = eventually("every event is handled", || async {
        let handled = fx.effects("a").await;
        (handled.len() == events.len()).then_some(handled)
    })
    .await;
    drained(fx, stream).await;
    handled.sort();
    let mut expected: Vec<_> = events.iter().map(|e| e.id).collect();
    expected.sort();
    assert_eq!(handled, expected);
    let info = stream.consumer_info("a").await.unwrap();
    assert_eq!(info.num_redelivered, 0, "{info:?}");
    assert_eq!(a.calls(), 5);
    assert!(
        dead_letters::list(&fx.db, Some("a"))
            .await
            .unwrap()
            .is_empty()
    );
}
