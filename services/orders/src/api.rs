//! The gRPC edge: protobuf in, domain types inside, protobuf and `Status` out.

use prost_types::Timestamp;
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};
use uuid::Uuid;
use waybill_api::orders::v1 as pb;
use waybill_runtime::Db;

use crate::{
    domain::{self, Item, NewOrder, Order, OrderStatus, Violation},
    page_token::Cursor,
    store::{Cancelled, OrderStore},
};

/// Page size when the request leaves it at 0.
const DEFAULT_PAGE_SIZE: i64 = 50;
/// Larger requested page sizes are reduced to this (AIP-158).
const MAX_PAGE_SIZE: i64 = 1000;

/// The orders service's gRPC implementation.
#[derive(Clone)]
pub struct OrdersApi {
    store: OrderStore,
}

impl OrdersApi {
    /// An orders service over the given pools.
    pub fn new(db: Db) -> Self {
        Self {
            store: OrderStore::new(db),
        }
    }
}

#[tonic::async_trait]
impl pb::orders_service_server::OrdersService for OrdersApi {
    async fn place_order(
        &self,
        request: Request<pb::PlaceOrderRequest>,
    ) -> Result<Response<pb::PlaceOrderResponse>, Status> {
        let request = request.into_inner();
        let items = request
            .items
            .into_iter()
            .map(|item| Item {
                sku: item.sku,
                quantity: item.quantity,
            })
            .collect();
        let new_order = NewOrder::validate(request.customer_id, items, request.delivery_address)
            .map_err(invalid_argument)?;
        let order = self.store.insert(&new_order).await?;
        tracing::info!(order_id = %order.id, customer_id = %order.customer_id, "order placed");
        Ok(Response::new(pb::PlaceOrderResponse {
            order: Some(to_proto(order)),
        }))
    }

    async fn get_order(
        &self,
        request: Request<pb::GetOrderRequest>,
    ) -> Result<Response<pb::GetOrderResponse>, Status> {
        let id = parse_order_id(&request.get_ref().order_id)?;
        match self.store.get(id).await? {
            Some(order) => Ok(Response::new(pb::GetOrderResponse {
                order: Some(to_proto(order)),
            })),
            None => Err(Status::not_found(format!("order {id} not found"))),
        }
    }

    async fn list_orders(
        &self,
        request: Request<pb::ListOrdersRequest>,
    ) -> Result<Response<pb::ListOrdersResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Vec::new();
        domain::check_customer_id(&request.customer_id, "customer_id", &mut violations);
        let page_size = match i64::from(request.page_size) {
            size if size < 0 => {
                violations.push(Violation {
                    field: "page_size".into(),
                    description: "must not be negative".into(),
                });
                0
            }
            0 => DEFAULT_PAGE_SIZE,
            size => size.min(MAX_PAGE_SIZE),
        };
        let after = if request.page_token.is_empty() {
            None
        } else {
            match Cursor::decode(&request.page_token) {
                Some(cursor) if cursor.customer_id == request.customer_id => Some(cursor.after),
                Some(_) => {
                    violations.push(Violation {
                        field: "page_token".into(),
                        description: "was issued for a different customer_id".into(),
                    });
                    None
                }
                None => {
                    violations.push(Violation {
                        field: "page_token".into(),
                        description: "is not a token from a previous ListOrders response".into(),
                    });
                    None
                }
            }
        };
        if !violations.is_empty() {
            return Err(invalid_argument(violations));
        }

        // One extra row tells whether another page follows without a second query.
        let mut orders = self
            .store
            .list_by_customer(&request.customer_id, after, page_size + 1)
            .await?;
        let next_page_token = if orders.len() as i64 > page_size {
            orders.truncate(page_size as usize);
            orders
                .last()
                .map(|last| {
                    Cursor {
                        customer_id: request.customer_id.clone(),
                        after: last.id,
                    }
                    .encode()
                })
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListOrdersResponse {
            orders: orders.into_iter().map(to_proto).collect(),
            next_page_token,
        }))
    }

    async fn cancel_order(
        &self,
        request: Request<pb::CancelOrderRequest>,
    ) -> Result<Response<pb::CancelOrderResponse>, Status> {
        let request = request.into_inner();
        let id = parse_order_id(&request.order_id);
        let mut violations = Vec::new();
        domain::check_text(&request.reason, "reason", false, &mut violations);
        let id = match id {
            Ok(id) if violations.is_empty() => id,
            Ok(_) => return Err(invalid_argument(violations)),
            Err(status) => return Err(status),
        };
        match self.store.cancel(id, &request.reason).await? {
            Cancelled::Done(order) => {
                tracing::info!(order_id = %order.id, "order cancelled");
                Ok(Response::new(pb::CancelOrderResponse {
                    order: Some(to_proto(order)),
                }))
            }
            Cancelled::NotCancellable(order) => Err(Status::failed_precondition(format!(
                "order {id} is {} and can no longer be cancelled",
                order.status.as_str()
            ))),
            Cancelled::NotFound => Err(Status::not_found(format!("order {id} not found"))),
        }
    }
}

fn parse_order_id(text: &str) -> Result<Uuid, Status> {
    let description = if text.is_empty() {
        "required"
    } else {
        match Uuid::parse_str(text) {
            Ok(id) => return Ok(id),
            Err(_) => "must be an order id (a UUID) returned by PlaceOrder",
        }
    };
    Err(invalid_argument(vec![Violation {
        field: "order_id".into(),
        description: description.into(),
    }]))
}

/// INVALID_ARGUMENT with a google.rpc.BadRequest listing every violation.
fn invalid_argument(violations: Vec<Violation>) -> Status {
    let summary = violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ");
    let mut details = ErrorDetails::new();
    for violation in violations {
        details.add_bad_request_violation(violation.field, violation.description);
    }
    Status::with_error_details(Code::InvalidArgument, summary, details)
}

fn to_proto(order: Order) -> pb::Order {
    pb::Order {
        order_id: order.id.to_string(),
        customer_id: order.customer_id,
        items: order
            .items
            .into_iter()
            .map(|item| pb::LineItem {
                sku: item.sku,
                quantity: item.quantity,
            })
            .collect(),
        delivery_address: order.delivery_address,
        status: match order.status {
            OrderStatus::Pending => pb::OrderStatus::Pending,
            OrderStatus::Confirmed => pb::OrderStatus::Confirmed,
            OrderStatus::Cancelled => pb::OrderStatus::Cancelled,
        } as i32,
        cancel_reason: order.cancel_reason,
        create_time: Some(timestamp(order.created_at)),
        update_time: Some(timestamp(order.updated_at)),
    }
}

fn timestamp(time: chrono::DateTime<chrono::Utc>) -> Timestamp {
    Timestamp {
        seconds: time.timestamp(),
        nanos: time.timestamp_subsec_nanos() as i32,
    }
}
