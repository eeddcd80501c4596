//! The gRPC edge: protobuf in, domain types inside, protobuf and `Status` out. Every input is
//! checked here, with every bad field named, before the store is asked anything.

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use uuid::Uuid;
use waybill_api::delivery::v1 as pb;
use waybill_runtime::{
    Db,
    validate::{Violations, parse_uuid, precondition_failure, timestamp},
};

use crate::{
    domain::{Courier, Delivery, DeliveryStatus, Location, TrackingEvent},
    store::{Assigned, Cancelled, DeliveryStore, Updated},
    tracking::{Hub, Subscription},
};

/// Messages a TrackDelivery stream may hold for a slow reader before its watcher waits.
const STREAM_BUFFER: usize = 16;

/// The delivery service's gRPC implementation.
#[derive(Clone)]
pub struct DeliveryApi {
    store: DeliveryStore,
    hub: Hub,
}

impl DeliveryApi {
    /// A delivery service over the given pools. Tracking's listening session (one connection
    /// outside the pools) opens with the first TrackDelivery call.
    pub fn new(db: Db) -> Self {
        Self {
            store: DeliveryStore::new(db.clone()),
            hub: Hub::new(db),
        }
    }
}

#[tonic::async_trait]
impl pb::delivery_service_server::DeliveryService for DeliveryApi {
    async fn put_courier(
        &self,
        request: Request<pb::PutCourierRequest>,
    ) -> Result<Response<pb::PutCourierResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::default();
        Courier::check_new(
            &request.courier_id,
            &request.name,
            &request.zone,
            request.capacity,
            &mut violations,
        );
        violations.into_result(())?;
        let courier = self
            .store
            .put_courier(
                &request.courier_id,
                &request.name,
                &request.zone,
                request.capacity,
            )
            .await?;
        tracing::info!(courier_id = %courier.id, zone = %courier.zone, capacity = courier.capacity, "courier stored");
        Ok(Response::new(pb::PutCourierResponse {
            courier: Some(pb::Courier {
                courier_id: courier.id,
                name: courier.name,
                zone: courier.zone,
                capacity: courier.capacity,
                active: courier.active,
            }),
        }))
    }

    async fn assign_courier(
        &self,
        request: Request<pb::AssignCourierRequest>,
    ) -> Result<Response<pb::AssignCourierResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::default();
        let order_id = violations.uuid(&request.order_id, "order_id");
        violations.check_key(&request.customer_id, "customer_id");
        violations.check_key(&request.zone, "zone");
        let order_id = violations.into_parsed(order_id)?;
        let delivery = match self
            .store
            .assign(order_id, &request.customer_id, &request.zone)
            .await?
        {
            Assigned::Created(delivery) => {
                tracing::debug!(%order_id, courier_id = ?delivery.courier_id, zone = %delivery.zone, "courier assigned");
                delivery
            }
            Assigned::Existing(delivery) if delivery.status == DeliveryStatus::Cancelled => {
                return Err(Status::failed_precondition(format!(
                    "delivery for order {order_id} was cancelled"
                )));
            }
            Assigned::Existing(delivery) => delivery,
            Assigned::NoCourier => {
                return Err(precondition_failure(
                    "COURIER",
                    &request.zone,
                    format!("no courier in zone {} has capacity left", request.zone),
                ));
            }
        };
        Ok(Response::new(pb::AssignCourierResponse {
            delivery: Some(to_proto(delivery)),
        }))
    }

    async fn cancel_assignment(
        &self,
        request: Request<pb::CancelAssignmentRequest>,
    ) -> Result<Response<pb::CancelAssignmentResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::default();
        let order_id = violations.uuid(&request.order_id, "order_id");
        violations.check_text(&request.reason, "reason", false);
        let order_id = violations.into_parsed(order_id)?;
        match self.store.cancel(order_id, &request.reason).await? {
            Cancelled::Done(delivery) => {
                tracing::info!(%order_id, courier_id = ?delivery.courier_id, "delivery cancelled");
                Ok(Response::new(pb::CancelAssignmentResponse {
                    delivery: Some(to_proto(delivery)),
                }))
            }
            Cancelled::NotCancellable(delivery) => Err(Status::failed_precondition(format!(
                "delivery for order {order_id} is {} and can no longer be cancelled",
                delivery.status.as_str()
            ))),
        }
    }

    async fn update_status(
        &self,
        request: Request<pb::UpdateStatusRequest>,
    ) -> Result<Response<pb::UpdateStatusResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::default();
        let order_id = violations.uuid(&request.order_id, "order_id");
        let status = match pb::DeliveryStatus::try_from(request.status) {
            Ok(pb::DeliveryStatus::PickedUp) => Some(DeliveryStatus::PickedUp),
            Ok(pb::DeliveryStatus::InTransit) => Some(DeliveryStatus::InTransit),
            Ok(pb::DeliveryStatus::Delivered) => Some(DeliveryStatus::Delivered),
            Ok(pb::DeliveryStatus::Failed) => Some(DeliveryStatus::Failed),
            Ok(pb::DeliveryStatus::Unspecified) => {
                violations.add("status", "required");
                None
            }
            Ok(pb::DeliveryStatus::Assigned | pb::DeliveryStatus::Cancelled) | Err(_) => {
                violations.add(
                    "status",
                    "must be PICKED_UP, IN_TRANSIT, DELIVERED or FAILED \
                     (AssignCourier assigns, CancelAssignment cancels)",
                );
                None
            }
        };
        let location = request.location.map(from_proto_location);
        if let Some(location) = &location {
            location.check("location", &mut violations);
        }
        violations.check_text(&request.reason, "reason", false);
        let (order_id, status) = violations.into_parsed(order_id.zip(status))?;
        let updated = self
            .store
            .update_status(order_id, status, location, &request.reason)
            .await?;
        let delivery = updated_or_status(order_id, updated, |delivery| {
            format!(
                "delivery for order {order_id} cannot go from {} to {}",
                delivery.status.as_str(),
                status.as_str()
            )
        })?;
        let token = self.store.consistency_token().await?;
        Ok(Response::new(pb::UpdateStatusResponse {
            delivery: Some(to_proto(delivery)),
            consistency_token: token.as_str().to_owned(),
        }))
    }

    async fn update_location(
        &self,
        request: Request<pb::UpdateLocationRequest>,
    ) -> Result<Response<pb::UpdateLocationResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::default();
        let order_id = violations.uuid(&request.order_id, "order_id");
        let location = match request.location {
            Some(location) => {
                let location = from_proto_location(location);
                location.check("location", &mut violations);
                Some(location)
            }
            None => {
                violations.add("location", "required");
                None
            }
        };
        let (order_id, location) = violations.into_parsed(order_id.zip(location))?;
        let updated = self.store.update_location(order_id, location).await?;
        let delivery = updated_or_status(order_id, updated, |delivery| {
            format!(
                "delivery for order {order_id} is {}; locations are recorded only while \
                 PICKED_UP or IN_TRANSIT",
                delivery.status.as_str()
            )
        })?;
        let token = self.store.consistency_token().await?;
        Ok(Response::new(pb::UpdateLocationResponse {
            delivery: Some(to_proto(delivery)),
            consistency_token: token.as_str().to_owned(),
        }))
    }

    async fn get_delivery(
        &self,
        request: Request<pb::GetDeliveryRequest>,
    ) -> Result<Response<pb::GetDeliveryResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::default();
        let order_id = violations.uuid(&request.order_id, "order_id");
        let token = violations.consistency_token(&request.consistency_token, "consistency_token");
        let order_id = violations.into_parsed(order_id)?;
        match self
            .store
            .get_with_history(order_id, token.as_ref())
            .await?
        {
            Some((delivery, history)) => Ok(Response::new(pb::GetDeliveryResponse {
                delivery: Some(to_proto(delivery)),
                history: history.into_iter().map(event_to_proto).collect(),
            })),
            None => Err(not_found(order_id)),
        }
    }

    type TrackDeliveryStream = ReceiverStream<Result<pb::TrackDeliveryResponse, Status>>;

    async fn track_delivery(
        &self,
        request: Request<pb::TrackDeliveryRequest>,
    ) -> Result<Response<Self::TrackDeliveryStream>, Status> {
        let order_id = parse_uuid(&request.get_ref().order_id, "order_id")?;
        // Subscribe first: a change committed after this point is signalled, and one
        // committed before it is in the state read next.
        let subscription = self.hub.subscribe(order_id);
        let Some(current) = self.store.current(order_id).await? else {
            return Err(not_found(order_id));
        };
        let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(watch(self.store.clone(), subscription, current, sender));
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

/// Feeds one TrackDelivery stream: the current state, then every change in version order,
/// until the delivery ends or the caller hangs up (the receiver is dropped, which stops this
/// at its next send or wait).
async fn watch(
    store: DeliveryStore,
    mut subscription: Subscription,
    mut last: Delivery,
    stream: mpsc::Sender<Result<pb::TrackDeliveryResponse, Status>>,
) {
    if stream.send(Ok(track_response(&last))).await.is_err() {
        return;
    }
    while !last.status.is_final() {
        tokio::select! {
            () = stream.closed() => return,
            () = subscription.changed() => {}
        }
        let changes = match store.changes_since(last.order_id, last.version).await {
            Ok(changes) => changes,
            Err(error) => {
                let _ = stream.send(Err(error.into())).await;
                return;
            }
        };
        for (event, current) in changes {
            if event.version <= last.version {
                continue;
            }
            let next = last.after(&event, &current);
            if stream.send(Ok(track_response(&next))).await.is_err() {
                return;
            }
            last = next;
            if last.status.is_final() {
                break;
            }
        }
    }
    tracing::debug!(order_id = %last.order_id, status = last.status.as_str(), "tracking stream ended");
}

/// The checked value when no violation was found, else INVALID_ARGUMENT naming them all.
fn not_found(order_id: Uuid) -> Status {
    Status::not_found(format!("no delivery for order {order_id}"))
}

/// The delivery after an update, or the status saying why there is none; `forbidden` words
/// the FAILED_PRECONDITION message from the delivery as it stands.
fn updated_or_status(
    order_id: Uuid,
    updated: Updated,
    forbidden: impl FnOnce(&Delivery) -> String,
) -> Result<Delivery, Status> {
    match updated {
        Updated::Changed(delivery) => {
            tracing::info!(%order_id, status = delivery.status.as_str(), version = delivery.version, "delivery updated");
            Ok(delivery)
        }
        Updated::Unchanged(delivery) => Ok(delivery),
        Updated::Forbidden(delivery) => Err(Status::failed_precondition(forbidden(&delivery))),
        Updated::NotFound => Err(not_found(order_id)),
    }
}

fn from_proto_location(location: pb::Location) -> Location {
    Location {
        latitude: location.latitude,
        longitude: location.longitude,
    }
}

fn location_to_proto(location: Location) -> pb::Location {
    pb::Location {
        latitude: location.latitude,
        longitude: location.longitude,
    }
}

fn track_response(delivery: &Delivery) -> pb::TrackDeliveryResponse {
    pb::TrackDeliveryResponse {
        delivery: Some(to_proto(delivery.clone())),
    }
}

fn to_proto(delivery: Delivery) -> pb::Delivery {
    pb::Delivery {
        order_id: delivery.order_id.to_string(),
        customer_id: delivery.customer_id,
        courier_id: delivery.courier_id.unwrap_or_default(),
        zone: delivery.zone,
        status: pb::DeliveryStatus::from(delivery.status) as i32,
        location: delivery.location.map(location_to_proto),
        reason: delivery.reason,
        version: delivery.version,
        create_time: Some(timestamp(delivery.created_at)),
        update_time: Some(timestamp(delivery.updated_at)),
    }
}

fn event_to_proto(event: TrackingEvent) -> pb::TrackingEvent {
    pb::TrackingEvent {
        version: event.version,
        status: pb::DeliveryStatus::from(event.status) as i32,
        location: event.location.map(location_to_proto),
        time: Some(timestamp(event.at)),
    }
}
