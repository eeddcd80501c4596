//! The handler registry: one handler per command kind. The platform's handlers call the
//! services through mesh-layer clients, each call carrying an `idempotency-key` derived from
//! the command id, so a command run twice (a worker died after the call but before recording
//! the outcome) has its effect once: the service replays the first answer.

use std::{collections::HashMap, sync::Arc, time::Duration};

use mesh_layer::{balance::Balancer, client::MeshClient, connection::Connection};
use tonic::{Code, Request, Status};
use uuid::Uuid;
use waybill_api::{
    commands::v1::command_payload::Kind as PayloadKind,
    inventory::v1::{self as inventory, inventory_service_client::InventoryServiceClient},
    notifications::v1::{
        self as notifications, notifications_service_client::NotificationsServiceClient,
    },
    orders::v1::{self as orders, orders_service_client::OrdersServiceClient},
};

use crate::domain::{Kind, Payload, address_result};

/// The metadata a handler's calls identify themselves with (the idempotency scope).
const CALLER: &str = "waybill-commands";

/// What a handler is given.
#[derive(Debug, Clone)]
pub struct Execution {
    pub command_id: Uuid,
    pub user_id: String,
    pub payload: Payload,
    pub attempt: i32,
}

impl Execution {
    /// The idempotency key of this command's calls: the same on every attempt.
    pub fn idempotency_key(&self) -> String {
        format!("command:{}", self.command_id)
    }
}

/// Why a run failed.
#[derive(Debug, Clone)]
pub enum Failure {
    /// Might work later (a service down, overloaded, a timeout): retried with backoff.
    Transient(String),
    /// Will not work however often it is tried (refused, not found): DEAD at once.
    Permanent(String),
}

impl Failure {
    /// Sorts a service's answer: codes that say "not now" are transient, codes that say
    /// "never" are permanent.
    pub fn from_status(call: &str, status: &Status) -> Self {
        let text = format!("{call}: {:?}: {}", status.code(), status.message());
        match status.code() {
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Internal
            | Code::Unknown
            | Code::Cancelled => Failure::Transient(text),
            _ => Failure::Permanent(text),
        }
    }
}

/// Runs commands of one kind.
#[tonic::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Runs the command; on success, what it did (shown as the command's result).
    async fn run(&self, execution: &Execution) -> Result<String, Failure>;
}

/// Kinds to handlers.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<Kind, Arc<dyn Handler>>,
}

impl Registry {
    pub fn with(mut self, kind: Kind, handler: impl Handler) -> Self {
        self.handlers.insert(kind, Arc::new(handler));
        self
    }

    pub fn get(&self, kind: Kind) -> Option<&Arc<dyn Handler>> {
        self.handlers.get(&kind)
    }

    /// The platform's handlers: every kind, through the given clients.
    pub fn platform(clients: Clients) -> Self {
        let platform = Arc::new(clients);
        Kind::ALL
            .into_iter()
            .fold(Registry::default(), |registry, kind| {
                registry.with(kind, PlatformHandler(platform.clone()))
            })
    }
}

pub type Mesh = MeshClient<Balancer<Connection>>;

/// The services the platform's handlers call.
#[derive(Clone)]
pub struct Clients {
    pub orders: OrdersServiceClient<Mesh>,
    pub inventory: InventoryServiceClient<Mesh>,
    pub notifications: NotificationsServiceClient<Mesh>,
    /// The deadline of each call.
    pub timeout: Duration,
}

impl Clients {
    fn request<T>(&self, execution: &Execution, message: T) -> Result<Request<T>, Failure> {
        let mut request = Request::new(message);
        request.set_timeout(self.timeout);
        let metadata = request.metadata_mut();
        let key = execution
            .idempotency_key()
            .parse()
            .map_err(|_| Failure::Permanent("command id is not valid metadata".into()))?;
        metadata.insert("idempotency-key", key);
        metadata.insert(
            "waybill-caller",
            tonic::metadata::MetadataValue::from_static(CALLER),
        );
        Ok(request)
    }
}

struct PlatformHandler(Arc<Clients>);

#[tonic::async_trait]
impl Handler for PlatformHandler {
    async fn run(&self, execution: &Execution) -> Result<String, Failure> {
        let clients = &self.0;
        match execution.payload.get() {
            PayloadKind::CancelOrder(cancel) => {
                let request = clients.request(
                    execution,
                    orders::CancelOrderRequest {
                        order_id: cancel.order_id.clone(),
                        reason: cancel.reason.clone(),
                    },
                )?;
                let order = clients
                    .orders
                    .clone()
                    .cancel_order(request)
                    .await
                    .map_err(|status| Failure::from_status("orders.CancelOrder", &status))?
                    .into_inner()
                    .order
                    .ok_or_else(|| Failure::Transient("CancelOrder returned no order".into()))?;
                Ok(format!("order {} is {:?}", order.order_id, order.status()))
            }
            PayloadKind::ChangeDeliveryAddress(change) => {
                let request = clients.request(
                    execution,
                    orders::ChangeDeliveryAddressRequest {
                        order_id: change.order_id.clone(),
                        delivery_address: change.delivery_address.clone(),
                    },
                )?;
                let previous = clients
                    .orders
                    .clone()
                    .change_delivery_address(request)
                    .await
                    .map_err(|status| {
                        Failure::from_status("orders.ChangeDeliveryAddress", &status)
                    })?
                    .into_inner()
                    .previous_delivery_address;
                Ok(address_result(&previous))
            }
            PayloadKind::RestockItem(restock) => {
                let request = clients.request(
                    execution,
                    inventory::AdjustStockRequest {
                        sku: restock.sku.clone(),
                        delta: restock.quantity,
                    },
                )?;
                let item = clients
                    .inventory
                    .clone()
                    .adjust_stock(request)
                    .await
                    .map_err(|status| Failure::from_status("inventory.AdjustStock", &status))?
                    .into_inner()
                    .item
                    .ok_or_else(|| Failure::Transient("AdjustStock returned no item".into()))?;
                Ok(format!(
                    "{} adjusted by {}: {} on hand",
                    item.sku, restock.quantity, item.on_hand
                ))
            }
            PayloadKind::SendNotification(send) => {
                let request = clients.request(
                    execution,
                    notifications::SendNotificationRequest {
                        customer_id: send.customer_id.clone(),
                        message: send.message.clone(),
                        request_id: execution.command_id.to_string(),
                    },
                )?;
                let notification = clients
                    .notifications
                    .clone()
                    .send_notification(request)
                    .await
                    .map_err(|status| {
                        Failure::from_status("notifications.SendNotification", &status)
                    })?
                    .into_inner()
                    .notification
                    .ok_or_else(|| {
                        Failure::Transient("SendNotification returned no notification".into())
                    })?;
                Ok(format!("notification {}", notification.notification_id))
            }
        }
    }
}
