//! What every waybill server does whatever it serves: reflection, and a graceful drain on
//! SIGTERM.

// A failed unwrap is a failed test, which is what we want here.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};
use waybill_api::orders::v1::{self as pb, orders_service_client::OrdersServiceClient};
use waybill_test_support::{PATIENCE, TestDb, Waybill, eventually};

async fn reflect(server: &Waybill, request: MessageRequest) -> MessageResponse {
    let mut client = ServerReflectionClient::new(server.channel().await);
    let requests = tokio_stream::iter([ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    }]);
    let mut responses = client
        .server_reflection_info(requests)
        .await
        .unwrap()
        .into_inner();
    responses
        .message()
        .await
        .unwrap()
        .and_then(|r| r.message_response)
        .expect("a reflection response")
}

#[tokio::test]
async fn reflection_lists_and_describes_the_services() {
    let db = TestDb::new().await;
    let server = Waybill::serve(&db, &[]);

    let MessageResponse::ListServicesResponse(list) =
        reflect(&server, MessageRequest::ListServices(String::new())).await
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "waybill.orders.v1.OrdersService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }

    let MessageResponse::FileDescriptorResponse(files) = reflect(
        &server,
        MessageRequest::FileContainingSymbol("waybill.orders.v1.OrdersService".into()),
    )
    .await
    else {
        panic!("expected file descriptors");
    };
    let names: Vec<String> = files
        .file_descriptor_proto
        .iter()
        .map(|bytes| {
            <prost_types::FileDescriptorProto as prost::Message>::decode(bytes.as_slice())
                .unwrap()
                .name()
                .to_owned()
        })
        .collect();
    assert!(
        names.iter().any(|n| n == "waybill/orders/v1/orders.proto"),
        "{names:?}"
    );
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_call_finish_then_exits() {
    let db = TestDb::new().await;
    let mut server = Waybill::serve(&db, &[]);
    let mut client = OrdersServiceClient::new(server.channel().await);

    // Hold a lock that makes the next PlaceOrder wait inside its INSERT.
    let mut blocker = db.primary().await;
    let lock = blocker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE orders.orders IN EXCLUSIVE MODE")
        .await
        .unwrap();

    let in_flight = tokio::spawn(async move {
        client
            .place_order(pb::PlaceOrderRequest {
                customer_id: "c-drain".into(),
                items: vec![pb::LineItem {
                    sku: "SKU-1".into(),
                    quantity: 1,
                }],
                delivery_address: "1 Main St".into(),
                zone: String::new(),
            })
            .await
    });
    let observer = db.primary().await;
    eventually("PlaceOrder waits on the lock", || {
        let observer = &observer;
        let name = db.name.clone();
        async move {
            let waiting: i64 = observer
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = $1 AND wait_event_type = 'Lock'",
                    &[&name],
                )
                .await
                .ok()?
                .get(0);
            (waiting > 0).then_some(())
        }
    })
    .await;

    server.terminate();
    server.wait_for_log("draining in-flight calls").await;
    assert!(
        server.try_exit_status().is_none(),
        "the process must wait for the in-flight call"
    );
    // A draining server stops taking connections (soon: the accept loop learns of the drain
    // asynchronously). A connection the kernel queued but nobody serves never completes its
    // HTTP/2 handshake, hence the timeout around each attempt.
    let endpoint = server.endpoint();
    eventually("the draining server stops taking connections", || {
        let endpoint = endpoint.clone();
        async move {
            let attempt = tokio::time::timeout(
                Duration::from_millis(500),
                tonic::transport::Endpoint::from_shared(endpoint)
                    .ok()?
                    .connect_timeout(Duration::from_millis(500))
                    .connect(),
            )
            .await;
            (!matches!(attempt, Ok(Ok(_)))).then_some(())
        }
    })
    .await;
    assert!(
        server.try_exit_status().is_none(),
        "still waiting for the in-flight call"
    );

    lock.rollback().await.unwrap();
    let response = tokio::time::timeout(PATIENCE, in_flight)
        .await
        .expect("the in-flight call finishes")
        .unwrap()
        .expect("the in-flight call succeeds");
    // Stored; its saga may not have finished while the process drained (it resumes on the
    // next start), so the status is not the point here.
    let order = response.into_inner().order.unwrap();
    assert!(!order.order_id.is_empty());

    let status = server
        .wait_for_exit(PATIENCE)
        .await
        .expect("the process exits after draining");
    assert!(status.success(), "exit status {status}");
    assert_eq!(db.count("orders.orders").await, 1);
}
