//! GetOrder and ListOrders are served by the streaming replica, and a consistency token from a
//! write makes them see that write (read-your-writes) even while the replica lags. This binary
//! has a cluster of its own, so it may pause the replica's WAL replay without disturbing other
//! tests.

// A failed unwrap is a failed test, which is what we want here.
#![allow(clippy::unwrap_used)]

use waybill_api::orders::v1::{self as pb, orders_service_client::OrdersServiceClient};
use waybill_test_support::{TestDb, Waybill, eventually, wait_for_replica};

fn order_for(customer: &str) -> pb::PlaceOrderRequest {
    pb::PlaceOrderRequest {
        customer_id: customer.into(),
        items: vec![pb::LineItem {
            sku: "SKU-1".into(),
            quantity: 1,
        }],
        delivery_address: "2 Side St".into(),
        zone: String::new(),
    }
}

#[tokio::test]
async fn listing_reads_the_replica_and_sees_writes_once_replicated() {
    let db = TestDb::new().await;
    let server = Waybill::serve(&db, &[]);
    let mut client = OrdersServiceClient::new(server.channel().await);
    let list_after = |token: &str| pb::ListOrdersRequest {
        customer_id: "c-replica".into(),
        page_size: 10,
        page_token: String::new(),
        consistency_token: token.into(),
    };
    let list = || list_after("");

    let first = client
        .place_order(order_for("c-replica"))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    wait_for_replica().await;
    let listed = client
        .list_orders(list())
        .await
        .unwrap()
        .into_inner()
        .orders;
    assert_eq!(listed, std::slice::from_ref(&first));

    // Freeze the replica: a write now reaches the primary only.
    let replica = db.replica().await;
    replica
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    let placed = client
        .place_order(order_for("c-replica"))
        .await
        .unwrap()
        .into_inner();
    let (second, token) = (placed.order.unwrap(), placed.consistency_token);
    assert!(!token.is_empty(), "a write returns a consistency token");
    let primary_rows = db.count("orders.orders").await;
    assert_eq!(primary_rows, 2, "the primary has both orders");

    let listed = client
        .list_orders(list())
        .await
        .unwrap()
        .into_inner()
        .orders;
    assert_eq!(
        listed,
        std::slice::from_ref(&first),
        "ListOrders must come from the paused replica, which lacks the second order"
    );
    let get = |token: &str| pb::GetOrderRequest {
        order_id: second.order_id.clone(),
        consistency_token: token.into(),
    };
    let stale = client.get_order(get("")).await.unwrap_err();
    assert_eq!(
        stale.code(),
        tonic::Code::NotFound,
        "without a token GetOrder reads the paused replica"
    );
    // With the token, the writer sees its own write at once: the replica is behind it, so
    // the primary answers.
    let fetched = client
        .get_order(get(&token))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(fetched, second);
    let listed = client
        .list_orders(list_after(&token))
        .await
        .unwrap()
        .into_inner()
        .orders;
    assert_eq!(listed, [second.clone(), first.clone()]);
    let malformed = client.get_order(get("not-a-token")).await.unwrap_err();
    assert_eq!(malformed.code(), tonic::Code::InvalidArgument);

    replica
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    let listed = eventually("the replica replays the second order", || {
        let mut client = client.clone();
        async move {
            let orders = client.list_orders(list()).await.ok()?.into_inner().orders;
            (orders.len() == 2).then_some(orders)
        }
    })
    .await;
    assert_eq!(listed, [second, first], "newest first");
}
