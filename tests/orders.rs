//! The orders service end to end: a real `waybill serve` process, a real primary and replica.

// A failed unwrap is a failed test, which is what we want here.
#![allow(clippy::unwrap_used)]

use tonic::{Code, Status, transport::Channel};
use tonic_types::StatusExt;
use waybill_api::orders::v1::{self as pb, orders_service_client::OrdersServiceClient};
use waybill_test_support::{TestDb, Waybill, courier, stock, wait_for_replica};

/// A server with the items of [`place_request`] in stock and a courier in the default zone,
/// so that placed orders are confirmed.
async fn start() -> (TestDb, Waybill, OrdersServiceClient<Channel>) {
    let db = TestDb::new().await;
    let server = Waybill::serve(&db, &[]);
    let channel = server.channel().await;
    for sku in ["SKU-1", "SKU-2"] {
        stock(&channel, sku, 1_000_000).await;
    }
    courier(&channel, "van-1", "default", 1000).await;
    (db, server, OrdersServiceClient::new(channel))
}

fn place_request(customer: &str) -> pb::PlaceOrderRequest {
    pb::PlaceOrderRequest {
        customer_id: customer.into(),
        items: vec![
            pb::LineItem {
                sku: "SKU-1".into(),
                quantity: 2,
            },
            pb::LineItem {
                sku: "SKU-2".into(),
                quantity: 1,
            },
        ],
        delivery_address: "1 Main St".into(),
        zone: String::new(),
    }
}

/// The field paths of a BadRequest detail, in order.
#[track_caller]
fn violated_fields(status: &Status) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let details = status.get_error_details();
    let bad_request = details
        .bad_request()
        .unwrap_or_else(|| panic!("no BadRequest detail in {status:?}"));
    bad_request
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect()
}

#[tokio::test]
async fn a_placed_order_can_be_read_back() {
    let (_db, _server, mut client) = start().await;

    let response = client
        .place_order(place_request("c-1"))
        .await
        .unwrap()
        .into_inner();
    let placed = response.order.unwrap();
    assert_eq!(placed.status(), pb::OrderStatus::Confirmed, "{placed:?}");
    assert_eq!(placed.courier_id, "van-1");
    assert_eq!(placed.zone, "default");
    assert!(placed.create_time.is_some());

    // The token makes the read see the write, whichever node serves it.
    let fetched = client
        .get_order(pb::GetOrderRequest {
            order_id: placed.order_id.clone(),
            consistency_token: response.consistency_token,
        })
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(fetched, placed);
    assert_eq!(fetched.customer_id, "c-1");
    assert_eq!(fetched.items, place_request("c-1").items);
}

#[tokio::test]
async fn invalid_orders_name_every_bad_field_and_store_nothing() {
    let (db, _server, mut client) = start().await;

    let cases = [
        (
            pb::PlaceOrderRequest {
                items: vec![],
                ..place_request("c-1")
            },
            vec!["items"],
        ),
        (
            pb::PlaceOrderRequest {
                items: vec![
                    pb::LineItem {
                        sku: "ok".into(),
                        quantity: 1,
                    },
                    pb::LineItem {
                        sku: "SKU".into(),
                        quantity: 0,
                    },
                    pb::LineItem {
                        sku: "SKU".into(),
                        quantity: -3,
                    },
                ],
                ..place_request("c-1")
            },
            vec!["items[1].quantity", "items[2].quantity"],
        ),
        (
            pb::PlaceOrderRequest {
                customer_id: "c".repeat(65),
                delivery_address: "a".repeat(513),
                ..place_request("c-1")
            },
            vec!["customer_id", "delivery_address"],
        ),
        (
            // Postgres cannot store NUL; it must be refused before it reaches SQL.
            place_request("nul\0byte"),
            vec!["customer_id"],
        ),
    ];
    for (request, expected) in cases {
        let status = client.place_order(request).await.unwrap_err();
        assert_eq!(violated_fields(&status), expected);
    }

    assert_eq!(db.count("orders.orders").await, 0);
    assert_eq!(db.count("orders.order_items").await, 0);
}

