//! The gRPC edge: protobuf in, domain types inside, protobuf and `Status` out.

use std::time::Duration;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use tonic::{Request, Response, Status};
use waybill_api::inventory::v1 as pb;
use waybill_runtime::{
    Db,
    validate::{Violations, parse_uuid, precondition_failure, timestamp},
};

use crate::{
    cache::ItemCache,
    domain::{Item, MAX_ON_HAND, NewReservation, Reservation, ReservationState},
    store::{InventoryStore, Refused, StockRefused},
};

const DEFAULT_PAGE_SIZE: i64 = 100;
const MAX_PAGE_SIZE: i64 = 1000;

/// The inventory service's gRPC implementation.
#[derive(Clone)]
pub struct InventoryApi {
    store: InventoryStore,
    cache: ItemCache,
    reservation_ttl: Duration,
}

impl InventoryApi {
    /// An inventory service over `db` whose reservations expire after `reservation_ttl` and
    /// whose GetItem answers from `cache` when it can.
    pub(crate) fn new(db: Db, reservation_ttl: Duration, cache: ItemCache) -> Self {
        Self {
            store: InventoryStore::new(db),
            cache,
            reservation_ttl,
        }
    }

    pub(crate) fn store(&self) -> &InventoryStore {
        &self.store
    }
}

