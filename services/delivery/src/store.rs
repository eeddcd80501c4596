//! The delivery schema's SQL. Every write is one transaction that changes the delivery, its
//! courier's load, the history and the outbox together, and tells watchers (NOTIFY, delivered
//! at commit), so a failed call leaves nothing half-written and nobody hears of a change that
//! did not commit.
//!
//! Concurrency: a delivery's row is locked (`FOR UPDATE`) before any change is decided; an
//! assignment locks its courier with `SKIP LOCKED`, so concurrent assignments in one zone
//! spread over its couriers instead of queueing on the least loaded one; the order id is the
//! deliveries' key, so one order never gets two deliveries.

use std::sync::LazyLock;

use deadpool_postgres::Transaction;
use tokio_postgres::{Row, types::ToSql};
use uuid::Uuid;
use waybill_api::{delivery::v1 as pb, events::v1 as events};
use waybill_events::Event;
use waybill_runtime::{ConsistencyToken, Db, DbError, pipeline::PipelinedTx};

use crate::{
    domain::{Courier, Delivery, DeliveryStatus, Location, TrackingEvent, Transition},
    outbox, tracking,
};

const DELIVERY_COLUMNS: &str = "d.order_id, d.customer_id, d.courier_id, d.zone, d.status, \
     d.lat, d.lng, d.reason, d.version, d.created_at, d.updated_at";

/// AssignCourier's last statement ($1 order, $2 customer, $3 courier, $4 zone, $5 the
/// watchers' channel, then the outbox row), sent with the COMMIT: the delivery, its first
/// history row (telling the watchers, as `record` does for every later change) and
/// CourierAssigned. The key decides between concurrent assignments of one order: the loser
/// waits for the winner's commit and inserts nothing (so neither does the rest of the
/// statement), and gives back the courier it took, so that what it commits changes nothing.
static ASSIGN: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH assigned AS (
             INSERT INTO delivery.deliveries AS d
                 (order_id, customer_id, courier_id, zone, status, version)
             VALUES ($1, $2, $3, $4, 'ASSIGNED', 1)
             ON CONFLICT (order_id) DO NOTHING
             RETURNING {DELIVERY_COLUMNS}
         ), tracked AS (
             INSERT INTO delivery.tracking_events (order_id, version, status, lat, lng, at)
             SELECT order_id, version, status, lat, lng, updated_at FROM assigned
             RETURNING pg_notify($5, order_id::text)
         ), given_back AS (
             UPDATE delivery.couriers SET active = active - 1, updated_at = now()
             WHERE id = $3 AND NOT EXISTS (SELECT 1 FROM assigned)
         ), {}
         SELECT * FROM assigned",
        outbox::OutboxRow::cte(outbox::SCHEMA, "assigned", 6)
    )
});

/// The outcome of an assignment.
pub enum Assigned {
    /// A courier was assigned now.
    Created(Delivery),
    /// The order already had a delivery (any status, CANCELLED included).
    Existing(Delivery),
    /// No courier of the zone has capacity left.
    NoCourier,
}

/// The outcome of a cancellation.
pub enum Cancelled {
    /// The delivery is CANCELLED now, or already was, or a cancellation was recorded for an
    /// order without one.
    Done(Delivery),
    /// The delivery is past ASSIGNED.
    NotCancellable(Delivery),
}

/// The outcome of a status or location update.
pub enum Updated {
    /// Changed; the new state.
    Changed(Delivery),
    /// Already in the asked status; nothing written.
    Unchanged(Delivery),
    /// The delivery's state does not allow it.
    Forbidden(Delivery),
    /// No delivery for the order.
    NotFound,
}

/// The delivery schema's queries over one process's pools. Cheap to clone.
#[derive(Clone)]
pub struct DeliveryStore {
    db: Db,
}

