//! PlaceOrder's saga, orchestrated here: reserve stock → assign a courier → commit the stock →
//! confirm the order. When a step fails for good (out of stock, no courier), or the customer
//! cancels, the compensations run in reverse — cancel the assignment, release the stock — and
//! the order ends CANCELLED with the reason.
//!
//! Durability without a step log: every remote step is keyed by the order id (one
//! reservation per order, one delivery per order), so repeating a step returns what it did the
//! first time, and both compensations leave a tombstone, so a forward step that arrives late
//! (a delayed retry) is refused instead of undoing the compensation. A saga therefore only has
//! to remember its direction (FORWARD, COMPENSATE, DONE) and its lease: a resumed saga simply
//! runs its phase again from the start. That keeps the happy path at one database write in
//! this service per step boundary that matters (insert, confirm) instead of one per step.
//!
//! A saga runs in its own task, detached from the PlaceOrder call that started it, so a caller
//! that hangs up does not stop it midway. Transient failures (a participant UNAVAILABLE or too
//! slow) defer the saga with backoff; the driver (`drive_forever`) picks up sagas whose lease
//! or retry time has passed — those of a killed orchestrator included.
//!
//! Traces: a saga run is a `saga` span. Run from PlaceOrder it is that call's child, so the
//! steps' calls and the events the saga emits continue the caller's trace; resumed by the
//! driver, it is a new trace linked to the call that started it (`orders.sagas.traceparent`).

use std::{sync::Arc, time::Duration};

use mesh_layer::{balance::Balancer, client::MeshClient, connection::Connection, shed::CapSlot};
use tokio::sync::Semaphore;
use tonic::{Code, Request, Status};
use tracing::Instrument;
use uuid::Uuid;
use waybill_api::{
    delivery::v1::{self as delivery, delivery_service_client::DeliveryServiceClient},
    inventory::v1::{self as inventory, inventory_service_client::InventoryServiceClient},
};
use waybill_runtime::DbError;

use crate::{
    domain::Order,
    store::{OrderStore, Phase, Saga},
};

/// The inventory service, through the mesh.
pub type InventoryClient = InventoryServiceClient<MeshClient<Balancer<Connection>>>;
/// The delivery service, through the mesh.
pub type DeliveryClient = DeliveryServiceClient<MeshClient<Balancer<Connection>>>;

/// How sagas run.
#[derive(Clone, Debug)]
pub struct SagaSettings {
    /// How long an orchestrator owns a saga it runs before another may take it over.
    pub lease: Duration,
    /// The deadline of each call to a participant.
    pub step_timeout: Duration,
    /// Transient failures going forward before the saga gives up and compensates.
    pub max_attempts: i32,
    /// How often the driver looks for sagas to resume.
    pub poll: Duration,
    /// Most sagas the driver runs at once.
    pub concurrency: usize,
}

/// Runs sagas.
#[derive(Clone)]
pub struct Orchestrator {
    store: OrderStore,
    inventory: InventoryClient,
    delivery: DeliveryClient,
    settings: Arc<SagaSettings>,
    running: Arc<Semaphore>,
}

/// Why a phase did not complete.
enum StepError {
    /// It cannot succeed: compensate with this reason.
    Permanent(String),
    /// It may succeed later.
    Transient { step: &'static str, error: String },
}

/// At most this many phase changes are followed in one run (forward → compensate → done).
const MAX_TURNS: usize = 3;

impl Orchestrator {
    pub fn new(
        store: OrderStore,
        inventory: InventoryClient,
        delivery: DeliveryClient,
        settings: SagaSettings,
    ) -> Self {
        let running = Arc::new(Semaphore::new(settings.concurrency.max(1)));
        Self {
            store,
            inventory,
            delivery,
            settings: Arc::new(settings),
            running,
        }
    }

    pub fn settings(&self) -> &SagaSettings {
        &self.settings
    }

