//! The inventory schema's SQL. Item rows are always locked in SKU order, so concurrent
//! reservations, releases and commits queue behind each other instead of deadlocking, and
//! every change of stock happens under that lock: stock cannot go negative.

use std::{collections::BTreeMap, time::Duration};

use deadpool_postgres::{GenericClient, Transaction};
use tokio_postgres::{Row, error::SqlState, types::ToSql};
use uuid::Uuid;
use waybill_runtime::{
    Db, DbError,
    pipeline::{PipelinedTx, Statement, pipeline},
};

use crate::domain::{Item, NewReservation, Reservation, ReservationState};

const ITEM_COLUMNS: &str = "sku, name, on_hand, reserved, updated_at";

/// Why a reservation change was refused.
#[derive(Debug)]
pub enum Refused {
    /// An item does not have the units asked for.
    OutOfStock {
        sku: String,
        requested: i32,
        available: i32,
    },
    /// An item is not in the catalog.
    UnknownItem(String),
    /// The reservation's state forbids the change.
    State(Reservation),
    /// No reservation for the order.
    NotFound,
}

/// Why a stock change was refused.
#[derive(Debug)]
pub enum StockRefused {
    /// No such item.
    NotFound,
    /// The change would leave fewer units on hand than are reserved (or fewer than zero).
    BelowReserved(Item),
}

#[derive(Clone)]
pub struct InventoryStore {
    db: Db,
}