impl DeliveryStore {
    /// A store over the given pools.
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Creates a courier or replaces its name, zone and capacity; its load is kept.
    #[tracing::instrument(name = "delivery.put_courier", level = "debug", skip_all, fields(
        otel.kind = "client", db.system = "postgresql", db.operation.name = "put_courier",
        db.namespace, waybill.db.role))]
    pub async fn put_courier(
        &self,
        id: &str,
        name: &str,
        zone: &str,
        capacity: i32,
    ) -> Result<Courier, DbError> {
        let client = self.db.primary().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO delivery.couriers (id, name, zone, capacity) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (id) DO UPDATE
                 SET name = excluded.name, zone = excluded.zone, capacity = excluded.capacity,
                     updated_at = now()
                 RETURNING id, name, zone, capacity, active",
            )
            .await?;
        let row = client
            .query_one(&statement, &[&id, &name, &zone, &capacity])
            .await?;
        Ok(Courier {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            zone: row.try_get("zone")?,
            capacity: row.try_get("capacity")?,
            active: row.try_get("active")?,
        })
    }

    /// Assigns a courier of `zone` with capacity left (the least loaded of a few, see
    /// [`take_courier`]), unless the order already has a delivery, which is returned as is.
    #[tracing::instrument(name = "delivery.assign", level = "debug", skip_all, fields(
        otel.kind = "client", db.system = "postgresql", db.operation.name = "assign",
        db.namespace, waybill.db.role))]
    pub async fn assign(
        &self,
        order_id: Uuid,
        customer_id: &str,
        zone: &str,
    ) -> Result<Assigned, DbError> {
        let client = self.db.primary().await?;
        // BEGIN, the existing delivery and a courier pick in one round trip. A courier taken
        // for an order that already has its delivery is given back by the rollback.
        let (tx, answers) = PipelinedTx::begin(
            client,
            &[
                (select_delivery_sql(false), &[&order_id]),
                (take_courier_sql(Pick::Window), &[&zone, &order_id]),
            ],
        )
        .await?;
        let existing = answers
            .first()
            .and_then(|rows| rows.first())
            .map(delivery_from_row)
            .transpose()?;
        let taken: Option<String> = answers
            .get(1)
            .and_then(|rows| rows.first())
            .map(|row| row.try_get(0))
            .transpose()?;
        if let Some(existing) = existing {
            tx.rollback().await?;
            return Ok(Assigned::Existing(existing));
        }
        // None of the window's candidates was free: look at the whole zone, and when every
        // free courier is being assigned right now, wait for one.
        let mut taken = taken;
        for pick in [Pick::Zone, Pick::ZoneWaiting] {
            if taken.is_some() {
                break;
            }
            taken = take_courier(tx.client(), order_id, zone, pick).await?;
        }
        let Some(courier_id) = taken else {
            // No courier free, or a concurrent assignment of this order committed since the
            // first look (the picks take none for an order with a delivery).
            let existing = select_delivery(tx.client(), order_id, false).await?;
            tx.rollback().await?;
            return Ok(match existing {
                Some(existing) => Assigned::Existing(existing),
                None => Assigned::NoCourier,
            });
        };
        let event = Event::new(
            outbox::COURIER_ASSIGNED,
            order_id.to_string(),
            &events::CourierAssigned {
                order_id: order_id.to_string(),
                customer_id: customer_id.to_owned(),
                courier_id: courier_id.clone(),
            },
        );
        let appended = outbox::OutboxRow::new(outbox::SCHEMA, &event)?;
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![
            &order_id,
            &customer_id,
            &courier_id,
            &zone,
            &tracking::CHANNEL,
        ];
        params.extend(appended.params());
        // The delivery, its history and its event, sent with the COMMIT (see [`ASSIGN`]).
        let answers = tx.commit(&[(&ASSIGN, &params)]).await?;
        match answers.first().and_then(|rows| rows.first()) {
            Some(row) => Ok(Assigned::Created(delivery_from_row(row)?)),
            None => match select_delivery(&self.db.primary().await?, order_id, false).await? {
                Some(winner) => Ok(Assigned::Existing(winner)),
                None => Err(DbError::Invariant(format!(
                    "delivery {order_id} conflicted on insert but is not there"
                ))),
            },
        }
    }

    /// Cancels an ASSIGNED delivery and frees its courier. For an order without a delivery
    /// it records a CANCELLED one without a courier, so that a late assignment is refused.
    #[tracing::instrument(name = "delivery.cancel", level = "debug", skip_all, fields(
        otel.kind = "client", db.system = "postgresql", db.operation.name = "cancel",
        db.namespace, waybill.db.role))]
    pub async fn cancel(&self, order_id: Uuid, reason: &str) -> Result<Cancelled, DbError> {
        let mut client = self.db.primary().await?;
        let tx = client.transaction().await?;
        let delivery = match select_delivery(&tx, order_id, true).await? {
            Some(delivery) => delivery,
            None => {
                let inserted = tx
                    .query_opt(
                        &tx.prepare_cached(&format!(
                            "INSERT INTO delivery.deliveries AS d
                                 (order_id, status, reason, version)
                             VALUES ($1, 'CANCELLED', $2, 1)
                             ON CONFLICT (order_id) DO NOTHING
                             RETURNING {DELIVERY_COLUMNS}"
                        ))
                        .await?,
                        &[&order_id, &reason],
                    )
                    .await?;
                if let Some(row) = inserted {
                    // No outbox event: nothing was being delivered, and the order's own
                    // cancellation event tells the world.
                    let tombstone = delivery_from_row(&row)?;
                    record(&tx, &tombstone, None).await?;
                    tx.commit().await?;
                    return Ok(Cancelled::Done(tombstone));
                }
                // An assignment committed in between: cancel that one (a new statement sees
                // it, as this transaction reads committed data).
                select_delivery(&tx, order_id, true).await?.ok_or_else(|| {
                    DbError::Invariant(format!(
                        "delivery {order_id} conflicted on insert but is not there"
                    ))
                })?
            }
        };
        match change_status(&tx, delivery, DeliveryStatus::Cancelled, None, reason).await? {
            Updated::Changed(delivery) => {
                tx.commit().await?;
                Ok(Cancelled::Done(delivery))
            }
            Updated::Unchanged(delivery) => Ok(Cancelled::Done(delivery)),
            Updated::Forbidden(delivery) => Ok(Cancelled::NotCancellable(delivery)),
            Updated::NotFound => Err(DbError::Invariant(format!(
                "delivery {order_id} vanished under a row lock"
            ))),
        }
    }

    /// Moves a delivery to `to` if the lifecycle allows, with an optional location and, for
    /// FAILED, a reason.
    #[tracing::instrument(name = "delivery.update_status", level = "debug", skip_all, fields(
        otel.kind = "client", db.system = "postgresql", db.operation.name = "update_status",
        db.namespace, waybill.db.role))]
    pub async fn update_status(
        &self,
        order_id: Uuid,
        to: DeliveryStatus,
        location: Option<Location>,
        reason: &str,
    ) -> Result<Updated, DbError> {
        let mut client = self.db.primary().await?;
        let tx = client.transaction().await?;
        let Some(delivery) = select_delivery(&tx, order_id, true).await? else {
            return Ok(Updated::NotFound);
        };
        let outcome = change_status(&tx, delivery, to, location, reason).await?;
        if matches!(outcome, Updated::Changed(_)) {
            tx.commit().await?;
        }
        Ok(outcome)
    }

    /// Records the courier's location while the delivery is PICKED_UP or IN_TRANSIT.
    #[tracing::instrument(name = "delivery.update_location", level = "debug", skip_all, fields(
        otel.kind = "client", db.system = "postgresql", db.operation.name = "update_location",
        db.namespace, waybill.db.role))]
    pub async fn update_location(
        &self,
        order_id: Uuid,
        location: Location,
    ) -> Result<Updated, DbError> {
        let mut client = self.db.primary().await?;
        let tx = client.transaction().await?;
        let Some(delivery) = select_delivery(&tx, order_id, true).await? else {
            return Ok(Updated::NotFound);
        };
        if !delivery.status.tracks_location() {
            return Ok(Updated::Forbidden(delivery));
        }
        let row = tx
            .query_one(
                &tx.prepare_cached(&format!(
                    "UPDATE delivery.deliveries AS d
                     SET lat = $2, lng = $3, version = version + 1, updated_at = now()
                     WHERE order_id = $1
                     RETURNING {DELIVERY_COLUMNS}"
                ))
                .await?,
                &[&order_id, &location.latitude, &location.longitude],
            )
            .await?;
        let delivery = delivery_from_row(&row)?;
        record(&tx, &delivery, Some(location)).await?;
        tx.commit().await?;
        Ok(Updated::Changed(delivery))
    }

    /// A token covering every write committed so far.
    #[tracing::instrument(name = "delivery.consistency_token", level = "debug", skip_all, fields(
        otel.kind = "client", db.system = "postgresql", db.operation.name = "consistency_token",
        db.namespace, waybill.db.role))]
    pub async fn consistency_token(&self) -> Result<ConsistencyToken, DbError> {
        self.db.consistency_token().await
    }

    /// A delivery and its history, oldest first, from a replica that reflects `after`, in one statement so both
    /// come from one snapshot.
    #[tracing::instrument(name = "delivery.get_with_history", level = "debug", skip_all, fields(
        otel.kind = "client", db.system = "postgresql", db.operation.name = "get_with_history",
        db.namespace, waybill.db.role))]
    pub async fn get_with_history(
        &self,
        order_id: Uuid,
        after: Option<&ConsistencyToken>,
    ) -> Result<Option<(Delivery, Vec<TrackingEvent>)>, DbError> {
        let client = self.db.replica_after(after).await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {DELIVERY_COLUMNS},
                     ARRAY(SELECT version FROM delivery.tracking_events e
                           WHERE e.order_id = d.order_id ORDER BY version) AS h_version,
                     ARRAY(SELECT status FROM delivery.tracking_events e
                           WHERE e.order_id = d.order_id ORDER BY version) AS h_status,
                     ARRAY(SELECT lat FROM delivery.tracking_events e
                           WHERE e.order_id = d.order_id ORDER BY version) AS h_lat,
                     ARRAY(SELECT lng FROM delivery.tracking_events e
                           WHERE e.order_id = d.order_id ORDER BY version) AS h_lng,
                     ARRAY(SELECT at FROM delivery.tracking_events e
                           WHERE e.order_id = d.order_id ORDER BY version) AS h_at
                 FROM delivery.deliveries d WHERE d.order_id = $1"
            ))
            .await?;
        let Some(row) = client.query_opt(&statement, &[&order_id]).await? else {
            return Ok(None);
        };
        let delivery = delivery_from_row(&row)?;
        let versions: Vec<i64> = row.try_get("h_version")?;
        let statuses: Vec<String> = row.try_get("h_status")?;
        let lats: Vec<Option<f64>> = row.try_get("h_lat")?;
        let lngs: Vec<Option<f64>> = row.try_get("h_lng")?;
        let ats: Vec<chrono::DateTime<chrono::Utc>> = row.try_get("h_at")?;
        let history = versions
            .into_iter()
            .zip(statuses)
            .zip(lats.into_iter().zip(lngs))
            .zip(ats)
            .map(|(((version, status), (lat, lng)), at)| {
                Ok(TrackingEvent {
                    version,
                    status: parse_status(&status)?,
                    location: location(lat, lng),
                    at,
                })
            })
            .collect::<Result<_, DbError>>()?;
        Ok(Some((delivery, history)))
    }

    /// A delivery as it stands now, from the primary (a watcher's first message must not be
    /// older than the changes it is told of next).
    #[tracing::instrument(name = "delivery.current", level = "debug", skip_all, fields(
        otel.kind = "client", db.system = "postgresql", db.operation.name = "current",
        db.namespace, waybill.db.role))]
    pub async fn current(&self, order_id: Uuid) -> Result<Option<Delivery>, DbError> {
        let client = self.db.primary().await?;
        select_delivery(&client, order_id, false).await
    }

    /// The changes of a delivery after `version`, oldest first, each with the delivery as it
    /// stands now (one statement: one snapshot), from the primary.
    pub async fn changes_since(
        &self,
        order_id: Uuid,
        version: i64,
    ) -> Result<Vec<(TrackingEvent, Delivery)>, DbError> {
        let client = self.db.primary().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {DELIVERY_COLUMNS}, e.version AS e_version, e.status AS e_status,
                     e.lat AS e_lat, e.lng AS e_lng, e.at AS e_at
                 FROM delivery.deliveries d
                 JOIN delivery.tracking_events e ON e.order_id = d.order_id AND e.version > $2
                 WHERE d.order_id = $1
                 ORDER BY e.version"
            ))
            .await?;
        client
            .query(&statement, &[&order_id, &version])
            .await?
            .iter()
            .map(|row| {
                let status: &str = row.try_get("e_status")?;
                let event = TrackingEvent {
                    version: row.try_get("e_version")?,
                    status: parse_status(status)?,
                    location: location(row.try_get("e_lat")?, row.try_get("e_lng")?),
                    at: row.try_get("e_at")?,
                };
                Ok((event, delivery_from_row(row)?))
            })
            .collect()
    }
}