    /// Runs the saga of an order this orchestrator holds the lease of, in its own task (which
    /// keeps `slot` until it ends), until it ends or is deferred; returns the order as it
    /// then stands.
    ///
    /// The saga's span is a child of the current one (the PlaceOrder call's), so its steps'
    /// calls continue the caller's trace.
    pub async fn run_detached(&self, order: Order, slot: Option<CapSlot>) -> Result<Order, Status> {
        let this = self.clone();
        let order_id = order.id;
        let span = Self::span(order_id, "place");
        // Just placed, as inserted, so the first turn need not read it back.
        let placed = (order, Saga::placed());
        let saga = async move {
            let ran = this.run_from(order_id, Some(placed)).await;
            // The call's slot under PlaceOrder's cap is free once the saga is over too.
            drop(slot);
            ran
        };
        match tokio::spawn(saga.instrument(span)).await {
            Ok(result) => result.map_err(Status::from),
            Err(error) => {
                tracing::error!(%order_id, %error, "saga task failed");
                Err(Status::internal(
                    "the order's saga failed; it resumes shortly",
                ))
            }
        }
    }

    /// The span of one run of an order's saga (`why`: what started the run).
    pub fn span(order_id: Uuid, why: &'static str) -> tracing::Span {
        tracing::debug_span!("saga", otel.name = "saga", waybill.order_id = %order_id,
            waybill.saga.started_by = why)
    }

    /// Runs an order's saga until it ends or is deferred.
    pub async fn run(&self, order_id: Uuid) -> Result<Order, DbError> {
        self.run_from(order_id, None).await
    }

    /// [`Self::run`], starting from `known` (the order and its saga as they stand) instead
    /// of reading them.
    async fn run_from(
        &self,
        order_id: Uuid,
        known: Option<(Order, Saga)>,
    ) -> Result<Order, DbError> {
        // A run can outlast its lease (slow participants, quick retries): renewed every third
        // of it, the lease keeps the driver from starting a second run of the same saga.
        // Renewal ends before the run defers the saga (`Renewal::stop` waits for a renewal in
        // flight), so it never overwrites the backoff; a DONE saga is never renewed.
        let lease = self.settings.lease;
        let renewal = Renewal::default();
        let renew = async {
            let mut ticker = tokio::time::interval((lease / 3).max(Duration::from_millis(10)));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let stopped = renewal.stopped.lock().await;
                if *stopped {
                    // The run is about to end; nothing more to renew.
                    drop(stopped);
                    return std::future::pending().await;
                }
                if let Err(error) = self.store.renew_lease(order_id, lease).await {
                    tracing::warn!(%order_id, %error, "could not renew the saga's lease");
                }
                drop(stopped);
            }
        };
        tokio::select! {
            ran = self.turns(order_id, known, &renewal) => ran,
            never = renew => never,
        }
    }

    /// Runs the saga's phases until it ends or is deferred.
    async fn turns(
        &self,
        order_id: Uuid,
        mut known: Option<(Order, Saga)>,
        renewal: &Renewal,
    ) -> Result<Order, DbError> {
        for _ in 0..MAX_TURNS {
            let loaded = match known.take() {
                Some(known) => Some(known),
                None => self.store.load_saga(order_id).await?,
            };
            let Some((order, saga)) = loaded else {
                return Err(DbError::Invariant(format!("order {order_id} has no saga")));
            };
            match saga.phase {
                Phase::Done => return Ok(order),
                Phase::Forward => match self.forward_with_quick_retries(&order).await {
                    Ok(courier_id) => {
                        if let Some(confirmed) = self.store.confirm(&order, &courier_id).await? {
                            tracing::debug!(%order_id, %courier_id, "order confirmed");
                            waybill_runtime::metrics::saga_outcome("confirmed");
                            return Ok(confirmed);
                        }
                        // Cancelled while going forward: the next turn compensates.
                    }
                    Err(StepError::Permanent(reason)) => {
                        tracing::info!(%order_id, %reason, "saga compensates");
                        self.store.start_compensation(order.id, &reason).await?;
                    }
                    Err(StepError::Transient { step, error }) => {
                        let attempts = saga.attempts + 1;
                        if attempts >= self.settings.max_attempts {
                            let reason =
                                format!("{step} failed {attempts} times; last error: {error}");
                            tracing::warn!(%order_id, %reason, "saga gives up and compensates");
                            self.store.start_compensation(order.id, &reason).await?;
                        } else {
                            let backoff = backoff(attempts);
                            tracing::info!(%order_id, step, %error, ?backoff, "saga step failed; retrying later");
                            waybill_runtime::metrics::saga_outcome("deferred");
                            self.defer(renewal, order.id, step, &error, backoff).await?;
                            return Ok(order);
                        }
                    }
                },
                Phase::Compensate => match self.compensate(&order, &saga.reason).await {
                    Ok(()) => {
                        if let Some(cancelled) = self.store.finish_compensation(order.id).await? {
                            tracing::info!(%order_id, reason = %cancelled.cancel_reason, "order cancelled; compensations done");
                            waybill_runtime::metrics::saga_outcome("cancelled");
                            return Ok(cancelled);
                        }
                    }
                    // Compensation never gives up: stock must come back. A permanent error
                    // here means a bug or a manual change; it is retried at the longest
                    // backoff and logged loudly.
                    Err(StepError::Permanent(error)) => {
                        tracing::error!(%order_id, %error, "compensation refused; retrying later");
                        waybill_runtime::metrics::saga_outcome("compensation_refused");
                        self.defer(renewal, order.id, "compensate", &error, MAX_BACKOFF)
                            .await?;
                        return Ok(order);
                    }
                    Err(StepError::Transient { step, error }) => {
                        let backoff = backoff(saga.attempts + 1);
                        tracing::info!(%order_id, step, %error, ?backoff, "compensation failed; retrying later");
                        waybill_runtime::metrics::saga_outcome("deferred");
                        self.defer(renewal, order.id, step, &error, backoff).await?;
                        return Ok(order);
                    }
                },
            }
        }
        Err(DbError::Invariant(format!(
            "the saga of order {order_id} changed phase more than {MAX_TURNS} times in one run"
        )))
    }

