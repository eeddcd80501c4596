//! PlaceOrder's saga end to end: real `waybill serve` processes running orders, inventory and
//! delivery, a real primary and replica. Each test checks what the database ends up holding,
//! not only what the call answered: no stock left reserved, no courier left busy.

// A failed unwrap is a failed test, which is what we want here.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tonic::{Request, transport::Channel};
use waybill_api::{
    delivery::v1::{self as delivery, delivery_service_client::DeliveryServiceClient},
    notifications::v1::{
        self as notifications, notifications_service_client::NotificationsServiceClient,
    },
    orders::v1::{self as pb, orders_service_client::OrdersServiceClient},
};
use waybill_test_support::{ServeOptions, TestDb, Waybill, eventually};

struct Clients {
    channel: Channel,
    orders: OrdersServiceClient<Channel>,
    delivery: DeliveryServiceClient<Channel>,
    notifications: NotificationsServiceClient<Channel>,
}

async fn clients(server: &Waybill) -> Clients {
    let channel = server.channel().await;
    Clients {
        channel: channel.clone(),
        orders: OrdersServiceClient::new(channel.clone()),
        delivery: DeliveryServiceClient::new(channel.clone()),
        notifications: NotificationsServiceClient::new(channel),
    }
}

impl Clients {
    async fn stock(&mut self, sku: &str, on_hand: i32) {
        waybill_test_support::stock(&self.channel, sku, on_hand).await;
    }

    async fn courier(&mut self, id: &str, zone: &str, capacity: i32) {
        waybill_test_support::courier(&self.channel, id, zone, capacity).await;
    }

    async fn place(&mut self, customer: &str, sku: &str, quantity: i32) -> pb::Order {
        self.place_with_token(customer, sku, quantity).await.0
    }

    /// The order and the consistency token of its placement.
    async fn place_with_token(
        &mut self,
        customer: &str,
        sku: &str,
        quantity: i32,
    ) -> (pb::Order, String) {
        let response = self
            .orders
            .place_order(place_request(customer, sku, quantity))
            .await
            .unwrap()
            .into_inner();
        (response.order.unwrap(), response.consistency_token)
    }