/// Picks and locks a courier of `zone` with capacity left: the least loaded of a few
/// ([`Pick::Window`]), or of the whole zone. Couriers other transactions hold are skipped;
/// only when every candidate is held does it wait for them (their holders may not end up
/// using the last capacity), so a busy zone neither queues on one courier nor refuses while
/// capacity is left. Postgres re-checks `active < capacity` on the latest version of the row
/// it locks, so capacity is never exceeded.
async fn take_courier(
    client: &impl deadpool_postgres::GenericClient,
    order_id: Uuid,
    zone: &str,
    pick: Pick,
) -> Result<Option<String>, DbError> {
    client
        .query_opt(
            &client.prepare_cached(take_courier_sql(pick)).await?,
            &[&zone, &order_id],
        )
        .await?
        .map(|row| row.try_get(0))
        .transpose()
        .map_err(DbError::from)
}

/// Where [`take_courier`] looks.
#[derive(Clone, Copy)]
enum Pick {
    /// The least loaded of [`WINDOW`] couriers with capacity left, found from a random point
    /// of the zone's `pick_key` order (wrapping around), skipping held ones. While most
    /// couriers have room it reads a handful of rows whatever the zone's size (full ones are
    /// walked past, so a nearly full zone costs more); choosing the least loaded of a few
    /// random ones keeps loads close to even (the "power of d choices").
    Window,
    /// The least loaded of the whole zone, skipping held ones: a sort of the zone.
    Zone,
    /// The same, waiting for held couriers.
    ZoneWaiting,
}