    /// Ends this run with the saga deferred for `backoff` after `step` failed with `error`.
    /// The lease renewal stops first (waiting for one in flight), so it cannot overwrite the
    /// backoff.
    async fn defer(
        &self,
        renewal: &Renewal,
        order_id: Uuid,
        step: &str,
        error: &str,
        backoff: Duration,
    ) -> Result<(), DbError> {
        renewal.stop().await;
        self.store.defer_saga(order_id, step, error, backoff).await
    }

    /// [`Self::forward`], tried again at once (after a short jittered pause) when a
    /// participant was briefly unable to answer — a shed call, a connection being replaced —
    /// so that a momentary refusal does not defer the whole saga and leave the caller with a
    /// PENDING order. Steps are idempotent, so trying again from the start is safe.
    async fn forward_with_quick_retries(&self, order: &Order) -> Result<String, StepError> {
        let mut pause = QUICK_RETRY_PAUSE;
        for _ in 0..QUICK_RETRIES {
            match self.forward(order).await {
                Err(StepError::Transient { step, error }) => {
                    tracing::debug!(order_id = %order.id, step, %error, "saga step refused; trying again at once");
                    tokio::time::sleep(pause.mul_f64(0.5 + fastrand::f64())).await;
                    pause *= 3;
                }
                done => return done,
            }
        }
        self.forward(order).await
    }

    /// Reserve → assign → commit; the assigned courier.
    async fn forward(&self, order: &Order) -> Result<String, StepError> {
        let order_id = order.id.to_string();
        let lines = order
            .items
            .iter()
            .map(|item| inventory::ReservationLine {
                sku: item.sku.clone(),
                quantity: item.quantity,
            })
            .collect();
        self.inventory
            .clone()
            .reserve(self.request(inventory::ReserveRequest {
                order_id: order_id.clone(),
                lines,
            }))
            .await
            .map_err(|status| classify("reserve stock", status))?;
        let assigned = self
            .delivery
            .clone()
            .assign_courier(self.request(delivery::AssignCourierRequest {
                order_id: order_id.clone(),
                customer_id: order.customer_id.clone(),
                zone: order.zone.clone(),
            }))
            .await
            .map_err(|status| classify("assign a courier", status))?
            .into_inner();
        let courier_id = assigned
            .delivery
            .map(|d| d.courier_id)
            .filter(|id| !id.is_empty())
            .ok_or_else(|| StepError::Transient {
                step: "assign a courier",
                error: "the delivery service answered without a courier".into(),
            })?;
        self.inventory
            .clone()
            .commit(self.request(inventory::CommitRequest {
                order_id: order_id.clone(),
            }))
            .await
            .map_err(|status| classify("commit stock", status))?;
        Ok(courier_id)
    }

