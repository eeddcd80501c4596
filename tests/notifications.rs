//! Notifications delivered to a webhook: a real HTTP receiver on loopback that refuses the
//! first call, so the retry path is what delivers it.

// A failed unwrap is a failed test, which is what we want here.
#![allow(clippy::unwrap_used)]

use std::{collections::BTreeMap, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpListener,
    sync::mpsc,
};
use waybill_api::{
    notifications::v1::{self as pb, notifications_service_client::NotificationsServiceClient},
    orders::v1::{self as orders, orders_service_client::OrdersServiceClient},
};
use waybill_test_support::{PATIENCE, TestDb, Waybill, courier, eventually, stock};

/// One POST the receiver got: its idempotency key and JSON body.
#[derive(Debug)]
struct Received {
    key: String,
    body: serde_json::Value,
}

/// An HTTP/1.1 receiver that answers 503 to its first request and 200 to the rest.
async fn receiver() -> (String, mpsc::UnboundedReceiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut served = 0usize;
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (read, mut write) = stream.into_split();
            let mut read = BufReader::new(read);
            // Requests on one connection, one after the other (the client keeps it alive).
            loop {
                let mut headers = BTreeMap::new();
                let mut line = String::new();
                if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                    break;
                }
                loop {
                    line.clear();
                    read.read_line(&mut line).await.unwrap();
                    let Some((name, value)) = line.trim_end().split_once(':') else {
                        break;
                    };
                    headers.insert(name.to_ascii_lowercase(), value.trim().to_owned());
                }
                let length: usize = headers["content-length"].parse().unwrap();
                let mut body = vec![0; length];
                read.read_exact(&mut body).await.unwrap();
                served += 1;
                let status = if served == 1 {
                    "503 Service Unavailable"
                } else {
                    "200 OK"
                };
                let _ = tx.send(Received {
                    key: headers.get("idempotency-key").cloned().unwrap_or_default(),
                    body: serde_json::from_slice(&body).unwrap(),
                });
                write
                    .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
            }
        }
    });
    (url, rx)
}

#[tokio::test]
async fn notifications_reach_the_webhook_after_a_refusal() {
    let (url, mut received) = receiver().await;
    let db = TestDb::new().await;
    let server = Waybill::serve(&db, &["--notify-webhook", &url]);
    let channel = server.channel().await;
    stock(&channel, "SKU-1", 5).await;
    courier(&channel, "bike-1", "default", 5).await;
    let order = OrdersServiceClient::new(channel.clone())
        .place_order(orders::PlaceOrderRequest {
            customer_id: "c-hook".into(),
            items: vec![orders::LineItem {
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
        .unwrap();

    // Two notifications (confirmed, courier assigned); the first POST was refused and sent
    // again, so three calls with two distinct keys.
    let mut calls = Vec::new();
    while calls.len() < 3 {
        let call = tokio::time::timeout(PATIENCE, received.recv())
            .await
            .expect("the webhook is called")
            .unwrap();
        calls.push(call);
    }
    let refused = &calls[0].key;
    assert_eq!(
        calls.iter().filter(|c| &c.key == refused).count(),
        2,
        "the refused call is sent again with its key: {calls:?}"
    );
    let mut kinds: Vec<&str> = calls[1..]
        .iter()
        .map(|c| c.body["kind"].as_str().unwrap())
        .collect();
    kinds.sort_unstable();
    assert_eq!(kinds, ["COURIER_ASSIGNED", "ORDER_CONFIRMED"], "{calls:?}");
    for call in &calls {
        assert_eq!(call.body["customer_id"], "c-hook");
        assert_eq!(call.body["order_id"], order.order_id.as_str());
        assert!(call.key.ends_with(":c-hook"), "{call:?}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        received.try_recv().is_err(),
        "nothing is sent twice once accepted"
    );

    let client = NotificationsServiceClient::new(channel);
    eventually("both notifications are recorded once", || {
        let mut client = client.clone();
        async move {
            let listed = client
                .list_notifications(pb::ListNotificationsRequest {
                    customer_id: "c-hook".into(),
                    page_size: 0,
                    page_token: String::new(),
                })
                .await
                .ok()?
                .into_inner()
                .notifications;
            (listed.len() == 2).then_some(())
        }
    })
    .await;
}
