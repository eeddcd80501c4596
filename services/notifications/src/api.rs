//! The gRPC edge of notifications.

use tonic::{Request, Response, Status};
use uuid::Uuid;
use waybill_api::notifications::v1 as pb;
use waybill_runtime::{
    Db, DbError,
    page_token::Cursor,
    validate::{Violations, timestamp},
};

use std::sync::Arc;

use waybill_events::HandlerError;

use crate::{
    handler::{Kind, Notice},
    sink::Sink,
};

const DEFAULT_PAGE_SIZE: i64 = 50;
const MAX_PAGE_SIZE: i64 = 1000;

/// The notifications service's gRPC implementation.
#[derive(Clone)]
pub struct NotificationsApi {
    db: Db,
    sink: Arc<Sink>,
}

const COLUMNS: &str = "id, customer_id, order_id, kind, message, event_id, created_at";

impl NotificationsApi {
    /// Notifications read from `db`'s replicas; messages sent through `sink`.
    pub fn new(db: Db, sink: Arc<Sink>) -> Self {
        Self { db, sink }
    }
}

#[tonic::async_trait]
impl pb::notifications_service_server::NotificationsService for NotificationsApi {
    async fn list_notifications(
        &self,
        request: Request<pb::ListNotificationsRequest>,
    ) -> Result<Response<pb::ListNotificationsResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::default();
        violations.check_key(&request.customer_id, "customer_id");
        let page_size = violations.page_size(
            request.page_size,
            "page_size",
            DEFAULT_PAGE_SIZE,
            MAX_PAGE_SIZE,
        );
        let after = violations.page_cursor(&request.page_token, &request.customer_id, "page_token");
        violations.into_result(())?;

        let client = self.db.replica().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM notifications.notifications
                     WHERE customer_id = $1 AND ($2::uuid IS NULL OR id < $2)
                     ORDER BY id DESC LIMIT $3"
                ),
                &[&request.customer_id, &after, &(page_size + 1)],
            )
            .await
            .map_err(DbError::from)?;
        let mut notifications = rows
            .iter()
            .map(notification)
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(DbError::from)?;
        let next_page_token = if notifications.len() as i64 > page_size {
            notifications.truncate(page_size as usize);
            let last = rows
                .get(page_size as usize - 1)
                .map(|row| row.try_get::<_, Uuid>(0))
                .transpose()
                .map_err(DbError::from)?;
            last.map(|after| {
                Cursor {
                    customer_id: request.customer_id.clone(),
                    after,
                }
                .encode()
            })
            .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListNotificationsResponse {
            notifications,
            next_page_token,
        }))
    }

    async fn send_notification(
        &self,
        request: Request<pb::SendNotificationRequest>,
    ) -> Result<Response<pb::SendNotificationResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::default();
        violations.check_key(&request.customer_id, "customer_id");
        violations.check_text(&request.message, "message", true);
        violations.check_key(&request.request_id, "request_id");
        violations.into_result(())?;

        let mut client = self.db.primary().await?;
        let tx = client.transaction().await.map_err(DbError::from)?;
        let id = Uuid::now_v7();
        let inserted = tx
            .query_opt(
                &format!(
                    "INSERT INTO notifications.notifications
                         (id, customer_id, kind, message, request_id)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (customer_id, request_id) WHERE request_id IS NOT NULL
                     DO NOTHING
                     RETURNING {COLUMNS}"
                ),
                &[
                    &id,
                    &request.customer_id,
                    &Kind::Message.as_str(),
                    &request.message,
                    &request.request_id,
                ],
            )
            .await
            .map_err(DbError::from)?;
        let row = match inserted {
            Some(row) => {
                // Sent inside the transaction: if the sink refuses, nothing is recorded and
                // the caller's retry sends again (the sink dedupes by the idempotency key).
                let notice = Notice {
                    customer_id: request.customer_id.clone(),
                    order_id: String::new(),
                    kind: Kind::Message,
                    message: request.message.clone(),
                };
                self.sink
                    .send(id, &notice)
                    .await
                    .map_err(|error| match error {
                        HandlerError::Permanent(why) => {
                            Status::internal(format!("the sink refused: {why}"))
                        }
                        other => Status::unavailable(format!("the sink did not take it: {other}")),
                    })?;
                row
            }
            None => tx
                .query_one(
                    &format!(
                        "SELECT {COLUMNS} FROM notifications.notifications
                         WHERE customer_id = $1 AND request_id = $2"
                    ),
                    &[&request.customer_id, &request.request_id],
                )
                .await
                .map_err(DbError::from)?,
        };
        tx.commit().await.map_err(DbError::from)?;
        let notification = notification(&row).map_err(DbError::from)?;
        Ok(Response::new(pb::SendNotificationResponse {
            notification: Some(notification),
        }))
    }
}

fn notification(row: &tokio_postgres::Row) -> Result<pb::Notification, tokio_postgres::Error> {
    let id: Uuid = row.try_get(0)?;
    let order_id: Option<Uuid> = row.try_get(2)?;
    let kind: &str = row.try_get(3)?;
    let event_id: Option<Uuid> = row.try_get(5)?;
    Ok(pb::Notification {
        notification_id: id.to_string(),
        customer_id: row.try_get(1)?,
        order_id: order_id.map(|id| id.to_string()).unwrap_or_default(),
        kind: match Kind::parse(kind) {
            Some(Kind::OrderConfirmed) => pb::NotificationKind::OrderConfirmed,
            Some(Kind::CourierAssigned) => pb::NotificationKind::CourierAssigned,
            Some(Kind::Delivered) => pb::NotificationKind::Delivered,
            Some(Kind::OrderCancelled) => pb::NotificationKind::OrderCancelled,
            Some(Kind::DeliveryFailed) => pb::NotificationKind::DeliveryFailed,
            Some(Kind::Message) => pb::NotificationKind::Message,
            None => pb::NotificationKind::Unspecified,
        } as i32,
        message: row.try_get(4)?,
        event_id: event_id.map(|id| id.to_string()).unwrap_or_default(),
        create_time: Some(timestamp(row.try_get(6)?)),
    })
}