    /// Cancel the assignment, then release the stock (reverse order of the steps). Both are
    /// safe whether or not the forward step ever ran.
    async fn compensate(&self, order: &Order, reason: &str) -> Result<(), StepError> {
        let order_id = order.id.to_string();
        self.delivery
            .clone()
            .cancel_assignment(self.request(delivery::CancelAssignmentRequest {
                order_id: order_id.clone(),
                reason: reason.to_owned(),
            }))
            .await
            .map_err(|status| classify("cancel the assignment", status))?;
        self.inventory
            .clone()
            .release(self.request(inventory::ReleaseRequest { order_id }))
            .await
            .map_err(|status| classify("release stock", status))?;
        Ok(())
    }

    /// Cancels an order's delivery (for a customer's cancel of a CONFIRMED order).
    pub async fn cancel_delivery(&self, order_id: Uuid, reason: &str) -> Result<(), Status> {
        self.delivery
            .clone()
            .cancel_assignment(self.request(delivery::CancelAssignmentRequest {
                order_id: order_id.to_string(),
                reason: reason.to_owned(),
            }))
            .await?;
        Ok(())
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(self.settings.step_timeout);
        request
    }

    /// Resumes sagas whose lease or retry time has passed, forever.
    pub async fn drive_forever(self) {
        let mut ticker = tokio::time::interval(self.settings.poll);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let free = self.running.available_permits();
            if free == 0 {
                continue;
            }
            let due = match self
                .store
                .claim_due_sagas(free.min(256) as i64, self.settings.lease)
                .await
            {
                Ok(due) => due,
                Err(error) => {
                    tracing::warn!(%error, "looking for sagas to resume failed");
                    continue;
                }
            };
            for (order_id, traceparent) in due {
                let Ok(permit) = self.running.clone().acquire_owned().await else {
                    return;
                };
                let this = self.clone();
                // A trace of its own, linked to the call that started the saga: that call
                // answered long ago, and this run is the driver's doing.
                let span = tracing::debug_span!(parent: None, "saga", otel.name = "saga",
                    waybill.order_id = %order_id, waybill.saga.started_by = "driver");
                waybill_runtime::telemetry::link(&span, &traceparent);
                tokio::spawn(
                    async move {
                        tracing::info!(%order_id, "resuming saga");
                        if let Err(error) = this.run(order_id).await {
                            tracing::warn!(%order_id, %error, "resumed saga failed; it is retried when its lease ends");
                        }
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
        }
    }
}

/// Whether a run still renews its lease (see [`Orchestrator::run_from`]).
#[derive(Default)]
struct Renewal {
    stopped: tokio::sync::Mutex<bool>,
}

impl Renewal {
    /// No renewal after this returns, nor one still in flight.
    async fn stop(&self) {
        *self.stopped.lock().await = true;
    }
}

/// Immediate retries of a transiently failed forward phase before the saga is deferred.
const QUICK_RETRIES: usize = 2;
/// The first pause between them (then three times as long), jittered.
const QUICK_RETRY_PAUSE: Duration = Duration::from_millis(20);

/// Longest wait between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Exponential from 200 ms, capped, with half jitter so that sagas failed together do not
/// retry together.
fn backoff(attempt: i32) -> Duration {
    let exponent = attempt.clamp(0, 16) as u32;
    let ceiling = Duration::from_millis(200)
        .saturating_mul(2u32.saturating_pow(exponent))
        .min(MAX_BACKOFF);
    ceiling.mul_f64(0.5 + fastrand::f64() / 2.0)
}

/// Codes that mean the participant refused for good (compensate) versus could not answer now
/// (retry later).
fn classify(step: &'static str, status: Status) -> StepError {
    match status.code() {
        Code::FailedPrecondition
        | Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::OutOfRange
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::Unimplemented => StepError::Permanent(format!("{step}: {}", status.message())),
        _ => StepError::Transient {
            step,
            error: format!("{:?}: {}", status.code(), status.message()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) <= Duration::from_millis(400));
        assert!(backoff(1) >= Duration::from_millis(200));
        assert!(backoff(30) <= MAX_BACKOFF);
        assert!(backoff(30) >= MAX_BACKOFF / 2);
    }

    #[test]
    fn refusals_compensate_and_outages_retry() {
        assert!(matches!(
            classify("reserve stock", Status::failed_precondition("out of stock")),
            StepError::Permanent(reason) if reason == "reserve stock: out of stock"
        ));
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
        ] {
            assert!(matches!(
                classify("reserve stock", Status::new(code, "x")),
                StepError::Transient { .. }
            ));
        }
    }
}