    /// Waits until the customer's notifications (read from a replica) are exactly `kinds`,
    /// oldest first, and returns them.
    async fn notified(
        &self,
        customer: &str,
        kinds: &[notifications::NotificationKind],
    ) -> Vec<notifications::Notification> {
        let want: Vec<i32> = kinds.iter().map(|kind| *kind as i32).collect();
        eventually(&format!("{customer} is notified of {kinds:?}"), || {
            let mut client = self.notifications.clone();
            let want = want.clone();
            async move {
                let mut listed = client
                    .list_notifications(notifications::ListNotificationsRequest {
                        customer_id: customer.into(),
                        page_size: 0,
                        page_token: String::new(),
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .notifications;
                listed.reverse();
                let got: Vec<i32> = listed.iter().map(|n| n.kind).collect();
                (got == want).then_some(listed)
            }
        })
        .await
    }

    /// An order as the primary has it (a token newer than every write so far).
    async fn order(&mut self, order_id: &str, token: &str) -> pb::Order {
        self.orders
            .get_order(pb::GetOrderRequest {
                order_id: order_id.into(),
                consistency_token: token.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .order
            .unwrap()
    }
}

fn place_request(customer: &str, sku: &str, quantity: i32) -> pb::PlaceOrderRequest {
    pb::PlaceOrderRequest {
        customer_id: customer.into(),
        items: vec![pb::LineItem {
            sku: sku.into(),
            quantity,
        }],
        delivery_address: "1 Main St".into(),
        zone: "north".into(),
    }
}

/// (on_hand, reserved) of an item, read from the primary.
async fn stock_of(db: &TestDb, sku: &str) -> (i32, i32) {
    let row = db
        .primary()
        .await
        .query_one(
            "SELECT on_hand, reserved FROM inventory.items WHERE sku = $1",
            &[&sku],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Active deliveries of a courier, read from the primary.
async fn courier_load(db: &TestDb, courier: &str) -> i32 {
    db.primary()
        .await
        .query_one(
            "SELECT active FROM delivery.couriers WHERE id = $1",
            &[&courier],
        )
        .await
        .unwrap()
        .get(0)
}

fn status(order: &pb::Order) -> pb::OrderStatus {
    pb::OrderStatus::try_from(order.status).unwrap()
}

/// A server whose every Reserve takes `delay` (an injected fault), started with `args`, with
/// 100 units of SKU-1 and a courier of capacity 10 in zone north.
async fn slow_reserve_server(db: &TestDb, delay: &str, args: &[&str]) -> (Waybill, Clients) {
    let policy = format!(
        r#"{{"methodConfig": [{{"name": [{{"service": "waybill.inventory.v1.InventoryService", "method": "Reserve"}}],
            "faults": {{"delay": {{"duration": "{delay}", "percent": 100}}}}}}]}}"#
    );
    let server = Waybill::start(
        db,
        ServeOptions {
            policy: Some(&policy),
            args,
            ..ServeOptions::default()
        },
    );
    let mut clients = clients(&server).await;
    clients.stock("SKU-1", 100).await;
    clients.courier("bike-1", "north", 10).await;
    (server, clients)
}

#[tokio::test]
async fn an_order_is_confirmed_and_delivered() {
    let db = TestDb::new().await;
    let server = Waybill::serve(&db, &[]);
    let mut clients = clients(&server).await;
    clients.stock("SKU-1", 5).await;
    clients.courier("bike-1", "north", 2).await;

    let (order, token) = clients.place_with_token("c-1", "SKU-1", 2).await;
    assert_eq!(status(&order), pb::OrderStatus::Confirmed, "{order:?}");
    assert_eq!(order.courier_id, "bike-1");
    assert_eq!(order.zone, "north");
    // Committed: the units left on_hand, nothing stays reserved.
    assert_eq!(stock_of(&db, "SKU-1").await, (3, 0));
    assert_eq!(courier_load(&db, "bike-1").await, 1);

    for next in [
        delivery::DeliveryStatus::PickedUp,
        delivery::DeliveryStatus::InTransit,
        delivery::DeliveryStatus::Delivered,
    ] {
        clients
            .delivery
            .update_status(delivery::UpdateStatusRequest {
                order_id: order.order_id.clone(),
                status: next as i32,
                location: None,
                reason: String::new(),
            })
            .await
            .unwrap();
    }
    assert_eq!(courier_load(&db, "bike-1").await, 0);
    let stored = clients.order(&order.order_id, &token).await;
    assert_eq!(status(&stored), pb::OrderStatus::Confirmed);

    // Through the outboxes, the bus and the notifications consumer. The assignment and the
    // confirmation come from two services' outboxes, so their relative order is not fixed.
    use notifications::NotificationKind as Kind;
    let notified = eventually("the customer is notified of all three", || {
        let clients = &clients;
        async move {
            let mut client = clients.notifications.clone();
            let listed = client
                .list_notifications(notifications::ListNotificationsRequest {
                    customer_id: "c-1".into(),
                    page_size: 0,
                    page_token: String::new(),
                })
                .await
                .ok()?
                .into_inner()
                .notifications;
            let mut kinds: Vec<i32> = listed.iter().map(|n| n.kind).collect();
            kinds.sort_unstable();
            let mut want = vec![
                Kind::OrderConfirmed as i32,
                Kind::CourierAssigned as i32,
                Kind::Delivered as i32,
            ];
            want.sort_unstable();
            (kinds == want).then_some(listed)
        }
    })
    .await;
    assert!(notified.iter().all(|n| n.order_id == order.order_id));
    // Delivered is last: it was caused after the other two had been published.
    assert_eq!(notified[0].kind, Kind::Delivered as i32);
}

#[tokio::test]
async fn out_of_stock_cancels_and_leaves_nothing_reserved() {
    let db = TestDb::new().await;
    let server = Waybill::serve(&db, &[]);
    let mut clients = clients(&server).await;
    clients.stock("SKU-1", 1).await;
    clients.courier("bike-1", "north", 5).await;

    let order = clients.place("c-1", "SKU-1", 2).await;
    assert_eq!(status(&order), pb::OrderStatus::Cancelled, "{order:?}");
    assert!(
        order.cancel_reason.contains("SKU-1"),
        "the reason names the item: {:?}",
        order.cancel_reason
    );
    assert_eq!(stock_of(&db, "SKU-1").await, (1, 0));
    // The forward step never reached the courier; the compensation left a tombstone only.
    assert_eq!(courier_load(&db, "bike-1").await, 0);
    let notified = clients
        .notified("c-1", &[notifications::NotificationKind::OrderCancelled])
        .await;
    assert!(notified[0].message.contains("SKU-1"), "{notified:?}");
}

#[tokio::test]
async fn no_courier_releases_the_stock() {
    let db = TestDb::new().await;
    let server = Waybill::serve(&db, &[]);
    let mut clients = clients(&server).await;
    clients.stock("SKU-1", 5).await;
    // A courier, but in another zone.
    clients.courier("bike-1", "south", 5).await;

    let order = clients.place("c-1", "SKU-1", 2).await;
    assert_eq!(status(&order), pb::OrderStatus::Cancelled, "{order:?}");
    assert!(
        order.cancel_reason.contains("north"),
        "the reason names the zone: {:?}",
        order.cancel_reason
    );
    assert_eq!(stock_of(&db, "SKU-1").await, (5, 0));
    let reservation_state: String = db
        .primary()
        .await
        .query_one(
            "SELECT state FROM inventory.reservations WHERE order_id = $1::text::uuid",
            &[&order.order_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(reservation_state, "RELEASED");
}

#[tokio::test]
async fn the_same_key_twice_places_one_order() {
    let db = TestDb::new().await;
    let server = Waybill::serve(&db, &[]);
    let mut clients = clients(&server).await;
    clients.stock("SKU-1", 5).await;
    clients.courier("bike-1", "north", 5).await;

    let mut placed = Vec::new();
    for _ in 0..2 {
        let mut request = Request::new(place_request("c-1", "SKU-1", 1));
        request
            .metadata_mut()
            .insert("idempotency-key", "order-attempt-1".parse().unwrap());
        placed.push(
            clients
                .orders
                .place_order(request)
                .await
                .unwrap()
                .into_inner()
                .order
                .unwrap(),
        );
    }
    assert_eq!(placed[0].order_id, placed[1].order_id);
    assert_eq!(db.count("orders.orders").await, 1);
    assert_eq!(stock_of(&db, "SKU-1").await, (4, 0));
}

/// A keyed PlaceOrder whose key the mesh layer has let go of (it does when the database
/// fails to confirm a commit that in fact happened, answering UNAVAILABLE, or when the key's
/// retention ends) must still not place a second order: the order keeps its key's digest.
#[tokio::test]
async fn a_repeat_the_idempotency_layer_let_through_finds_the_first_order() {
    let db = TestDb::new().await;
    let server = Waybill::serve(&db, &[]);
    let mut clients = clients(&server).await;
    clients.stock("SKU-1", 5).await;
    clients.courier("bike-1", "north", 5).await;

    let keyed = |caller: &'static str, quantity: i32| {
        let mut request = Request::new(place_request("c-1", "SKU-1", quantity));
        let metadata = request.metadata_mut();
        metadata.insert("idempotency-key", "order-attempt-1".parse().unwrap());
        metadata.insert("waybill-caller", caller.parse().unwrap());
        request
    };
    let forget_keys = || async {
        let forgotten = db
            .primary()
            .await
            .execute(
                "DELETE FROM mesh.idempotency_keys WHERE caller = 'shop' AND key = 'order-attempt-1'",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(forgotten, 1, "the first call's outcome was stored");
    };
    let mut orders = clients.orders.clone();
    let first = orders
        .place_order(keyed("shop", 1))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(status(&first), pb::OrderStatus::Confirmed);

    forget_keys().await;
    let repeat = orders.place_order(keyed("shop", 1)).await.unwrap();
    assert_eq!(
        repeat.metadata().get("waybill-mesh"),
        None,
        "the handler ran again (not a replay)"
    );
    let repeat = repeat.into_inner().order.unwrap();
    assert_eq!(repeat.order_id, first.order_id);
    assert_eq!(status(&repeat), pb::OrderStatus::Confirmed);
    assert_eq!(db.count("orders.orders").await, 1);
    assert_eq!(db.count("orders.order_items").await, 1);
    assert_eq!(db.count("orders.sagas").await, 1);
    assert_eq!(stock_of(&db, "SKU-1").await, (4, 0));

    // The same key for a different order: refused, nothing written.
    forget_keys().await;
    let reused = orders.place_order(keyed("shop", 2)).await.unwrap_err();
    assert_eq!(reused.code(), tonic::Code::InvalidArgument, "{reused:?}");
    assert_eq!(db.count("orders.orders").await, 1);

    // Keys are the caller's own: another caller's same key places another order.
    let other = orders
        .place_order(keyed("another-shop", 1))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_ne!(other.order_id, first.order_id);
    assert_eq!(db.count("orders.orders").await, 2);
    assert_eq!(stock_of(&db, "SKU-1").await, (3, 0));
}

#[tokio::test]
async fn twenty_orders_for_the_last_unit_one_wins() {
    let db = TestDb::new().await;
    let server = Waybill::serve(&db, &[]);
    let mut clients = clients(&server).await;
    clients.stock("LAST", 1).await;
    clients.courier("bike-1", "north", 100).await;

    let calls: Vec<_> = (0..20)
        .map(|n| {
            let mut orders = clients.orders.clone();
            tokio::spawn(async move {
                orders
                    .place_order(place_request(&format!("c-{n}"), "LAST", 1))
                    .await
                    .unwrap()
                    .into_inner()
                    .order
                    .unwrap()
            })
        })
        .collect();
    let mut orders = Vec::new();
    for call in calls {
        orders.push(call.await.unwrap());
    }
    let confirmed = orders
        .iter()
        .filter(|o| status(o) == pb::OrderStatus::Confirmed)
        .count();
    let cancelled = orders
        .iter()
        .filter(|o| status(o) == pb::OrderStatus::Cancelled)
        .count();
    assert_eq!((confirmed, cancelled), (1, 19), "{orders:#?}");
    assert_eq!(stock_of(&db, "LAST").await, (0, 0));
    assert_eq!(courier_load(&db, "bike-1").await, 1);
}

/// An orchestrator killed (SIGKILL) after reserving the stock, while its courier assignment
/// hangs, leaves a saga whose lease runs out; a second process resumes it to the end.
#[tokio::test]
async fn a_saga_killed_midway_completes_after_restart() {
    let db = TestDb::new().await;
    // The first process's AssignCourier hangs, so its saga is stuck between reserve and
    // assign when it is killed.
    let mut first = Waybill::start(
        &db,
        ServeOptions {
            policy: Some(
                r#"{"methodConfig": [{"name": [{"service": "waybill.delivery.v1.DeliveryService", "method": "AssignCourier"}],
                    "faults": {"delay": {"duration": "60s", "percent": 100}}}]}"#,
            ),
            args: &["--saga-lease", "2s", "--saga-step-timeout", "30s"],
            ..ServeOptions::default()
        },
    );
    let mut first_clients = clients(&first).await;
    first_clients.stock("SKU-1", 5).await;
    first_clients.courier("bike-1", "north", 5).await;

