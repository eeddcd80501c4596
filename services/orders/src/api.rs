//! The gRPC edge: protobuf in, domain types inside, protobuf and `Status` out.

use mesh_layer::{idempotency::KeyId, shed::CapSlot};
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;
use waybill_api::orders::v1 as pb;
use waybill_runtime::{
    page_token::Cursor,
    validate::{Violations, timestamp},
};

use crate::{
    domain::{Item, NewOrder, Order, OrderStatus},
    saga::Orchestrator,
    store::{Cancelled, OrderStore, Placed},
};

/// Page size when the request leaves it at 0.
const DEFAULT_PAGE_SIZE: i64 = 50;
/// Larger requested page sizes are reduced to this (AIP-158).
const MAX_PAGE_SIZE: i64 = 1000;

/// The orders service's gRPC implementation.
#[derive(Clone)]
pub struct OrdersApi {
    store: OrderStore,
    sagas: Orchestrator,
}

impl OrdersApi {
    /// An orders service whose sagas run on `sagas`.
    pub(crate) fn new(store: OrderStore, sagas: Orchestrator) -> Self {
        Self { store, sagas }
    }

    /// PlaceOrder's answer: the order and a token that reads it back from a replica.
    async fn placed(&self, order: Order) -> Result<Response<pb::PlaceOrderResponse>, Status> {
        let token = match self.store.consistency_token().await {
            Ok(token) => token.as_str().to_owned(),
            Err(error) => {
                tracing::warn!(order_id = %order.id, %error, "no consistency token for a placed order");
                String::new()
            }
        };
        Ok(Response::new(pb::PlaceOrderResponse {
            order: Some(to_proto(order)),
            consistency_token: token,
        }))
    }
}

#[tonic::async_trait]
impl pb::orders_service_server::OrdersService for OrdersApi {
    async fn place_order(
        &self,
        request: Request<pb::PlaceOrderRequest>,
    ) -> Result<Response<pb::PlaceOrderResponse>, Status> {
        // PlaceOrder's slot under its cap (crate::PLACE_ORDER) goes with the saga, which may
        // outlive this call (a caller that hangs up, a deadline), so the cap bounds sagas.
        let slot = request.extensions().get::<CapSlot>().cloned();
        let placement_key = request.extensions().get::<KeyId>().map(KeyId::digest);
        let request = request.into_inner();
        let items = request
            .items
            .into_iter()
            .map(|item| Item {
                sku: item.sku,
                quantity: item.quantity,
            })
            .collect();
        let new_order = NewOrder::validate(
            request.customer_id,
            items,
            request.delivery_address,
            request.zone,
        )?;
        // A saga resumed later by the driver links back to this call.
        let traceparent = waybill_runtime::telemetry::current_traceparent().unwrap_or_default();
        let order = match self
            .store
            .insert(
                placement_key,
                &new_order,
                self.sagas.settings().lease,
                &traceparent,
            )
            .await?
        {
            Placed::New(order) => order,
            Placed::Existing(order) if new_order.placed_as(&order) => {
                // A repeat of a keyed call that the idempotency layer let through after all
                // (it released the key when the database did not confirm the first call's
                // commit, which had happened). Its saga is the first call's, running or
                // resumed by the driver: answer with the order as it stands.
                tracing::info!(order_id = %order.id, "a repeated placement found its order");
                return self.placed(order).await;
            }
            Placed::Existing(_) => {
                return Err(Status::invalid_argument(
                    "idempotency-key was already used to place a different order",
                ));
            }
        };
        tracing::debug!(order_id = %order.id, customer_id = %order.customer_id, "order placed");
        // The saga has its own task: if this call is abandoned, the saga still finishes. From
        // here on the order exists, so no error may reach the caller: a retryable code would
        // release the idempotency key and a retry would place a second order. A saga that
        // failed to run is resumed by the driver when its lease ends; the caller sees PENDING.
        let order = match self.sagas.run_detached(order.clone(), slot).await {
            Ok(order) => order,
            Err(status) => {
                tracing::warn!(order_id = %order.id, %status, "saga did not run; it resumes when its lease ends");
                order
            }
        };
        self.placed(order).await
    }

