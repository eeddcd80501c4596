//! The orders schema's SQL. Every write is one statement or one transaction, so a failed call
//! leaves nothing half-written.

use std::{sync::LazyLock, time::Duration};

use tokio_postgres::Row;
use uuid::Uuid;
use waybill_runtime::{
    Client, ConsistencyToken, Db, DbError,
    group_commit::{Abandoned, GroupCommit},
};

use crate::{
    domain::{Item, NewOrder, Order, OrderStatus},
    outbox,
};

const ORDER_COLUMNS: &str = "o.id, o.customer_id, o.delivery_address, o.status, o.cancel_reason, \
     o.created_at, o.updated_at, o.zone, o.courier_id, \
     ARRAY(SELECT sku FROM orders.order_items i WHERE i.order_id = o.id ORDER BY line_no) AS skus, \
     ARRAY(SELECT quantity FROM orders.order_items i WHERE i.order_id = o.id ORDER BY line_no) AS quantities";

/// [`OrderStore::confirm`]'s statement ($1 order, $2 courier, then the outbox row). One
/// statement, so one round trip and no explicit transaction. The saga row is locked before
/// the order row, as `cancel` does, so the two never deadlock; a saga no longer going forward
/// (a cancel won) locks nothing and changes nothing.
static CONFIRM: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH saga AS (
             SELECT order_id FROM orders.sagas
             WHERE order_id = $1 AND phase = 'FORWARD'
             FOR UPDATE
         ), confirmed AS (
             UPDATE orders.orders
             SET status = 'CONFIRMED', courier_id = $2, updated_at = now()
             WHERE id IN (SELECT order_id FROM saga) AND status = 'PENDING'
             RETURNING *
         ), ended AS (
             UPDATE orders.sagas SET phase = 'DONE', step = '', last_error = '', updated_at = now()
             WHERE order_id IN (SELECT id FROM confirmed)
         ), {}
         SELECT {ORDER_COLUMNS} FROM confirmed o",
        outbox::OutboxRow::cte(outbox::SCHEMA, "confirmed", 3)
    )
});

/// What [`OrderStore::insert`] did.
pub enum Placed {
    /// The order is new: stored PENDING with its saga.
    New(Order),
    /// An order with that placement key was already stored (by an earlier run of the same
    /// keyed call); here it is as it stands now. Nothing was written.
    Existing(Order),
}

/// The outcome of a cancel request.
pub enum Cancelled {
    /// The order is cancelled now (or already was).
    Done(Order),
    /// The order's state does not allow it.
    NotCancellable(Order),
    /// No such order.
    NotFound,
}

#[derive(Clone)]
pub struct OrderStore {
    db: Db,
    inserts: GroupCommit<PendingInsert, Inserted>,
}

/// An order waiting for its batch ([`OrderStore::insert`]).
struct PendingInsert {
    id: Uuid,
    /// The digest of a keyed call's idempotency key ([`OrderStore::insert`]).
    placement_key: Option<[u8; 32]>,
    order: NewOrder,
    lease_seconds: f64,
    traceparent: String,
}

/// A stored order's `created_at` and `updated_at`, or `None` when an order with its placement
/// key was already there (a repeat of a keyed placement: [`OrderStore::insert`]).
type Inserted = Result<Option<(Timestamp, Timestamp)>, DbError>;
type Timestamp = chrono::DateTime<chrono::Utc>;

/// Writers storing new orders: two, so one batch gathers while the other commits.
const INSERT_WRITERS: usize = 2;
/// Most orders in one insert statement.
const INSERT_BATCH: usize = 64;
/// Orders that may wait for a writer; PlaceOrder's admission cap keeps far fewer in flight
/// (an abandoned one leaves its slot, but is dropped from the queue unstored).
const INSERT_QUEUE: usize = 4096;