    let mut orders = first_clients.orders.clone();
    let placing = tokio::spawn(async move {
        let mut request = Request::new(place_request("c-1", "SKU-1", 2));
        request.set_timeout(Duration::from_secs(20));
        orders.place_order(request).await
    });
    // Reserved, and stuck in the assignment.
    eventually("the stock is reserved", || async {
        (stock_of(&db, "SKU-1").await == (5, 2)).then_some(())
    })
    .await;
    first.kill();
    assert!(placing.await.unwrap().is_err(), "the caller saw the crash");
    let order_id: String = db
        .primary()
        .await
        .query_one("SELECT id::text FROM orders.orders", &[])
        .await
        .unwrap()
        .get(0);

    let second = Waybill::serve(&db, &["--saga-poll", "100ms"]);
    let orders = clients(&second).await.orders;
    let order = eventually("the saga resumes and confirms the order", || {
        let mut clients_orders = orders.clone();
        let order_id = order_id.clone();
        async move {
            let order = clients_orders
                .get_order(pb::GetOrderRequest {
                    order_id,
                    consistency_token: String::new(),
                })
                .await
                .ok()?
                .into_inner()
                .order?;
            (order.status == pb::OrderStatus::Confirmed as i32).then_some(order)
        }
    })
    .await;
    assert_eq!(order.courier_id, "bike-1");
    assert_eq!(stock_of(&db, "SKU-1").await, (3, 0));
    assert_eq!(courier_load(&db, "bike-1").await, 1);
}