impl InventoryStore {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Creates or replaces an item's name and stock on hand.
    #[tracing::instrument(name = "inventory.put_item", level = "debug", skip_all, fields(
        otel.kind = "client", db.system = "postgresql", db.operation.name = "put_item",
        db.namespace, waybill.db.role))]
    pub async fn put_item(
        &self,
        sku: &str,
        name: &str,
        on_hand: i32,
    ) -> Result<Result<Item, StockRefused>, DbError> {
        let client = self.db.primary().await?;
        let result = client
            .query_one(
                &format!(
                    "WITH changed AS (
                         INSERT INTO inventory.items (sku, name, on_hand) VALUES ($1, $2, $3)
                         ON CONFLICT (sku) DO UPDATE
                         SET name = EXCLUDED.name, on_hand = EXCLUDED.on_hand, updated_at = now()
                         RETURNING {ITEM_COLUMNS}
                     )
                     SELECT {ITEM_COLUMNS}, pg_notify('{channel}', sku) FROM changed",
                    channel = crate::cache::CHANNEL
                ),
                &[&sku, &name, &on_hand],
            )
            .await;
        match result {
            Ok(row) => Ok(Ok(item_from_row(&row)?)),
            Err(error) if error.code() == Some(&SqlState::CHECK_VIOLATION) => {
                let item = self.get_item_from(true, sku).await?;
                Ok(Err(item.map_or(
                    StockRefused::NotFound,
                    StockRefused::BelowReserved,
                )))
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Adds `delta` units (negative removes) unless that leaves fewer than are reserved.
    #[tracing::instrument(name = "inventory.adjust_stock", level = "debug", skip_all, fields(
        otel.kind = "client", db.system = "postgresql", db.operation.name = "adjust_stock",
        db.namespace, waybill.db.role))]
    pub async fn adjust_stock(
        &self,
        sku: &str,
        delta: i32,
    ) -> Result<Result<Item, StockRefused>, DbError> {
        let client = self.db.primary().await?;
        let row = client
            .query_opt(
                &format!(
                    "WITH changed AS (
                         UPDATE inventory.items
                         SET on_hand = on_hand + $2::integer, updated_at = now()
                         WHERE sku = $1 AND on_hand::bigint + $2::integer >= reserved
                           AND on_hand::bigint + $2::integer <= {max}
                         RETURNING {ITEM_COLUMNS}
                     )
                     SELECT {ITEM_COLUMNS}, pg_notify('{channel}', sku) FROM changed",
                    max = crate::domain::MAX_ON_HAND,
                    channel = crate::cache::CHANNEL
                ),
                &[&sku, &delta],
            )
            .await?;
        match row {
            Some(row) => Ok(Ok(item_from_row(&row)?)),
            None => {
                let item = self.get_item_from(true, sku).await?;
                Ok(Err(item.map_or(
                    StockRefused::NotFound,
                    StockRefused::BelowReserved,
                )))
            }
        }
    }

    /// One item, from a replica (the catalog tolerates replication lag).
    #[tracing::instrument(name = "inventory.get_item", level = "debug", skip_all, fields(
        otel.kind = "client", db.system = "postgresql", db.operation.name = "get_item",
        db.namespace, waybill.db.role))]
    pub async fn get_item(&self, sku: &str) -> Result<Option<Item>, DbError> {
        self.get_item_from(false, sku).await
    }

    /// One item, read on the primary: for filling a cache (see `cache.rs`).
    pub async fn get_item_from_primary(&self, sku: &str) -> Result<Option<Item>, DbError> {
        self.get_item_from(true, sku).await
    }

    async fn get_item_from(&self, primary: bool, sku: &str) -> Result<Option<Item>, DbError> {
        let client = if primary {
            self.db.primary().await?
        } else {
            self.db.replica().await?
        };
        let statement = client
            .prepare_cached(&format!(
                "SELECT {ITEM_COLUMNS} FROM inventory.items WHERE sku = $1"
            ))
            .await?;
        client
            .query_opt(&statement, &[&sku])
            .await?
            .map(|row| item_from_row(&row))
            .transpose()
    }

    /// Up to `limit` items after `after` in SKU order, from a replica.
    #[tracing::instrument(name = "inventory.list_items", level = "debug", skip_all, fields(
        otel.kind = "client", db.system = "postgresql", db.operation.name = "list_items",
        db.namespace, waybill.db.role))]
    pub async fn list_items(&self, after: Option<&str>, limit: i64) -> Result<Vec<Item>, DbError> {
        let client = self.db.replica().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {ITEM_COLUMNS} FROM inventory.items
                     WHERE ($1::text IS NULL OR sku > $1) ORDER BY sku LIMIT $2"
                ),
                &[&after, &limit],
            )
            .await?;
        rows.iter().map(item_from_row).collect()
    }

    /// Holds every line for the order, or none. A repeat returns the reservation as it
    /// stands.
    #[tracing::instrument(name = "inventory.reserve", level = "debug", skip_all, fields(
        otel.kind = "client", db.system = "postgresql", db.operation.name = "reserve",
        db.namespace, waybill.db.role))]
    pub async fn reserve(
        &self,
        request: &NewReservation,
        ttl: Duration,
    ) -> Result<Result<Reservation, Refused>, DbError> {
        let client = self.db.primary().await?;
        let ttl_seconds = ttl.as_secs_f64();
        let skus: Vec<&str> = request.lines.keys().map(String::as_str).collect();
        let quantities: Vec<i32> = request.lines.values().copied().collect();
        // BEGIN, the reservation's row and the item locks (SKU order) in one round trip. The
        // primary key decides between concurrent reserves of one order: the second waits for
        // the first to commit and then sees the row.
        let (tx, answers) = PipelinedTx::begin(
            client,
            &[
                (
                    "INSERT INTO inventory.reservations (order_id, state, expires_at)
                     VALUES ($1, 'HELD', now() + make_interval(secs => $2))
                     ON CONFLICT (order_id) DO NOTHING
                     RETURNING expires_at",
                    &[&request.order_id, &ttl_seconds],
                ),
                (
                    "SELECT sku, on_hand - reserved FROM inventory.items
                     WHERE sku = ANY($1) ORDER BY sku FOR UPDATE",
                    &[&skus],
                ),
            ],
        )
        .await?;
        let mut answers = answers.into_iter();
        let inserted = answers.next().and_then(|rows| rows.into_iter().next());
        let items = answers.next().unwrap_or_default();
        let Some(inserted) = inserted else {
            // Already reserved (the item locks go with the rollback).
            let existing = load_reservation(tx.client(), request.order_id, false).await?;
            tx.rollback().await?;
            return Ok(match existing {
                Some(r) if r.state == ReservationState::Released => Err(Refused::State(r)),
                Some(r) => Ok(r),
                None => Err(Refused::NotFound),
            });
        };
        let available: BTreeMap<String, i32> = items
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect::<Result<_, DbError>>()?;
        let refused = request
            .lines
            .iter()
            .find_map(|(sku, &requested)| match available.get(sku) {
                None => Some(Refused::UnknownItem(sku.clone())),
                Some(&available) if available < requested => Some(Refused::OutOfStock {
                    sku: sku.clone(),
                    requested,
                    available,
                }),
                Some(_) => None,
            });
        if let Some(refused) = refused {
            tx.rollback().await?;
            return Ok(Err(refused));
        }
        // The units held, the lines and COMMIT in one round trip.
        tx.commit(&[(
            "WITH wanted AS (SELECT * FROM unnest($2::text[], $3::int4[]) AS w(sku, quantity)),
                  held AS (
                      UPDATE inventory.items i SET reserved = i.reserved + w.quantity, updated_at = now()
                      FROM wanted w WHERE i.sku = w.sku
                  )
             INSERT INTO inventory.reservation_lines (order_id, sku, quantity)
             SELECT $1, sku, quantity FROM wanted",
            &[&request.order_id, &skus, &quantities],
        )])
        .await?;
        Ok(Ok(Reservation {
            order_id: request.order_id,
            lines: request.lines.clone(),
            state: ReservationState::Held,
            expires_at: inserted.try_get(0)?,
        }))
    }

    /// Gives back the stock of a reservation that is still HELD and past its expiry, checked
    /// under the row lock: a reservation committed since it was listed as expired keeps its
    /// stock. `false` when there was nothing to give back.
    #[tracing::instrument(name = "inventory.release_expired", level = "debug", skip_all, fields(
        otel.kind = "client", db.system = "postgresql", db.operation.name = "release_expired",
        db.namespace, waybill.db.role))]
    pub async fn release_expired(&self, order_id: Uuid) -> Result<bool, DbError> {
        let mut client = self.db.primary().await?;
        let tx = client.transaction().await?;
        let still_expired = tx
            .query_opt(
                &tx.prepare_cached(
                    "SELECT 1 FROM inventory.reservations
                     WHERE order_id = $1 AND state = 'HELD' AND expires_at < now()
                     FOR UPDATE",
                )
                .await?,
                &[&order_id],
            )
            .await?;
        if still_expired.is_none() {
            return Ok(false);
        }
        give_back(&tx, order_id, ReservationState::Held).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Gives a reservation's stock back. Unknown orders get a tombstone so that a late
    /// Reserve is refused.
    #[tracing::instrument(name = "inventory.release", level = "debug", skip_all, fields(
        otel.kind = "client", db.system = "postgresql", db.operation.name = "release",
        db.namespace, waybill.db.role))]
    pub async fn release(&self, order_id: Uuid) -> Result<Result<Reservation, Refused>, DbError> {
        let mut client = self.db.primary().await?;
        let tx = client.transaction().await?;
        let tombstone = tx
            .execute(
                &tx.prepare_cached(
                    "INSERT INTO inventory.reservations (order_id, state) VALUES ($1, 'RELEASED')
                 ON CONFLICT (order_id) DO NOTHING",
                )
                .await?,
                &[&order_id],
            )
            .await?;
        let reservation = load_reservation(&tx, order_id, true).await?;
        let Some(reservation) = reservation else {
            return Ok(Err(Refused::NotFound));
        };
        if tombstone == 1 {
            tx.commit().await?;
            return Ok(Ok(reservation));
        }
        if reservation.state == ReservationState::Released {
            return Ok(Ok(reservation));
        }
        give_back(&tx, order_id, reservation.state).await?;
        tx.commit().await?;
        Ok(Ok(Reservation {
            state: ReservationState::Released,
            expires_at: None,
            ..reservation
        }))
    }

    /// Makes a HELD reservation final: its units leave on_hand.
    #[tracing::instrument(name = "inventory.commit", level = "debug", skip_all, fields(
        otel.kind = "client", db.system = "postgresql", db.operation.name = "commit",
        db.namespace, waybill.db.role))]
    pub async fn commit(&self, order_id: Uuid) -> Result<Result<Reservation, Refused>, DbError> {
        let client = self.db.primary().await?;
        let (tx, answers) =
            PipelinedTx::begin(client, &reservation_queries(&[&order_id], true)).await?;
        let Some(reservation) = reservation_from_rows(order_id, answers)? else {
            tx.rollback().await?;
            return Ok(Err(Refused::NotFound));
        };
        match reservation.state {
            ReservationState::Committed | ReservationState::Released => {
                tx.rollback().await?;
                Ok(match reservation.state {
                    ReservationState::Committed => Ok(reservation),
                    _ => Err(Refused::State(reservation)),
                })
            }
            ReservationState::Held => {
                // Item locks in SKU order first, then both updates, then COMMIT: one round
                // trip.
                tx.commit(&[
                    (LOCK_ITEMS, &[&order_id]),
                    (
                        "UPDATE inventory.items i
                             SET on_hand = i.on_hand - l.quantity,
                                 reserved = i.reserved - l.quantity, updated_at = now()
                             FROM inventory.reservation_lines l
                             WHERE l.order_id = $1 AND i.sku = l.sku",
                        &[&order_id],
                    ),
                    (
                        "UPDATE inventory.reservations
                             SET state = 'COMMITTED', expires_at = NULL, updated_at = now()
                             WHERE order_id = $1",
                        &[&order_id],
                    ),
                ])
                .await?;
                Ok(Ok(Reservation {
                    state: ReservationState::Committed,
                    expires_at: None,
                    ..reservation
                }))
            }
        }
    }

    /// Orders whose HELD reservation has expired, oldest first, at most `limit`.
    pub async fn expired(&self, limit: i64) -> Result<Vec<Uuid>, DbError> {
        let client = self.db.primary().await?;
        let rows = client
            .query(
                "SELECT order_id FROM inventory.reservations
                 WHERE state = 'HELD' AND expires_at < now()
                 ORDER BY expires_at LIMIT $1",
                &[&limit],
            )
            .await?;
        rows.iter()
            .map(|row| row.try_get(0).map_err(DbError::from))
            .collect()
    }
}

