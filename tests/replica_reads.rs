//! ListOrders is served by the streaming replica. This binary has a cluster of its own, so it
//! may pause the replica's WAL replay without disturbing other tests.

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
    let list = || pb::ListOrdersRequest {
        customer_id: "c-replica".into(),
        page_size: 10,
        page_token: String::new(),
    };

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
    let second = client
        .place_order(order_for("c-replica"))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
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
    // GetOrder reads the primary, so the writer sees its own write at once.
    let fetched = client
        .get_order(pb::GetOrderRequest {
            order_id: second.order_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(fetched, second);

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