/// How many candidates [`Pick::Window`] compares.
const WINDOW: i32 = 8;

/// [`take_courier`]'s statement (zone `$1`, order `$2`).
fn take_courier_sql(pick: Pick) -> &'static str {
    static WINDOWED: LazyLock<String> = LazyLock::new(|| {
        // `start` is materialized so both halves of the wrap-around see one random point; the
        // second half runs only when the first found fewer than WINDOW. Ties go to the
        // candidate nearest the random point: by id, the same couriers would lose every tie.
        pick_statement(
            &format!(
                "start AS MATERIALIZED (SELECT random() AS at),
                 candidates AS MATERIALIZED (
                     SELECT ARRAY(
                         SELECT id FROM (
                             (SELECT id FROM delivery.couriers
                              WHERE zone = $1 AND pick_key >= (SELECT at FROM start)
                                AND active < capacity
                              ORDER BY pick_key LIMIT {WINDOW})
                             UNION ALL
                             (SELECT id FROM delivery.couriers
                              WHERE zone = $1 AND pick_key < (SELECT at FROM start)
                                AND active < capacity
                              ORDER BY pick_key LIMIT {WINDOW})
                         ) AS window_ LIMIT {WINDOW}
                     ) AS ids
                 ),"
            ),
            "id = ANY((SELECT ids FROM candidates)::text[])",
            "array_position((SELECT ids FROM candidates), id)",
            " SKIP LOCKED",
        )
    });
    static SKIPPING: LazyLock<String> =
        LazyLock::new(|| pick_statement("", "zone = $1", "id", " SKIP LOCKED"));
    static WAITING: LazyLock<String> = LazyLock::new(|| pick_statement("", "zone = $1", "id", ""));
    match pick {
        Pick::Window => &WINDOWED,
        Pick::Zone => &SKIPPING,
        Pick::ZoneWaiting => &WAITING,
    }
}