/// Returns a HELD or COMMITTED reservation's units and marks it RELEASED: held units stop
/// being reserved; committed units come back on hand (the order was cancelled after its stock
/// was committed, before the goods left). The caller holds the reservation's row lock.
async fn give_back(
    tx: &Transaction<'_>,
    order_id: Uuid,
    state: ReservationState,
) -> Result<(), DbError> {
    let units = match state {
        ReservationState::Released => return Ok(()),
        ReservationState::Held => {
            "UPDATE inventory.items i SET reserved = i.reserved - l.quantity, updated_at = now()
             FROM inventory.reservation_lines l
             WHERE l.order_id = $1 AND i.sku = l.sku"
        }
        ReservationState::Committed => {
            "UPDATE inventory.items i SET on_hand = i.on_hand + l.quantity, updated_at = now()
             FROM inventory.reservation_lines l
             WHERE l.order_id = $1 AND i.sku = l.sku"
        }
    };
    lock_items(tx, order_id).await?;
    tx.execute(&tx.prepare_cached(units).await?, &[&order_id])
        .await?;
    tx.execute(
        &tx.prepare_cached(
            "UPDATE inventory.reservations
             SET state = 'RELEASED', expires_at = NULL, updated_at = now()
             WHERE order_id = $1",
        )
        .await?,
        &[&order_id],
    )
    .await?;
    Ok(())
}

