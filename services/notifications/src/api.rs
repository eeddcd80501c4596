//! The gRPC edge of notifications.

use tonic::{Request, Response, Status};
use uuid::Uuid;
use waybill_api::notifications::v1 as pb;
use waybill_runtime::{
    Db, DbError,
    page_token::Cursor,
    validate::{Violations, timestamp},
};

use crate::handler::Kind;

const DEFAULT_PAGE_SIZE: i64 = 50;
const MAX_PAGE_SIZE: i64 = 1000;

/// The notifications service's gRPC implementation.
#[derive(Clone)]
pub struct NotificationsApi {
    db: Db,
}

impl NotificationsApi {
    /// Notifications read from `db`'s replicas.
    pub fn new(db: Db) -> Self {
        Self { db }
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
        let after = match (
            request.page_token.is_empty(),
            Cursor::decode(&request.page_token),
        ) {
            (true, _) => None,
            (false, Some(cursor)) if cursor.customer_id == request.customer_id => {
                Some(cursor.after)
            }
            (false, _) => {
                violations.add(
                    "page_token",
                    "is not a token from a previous ListNotifications call for this customer",
                );
                None
            }
        };
        violations.into_result(())?;

        let client = self.db.replica().await?;
        let rows = client
            .query(
                "SELECT id, customer_id, order_id, kind, message, event_id, created_at
                 FROM notifications.notifications
                 WHERE customer_id = $1 AND ($2::uuid IS NULL OR id < $2)
                 ORDER BY id DESC LIMIT $3",
                &[&request.customer_id, &after, &(page_size + 1)],
            )
            .await
            .map_err(DbError::from)?;
        let mut notifications = rows
            .iter()
            .map(|row| {
                let id: Uuid = row.try_get(0)?;
                let order_id: Uuid = row.try_get(2)?;
                let kind: &str = row.try_get(3)?;
                let event_id: Uuid = row.try_get(5)?;
                Ok(pb::Notification {
                    notification_id: id.to_string(),
                    customer_id: row.try_get(1)?,
                    order_id: order_id.to_string(),
                    kind: match Kind::parse(kind) {
                        Some(Kind::OrderConfirmed) => pb::NotificationKind::OrderConfirmed,
                        Some(Kind::CourierAssigned) => pb::NotificationKind::CourierAssigned,
                        Some(Kind::Delivered) => pb::NotificationKind::Delivered,
                        Some(Kind::OrderCancelled) => pb::NotificationKind::OrderCancelled,
                        Some(Kind::DeliveryFailed) => pb::NotificationKind::DeliveryFailed,
                        None => pb::NotificationKind::Unspecified,
                    } as i32,
                    message: row.try_get(4)?,
                    event_id: event_id.to_string(),
                    create_time: Some(timestamp(row.try_get(6)?)),
                })
            })
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
}
