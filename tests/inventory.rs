//! The inventory service end to end: stock rules, reservation expiry, and the catalog cache
//! invalidated across processes.

// A failed unwrap is a failed test, which is what we want here.
#![allow(clippy::unwrap_used)]

use tonic::{Code, transport::Channel};
use uuid::Uuid;
use waybill_api::inventory::v1::{self as pb, inventory_service_client::InventoryServiceClient};
use waybill_test_support::{ServeOptions, TestDb, Waybill, eventually};

type Client = InventoryServiceClient<Channel>;

fn serve(db: &TestDb, args: &[&str]) -> Waybill {
    Waybill::start(
        db,
        ServeOptions {
            services: Some("inventory"),
            args,
            ..ServeOptions::default()
        },
    )
}

async fn put(client: &mut Client, sku: &str, on_hand: i32) -> pb::Item {
    client
        .put_item(pb::PutItemRequest {
            sku: sku.into(),
            name: format!("item {sku}"),
            on_hand,
        })
        .await
        .unwrap()
        .into_inner()
        .item
        .unwrap()
}

async fn reserve(
    client: &mut Client,
    order_id: Uuid,
    sku: &str,
    quantity: i32,
) -> Result<pb::Reservation, tonic::Status> {
    client
        .reserve(pb::ReserveRequest {
            order_id: order_id.to_string(),
            lines: vec![pb::ReservationLine {
                sku: sku.into(),
                quantity,
            }],
        })
        .await
        .map(|r| r.into_inner().reservation.unwrap())
}

async fn item(client: &mut Client, sku: &str) -> pb::Item {
    client
        .get_item(pb::GetItemRequest { sku: sku.into() })
        .await
        .unwrap()
        .into_inner()
        .item
        .unwrap()
}

#[tokio::test]
async fn stock_rules_hold_through_reserve_commit_and_release() {
    let db = TestDb::new().await;
    let server = serve(&db, &[]);
    let mut client = Client::new(server.channel().await);
    put(&mut client, "A", 5).await;

    let order = Uuid::now_v7();
    let held = reserve(&mut client, order, "A", 3).await.unwrap();
    assert_eq!(held.state(), pb::ReservationState::Held);
    // Repeating the reserve returns the same reservation and holds nothing more.
    let again = reserve(&mut client, order, "A", 3).await.unwrap();
    assert_eq!(again, held);

    // On hand cannot go below what is reserved.
    let refused = client
        .adjust_stock(pb::AdjustStockRequest {
            sku: "A".into(),
            delta: -3,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let refused = reserve(&mut client, Uuid::now_v7(), "A", 3)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);

    client
        .commit(pb::CommitRequest {
            order_id: order.to_string(),
        })
        .await
        .unwrap();
    let stock = db
        .primary()
        .await
        .query_one(
            "SELECT on_hand, reserved FROM inventory.items WHERE sku = 'A'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((stock.get::<_, i32>(0), stock.get::<_, i32>(1)), (2, 0));

    // Releasing a committed reservation (the order was cancelled before the goods left)
    // puts its units back; releasing again changes nothing.
    for _ in 0..2 {
        let released = client
            .release(pb::ReleaseRequest {
                order_id: order.to_string(),
            })
            .await
            .unwrap()
            .into_inner()
            .reservation
            .unwrap();
        assert_eq!(released.state(), pb::ReservationState::Released);
    }
    let stock = db
        .primary()
        .await
        .query_one(
            "SELECT on_hand, reserved FROM inventory.items WHERE sku = 'A'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((stock.get::<_, i32>(0), stock.get::<_, i32>(1)), (5, 0));
    // A reserve that arrives after its order's release is refused.
    let late = reserve(&mut client, order, "A", 1).await.unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn an_uncommitted_reservation_expires_and_gives_its_stock_back() {
    let db = TestDb::new().await;
    let server = serve(
        &db,
        &["--reservation-ttl", "300ms", "--reservation-sweep", "100ms"],
    );
    let mut client = Client::new(server.channel().await);
    put(&mut client, "B", 2).await;
    let order = Uuid::now_v7();
    reserve(&mut client, order, "B", 2).await.unwrap();
    eventually("the reservation expires", || async {
        let state: String = db
            .primary()
            .await
            .query_one(
                "SELECT state FROM inventory.reservations WHERE order_id = $1",
                &[&order],
            )
            .await
            .unwrap()
            .get(0);
        (state == "RELEASED").then_some(())
    })
    .await;
    let stock = db
        .primary()
        .await
        .query_one("SELECT reserved FROM inventory.items WHERE sku = 'B'", &[])
        .await
        .unwrap();
    assert_eq!(stock.get::<_, i32>(0), 0);
    let committed = client
        .commit(pb::CommitRequest {
            order_id: order.to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        committed.code(),
        Code::FailedPrecondition,
        "too late to commit"
    );
}

/// A catalog change made through one process is seen at once by another process's cache,
/// although that cache would keep the old item for a minute.
#[tokio::test]
async fn a_catalog_change_invalidates_every_processs_cache() {
    let db = TestDb::new().await;
    let writer = serve(&db, &[]);
    let reader = serve(&db, &["--catalog-cache-ttl", "60s"]);
    let mut writer_client = Client::new(writer.channel().await);
    let mut reader_client = Client::new(reader.channel().await);
    put(&mut writer_client, "C", 1).await;
    let cached = eventually("the reader sees the item", || {
        let mut client = reader_client.clone();
        async move {
            client
                .get_item(pb::GetItemRequest { sku: "C".into() })
                .await
                .ok()
                .and_then(|r| r.into_inner().item)
        }
    })
    .await;
    assert_eq!(cached.on_hand, 1);

    put(&mut writer_client, "C", 7).await;
    let fresh = eventually("the reader's cache drops the old item", || {
        let mut client = reader_client.clone();
        async move {
            let item = client
                .get_item(pb::GetItemRequest { sku: "C".into() })
                .await
                .ok()?
                .into_inner()
                .item?;
            (item.on_hand == 7).then_some(item)
        }
    })
    .await;
    assert_eq!(fresh.available, 7);
    assert_eq!(item(&mut reader_client, "C").await.on_hand, 7);
}