/// PlaceOrder runs at most `--saga-max-placing` sagas at once. Past that, a call is refused at
/// once with RESOURCE_EXHAUSTED and writes nothing, while the admitted orders complete; a slot
/// is free again once its saga ends.
#[tokio::test]
async fn orders_past_the_admission_bound_are_refused_at_once_and_write_nothing() {
    let db = TestDb::new().await;
    // Every Reserve takes 1.5 s, so two orders hold both slots while the others arrive.
    let (_server, mut clients) = slow_reserve_server(
        &db,
        "1500ms",
        &["--saga-max-placing", "2", "--saga-step-timeout", "10s"],
    )
    .await;

    let admitted: Vec<_> = (0..2)
        .map(|n| {
            let mut orders = clients.orders.clone();
            tokio::spawn(async move {
                orders
                    .place_order(place_request(&format!("c-{n}"), "SKU-1", 1))
                    .await
            })
        })
        .collect();
    eventually("both admitted orders are stored", || async {
        (db.count("orders.orders").await == 2).then_some(())
    })
    .await;

    for n in 2..6 {
        let started = std::time::Instant::now();
        let refused = clients
            .orders
            .place_order(place_request(&format!("c-{n}"), "SKU-1", 1))
            .await
            .unwrap_err();
        assert_eq!(
            refused.code(),
            tonic::Code::ResourceExhausted,
            "{refused:?}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(1000),
            "refused at once, not after the admitted sagas: {:?}",
            started.elapsed()
        );
    }
    for placing in admitted {
        let order = placing.await.unwrap().unwrap().into_inner().order.unwrap();
        assert_eq!(status(&order), pb::OrderStatus::Confirmed, "{order:?}");
    }
    assert_eq!(
        db.count("orders.orders").await,
        2,
        "refused calls wrote no order"
    );
    assert_eq!(stock_of(&db, "SKU-1").await, (98, 0));

    let after = clients.place("c-late", "SKU-1", 1).await;
    assert_eq!(
        status(&after),
        pb::OrderStatus::Confirmed,
        "slots are freed"
    );
}