/// The pick: the least loaded courier `among` (ties by `tie_break`) with capacity left, after
/// the common table expressions `with` (each followed by a comma).
fn pick_statement(with: &str, among: &str, tie_break: &str, skip_locked: &str) -> String {
    // Pick and load in one statement; none for an order that has its delivery already (a
    // repeated assignment), so a repeat changes no courier row, not even one it rolls back.
    // The scalar `(SELECT id FROM picked)` and `= ANY(array)` keep the planner on key lookups
    // (a join there hashed a scan of the whole table).
    format!(
        "WITH {with} picked AS (
             SELECT id FROM delivery.couriers
             WHERE {among} AND active < capacity
               AND NOT EXISTS (SELECT 1 FROM delivery.deliveries WHERE order_id = $2)
             ORDER BY active, {tie_break}
             LIMIT 1
             FOR UPDATE{skip_locked}
         )
         UPDATE delivery.couriers c SET active = c.active + 1, updated_at = now()
         WHERE c.id = (SELECT id FROM picked)
         RETURNING c.id"
    )
}

/// Applies a status change to a delivery locked by `tx`, if the lifecycle allows: the row,
/// the courier's load when the delivery ends, the history, the outbox and the watchers. The
/// caller commits on [`Updated::Changed`].
async fn change_status(
    tx: &Transaction<'_>,
    delivery: Delivery,
    to: DeliveryStatus,
    location: Option<Location>,
    reason: &str,
) -> Result<Updated, DbError> {
    match delivery.status.transition(to) {
        Transition::Unchanged => return Ok(Updated::Unchanged(delivery)),
        Transition::Forbidden => return Ok(Updated::Forbidden(delivery)),
        Transition::Allowed => {}
    }
    let reason = if matches!(to, DeliveryStatus::Failed | DeliveryStatus::Cancelled) {
        reason
    } else {
        ""
    };
    let row = tx
        .query_one(
            &tx.prepare_cached(&format!(
                "UPDATE delivery.deliveries AS d
                 SET status = $2, lat = coalesce($3, lat), lng = coalesce($4, lng), reason = $5,
                     version = version + 1, updated_at = now()
                 WHERE order_id = $1
                 RETURNING {DELIVERY_COLUMNS}"
            ))
            .await?,
            &[
                &delivery.order_id,
                &to.as_str(),
                &location.map(|l| l.latitude),
                &location.map(|l| l.longitude),
                &reason,
            ],
        )
        .await?;
    let changed = delivery_from_row(&row)?;
    if to.is_final()
        && let Some(courier_id) = &changed.courier_id
    {
        tx.execute(
            &tx.prepare_cached("UPDATE delivery.couriers SET active = active - 1, updated_at = now() WHERE id = $1").await?,
            &[courier_id],
        )
        .await?;
    }
    record(tx, &changed, location).await?;
    let status: pb::DeliveryStatus = to.into();
    outbox::append(
        tx,
        outbox::STATUS_CHANGED,
        &changed.order_id.to_string(),
        &events::DeliveryStatusChanged {
            order_id: changed.order_id.to_string(),
            customer_id: changed.customer_id.clone(),
            status: status as i32,
            reason: changed.reason.clone(),
        },
    )
    .await?;
    Ok(Updated::Changed(changed))
}