    async fn get_order(
        &self,
        request: Request<pb::GetOrderRequest>,
    ) -> Result<Response<pb::GetOrderResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::default();
        let id = violations.uuid(&request.order_id, "order_id");
        let token = violations.consistency_token(&request.consistency_token, "consistency_token");
        let id = violations.into_parsed(id)?;
        match self.store.get(id, token.as_ref()).await? {
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
        let mut violations = Violations::default();
        violations.check_key(&request.customer_id, "customer_id");
        let page_size = violations.page_size(
            request.page_size,
            "page_size",
            DEFAULT_PAGE_SIZE,
            MAX_PAGE_SIZE,
        );
        let after = violations.page_cursor(&request.page_token, &request.customer_id, "page_token");
        let token = violations.consistency_token(&request.consistency_token, "consistency_token");
        violations.into_result(())?;

        // One extra row tells whether another page follows without a second query.
        let mut orders = self
            .store
            .list_by_customer(&request.customer_id, after, page_size + 1, token.as_ref())
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
        let mut violations = Violations::default();
        let id = violations.uuid(&request.order_id, "order_id");
        violations.check_text(&request.reason, "reason", false);
        let id = violations.into_parsed(id)?;
        let Some(current) = self.store.get_current(id).await? else {
            return Err(Status::not_found(format!("order {id} not found")));
        };
        if current.status != OrderStatus::Cancelled {
            // A courier may already be assigned (the saga assigns before it confirms) and on
            // the way: the order can be cancelled only while the delivery can, so ask the
            // delivery service first. For an order not assigned yet this leaves a tombstone
            // that refuses the saga's assignment, which then compensates.
            self.sagas
                .cancel_delivery(id, &request.reason)
                .await
                .map_err(|status| match status.code() {
                    Code::FailedPrecondition => Status::failed_precondition(format!(
                        "order {id} is out for delivery and can no longer be cancelled"
                    )),
                    _ => status,
                })?;
        }
        let traceparent = waybill_runtime::telemetry::current_traceparent().unwrap_or_default();
        match self.store.cancel(id, &request.reason, &traceparent).await? {
            Cancelled::Done(order) => {
                tracing::info!(order_id = %order.id, "order cancelled");
                // Release the stock now rather than when the driver next looks. A child of
                // this call's span, though it may end after the call answers.
                let sagas = self.sagas.clone();
                let span = Orchestrator::span(id, "compensate");
                tokio::spawn(
                    async move {
                        if let Err(error) = sagas.run(id).await {
                            tracing::warn!(order_id = %id, %error, "compensation failed; it is retried");
                        }
                    }
                    .instrument(span),
                );
                let token = self.store.consistency_token().await?;
                Ok(Response::new(pb::CancelOrderResponse {
                    order: Some(to_proto(order)),
                    consistency_token: token.as_str().to_owned(),
                }))
            }
            Cancelled::NotCancellable(order) => Err(Status::failed_precondition(format!(
                "order {id} is {} and can no longer be cancelled",
                order.status.as_str()
            ))),
            Cancelled::NotFound => Err(Status::not_found(format!("order {id} not found"))),
        }
    }

    async fn change_delivery_address(
        &self,
        request: Request<pb::ChangeDeliveryAddressRequest>,
    ) -> Result<Response<pb::ChangeDeliveryAddressResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::default();
        let id = violations.uuid(&request.order_id, "order_id");
        violations.check_text(&request.delivery_address, "delivery_address", true);
        let id = violations.into_parsed(id)?;
        match self
            .store
            .change_address(id, &request.delivery_address)
            .await?
        {
            Ok((order, previous)) => {
                let token = self.store.consistency_token().await?;
                Ok(Response::new(pb::ChangeDeliveryAddressResponse {
                    order: Some(to_proto(order)),
                    previous_delivery_address: previous,
                    consistency_token: token.as_str().to_owned(),
                }))
            }
            Err(Cancelled::NotFound) => Err(Status::not_found(format!("order {id} not found"))),
            Err(Cancelled::NotCancellable(_) | Cancelled::Done(_)) => {
                Err(Status::failed_precondition(format!(
                    "order {id} is cancelled; its address can no longer change"
                )))
            }
        }
    }
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
        zone: order.zone,
        courier_id: order.courier_id,
    }
}
