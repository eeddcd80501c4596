//! grpc.health.v1 follows the primary database. This binary stops its cluster's primary, so it
//! has that cluster to itself.

// A failed unwrap is a failed test, which is what we want here.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use waybill_api::orders::v1::{self as pb, orders_service_client::OrdersServiceClient};
use waybill_test_support::{Role, TestDb, Waybill, cluster, eventually};

const ORDERS: &str = "waybill.orders.v1.OrdersService";

async fn status_of(
    client: &HealthClient<tonic::transport::Channel>,
    service: &str,
) -> ServingStatus {
    let response = client
        .clone()
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner();
    response.status()
}

#[tokio::test]
async fn health_turns_not_serving_when_the_primary_stops() {
    let db = TestDb::new().await;
    let server = Waybill::serve(&db, &["--health-interval", "200ms", "--db-timeout", "1s"]);
    let channel = server.channel().await;
    let health = HealthClient::new(channel.clone());

    for service in ["", ORDERS] {
        eventually("health reports SERVING", || {
            let health = health.clone();
            async move { (status_of(&health, service).await == ServingStatus::Serving).then_some(()) }
        })
        .await;
    }
    let unknown = health
        .clone()
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    cluster().kill(Role::Primary).unwrap();

    for service in ["", ORDERS] {
        eventually("health reports NOT_SERVING", || {
            let health = health.clone();
            async move {
                (status_of(&health, service).await == ServingStatus::NotServing).then_some(())
            }
        })
        .await;
    }

    // The process is alive though: a liveness probe must not restart it for the database.
    assert_eq!(status_of(&health, "liveness").await, ServingStatus::Serving);

    // A write now fails fast and says so: UNAVAILABLE (retryable), no SQL text, no hang.
    let mut orders = OrdersServiceClient::new(channel);
    let started = std::time::Instant::now();
    let status = orders
        .place_order(pb::PlaceOrderRequest {
            customer_id: "c-1".into(),
            items: vec![pb::LineItem {
                sku: "SKU-1".into(),
                quantity: 1,
            }],
            delivery_address: "somewhere".into(),
            zone: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(!status.message().contains("connection"), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}
