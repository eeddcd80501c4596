//! Events between the services end to end: outbox → relay → bus → notifications, on both
//! buses (Postgres, and NATS JetStream with a real nats-server), and the dead-letter path an
//! operator uses (`waybill events dead-letters` / `replay`).

// A failed unwrap is a failed test, which is what we want here.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use prost::Message;
use tonic::transport::Channel;
use uuid::Uuid;
use waybill_api::{
    events::v1 as events,
    notifications::v1::{
        self as notifications, notifications_service_client::NotificationsServiceClient,
    },
    orders::v1::{self as pb, orders_service_client::OrdersServiceClient},
};
use waybill_test_support::{
    NatsServer, TestDb, Waybill, courier, eventually, free_port, stock, waybill_bin,
};

/// Waits until the relays have moved every event out of the orders and delivery outboxes.
async fn outboxes_relayed(db: &TestDb) {
    eventually("the outboxes are relayed", || async {
        (db.count("orders.outbox").await == 0 && db.count("delivery.outbox").await == 0)
            .then_some(())
    })
    .await;
}

/// Stocks an item and a courier, places one order, and returns it.
async fn place_one(channel: Channel, customer: &str) -> pb::Order {
    stock(&channel, "SKU-1", 10).await;
    courier(&channel, "bike-1", "default", 10).await;
    OrdersServiceClient::new(channel)
        .place_order(pb::PlaceOrderRequest {
            customer_id: customer.into(),
            items: vec![pb::LineItem {
                sku: "SKU-1".into(),
                quantity: 1,
            }],
            delivery_address: "1 Main St".into(),
            zone: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap()
}

/// The kinds of a customer's notifications, once there are `count` of them, sorted.
async fn notification_kinds(channel: Channel, customer: &str, count: usize) -> Vec<i32> {
    let client = NotificationsServiceClient::new(channel);
    eventually(&format!("{count} notifications for {customer}"), || {
        let mut client = client.clone();
        async move {
            let listed = client
                .list_notifications(notifications::ListNotificationsRequest {
                    customer_id: customer.into(),
                    page_size: 0,
                    page_token: String::new(),
                })
                .await
                .ok()?
                .into_inner()
                .notifications;
            let mut kinds: Vec<i32> = listed.iter().map(|n| n.kind).collect();
            kinds.sort_unstable();
            (kinds.len() >= count).then_some(kinds)
        }
    })
    .await
}

fn expected_after_confirmation() -> Vec<i32> {
    let mut kinds = vec![
        notifications::NotificationKind::OrderConfirmed as i32,
        notifications::NotificationKind::CourierAssigned as i32,
    ];
    kinds.sort_unstable();
    kinds
}

#[tokio::test]
async fn events_flow_over_the_postgres_bus() {
    let db = TestDb::new().await;
    // The bus drops events of topics nobody has subscribed to yet, so the subscriptions exist
    // before any service runs: `waybill migrate` registers them...
    assert_eq!(
        db.count("bus.subscriptions").await,
        4,
        "the notifications subscription's four topics, registered by waybill migrate"
    );
    // ...and a consumer registers its own again before its process listens (for a database
    // migrated without them).
    db.primary()
        .await
        .batch_execute("DELETE FROM bus.subscriptions")
        .await
        .unwrap();
    let server = Waybill::serve(&db, &[]);
    assert_eq!(
        db.count("bus.subscriptions").await,
        4,
        "registered before the server listened"
    );
    let order = place_one(server.channel().await, "c-pg").await;
    assert_eq!(order.status(), pb::OrderStatus::Confirmed);
    assert_eq!(
        notification_kinds(server.channel().await, "c-pg", 2).await,
        expected_after_confirmation()
    );
    // Relayed: nothing left in the outboxes.
    outboxes_relayed(&db).await;
}

/// The inbox is the consumer's memory of handled events; past the bus's inbox retention
/// (`--inbox-retention`) its rows are purged, and the notifications they guarded stay.
#[tokio::test]
async fn inbox_rows_past_retention_are_purged() {
    let db = TestDb::new().await;
    let server = Waybill::serve(&db, &["--inbox-retention", "1s"]);
    place_one(server.channel().await, "c-purge").await;
    assert_eq!(
        notification_kinds(server.channel().await, "c-purge", 2).await,
        expected_after_confirmation()
    );
    eventually("the inbox is purged", || async {
        (db.count("notifications.inbox").await == 0).then_some(())
    })
    .await;
    assert_eq!(db.count("notifications.notifications").await, 2);
    assert!(server.log().contains("purged inbox rows past retention"));
}

#[tokio::test]
async fn events_flow_over_nats_jetstream() {
    let nats = NatsServer::start().await;
    let db = TestDb::new().await;
    let server = Waybill::serve(&db, &["--event-bus", "nats", "--nats-url", &nats.url]);
    let order = place_one(server.channel().await, "c-nats").await;
    assert_eq!(order.status(), pb::OrderStatus::Confirmed);
    assert_eq!(
        notification_kinds(server.channel().await, "c-nats", 2).await,
        expected_after_confirmation()
    );
    // Nothing took the Postgres bus's path.
    assert_eq!(db.count("bus.messages").await, 0);
}

/// NATS down when the services start (not up yet, or restarting, as in a cluster where pods
/// start in any order): they start anyway and take orders, whose events wait in the outboxes.
/// Once NATS is up, the platform's subscriptions are registered before the first publish:
/// the notifications process, started only after everything was published, still gets the
/// events (JetStream drops a message no consumer exists for). The command pipeline's
/// JetStream queue starts without NATS too.
#[tokio::test]
async fn services_start_without_nats_and_deliver_once_it_is_up() {
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let bus = ["--event-bus", "nats", "--nats-url", &url];
    let db = TestDb::new().await;
    let started = std::time::Instant::now();
    let publishers = Waybill::serve(
        &db,
        &[
            &["--services", "orders,inventory,delivery,commands"][..],
            &["--command-queue", "nats"][..],
            &bus[..],
        ]
        .concat(),
    );
    let order = place_one(publishers.channel().await, "c-nats-later").await;
    assert_eq!(order.status(), pb::OrderStatus::Confirmed);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "starting without NATS took {:?}",
        started.elapsed()
    );
    // Nothing can be relayed yet: the events wait in the outbox.
    assert!(db.count("orders.outbox").await > 0);

    let _nats = NatsServer::start_on(port).await;
    outboxes_relayed(&db).await;
    let consumer = Waybill::serve(
        &db,
        &[&["--services", "notifications"][..], &bus[..]].concat(),
    );
    assert_eq!(
        notification_kinds(consumer.channel().await, "c-nats-later", 2).await,
        expected_after_confirmation()
    );
    assert_eq!(db.count("bus.messages").await, 0);
}

/// In a deployment the notifications consumer may start after orders and delivery have
/// published (one Deployment per service), and JetStream keeps a message only for consumers
/// that exist when it is published. A process that relays an outbox therefore registers the
/// platform's subscriptions first: events published before any notifications process ever ran
/// are delivered once it starts, several to a transaction.
#[tokio::test]
async fn nats_events_published_before_their_consumer_first_ran_are_delivered() {
    let nats = NatsServer::start().await;
    let db = TestDb::new().await;
    let bus = ["--event-bus", "nats", "--nats-url", &nats.url];
    let publishers = Waybill::serve(
        &db,
        &[&["--services", "orders,inventory,delivery"][..], &bus[..]].concat(),
    );
    const ORDERS: usize = 3;
    for n in 0..ORDERS {
        let order = place_one(publishers.channel().await, &format!("c-late-{n}")).await;
        assert_eq!(order.status(), pb::OrderStatus::Confirmed);
    }
    outboxes_relayed(&db).await;
    let consumer = Waybill::serve(
        &db,
        &[&["--services", "notifications"][..], &bus[..]].concat(),
    );
    for n in 0..ORDERS {
        assert_eq!(
            notification_kinds(consumer.channel().await, &format!("c-late-{n}"), 2).await,
            expected_after_confirmation()
        );
    }
    // Waiting in the stream together, they were handled in shared transactions (a batch
    // per pull), not one commit each.
    let row = db
        .primary()
        .await
        .query_one(
            "SELECT count(DISTINCT xmin::text), count(*) FROM notifications.inbox",
            &[],
        )
        .await
        .unwrap();
    let (transactions, events): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(events, 2 * ORDERS as i64);
    assert!(
        transactions < events,
        "{events} events handled in {transactions} transactions"
    );
}

fn waybill_events(db: &TestDb, args: &[&str]) -> String {
    let output = Command::new(waybill_bin())
        .arg("events")
        .args(["--primary-url", &db.primary_url])
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "waybill events {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// An event whose payload does not decode is dead-lettered at once (retrying cannot help);
/// an operator sees it, repairs it, and replays it, and it is handled once.
#[tokio::test]
async fn a_poisoned_event_is_dead_lettered_and_replays() {
    let db = TestDb::new().await;
    let server = Waybill::serve(&db, &[]);
    // Make sure the notifications subscription exists before the event is published.
    server.wait_for_log("consumer").await;

    let event_id = Uuid::now_v7();
    let primary = db.primary().await;
    primary.batch_execute("BEGIN").await.unwrap();
    primary
        .execute(
            "INSERT INTO orders.outbox (id, topic, key, payload) VALUES ($1, 'orders.order_cancelled', 'k', $2)",
            &[&event_id, &vec![0xffu8, 0xff, 0xff]],
        )
        .await
        .unwrap();
    primary
        .batch_execute("SELECT pg_notify('waybill_outbox_orders', ''); COMMIT")
        .await
        .unwrap();

    let listed = eventually("the poisoned event is dead-lettered", || async {
        let listed = waybill_events(&db, &["dead-letters", "--subscription", "notifications"]);
        listed.contains(&event_id.to_string()).then_some(listed)
    })
    .await;
    assert!(listed.contains("does not decode"), "{listed}");
    assert_eq!(db.count("notifications.notifications").await, 0);

    // The repair: the payload the producer meant to send.
    let order_id = Uuid::now_v7();
    let repaired = events::OrderCancelled {
        order_id: order_id.to_string(),
        customer_id: "c-poison".into(),
        reason: "repaired".into(),
    }
    .encode_to_vec();
    let updated = primary
        .execute(
            "UPDATE bus.dead_letters SET payload = $2 WHERE event_id = $1",
            &[&event_id, &repaired],
        )
        .await
        .unwrap();
    assert_eq!(updated, 1);
    waybill_events(
        &db,
        &[
            "replay",
            "--subscription",
            "notifications",
            &event_id.to_string(),
        ],
    );

    let kinds = notification_kinds(server.channel().await, "c-poison", 1).await;
    assert_eq!(
        kinds,
        [notifications::NotificationKind::OrderCancelled as i32]
    );
    assert!(
        waybill_events(&db, &["dead-letters"]).is_empty(),
        "replayed dead letters are gone"
    );
}