/// Appends the change that made `delivery` to its history and tells every process's
/// watchers (the notification is delivered at commit, and only if it commits).
async fn record(
    tx: &Transaction<'_>,
    delivery: &Delivery,
    reported: Option<Location>,
) -> Result<(), DbError> {
    // One round trip: the row, then the notification.
    tx.query(
        &tx.prepare_cached(
            "WITH recorded AS (
                 INSERT INTO delivery.tracking_events (order_id, version, status, lat, lng, at)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 RETURNING 1
             )
             SELECT pg_notify($7, $8) FROM recorded",
        )
        .await?,
        &[
            &delivery.order_id,
            &delivery.version,
            &delivery.status.as_str(),
            &reported.map(|l| l.latitude),
            &reported.map(|l| l.longitude),
            &delivery.updated_at,
            &tracking::CHANNEL,
            &delivery.order_id.to_string(),
        ],
    )
    .await?;
    Ok(())
}

async fn select_delivery(
    client: &impl deadpool_postgres::GenericClient,
    order_id: Uuid,
    for_update: bool,
) -> Result<Option<Delivery>, DbError> {
    client
        .query_opt(
            &client
                .prepare_cached(select_delivery_sql(for_update))
                .await?,
            &[&order_id],
        )
        .await?
        .map(|row| delivery_from_row(&row))
        .transpose()
}