/// A saga whose run outlasts its lease renews it, so the driver does not start a second run of
/// it meanwhile: with a 1 s lease and a Reserve that takes 2.5 s, the order is confirmed
/// after exactly one Reserve and no resumption.
#[tokio::test]
async fn a_long_saga_renews_its_lease_and_runs_once() {
    let db = TestDb::new().await;
    let (server, mut clients) = slow_reserve_server(
        &db,
        "2500ms",
        &[
            "--saga-lease",
            "1s",
            "--saga-poll",
            "100ms",
            "--saga-step-timeout",
            "10s",
        ],
    )
    .await;

    let order = clients.place("c-1", "SKU-1", 1).await;
    assert_eq!(status(&order), pb::OrderStatus::Confirmed, "{order:?}");
    let metrics = server.scrape().await;
    let reserves: Vec<&str> = metrics
        .lines()
        .filter(|line| {
            line.starts_with("mesh_server_request_duration_seconds_count")
                && line.contains(r#"method="Reserve""#)
        })
        .collect();
    assert_eq!(reserves.len(), 1, "{reserves:?}");
    assert!(
        reserves[0].ends_with(" 1"),
        "one Reserve call: {reserves:?}"
    );
    assert!(
        !server.log().contains("resuming saga"),
        "the driver left the running saga alone"
    );
    assert_eq!(stock_of(&db, "SKU-1").await, (99, 0));
}

/// PlaceOrder's slot belongs to the saga, not to the call: a caller that gives up (its
/// deadline passes) does not free it while the saga it started still runs.
#[tokio::test]
async fn an_abandoned_placement_keeps_its_slot_until_its_saga_ends() {
    let db = TestDb::new().await;
    let (_server, mut clients) = slow_reserve_server(
        &db,
        "1500ms",
        &["--saga-max-placing", "1", "--saga-step-timeout", "10s"],
    )
    .await;

    let mut hasty = Request::new(place_request("c-hasty", "SKU-1", 1));
    hasty.set_timeout(Duration::from_millis(300));
    let abandoned = clients.orders.place_order(hasty).await.unwrap_err();
    assert!(
        matches!(
            abandoned.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{abandoned:?}"
    );
    let refused = clients
        .orders
        .place_order(place_request("c-next", "SKU-1", 1))
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "the abandoned call's saga still holds the slot: {refused:?}"
    );

    eventually("the abandoned order's saga confirms it", || async {
        let confirmed = db.count("orders.orders WHERE status = 'CONFIRMED'").await;
        (confirmed == 1).then_some(())
    })
    .await;
    // The saga's task lets go of the slot just after its confirmation commits.
    let after = eventually("the slot is free again", || {
        let mut orders = clients.orders.clone();
        async move {
            orders
                .place_order(place_request("c-after", "SKU-1", 1))
                .await
                .ok()
        }
    })
    .await
    .into_inner()
    .order
    .unwrap();
    assert_eq!(status(&after), pb::OrderStatus::Confirmed);
}