impl OrderStore {
    /// The store, with its insert writers. Must be called inside a tokio runtime.
    pub fn new(db: Db) -> Self {
        let writer_db = db.clone();
        let inserts = GroupCommit::start(
            "orders.insert",
            INSERT_WRITERS,
            INSERT_BATCH,
            INSERT_QUEUE,
            // The mesh layer gives a PlaceOrder's key up when the call is abandoned, and its
            // retry places the order anew. A keyed one would find the abandoned order by its
            // placement key if it were stored, but an unkeyed one would make two; and a caller
            // that gave up before its order was even queued for a writer expects none.
            Abandoned::Skip,
            move |batch| insert_batch(writer_db.clone(), batch),
        );
        Self { db, inserts }
    }

    /// Stores a new PENDING order with its items and its saga (FORWARD, leased to the caller
    /// for `lease`, started by the call traced as `traceparent`), atomically, unless an order
    /// with `placement_key` (a keyed call's [`mesh_layer::idempotency::KeyId::digest`])
    /// exists already: then that one is returned, unchanged. Concurrent orders share one
    /// statement and one commit ([`GroupCommit`]).
    #[tracing::instrument(name = "orders.insert", level = "debug", skip_all, fields(
        otel.kind = "client", db.system = "postgresql", db.operation.name = "insert",
        db.namespace, waybill.db.role, waybill.group_commit.queued_ms,
        waybill.group_commit.batch_size))]
    pub async fn insert(
        &self,
        placement_key: Option<[u8; 32]>,
        order: &NewOrder,
        lease: Duration,
        traceparent: &str,
    ) -> Result<Placed, DbError> {
        let id = Uuid::now_v7();
        // The writer task takes the connection; the span still says where its work went.
        self.db.note_primary();
        let stored = self
            .inserts
            .submit(PendingInsert {
                id,
                placement_key,
                order: order.clone(),
                lease_seconds: lease.as_secs_f64(),
                traceparent: traceparent.to_owned(),
            })
            .await
            .map_err(|refused| DbError::Unavailable(refused.to_string()))??;
        let Some((created_at, updated_at)) = stored else {
            let existing = match &placement_key {
                Some(key) => self.get_placed_with(key).await?,
                None => None,
            };
            return existing.map(Placed::Existing).ok_or_else(|| {
                DbError::Invariant(
                    "an order's placement key conflicted, and no order has it".into(),
                )
            });
        };
        Ok(Placed::New(Order {
            id,
            customer_id: order.customer_id.clone(),
            items: order.items.clone(),
            delivery_address: order.delivery_address.clone(),
            status: OrderStatus::Pending,
            cancel_reason: String::new(),
            created_at,
            updated_at,
            zone: order.zone.clone(),
            courier_id: String::new(),
        }))
    }

    /// One order as the primary has it now.
    #[tracing::instrument(name = "orders.get_current", level = "debug", skip_all, fields(
        otel.kind = "client", db.system = "postgresql", db.operation.name = "get_current",
        db.namespace, waybill.db.role))]
    pub async fn get_current(&self, id: Uuid) -> Result<Option<Order>, DbError> {
        let client = self.db.primary().await?;
        Self::get_on(&client, id).await
    }

    /// One order from a replica that reflects `after` (see [`Db::replica_after`]).
    #[tracing::instrument(name = "orders.get", level = "debug", skip_all, fields(
        otel.kind = "client", db.system = "postgresql", db.operation.name = "get",
        db.namespace, waybill.db.role))]
    pub async fn get(
        &self,
        id: Uuid,
        after: Option<&ConsistencyToken>,
    ) -> Result<Option<Order>, DbError> {
        let client = self.db.replica_after(after).await?;
        Self::get_on(&client, id).await
    }

    /// A token covering every write committed so far.
    #[tracing::instrument(name = "orders.consistency_token", level = "debug", skip_all, fields(
        otel.kind = "client", db.system = "postgresql", db.operation.name = "consistency_token",
        db.namespace, waybill.db.role))]
    pub async fn consistency_token(&self) -> Result<ConsistencyToken, DbError> {
        self.db.consistency_token().await
    }

    /// The order placed with `placement_key`, as the primary has it now.
    async fn get_placed_with(&self, placement_key: &[u8; 32]) -> Result<Option<Order>, DbError> {
        let client = self.db.primary().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {ORDER_COLUMNS} FROM orders.orders o WHERE o.placement_key = $1"
            ))
            .await?;
        client
            .query_opt(&statement, &[&placement_key.as_slice()])
            .await?
            .map(|row| order_from_row(&row))
            .transpose()
    }

    async fn get_on(client: &Client, id: Uuid) -> Result<Option<Order>, DbError> {
        let statement = client
            .prepare_cached(&format!(
                "SELECT {ORDER_COLUMNS} FROM orders.orders o WHERE o.id = $1"
            ))
            .await?;
        client
            .query_opt(&statement, &[&id])
            .await?
            .map(|row| order_from_row(&row))
            .transpose()
    }

    /// Up to `limit` of a customer's orders older than `after`, newest first, from a replica
    /// that reflects `token`.
    #[tracing::instrument(name = "orders.list_by_customer", level = "debug", skip_all, fields(
        otel.kind = "client", db.system = "postgresql", db.operation.name = "list_by_customer",
        db.namespace, waybill.db.role))]
    pub async fn list_by_customer(
        &self,
        customer_id: &str,
        after: Option<Uuid>,
        limit: i64,
        token: Option<&ConsistencyToken>,
    ) -> Result<Vec<Order>, DbError> {
        let client = self.db.replica_after(token).await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {ORDER_COLUMNS} FROM orders.orders o
                 WHERE o.customer_id = $1 AND ($2::uuid IS NULL OR o.id < $2)
                 ORDER BY o.id DESC
                 LIMIT $3"
            ))
            .await?;
        client
            .query(&statement, &[&customer_id, &after, &limit])
            .await?
            .iter()
            .map(order_from_row)
            .collect()
    }

    /// Cancels an order if its state allows, and turns its saga to compensation (release
    /// the stock, cancel the delivery; a resumed compensation links to `traceparent`) in the
    /// same transaction; an already cancelled order is returned as is.
    #[tracing::instrument(name = "orders.cancel", level = "debug", skip_all, fields(
        otel.kind = "client", db.system = "postgresql", db.operation.name = "cancel",
        db.namespace, waybill.db.role))]
    pub async fn cancel(
        &self,
        id: Uuid,
        reason: &str,
        traceparent: &str,
    ) -> Result<Cancelled, DbError> {
        let mut client = self.db.primary().await?;
        let transaction = client.transaction().await?;
        // Lock the saga row, then the order row: the order confirm and finish_compensation
        // take them (saga, then order), so two transactions never wait on each other in a
        // cycle. Locked, a concurrent state change (the saga confirming) cannot slip between
        // the check and the update.
        transaction
            .execute(
                &transaction
                    .prepare_cached("SELECT 1 FROM orders.sagas WHERE order_id = $1 FOR UPDATE")
                    .await?,
                &[&id],
            )
            .await?;
        let row = transaction
            .query_opt(
                &transaction
                    .prepare_cached(&format!(
                        "SELECT {ORDER_COLUMNS} FROM orders.orders o WHERE o.id = $1 FOR UPDATE"
                    ))
                    .await?,
                &[&id],
            )
            .await?;
        let Some(row) = row else {
            return Ok(Cancelled::NotFound);
        };
        let order = order_from_row(&row)?;
        if order.status == OrderStatus::Cancelled {
            return Ok(Cancelled::Done(order));
        }
        if !order.status.is_cancellable() {
            return Ok(Cancelled::NotCancellable(order));
        }
        let row = transaction
            .query_one(
                &transaction
                    .prepare_cached(
                        "UPDATE orders.orders
                 SET status = 'CANCELLED', cancel_reason = $2, updated_at = now()
                 WHERE id = $1
                 RETURNING updated_at",
                    )
                    .await?,
                &[&id, &reason],
            )
            .await?;
        transaction
            .execute(
                &transaction
                    .prepare_cached(
                        "UPDATE orders.sagas
                 SET phase = 'COMPENSATE', reason = $2, attempts = 0, due_at = now(),
                     updated_at = now(), traceparent = $3
                 WHERE order_id = $1",
                    )
                    .await?,
                &[&id, &reason, &traceparent],
            )
            .await?;
        let cancelled = Order {
            status: OrderStatus::Cancelled,
            cancel_reason: reason.to_owned(),
            updated_at: row.try_get(0)?,
            ..order
        };
        outbox::append(&transaction, &outbox::order_cancelled(&cancelled)).await?;
        transaction.commit().await?;
        Ok(Cancelled::Done(cancelled))
    }

    /// Changes an order's delivery address unless it was cancelled; the order after the
    /// change and the address before it.
    pub async fn change_address(
        &self,
        id: Uuid,
        address: &str,
    ) -> Result<Result<(Order, String), Cancelled>, DbError> {
        let mut client = self.db.primary().await?;
        let transaction = client.transaction().await?;
        let row = transaction
            .query_opt(
                &format!("SELECT {ORDER_COLUMNS} FROM orders.orders o WHERE o.id = $1 FOR UPDATE"),
                &[&id],
            )
            .await?;
        let Some(row) = row else {
            return Ok(Err(Cancelled::NotFound));
        };
        let order = order_from_row(&row)?;
        if order.status == OrderStatus::Cancelled {
            return Ok(Err(Cancelled::NotCancellable(order)));
        }
        let previous = order.delivery_address.clone();
        if previous == address {
            return Ok(Ok((order, previous)));
        }
        let row = transaction
            .query_one(
                "UPDATE orders.orders SET delivery_address = $2, updated_at = now()
                 WHERE id = $1 RETURNING updated_at",
                &[&id, &address],
            )
            .await?;
        transaction.commit().await?;
        let changed = Order {
            delivery_address: address.to_owned(),
            updated_at: row.try_get(0)?,
            ..order
        };
        Ok(Ok((changed, previous)))
    }

    /// Sagas whose lease or retry time has passed, claimed for `lease`, with the
    /// `traceparent` of the call that started each.
    pub async fn claim_due_sagas(
        &self,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<(Uuid, String)>, DbError> {
        let client = self.db.primary().await?;
        let rows = client
            .query(
                "UPDATE orders.sagas SET due_at = now() + make_interval(secs => $2), updated_at = now()
                 WHERE order_id IN (
                     SELECT order_id FROM orders.sagas
                     WHERE phase <> 'DONE' AND due_at <= now()
                     ORDER BY due_at LIMIT $1
                     FOR UPDATE SKIP LOCKED)
                 RETURNING order_id, traceparent",
                &[&limit, &lease.as_secs_f64()],
            )
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect()
    }

    /// Pushes the lease of a saga that is still running out to `lease` from now, so that no
    /// other orchestrator resumes it while this one is at work.
    #[tracing::instrument(name = "orders.renew_lease", level = "debug", skip_all, fields(
        otel.kind = "client", db.system = "postgresql", db.operation.name = "renew_lease",
        db.namespace, waybill.db.role))]
    pub async fn renew_lease(&self, id: Uuid, lease: Duration) -> Result<(), DbError> {
        let client = self.db.primary().await?;
        client
            .execute(
                &client
                    .prepare_cached(
                        "UPDATE orders.sagas SET due_at = now() + make_interval(secs => $2)
                         WHERE order_id = $1 AND phase <> 'DONE'",
                    )
                    .await?,
                &[&id, &lease.as_secs_f64()],
            )
            .await?;
        Ok(())
    }

    /// The order and its saga.
    #[tracing::instrument(name = "orders.load_saga", level = "debug", skip_all, fields(
        otel.kind = "client", db.system = "postgresql", db.operation.name = "load_saga",
        db.namespace, waybill.db.role))]
    pub async fn load_saga(&self, id: Uuid) -> Result<Option<(Order, Saga)>, DbError> {
        let client = self.db.primary().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {ORDER_COLUMNS}, s.phase, s.reason, s.attempts
                 FROM orders.orders o JOIN orders.sagas s ON s.order_id = o.id
                 WHERE o.id = $1"
            ))
            .await?;
        let Some(row) = client.query_opt(&statement, &[&id]).await? else {
            return Ok(None);
        };
        let phase: &str = row.try_get("phase")?;
        let phase = Phase::parse(phase)
            .ok_or_else(|| DbError::Invariant(format!("unknown saga phase {phase:?}")))?;
        let saga = Saga {
            phase,
            reason: row.try_get("reason")?,
            attempts: row.try_get("attempts")?,
        };
        Ok(Some((order_from_row(&row)?, saga)))
    }

    /// Records a transient failure of `step`; the saga is tried again after `backoff`.
    #[tracing::instrument(name = "orders.defer_saga", level = "debug", skip_all, fields(
        otel.kind = "client", db.system = "postgresql", db.operation.name = "defer_saga",
        db.namespace, waybill.db.role))]
    pub async fn defer_saga(
        &self,
        id: Uuid,
        step: &str,
        error: &str,
        backoff: Duration,
    ) -> Result<(), DbError> {
        let client = self.db.primary().await?;
        client
            .execute(
                "UPDATE orders.sagas
                 SET step = $2, last_error = $3, attempts = attempts + 1,
                     due_at = now() + make_interval(secs => $4), updated_at = now()
                 WHERE order_id = $1",
                &[&id, &step, &error, &backoff.as_secs_f64()],
            )
            .await?;
        Ok(())
    }

    /// Turns a FORWARD saga to compensation for `reason`. A saga already compensating (a
    /// concurrent cancel) keeps its own reason.
    #[tracing::instrument(name = "orders.start_compensation", level = "debug", skip_all, fields(
        otel.kind = "client", db.system = "postgresql", db.operation.name = "start_compensation",
        db.namespace, waybill.db.role))]
    pub async fn start_compensation(&self, id: Uuid, reason: &str) -> Result<(), DbError> {
        let client = self.db.primary().await?;
        client
            .execute(
                "UPDATE orders.sagas
                 SET phase = 'COMPENSATE', reason = $2, attempts = 0, updated_at = now()
                 WHERE order_id = $1 AND phase = 'FORWARD'",
                &[&id, &reason],
            )
            .await?;
        Ok(())
    }

    /// Ends a FORWARD saga: the order is CONFIRMED with its courier, and OrderConfirmed is in
    /// the outbox. `None` when the saga is no longer going forward (cancelled meanwhile).
    #[tracing::instrument(name = "orders.confirm", level = "debug", skip_all, fields(
        otel.kind = "client", db.system = "postgresql", db.operation.name = "confirm",
        db.namespace, waybill.db.role))]
    pub async fn confirm(&self, order: &Order, courier_id: &str) -> Result<Option<Order>, DbError> {
        // The event is built before the statement: it needs nothing the update computes.
        let event = outbox::order_confirmed(&Order {
            courier_id: courier_id.to_owned(),
            ..order.clone()
        });
        let row = outbox::OutboxRow::new(outbox::SCHEMA, &event)?;
        let client = self.db.primary().await?;
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            vec![&order.id, &courier_id];
        params.extend(row.params());
        client
            .query_opt(&client.prepare_cached(&CONFIRM).await?, &params)
            .await?
            .map(|row| order_from_row(&row))
            .transpose()
    }

    /// Ends a compensating saga: the order is CANCELLED with the saga's reason (unless the
    /// customer cancelled it already), with OrderCancelled in the outbox.
    #[tracing::instrument(name = "orders.finish_compensation", level = "debug", skip_all, fields(
        otel.kind = "client", db.system = "postgresql", db.operation.name = "finish_compensation",
        db.namespace, waybill.db.role))]
    pub async fn finish_compensation(&self, id: Uuid) -> Result<Option<Order>, DbError> {
        let mut client = self.db.primary().await?;
        let transaction = client.transaction().await?;
        let reason: Option<String> = transaction
            .query_opt(
                &transaction.prepare_cached("UPDATE orders.sagas SET phase = 'DONE', step = '', last_error = '', updated_at = now()
                 WHERE order_id = $1 AND phase = 'COMPENSATE'
                 RETURNING reason").await?,
                &[&id],
            )
            .await?
            .map(|row| row.try_get(0))
            .transpose()?;
        let Some(reason) = reason else {
            return Ok(None);
        };
        let cancelled = transaction
            .execute(
                &transaction
                    .prepare_cached(
                        "UPDATE orders.orders
                 SET status = 'CANCELLED', cancel_reason = $2, updated_at = now()
                 WHERE id = $1 AND status <> 'CANCELLED'",
                    )
                    .await?,
                &[&id, &reason],
            )
            .await?;
        let row = transaction
            .query_one(
                &transaction
                    .prepare_cached(&format!(
                        "SELECT {ORDER_COLUMNS} FROM orders.orders o WHERE o.id = $1"
                    ))
                    .await?,
                &[&id],
            )
            .await?;
        let order = order_from_row(&row)?;
        if cancelled == 1 {
            outbox::append(&transaction, &outbox::order_cancelled(&order)).await?;
        }
        transaction.commit().await?;
        Ok(Some(order))
    }
}