/// The delivery of order `$1`, its row locked when `for_update`.
fn select_delivery_sql(for_update: bool) -> &'static str {
    static PLAIN: LazyLock<String> = LazyLock::new(|| {
        format!("SELECT {DELIVERY_COLUMNS} FROM delivery.deliveries d WHERE d.order_id = $1")
    });
    static LOCKING: LazyLock<String> = LazyLock::new(|| format!("{} FOR UPDATE", *PLAIN));
    if for_update { &LOCKING } else { &PLAIN }
}

fn delivery_from_row(row: &Row) -> Result<Delivery, DbError> {
    Ok(Delivery {
        order_id: row.try_get("order_id")?,
        customer_id: row.try_get("customer_id")?,
        courier_id: row.try_get("courier_id")?,
        zone: row.try_get("zone")?,
        status: parse_status(row.try_get("status")?)?,
        location: location(row.try_get("lat")?, row.try_get("lng")?),
        reason: row.try_get("reason")?,
        version: row.try_get("version")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn parse_status(text: &str) -> Result<DeliveryStatus, DbError> {
    DeliveryStatus::parse(text).ok_or_else(|| {
        DbError::Invariant(format!("unknown delivery status {text:?} in the database"))
    })
}

fn location(lat: Option<f64>, lng: Option<f64>) -> Option<Location> {
    Some(Location {
        latitude: lat?,
        longitude: lng?,
    })
}

impl From<DeliveryStatus> for pb::DeliveryStatus {
    fn from(status: DeliveryStatus) -> Self {
        match status {
            DeliveryStatus::Assigned => pb::DeliveryStatus::Assigned,
            DeliveryStatus::PickedUp => pb::DeliveryStatus::PickedUp,
            DeliveryStatus::InTransit => pb::DeliveryStatus::InTransit,
            DeliveryStatus::Delivered => pb::DeliveryStatus::Delivered,
            DeliveryStatus::Failed => pb::DeliveryStatus::Failed,
            DeliveryStatus::Cancelled => pb::DeliveryStatus::Cancelled,
        }
    }
}