#[tokio::test]
async fn unknown_and_malformed_order_ids_are_told_apart() {
    let (_db, _server, mut client) = start().await;

    let unknown = client
        .get_order(pb::GetOrderRequest {
            order_id: uuid::Uuid::now_v7().to_string(),
            consistency_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let malformed = client
        .get_order(pb::GetOrderRequest {
            order_id: "order-1'; DROP TABLE orders.orders; --".into(),
            consistency_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&malformed), ["order_id"]);
}

#[tokio::test]
async fn listing_pages_through_a_customers_orders_newest_first() {
    let (_db, _server, mut client) = start().await;
    let mut placed = Vec::new();
    for _ in 0..5 {
        let order = client
            .place_order(place_request("c-pages"))
            .await
            .unwrap()
            .into_inner()
            .order
            .unwrap();
        placed.push(order.order_id);
    }
    client
        .place_order(place_request("someone-else"))
        .await
        .unwrap();
    wait_for_replica().await;

    let mut seen = Vec::new();
    let mut page_sizes = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_orders(pb::ListOrdersRequest {
                customer_id: "c-pages".into(),
                page_size: 2,
                page_token: token,
                consistency_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        page_sizes.push(page.orders.len());
        seen.extend(page.orders.into_iter().map(|o| o.order_id));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
        assert!(page_sizes.len() < 10, "paging does not end");
    }
    placed.reverse();
    assert_eq!(seen, placed);
    assert_eq!(page_sizes, [2, 2, 1]);

    // A token is bound to its customer; garbage and negative sizes are refused.
    let first = client
        .list_orders(pb::ListOrdersRequest {
            customer_id: "c-pages".into(),
            page_size: 1,
            page_token: String::new(),
            consistency_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let status = client
        .list_orders(pb::ListOrdersRequest {
            customer_id: "someone-else".into(),
            page_size: 1,
            page_token: first.next_page_token,
            consistency_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["page_token"]);
    let status = client
        .list_orders(pb::ListOrdersRequest {
            customer_id: String::new(),
            page_size: -1,
            page_token: "%%%".into(),
            consistency_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&status),
        ["customer_id", "page_size", "page_token"]
    );
}

#[tokio::test]
async fn cancelling_is_idempotent_and_recorded() {
    let (_db, _server, mut client) = start().await;
    let order = client
        .place_order(place_request("c-cancel"))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();

    let cancel = pb::CancelOrderRequest {
        order_id: order.order_id.clone(),
        reason: "changed my mind".into(),
    };
    let first = client
        .cancel_order(cancel.clone())
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(first.status(), pb::OrderStatus::Cancelled);
    assert_eq!(first.cancel_reason, "changed my mind");

    let again = client.cancel_order(cancel).await.unwrap().into_inner();
    assert_eq!(
        again.order.unwrap(),
        first,
        "a repeated cancel changes nothing"
    );

    // Read back with the cancel's token: a replica that has not replayed it yet must not
    // answer.
    let stored = client
        .get_order(pb::GetOrderRequest {
            order_id: order.order_id,
            consistency_token: again.consistency_token,
        })
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(stored, first);

    let unknown = client
        .cancel_order(pb::CancelOrderRequest {
            order_id: uuid::Uuid::now_v7().to_string(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

/// Orders placed at once share insert statements (group commit), and each gets its own items,
/// numbered from 1, and its own saga.
#[tokio::test]
async fn orders_placed_at_once_share_inserts_and_keep_their_own_items() {
    // Under the admission cap on PlaceOrders in flight (--saga-max-placing, 32).
    const ORDERS: usize = 24;
    let (db, server, client) = start().await;
    let calls: Vec<_> = (0..ORDERS)
        .map(|n| {
            let mut client = client.clone();
            let mut request = place_request(&format!("batch-{n}"));
            // A different first line per order, so a mixed-up flattening would show.
            request.items[0].quantity = 1 + n as i32;
            tokio::spawn(async move { client.place_order(request).await })
        })
        .collect();
    for call in calls {
        let order = call.await.unwrap().unwrap().into_inner().order.unwrap();
        assert_eq!(order.status(), pb::OrderStatus::Confirmed, "{order:?}");
    }
    let primary = db.primary().await;
    let wrong: i64 = primary
        .query_one(
            "SELECT count(*) FROM orders.orders o
             WHERE o.customer_id LIKE 'batch-%'
               AND (ARRAY(SELECT (line_no, sku, quantity)::text FROM orders.order_items i
                          WHERE i.order_id = o.id ORDER BY line_no)
                    IS DISTINCT FROM ARRAY[
                        format('(1,SKU-1,%s)', 1 + substr(o.customer_id, 7)::int),
                        '(2,SKU-2,1)']
                    OR NOT EXISTS (SELECT 1 FROM orders.sagas s WHERE s.order_id = o.id))",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(wrong, 0, "orders whose items or saga are not their own");
    // Rows stored by one statement share its transaction id (items are never updated, so
    // theirs is still the insert's): fewer transactions than orders means the batch statement
    // itself stored them, not a one-by-one fallback.
    let transactions: i64 = primary
        .query_one(
            "SELECT count(DISTINCT i.xmin::text) FROM orders.order_items i
             JOIN orders.orders o ON o.id = i.order_id WHERE o.customer_id LIKE 'batch-%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        transactions < ORDERS as i64,
        "{ORDERS} orders stored by {transactions} transactions"
    );
    let scrape = server.scrape().await;
    let series = |suffix: &str| -> f64 {
        let name = format!("waybill_group_commit_batch_writes_{suffix}{{kind=\"orders.insert\"}}");
        waybill_test_support::sample(&scrape, &name)
            .unwrap_or_else(|| panic!("no {name} in the scrape"))
    };
    assert_eq!(
        series("sum"),
        ORDERS as f64,
        "every order went through a batch"
    );
    assert!(
        series("count") < ORDERS as f64,
        "{} batches for {ORDERS} orders placed at once",
        series("count")
    );
}