/// Locks the items of order `$1`'s reservation, in SKU order (see the module comment).
const LOCK_ITEMS: &str = "SELECT 1 FROM inventory.items
     WHERE sku IN (SELECT sku FROM inventory.reservation_lines WHERE order_id = $1)
     ORDER BY sku FOR UPDATE";

/// Locks the reservation's item rows ([`LOCK_ITEMS`]).
async fn lock_items(tx: &Transaction<'_>, order_id: Uuid) -> Result<(), DbError> {
    tx.execute(&tx.prepare_cached(LOCK_ITEMS).await?, &[&order_id])
        .await?;
    Ok(())
}

async fn load_reservation(
    client: &impl GenericClient,
    order_id: Uuid,
    for_update: bool,
) -> Result<Option<Reservation>, DbError> {
    let answers = pipeline(client, &reservation_queries(&[&order_id], for_update)).await?;
    reservation_from_rows(order_id, answers)
}

/// The reservation of `order_id` (its row locked when `for_update`) and its lines: two
/// statements for one round trip, run in this order; the lines of a reservation never change
/// once written. `order_id` is the one parameter, `[&order_id]`; [`reservation_from_rows`]
/// reads their answers.
fn reservation_queries<'a>(
    order_id: &'a [&'a (dyn ToSql + Sync); 1],
    for_update: bool,
) -> [Statement<'a>; 2] {
    [
        (
            if for_update {
                "SELECT state, expires_at FROM inventory.reservations WHERE order_id = $1 FOR UPDATE"
            } else {
                "SELECT state, expires_at FROM inventory.reservations WHERE order_id = $1"
            },
            order_id,
        ),
        (
            "SELECT sku, quantity FROM inventory.reservation_lines
             WHERE order_id = $1 ORDER BY sku",
            order_id,
        ),
    ]
}

fn reservation_from_rows(
    order_id: Uuid,
    answers: Vec<Vec<Row>>,
) -> Result<Option<Reservation>, DbError> {
    let mut answers = answers.into_iter();
    let row = answers.next().and_then(|rows| rows.into_iter().next());
    let lines = answers.next().unwrap_or_default();
    let Some(row) = row else {
        return Ok(None);
    };
    let state: &str = row.try_get(0)?;
    let state = ReservationState::parse(state).ok_or_else(|| {
        DbError::Invariant(format!(
            "unknown reservation state {state:?} in the database"
        ))
    })?;
    let lines = lines
        .iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect::<Result<_, DbError>>()?;
    Ok(Some(Reservation {
        order_id,
        lines,
        state,
        expires_at: row.try_get(1)?,
    }))
}

fn item_from_row(row: &Row) -> Result<Item, DbError> {
    Ok(Item {
        sku: row.try_get("sku")?,
        name: row.try_get("name")?,
        on_hand: row.try_get("on_hand")?,
        reserved: row.try_get("reserved")?,
        updated_at: row.try_get("updated_at")?,
    })
}