/// Which way a saga is going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Running its steps.
    Forward,
    /// Undoing them.
    Compensate,
    /// Ended (the order is CONFIRMED or CANCELLED).
    Done,
}

impl Phase {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "FORWARD" => Some(Phase::Forward),
            "COMPENSATE" => Some(Phase::Compensate),
            "DONE" => Some(Phase::Done),
            _ => None,
        }
    }
}

/// A saga's durable state.
#[derive(Debug, Clone)]
pub struct Saga {
    pub phase: Phase,
    /// Why it compensates; empty going forward.
    pub reason: String,
    /// Transient failures of the current phase so far.
    pub attempts: i32,
}

impl Saga {
    /// The saga [`OrderStore::insert`] stores with a new order.
    pub fn placed() -> Self {
        Self {
            phase: Phase::Forward,
            reason: String::new(),
            attempts: 0,
        }
    }
}

fn order_from_row(row: &Row) -> Result<Order, DbError> {
    let status: &str = row.try_get("status")?;
    let status = OrderStatus::parse(status).ok_or_else(|| {
        DbError::Invariant(format!("unknown order status {status:?} in the database"))
    })?;
    let skus: Vec<String> = row.try_get("skus")?;
    let quantities: Vec<i32> = row.try_get("quantities")?;
    Ok(Order {
        id: row.try_get("id")?,
        customer_id: row.try_get("customer_id")?,
        items: skus
            .into_iter()
            .zip(quantities)
            .map(|(sku, quantity)| Item { sku, quantity })
            .collect(),
        delivery_address: row.try_get("delivery_address")?,
        status,
        cancel_reason: row.try_get("cancel_reason")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        zone: row.try_get("zone")?,
        courier_id: row.try_get("courier_id")?,
    })
}