#[tonic::async_trait]
impl pb::inventory_service_server::InventoryService for InventoryApi {
    async fn put_item(
        &self,
        request: Request<pb::PutItemRequest>,
    ) -> Result<Response<pb::PutItemResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::default();
        violations.check_id(&request.sku, "sku");
        violations.check_text(&request.name, "name", false);
        if !(0..=MAX_ON_HAND).contains(&request.on_hand) {
            violations.add(
                "on_hand",
                format!(
                    "must be between 0 and {MAX_ON_HAND}, got {}",
                    request.on_hand
                ),
            );
        }
        violations.into_result(())?;
        let item = self
            .store
            .put_item(&request.sku, &request.name, request.on_hand)
            .await?
            .map_err(stock_refused)?;
        tracing::info!(sku = %item.sku, on_hand = item.on_hand, "item stored");
        Ok(Response::new(pb::PutItemResponse {
            item: Some(item_to_proto(item)),
        }))
    }

    async fn adjust_stock(
        &self,
        request: Request<pb::AdjustStockRequest>,
    ) -> Result<Response<pb::AdjustStockResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::default();
        violations.check_id(&request.sku, "sku");
        if request.delta == 0 {
            violations.add("delta", "must not be zero");
        }
        violations.into_result(())?;
        let item = self
            .store
            .adjust_stock(&request.sku, request.delta)
            .await?
            .map_err(stock_refused)?;
        Ok(Response::new(pb::AdjustStockResponse {
            item: Some(item_to_proto(item)),
        }))
    }

    async fn get_item(
        &self,
        request: Request<pb::GetItemRequest>,
    ) -> Result<Response<pb::GetItemResponse>, Status> {
        let sku = request.into_inner().sku;
        let mut violations = Violations::default();
        violations.check_id(&sku, "sku");
        violations.into_result(())?;
        let item = match self.cache.get(&sku) {
            Some(item) => item,
            None => {
                // A cached item comes from the primary (see `cache.rs`); without a cache, a
                // replica answers.
                let ticket = self.cache.ticket();
                let item = if self.cache.is_enabled() {
                    self.store.get_item_from_primary(&sku).await?
                } else {
                    self.store.get_item(&sku).await?
                };
                let item =
                    item.ok_or_else(|| Status::not_found(format!("item {sku} not found")))?;
                self.cache.insert(&item, ticket);
                item
            }
        };
        Ok(Response::new(pb::GetItemResponse {
            item: Some(item_to_proto(item)),
        }))
    }

    async fn list_items(
        &self,
        request: Request<pb::ListItemsRequest>,
    ) -> Result<Response<pb::ListItemsResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::default();
        let page_size = violations.page_size(
            request.page_size,
            "page_size",
            DEFAULT_PAGE_SIZE,
            MAX_PAGE_SIZE,
        );
        let after = if request.page_token.is_empty() {
            None
        } else {
            let decoded = URL_SAFE_NO_PAD
                .decode(&request.page_token)
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok());
            if decoded.is_none() {
                violations.add(
                    "page_token",
                    "is not a token from a previous ListItems response",
                );
            }
            decoded
        };
        violations.into_result(())?;
        // One extra row tells whether another page follows.
        let mut items = self
            .store
            .list_items(after.as_deref(), page_size + 1)
            .await?;
        let next_page_token = if items.len() as i64 > page_size {
            items.truncate(page_size as usize);
            items
                .last()
                .map(|last| URL_SAFE_NO_PAD.encode(&last.sku))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListItemsResponse {
            items: items.into_iter().map(item_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn reserve(
        &self,
        request: Request<pb::ReserveRequest>,
    ) -> Result<Response<pb::ReserveResponse>, Status> {
        let request = request.into_inner();
        let lines = request
            .lines
            .into_iter()
            .map(|line| (line.sku, line.quantity))
            .collect();
        let reservation =
            NewReservation::validate(&request.order_id, lines).map_err(Violations::into_status)?;
        let reservation = self
            .store
            .reserve(&reservation, self.reservation_ttl)
            .await?
            .map_err(refused)?;
        Ok(Response::new(pb::ReserveResponse {
            reservation: Some(reservation_to_proto(reservation)),
        }))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let order_id = parse_uuid(&request.get_ref().order_id, "order_id")?;
        let reservation = self.store.release(order_id).await?.map_err(refused)?;
        Ok(Response::new(pb::ReleaseResponse {
            reservation: Some(reservation_to_proto(reservation)),
        }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        let order_id = parse_uuid(&request.get_ref().order_id, "order_id")?;
        let reservation = self.store.commit(order_id).await?.map_err(refused)?;
        Ok(Response::new(pb::CommitResponse {
            reservation: Some(reservation_to_proto(reservation)),
        }))
    }
}

fn refused(refused: Refused) -> Status {
    match refused {
        Refused::OutOfStock {
            sku,
            requested,
            available,
        } => precondition_failure(
            "STOCK",
            &sku,
            format!("not enough stock of {sku}: {requested} requested, {available} available"),
        ),
        Refused::UnknownItem(sku) => {
            precondition_failure("STOCK", &sku, format!("{sku} is not in the catalog"))
        }
        Refused::State(reservation) => Status::failed_precondition(format!(
            "the reservation for order {} is {}",
            reservation.order_id,
            reservation.state.as_str()
        )),
        Refused::NotFound => Status::not_found("no reservation for that order"),
    }
}

fn stock_refused(refused: StockRefused) -> Status {
    match refused {
        StockRefused::NotFound => Status::not_found("item not found"),
        StockRefused::BelowReserved(item) => precondition_failure(
            "STOCK",
            &item.sku,
            format!(
                "{}: {} units are reserved and {} on hand; stock on hand cannot go below what \
                 is reserved, below 0 or above {MAX_ON_HAND}",
                item.sku, item.reserved, item.on_hand
            ),
        ),
    }
}

fn item_to_proto(item: Item) -> pb::Item {
    pb::Item {
        available: item.on_hand - item.reserved,
        sku: item.sku,
        name: item.name,
        on_hand: item.on_hand,
        reserved: item.reserved,
        update_time: Some(timestamp(item.updated_at)),
    }
}

fn reservation_to_proto(reservation: Reservation) -> pb::Reservation {
    pb::Reservation {
        order_id: reservation.order_id.to_string(),
        lines: reservation
            .lines
            .into_iter()
            .map(|(sku, quantity)| pb::ReservationLine { sku, quantity })
            .collect(),
        state: match reservation.state {
            ReservationState::Held => pb::ReservationState::Held,
            ReservationState::Committed => pb::ReservationState::Committed,
            ReservationState::Released => pb::ReservationState::Released,
        } as i32,
        expire_time: reservation.expires_at.map(timestamp),
    }
}
