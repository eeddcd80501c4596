//! Events between waybill services: a transactional outbox, a relay, a bus (Postgres by
//! default, NATS JetStream to scale out), idempotent consumers with an inbox, and dead
//! letters.
//!
//! # The failure modes this answers
//!
//! - *A state change commits but its event is lost, or an event announces a change that
//!   rolled back.* A service writes events with [`outbox::append`] in the transaction that
//!   makes the change; the [`Relay`] moves only committed rows.
//! - *An event is delivered twice* (a relay or consumer dies between doing and recording).
//!   The bus is at-least-once; a [`Consumer`] handles each event in one transaction that
//!   first inserts `(subscription, event id)` into its inbox, so a redelivery finds the row
//!   and skips the handler. No check-then-insert: the insert is the check.
//! - *An event can never be handled.* After the subscription's attempts (exponential backoff
//!   between them), or at once for [`HandlerError::Permanent`], it goes to `bus.dead_letters`
//!   (the same table for both buses); [`dead_letters::list`] and [`dead_letters::replay`]
//!   work on it.
//!
//! # How it fits together
//!
//! ```text
//! service tx ──append──▶ <schema>.outbox ──NOTIFY at commit──▶ Relay ──▶ Bus ──▶ Consumer
//!                                                                         │  inbox + handler
//!                                                                         ▼  in one tx
//!                                                              bus.dead_letters
//! ```
//!
//! # Example
//!
//! ```no_run
//! use waybill_api::events::v1::OrderConfirmed;
//! use waybill_events::{Bus, Consumer, Event, Handler, HandlerError, Relay, Subscription, outbox};
//!
//! /// The consumer's side: effects go through `tx`, which also holds the inbox row.
//! struct Notifier;
//!
//! #[tonic::async_trait]
//! impl Handler for Notifier {
//!     async fn handle(
//!         &self,
//!         tx: &tokio_postgres::Transaction<'_>,
//!         event: &Event,
//!     ) -> Result<(), HandlerError> {
//!         let confirmed: OrderConfirmed = event.decode()?; // undecodable: Permanent
//!         tx.execute(
//!             "INSERT INTO notifications.sent (order_id) VALUES ($1)",
//!             &[&confirmed.order_id],
//!         )
//!         .await?; // database errors: Retry
//!         Ok(())
//!     }
//! }
//!
//! # async fn example(db: waybill_runtime::Db) -> Result<(), Box<dyn std::error::Error>> {
//! // Emitting: the event commits with the state change, or not at all.
//! let mut client = db.primary().await?;
//! let tx = client.transaction().await?;
//! // ... the state change, through `tx` ...
//! let confirmed = OrderConfirmed { order_id: "o-1".into(), ..Default::default() };
//! outbox::append(&tx, "orders", &Event::new("orders.order_confirmed", "o-1", &confirmed))
//!     .await?;
//! tx.commit().await?;
//!
//! // The relay runs beside the emitting service, the consumer beside the consuming one.
//! let bus = Bus::postgres(db.clone());
//! let relay = Relay::new(db.clone(), "orders", bus.clone())?;
//! let subscription = Subscription::new("notifications", ["orders.order_confirmed"])?;
//! let consumer = Consumer::new(db, bus, "notifications", subscription, Notifier)?;
//! tokio::spawn(relay.run(std::future::pending::<()>()));
//! tokio::spawn(consumer.run(async { tokio::signal::ctrl_c().await.ok(); }));
//! # Ok(())
//! # }
//! ```
//!
//! # Choices, and why
//!
//! - **No tight polling.** The relay and the Postgres-bus consumers sleep on LISTEN (a
//!   dedicated connection, reconnected with backoff; a reconnect counts as a wake-up) plus a
//!   slow sweep: the relay's every [`Relay::DEFAULT_SWEEP_INTERVAL`], a consumer's at its
//!   next due retry or within 5 s. (A pooled connection cannot LISTEN, so the LISTEN
//!   connections come from `Db::connect_primary_unpooled`.)
//! - **One relay moves at a time per schema** (a transaction-scoped advisory lock; the others
//!   stand by), on top of `FOR UPDATE SKIP LOCKED`. Parallel relays would publish batches out
//!   of order; one relay moves thousands of rows a second, which is more than one service's
//!   outbox needs. Events reach the bus in outbox id (UUIDv7, creation) order.
//! - **Postgres bus** (schema `bus`, [`SCHEMA`]): a move is one transaction (delete from the
//!   outbox, insert `bus.messages`, one `bus.deliveries` row per subscription of the topic,
//!   NOTIFY each subscription), so nothing is lost or duplicated between outbox and bus. It
//!   therefore lives in the services' database. Events of a topic nobody subscribes to are
//!   dropped, and a subscription gets only events published after it first registered
//!   ([`Bus::register`]: `waybill migrate` registers the platform's, every process that relays
//!   an outbox registers them again before publishing, on either bus, and each consumer its own
//!   before its process serves). Consumers claim due deliveries with `FOR UPDATE SKIP LOCKED`
//!   under a lease (the ack wait): a claim counts an attempt and hides the delivery until the
//!   lease ends, so no transaction stays open while a handler runs, and a consumer that dies
//!   gives its deliveries back when the lease ends. A handled delivery is deleted in the
//!   handler's own transaction (one commit per event, not two), and its
//!   message with it once no subscription still needs it.
//! - **NATS bus**: stream `WAYBILL` on `waybill.>`, file storage, interest retention (a
//!   message goes when every consumer has acked it, at most 7 days), 2-minute duplicate
//!   window. The relay publishes a batch with `Nats-Msg-Id` = event id, awaits every ack,
//!   then deletes the rows and commits; a re-publish after a crash is dropped by the server,
//!   or, past the window, by the inbox. A subscription is a durable pull consumer (explicit
//!   ack, `DeliverPolicy::New`, `max_deliver` = attempts + 1: the extra delivery records the
//!   dead letter when the last attempt's consumer died). A failed attempt is NAKed with the
//!   backoff delay; a dead letter is written to Postgres, then the message terminated.
//!   A subscription of several topics filters on the whole stream and acks the topics it did
//!   not ask for (several filter subjects would need nats-server 2.10; Debian ships 2.9).
//! - **Replaying a NATS dead letter republishes it** with header `Waybill-Replay-For:
//!   <subscription>` (other subscriptions ack and skip it) and a message id derived from the
//!   event id and the time it died (a repeated replay request is deduplicated, a later death
//!   is not). The handler is not run by the replaying tool, so a replay needs no handler code
//!   in the CLI and follows the same path, attempts and backoff as any delivery.
//! - **Ordering**: per key in the happy path (one relay, deliveries in sequence). A retried
//!   event is overtaken by later ones, and several consumer processes of one subscription
//!   work in parallel; handlers that care compare versions rather than trust arrival order.
//! - **Every failure counts as an attempt**, the database's included: an outage longer than
//!   the sum of the backoffs dead-letters events, which a replay sends again.
//! - **Traces cross the bus in the headers.** `outbox::append` adds the current span's W3C
//!   context (`traceparent`, `tracestate`, `baggage`) to the event's headers; both buses carry
//!   headers unchanged (dead letters and replays too), and the consumer makes each delivery a
//!   span that is a *child* of the span that wrote the event: one event per span, the trace
//!   view shows what an order caused, and parent-based sampling keeps the two halves together
//!   (docs/tracing.md). The relay makes no spans: a move is a batch, a span per sweep noise.
//! - The inbox grows by one row per handled event; purging rows older than the bus can
//!   redeliver (the duplicate window, the lease) is left to each service's housekeeping.

pub mod bus;
mod consumer;
pub mod dead_letters;
mod event;
mod listen;
pub mod outbox;
mod relay;
mod shutdown;

pub use bus::{Bus, BusConfig, BusError, BusKind, DEFAULT_INBOX_RETENTION};
pub use consumer::{Consumer, Handler, HandlerError, InvalidSubscription, Subscription};
pub use event::Event;
pub use outbox::{INBOX_TABLE_SQL, OUTBOX_TABLE_SQL};
pub use relay::Relay;

use waybill_runtime::Schema;

refinery::embed_migrations!("migrations");

/// The `bus` schema: the Postgres bus's tables and the dead letters of both buses. Migrate it
/// in the services' database whichever bus is configured.
pub const SCHEMA: Schema = Schema {
    name: "bus",
    runner: migrations::runner,
};