/// Stores a batch of new orders in one statement. If the statement is refused (an error in
/// the data of one order), each is tried on its own, so one order's failure is not its
/// neighbours'; any other failure (the database unreachable, a lost connection: the batch may
/// even have committed) is every order's, and the callers' retries sort it out.
async fn insert_batch(db: Db, batch: Vec<PendingInsert>) -> Vec<Inserted> {
    let error = match insert_rows(&db, &batch).await {
        Ok(stored) => return stored,
        Err(error) => error,
    };
    if batch.len() == 1 {
        return vec![Err(error)];
    }
    if !matches!(error, DbError::Query(_)) {
        return error.copies(batch.len()).into_iter().map(Err).collect();
    }
    tracing::debug!(%error, size = batch.len(), "a batch of orders was refused; storing them one by one");
    let mut stored = Vec::with_capacity(batch.len());
    for order in &batch {
        stored.push(match insert_rows(&db, std::slice::from_ref(order)).await {
            Ok(mut one) => one.pop().unwrap_or_else(|| {
                Err(DbError::Invariant(
                    "an order insert returned no row".to_owned(),
                ))
            }),
            Err(error) => Err(error),
        });
    }
    stored
}

/// [`insert_batch`]'s statement: the orders, their items and their sagas, atomically (data-
/// modifying CTEs, no explicit transaction). Answers in `batch`'s order.
async fn insert_rows(db: &Db, batch: &[PendingInsert]) -> Result<Vec<Inserted>, DbError> {
    let ids: Vec<Uuid> = batch.iter().map(|p| p.id).collect();
    let placement_keys: Vec<Option<&[u8]>> = batch
        .iter()
        .map(|p| p.placement_key.as_ref().map(|k| k.as_slice()))
        .collect();
    let customers: Vec<&str> = batch.iter().map(|p| p.order.customer_id.as_str()).collect();
    let addresses: Vec<&str> = batch
        .iter()
        .map(|p| p.order.delivery_address.as_str())
        .collect();
    let zones: Vec<&str> = batch.iter().map(|p| p.order.zone.as_str()).collect();
    let leases: Vec<f64> = batch.iter().map(|p| p.lease_seconds).collect();
    let traceparents: Vec<&str> = batch.iter().map(|p| p.traceparent.as_str()).collect();
    let lines = batch.iter().flat_map(|p| {
        // Validation caps an order's lines far below i16::MAX.
        (1i16..)
            .zip(&p.order.items)
            .map(move |(line_no, item)| (p.id, line_no, item))
    });
    let (mut line_orders, mut line_nos, mut skus, mut quantities) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (order_id, line_no, item) in lines {
        line_orders.push(order_id);
        line_nos.push(line_no);
        skus.push(item.sku.as_str());
        quantities.push(item.quantity);
    }
    let client = db.primary().await?;
    let rows = client
        .query(
            &client.prepare_cached(INSERT).await?,
            &[
                &ids,
                &customers,
                &addresses,
                &zones,
                &leases,
                &traceparents,
                &line_orders,
                &line_nos,
                &skus,
                &quantities,
                &placement_keys,
            ],
        )
        .await?;
    let mut stamps = std::collections::HashMap::with_capacity(rows.len());
    for row in &rows {
        let id: Uuid = row.try_get(0)?;
        stamps.insert(id, (row.try_get(1)?, row.try_get(2)?));
    }
    // An order the statement did not return had its placement key taken, by an order stored
    // before or by a repeat earlier in this batch.
    Ok(ids.iter().map(|id| Ok(stamps.remove(id))).collect())
}

