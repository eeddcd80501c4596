//! The orders schema's SQL. Every write is one statement or one transaction, so a failed call
//! leaves nothing half-written.

use tokio_postgres::Row;
use uuid::Uuid;
use waybill_runtime::{Db, DbError};

use crate::domain::{Item, NewOrder, Order, OrderStatus};

const ORDER_COLUMNS: &str = "o.id, o.customer_id, o.delivery_address, o.status, o.cancel_reason, \
     o.created_at, o.updated_at, \
     ARRAY(SELECT sku FROM orders.order_items i WHERE i.order_id = o.id ORDER BY line_no) AS skus, \
     ARRAY(SELECT quantity FROM orders.order_items i WHERE i.order_id = o.id ORDER BY line_no) AS quantities";

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
}

impl OrderStore {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Stores a new PENDING order with its items, atomically, in one round trip.
    pub async fn insert(&self, order: &NewOrder) -> Result<Order, DbError> {
        let id = Uuid::now_v7();
        let skus: Vec<&str> = order.items.iter().map(|i| i.sku.as_str()).collect();
        let quantities: Vec<i32> = order.items.iter().map(|i| i.quantity).collect();
        let client = self.db.primary().await?;
        // One statement with data-modifying CTEs: atomic without an explicit transaction.
        let statement = client
            .prepare_cached(
                "WITH placed AS (
                     INSERT INTO orders.orders (id, customer_id, delivery_address, status)
                     VALUES ($1, $2, $3, 'PENDING')
                     RETURNING created_at, updated_at
                 ), lines AS (
                     INSERT INTO orders.order_items (order_id, line_no, sku, quantity)
                     SELECT $1, line_no::smallint, sku, quantity
                     FROM unnest($4::text[], $5::int4[]) WITH ORDINALITY AS l(sku, quantity, line_no)
                 )
                 SELECT created_at, updated_at FROM placed",
            )
            .await?;
        let row = client
            .query_one(
                &statement,
                &[
                    &id,
                    &order.customer_id,
                    &order.delivery_address,
                    &skus,
                    &quantities,
                ],
            )
            .await?;
        Ok(Order {
            id,
            customer_id: order.customer_id.clone(),
            items: order.items.clone(),
            delivery_address: order.delivery_address.clone(),
            status: OrderStatus::Pending,
            cancel_reason: String::new(),
            created_at: row.try_get(0)?,
            updated_at: row.try_get(1)?,
        })
    }

    /// One order, read from the primary so that a client sees its own write at once.
    pub async fn get(&self, id: Uuid) -> Result<Option<Order>, DbError> {
        let client = self.db.primary().await?;
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

    /// Up to `limit` of a customer's orders older than `after`, newest first, from a replica.
    pub async fn list_by_customer(
        &self,
        customer_id: &str,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<Order>, DbError> {
        let client = self.db.replica().await?;
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

    /// Cancels an order if its state allows; an already cancelled order is returned as is.
    pub async fn cancel(&self, id: Uuid, reason: &str) -> Result<Cancelled, DbError> {
        let mut client = self.db.primary().await?;
        let transaction = client.transaction().await?;
        // Lock the row so a concurrent state change cannot slip between the check and the
        // update.
        let row = transaction
            .query_opt(
                &format!("SELECT {ORDER_COLUMNS} FROM orders.orders o WHERE o.id = $1 FOR UPDATE"),
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
                "UPDATE orders.orders
                 SET status = 'CANCELLED', cancel_reason = $2, updated_at = now()
                 WHERE id = $1
                 RETURNING updated_at",
                &[&id, &reason],
            )
            .await?;
        transaction.commit().await?;
        Ok(Cancelled::Done(Order {
            status: OrderStatus::Cancelled,
            cancel_reason: reason.to_owned(),
            updated_at: row.try_get(0)?,
            ..order
        }))
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
    })
}