/// New orders ($1–$6 and $11, one element per order), their items ($7–$10, one element per
/// line) and their sagas, in one statement. An order whose placement key is taken (already,
/// or by an earlier row of the batch) is skipped with its items and saga.
const INSERT: &str = "WITH input AS (
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::float8[], $6::text[],
                              $11::bytea[])
             AS i(id, customer_id, delivery_address, zone, lease, traceparent, placement_key)
     ), placed AS (
         INSERT INTO orders.orders (id, customer_id, delivery_address, status, zone, placement_key)
         -- In key order: two batches that share keys then wait for each other in one order
         -- and cannot deadlock.
         SELECT id, customer_id, delivery_address, 'PENDING', zone, placement_key FROM input
         ORDER BY placement_key
         ON CONFLICT (placement_key) WHERE placement_key IS NOT NULL DO NOTHING
         RETURNING id, created_at, updated_at
     ), lines AS (
         INSERT INTO orders.order_items (order_id, line_no, sku, quantity)
         SELECT * FROM unnest($7::uuid[], $8::int2[], $9::text[], $10::int4[])
             AS l(order_id, line_no, sku, quantity)
         WHERE order_id IN (SELECT id FROM placed)
     ), saga AS (
         INSERT INTO orders.sagas (order_id, phase, due_at, traceparent)
         SELECT id, 'FORWARD', now() + make_interval(secs => lease), traceparent FROM input
         WHERE id IN (SELECT id FROM placed)
     )
     SELECT id, created_at, updated_at FROM placed";
