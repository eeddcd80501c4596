//! The NATS JetStream bus: one stream (`WAYBILL`, subjects `waybill.>`), one durable pull
//! consumer per subscription, the envelope in headers, dead letters in Postgres.

use std::{str::FromStr, time::Duration};

use async_nats::{
    HeaderMap, HeaderName, HeaderValue,
    jetstream::{
        self, AckKind,
        consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
        message::PublishMessage,
        stream::{self, ConsumerErrorKind},
    },
};
use chrono::{DateTime, Utc};
use tokio_stream::StreamExt;
use uuid::Uuid;
use waybill_runtime::Db;

use crate::{
    Event, HandlerError,
    bus::BusError,
    consumer::{Inbox, Outcome, Subscription},
    dead_letters,
    shutdown::Shutdown,
};

/// The one stream every event goes to.
pub(crate) const STREAM: &str = "WAYBILL";
/// How long the stream remembers message ids to drop re-publishes.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How long an event nobody acked stays in the stream.
const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Most messages a consumer takes for one batch (one transaction).
const PULL_BATCH: usize = 16;
const FAILURE_FIRST: Duration = Duration::from_millis(200);
const FAILURE_MAX: Duration = Duration::from_secs(10);

/// Envelope headers (beside `Nats-Msg-Id`, which carries the event id for deduplication, or a
/// replay's own id).
const EVENT_ID: &str = "Waybill-Event-Id";
const KEY: &str = "Waybill-Key";
const CREATED_AT: &str = "Waybill-Created-At";
/// On a replayed dead letter: the only subscription that should handle it.
const REPLAY_FOR: &str = "Waybill-Replay-For";

/// The subject of `topic`.
pub(crate) fn subject(topic: &str) -> String {
    format!("waybill.{topic}")
}

/// How long starting up waits for NATS before going on without it.
const STARTUP_WAIT: Duration = Duration::from_secs(2);

pub(crate) struct NatsBus {
    client: async_nats::Client,
    js: jetstream::Context,
    /// Whether the stream and the subscriptions registered before publishing are known to
    /// exist: until they are, every publish sets them up first, and a failed publish clears
    /// it (a NATS that came back without its storage has neither).
    ready: std::sync::atomic::AtomicBool,
    /// The subscriptions that must exist before this process publishes anything
    /// ([`NatsBus::register_before_publishing`]).
    before_publishing: std::sync::Mutex<Vec<Subscription>>,
}

fn nats_error(what: &str, error: impl std::fmt::Display) -> BusError {
    BusError::Nats(format!("{what}: {error}"))
}

/// Longest a pull waits for a message before asking again.
const PULL_WAIT: Duration = Duration::from_secs(30);

/// How long taking what else is there may take (the server answers at once; this only
/// bounds a reply lost across a reconnect).
const FETCH_LIMIT: Duration = Duration::from_secs(5);

/// The next batch: waits (up to [`PULL_WAIT`]) for one message, then takes whatever else is
/// there now, up to [`PULL_BATCH`]. Both requests are complete when this returns, so nothing
/// more is delivered to this process while the batch is handled. Empty when the wait ended
/// with no message.
///
/// No idle heartbeat: async-nats 0.51's `Batch` returns `Pending` on a heartbeat without
/// asking to be woken again, which would leave a message that arrives later unread until the
/// client's own timer (expiry + 5 s) ends the request and drops it.
async fn next_batch(consumer: &PullConsumer) -> Result<Vec<jetstream::Message>, BusError> {
    let mut batch = Vec::with_capacity(PULL_BATCH);
    let mut first = consumer
        .batch()
        .max_messages(1)
        .expires(PULL_WAIT)
        .messages()
        .await
        .map_err(|e| nats_error("pull", e))?;
    while let Some(message) = first.next().await {
        batch.push(message.map_err(|e| nats_error("pull", e))?);
    }
    if batch.is_empty() {
        return Ok(batch);
    }
    // From here on a failure keeps what was taken: those messages are this process's now,
    // and dropping them would cost each an ack wait and an attempt.
    let rest = async {
        let mut rest = consumer
            .fetch()
            .max_messages(PULL_BATCH - 1)
            .messages()
            .await
            .map_err(|e| nats_error("pull", e))?;
        while let Some(message) = rest.next().await {
            batch.push(message.map_err(|e| nats_error("pull", e))?);
        }
        Ok::<_, BusError>(())
    };
    match tokio::time::timeout(FETCH_LIMIT, rest).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::debug!(%error, "taking more messages failed; handling those taken")
        }
        Err(_) => tracing::debug!("taking more messages had no answer; handling those taken"),
    }
    Ok(batch)
}

/// Tells the server, every third of `ack_wait`, that `messages` are still being handled, for
/// as long as handling them all one after another may take (`ack_wait` each): each event keeps
/// its own ack wait however many wait before it in the batch, and a batch that hangs is
/// still delivered again in the end. Never returns before that bound; run it beside the work.
async fn keep_in_progress(
    messages: Vec<jetstream::Message>,
    ack_wait: Duration,
) -> std::convert::Infallible {
    let bound = ack_wait.saturating_mul(u32::try_from(messages.len()).unwrap_or(u32::MAX));
    let started = tokio::time::Instant::now();
    let mut ticker = tokio::time::interval(ack_wait / 3);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        if started.elapsed() + ack_wait >= bound {
            // The last renewal would carry past the bound.
            return std::future::pending().await;
        }
        for message in &messages {
            // A lost one only means an earlier redelivery, which the inbox absorbs.
            let _ = message.ack_with(AckKind::Progress).await;
        }
    }
}

/// Why a subscription was not registered.
enum Registration {
    /// The server answered no.
    Refused(BusError),
    /// No answer: not connected, or the request failed or timed out.
    Failed(BusError),
}

impl NatsBus {
    /// A client for `url` that connects in the background and keeps reconnecting: a process
    /// whose NATS is down (not up yet, restarting) still starts, serves what does not need
    /// the bus, and keeps its events in the outboxes until NATS is back. Waits up to
    /// [`STARTUP_WAIT`] for the first connection. Fails only for a malformed URL.
    pub(crate) async fn connect(url: &str) -> Result<Self, BusError> {
        let client = waybill_runtime::nats::connect(url, "waybill", STARTUP_WAIT)
            .await
            .map_err(|e| nats_error("connect", e))?;
        let bus = Self {
            js: jetstream::new(client.clone()),
            client,
            ready: std::sync::atomic::AtomicBool::new(false),
            before_publishing: std::sync::Mutex::new(Vec::new()),
        };
        // Events wait in the outboxes and consumers keep trying until NATS is there.
        if let Err(error) = bus.stream().await {
            tracing::warn!(%url, %error, "the NATS stream could not be set up yet; it will be before the first publish");
        }
        Ok(bus)
    }

    fn connected(&self) -> Result<(), BusError> {
        waybill_runtime::nats::connected(&self.client).map_err(BusError::Nats)
    }

    /// Creates or updates the stream.
    async fn stream(&self) -> Result<(), BusError> {
        self.connected()?;
        self.js
            .create_or_update_stream(stream::Config {
                name: STREAM.to_owned(),
                subjects: vec!["waybill.>".to_owned()],
                storage: stream::StorageType::File,
                // A message goes once every consumer interested in it has acked it.
                retention: stream::RetentionPolicy::Interest,
                max_age: MAX_AGE,
                duplicate_window: DUPLICATE_WINDOW,
                ..Default::default()
            })
            .await
            .map(drop)
            .map_err(|e| nats_error("create stream WAYBILL", e))
    }

    /// `subscriptions` are registered before this process publishes its first event (now,
    /// if NATS is up; else before the first publish once it is). JetStream keeps a message
    /// only for the consumers that exist when it is published, and a consumer's process may
    /// start after the publishers.
    pub(crate) async fn register_before_publishing(&self, subscriptions: Vec<Subscription>) {
        if let Ok(mut waiting) = self.before_publishing.lock() {
            *waiting = subscriptions;
        }
        if let Err(error) = self.ready().await {
            tracing::warn!(%error, "subscriptions not registered yet; they will be before the first publish");
        }
    }

    /// The stream exists and so do the subscriptions registered before publishing.
    async fn ready(&self) -> Result<(), BusError> {
        use std::sync::atomic::Ordering;
        if self.ready.load(Ordering::Acquire) {
            return Ok(());
        }
        self.stream().await?;
        let waiting = self
            .before_publishing
            .lock()
            .map(|w| w.clone())
            .unwrap_or_default();
        for subscription in &waiting {
            match self.try_register(subscription).await {
                Ok(_) => {}
                // The server answered no (a consumer limit, a durable whose settings cannot
                // change): asking again will not help, and holding back every event of this
                // process for one subscription would be worse; its consumer registers it
                // itself, and says why it cannot.
                Err(Registration::Refused(error)) => {
                    tracing::error!(%error, subscription = subscription.name(),
                        "NATS refused a subscription; publishing without it");
                }
                // No answer (not connected, a timeout): try again before the next publish.
                Err(Registration::Failed(error)) => return Err(error),
            }
        }
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Publishes `events` in order and waits for every ack. `replay` marks a dead letter's
    /// replay: (the subscription it is for, the id that deduplicates this replay).
    pub(crate) async fn publish(
        &self,
        events: &[Event],
        replay: Option<(&str, &str)>,
    ) -> Result<(), BusError> {
        if events.is_empty() {
            return Ok(());
        }
        self.ready().await?;
        let published = self.publish_ready(events, replay).await;
        if published.is_err() {
            self.ready
                .store(false, std::sync::atomic::Ordering::Release);
        }
        published
    }

    async fn publish_ready(
        &self,
        events: &[Event],
        replay: Option<(&str, &str)>,
    ) -> Result<(), BusError> {
        let mut acks = Vec::with_capacity(events.len());
        for event in events {
            let mut message = PublishMessage::build()
                .payload(event.payload.clone().into())
                .headers(envelope_headers(event));
            message = match replay {
                None => message.message_id(event.id.to_string()),
                Some((subscription, id)) => message.message_id(id).header(REPLAY_FOR, subscription),
            };
            let ack = self
                .js
                .send_publish(subject(&event.topic), message)
                .await
                .map_err(|e| nats_error("publish", e))?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.map_err(|e| nats_error("publish ack", e))?;
        }
        Ok(())
    }

    /// Runs `inbox`'s subscription until shutdown, reopening the consumer after failures.
    ///
    /// Messages are asked for only when the last batch is done, never prefetched: a message
    /// delivered to this process starts its ack wait at once, and one waiting behind a slow
    /// batch would be delivered again (an attempt spent, and enough of them dead-letter an
    /// event that never failed). While a batch is handled, its messages are kept in progress.
    pub(crate) async fn consume<F: Future>(&self, inbox: &Inbox<'_>, shutdown: &mut Shutdown<F>) {
        let mut delay = FAILURE_FIRST;
        while !shutdown.is_done() {
            let consumer = match self.register(inbox.subscription).await {
                Ok(consumer) => consumer,
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?delay, "cannot open the NATS consumer");
                    shutdown.sleep(delay).await;
                    delay = (delay * 2).min(FAILURE_MAX);
                    continue;
                }
            };
            tracing::info!(topics = ?inbox.subscription.topics(), "subscription registered");
            loop {
                let batch = tokio::select! {
                    () = shutdown.wait() => return,
                    batch = next_batch(&consumer) => batch,
                };
                match batch {
                    Ok(batch) if batch.is_empty() => {}
                    Ok(batch) => {
                        delay = FAILURE_FIRST;
                        // One transaction for them all.
                        self.deliver(inbox, batch).await;
                    }
                    Err(error) => {
                        tracing::warn!(%error, retry_in = ?delay, "NATS consumer failed");
                        break;
                    }
                }
            }
            shutdown.sleep(delay).await;
            delay = (delay * 2).min(FAILURE_MAX);
        }
    }

    /// Creates or updates `sub`'s durable consumer: from then on the stream keeps its
    /// subjects' messages for it (the stream's retention is by interest). Idempotent.
    pub(crate) async fn register(&self, sub: &Subscription) -> Result<PullConsumer, BusError> {
        self.try_register(sub).await.map_err(|error| match error {
            Registration::Refused(error) | Registration::Failed(error) => error,
        })
    }

    /// [`NatsBus::register`], telling a refusal from a failure to get an answer.
    async fn try_register(&self, sub: &Subscription) -> Result<PullConsumer, Registration> {
        // Creating the stream is idempotent and cheap next to creating the consumer, and a
        // consumer needs it: a NATS server that started empty after this process did has none.
        self.stream().await.map_err(Registration::Failed)?;
        let stream = self
            .js
            .get_stream(STREAM)
            .await
            .map_err(|e| Registration::Failed(nats_error("get stream", e)))?;
        let mut config = pull::Config {
            durable_name: Some(sub.name().to_owned()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: sub.ack_wait(),
            // One delivery more than attempts: if the last attempt's consumer dies, the next
            // delivery records the dead letter instead of the server dropping the message.
            max_deliver: i64::from(sub.max_attempts()) + 1,
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        };
        // One topic: the server filters. Several: several filter subjects need nats-server
        // 2.10 (Debian stable ships 2.9, which silently ignores them), so the consumer takes
        // the whole stream and `deliver` acks what the subscription did not ask for.
        config.filter_subject = match sub.topics() {
            [only] => subject(only),
            _ => subject(">"),
        };
        stream.create_consumer(config).await.map_err(|e| {
            let refused = matches!(
                e.kind(),
                ConsumerErrorKind::JetStream(_)
                    | ConsumerErrorKind::InvalidName
                    | ConsumerErrorKind::InvalidConsumerType
            );
            let error = nats_error("create consumer", e);
            if refused {
                Registration::Refused(error)
            } else {
                Registration::Failed(error)
            }
        })
    }

    /// Handles a batch of messages, their events in one transaction (one by one if that
    /// fails), and acks, naks (retry later) or terminates (dead letter) each.
    async fn deliver(&self, inbox: &Inbox<'_>, messages: Vec<jetstream::Message>) {
        // Kept in progress while handled, and no longer once settled: a late Progress after a
        // Nak would restart the ack wait and override the retry's backoff.
        let in_progress = keep_in_progress(messages.clone(), inbox.subscription.ack_wait());
        let handled = tokio::select! {
            biased;
            handled = self.handle(inbox, messages) => handled,
            never = in_progress => match never {},
        };
        for ((message, event, attempts), outcome) in handled {
            match outcome {
                Outcome::Handled | Outcome::Duplicate => settle(&message, AckKind::Ack).await,
                Outcome::Failed(error) => self.fail(inbox, &message, &event, attempts, error).await,
            }
        }
    }

    /// Admits and handles a batch; each message with its outcome, to settle.
    async fn handle(
        &self,
        inbox: &Inbox<'_>,
        messages: Vec<jetstream::Message>,
    ) -> Vec<((jetstream::Message, Event, u32), Outcome)> {
        let mut due = Vec::with_capacity(messages.len());
        for message in messages {
            due.extend(self.admit(inbox, message).await);
        }
        if due.is_empty() {
            return Vec::new();
        }
        let batch: Vec<(Option<i64>, &Event)> =
            due.iter().map(|(_, event, _)| (None, event)).collect();
        let outcomes = match inbox.handle_batch(&batch).await {
            Some(outcomes) => outcomes,
            None => {
                let mut outcomes = Vec::with_capacity(due.len());
                for (_, event, _) in &due {
                    outcomes.push(inbox.handle(event).await);
                }
                outcomes
            }
        };
        due.into_iter().zip(outcomes).collect()
    }

    /// A message's event for the subscription to handle, with the delivery's attempt; `None`
    /// when the message was settled here instead (not an event, not for this subscription,
    /// or past its attempts).
    async fn admit(
        &self,
        inbox: &Inbox<'_>,
        message: jetstream::Message,
    ) -> Option<(jetstream::Message, Event, u32)> {
        let sub = inbox.subscription;
        let attempts = message
            .info()
            .map(|info| u32::try_from(info.delivered).unwrap_or(u32::MAX))
            .unwrap_or(1);
        let (event, replay_for) = match parse_envelope(&message) {
            Ok(parsed) => parsed,
            Err(error) => {
                // No event id to record it under: nothing to dead-letter, nothing to retry.
                tracing::error!(subject = %message.subject, %error, "dropping a message that is not a waybill event");
                settle(&message, AckKind::Term).await;
                return None;
            }
        };
        if replay_for
            .as_deref()
            .is_some_and(|target| target != sub.name())
            || !sub.topics().contains(&event.topic)
        {
            settle(&message, AckKind::Ack).await;
            return None;
        }
        if attempts > sub.max_attempts() {
            let error = HandlerError::Permanent(format!(
                "gave up after {} attempts; the last did not finish within the ack wait",
                sub.max_attempts()
            ));
            self.fail(inbox, &message, &event, attempts, error).await;
            return None;
        }
        Some((message, event, attempts))
    }

    /// After a failed attempt: a retry after its backoff (nak), or the dead letter when the
    /// failure is permanent or the attempts are used up.
    async fn fail(
        &self,
        inbox: &Inbox<'_>,
        message: &jetstream::Message,
        event: &Event,
        attempts: u32,
        failure: HandlerError,
    ) {
        let sub = inbox.subscription;
        let give_up =
            matches!(failure, HandlerError::Permanent(_)) || attempts >= sub.max_attempts();
        if !give_up {
            let delay = sub.backoff(attempts);
            tracing::info!(event_id = %event.id, attempts, retry_in = ?delay, error = %failure,
                "handler failed; will retry");
            settle(message, AckKind::Nak(Some(delay))).await;
            return;
        }
        let attempts = attempts.min(sub.max_attempts());
        let error = failure.to_string();
        let recorded = async {
            let client = inbox.db.primary().await?;
            dead_letters::record(&**client, sub.name(), event, attempts, &error).await
        };
        match recorded.await {
            Ok(()) => {
                dead_letters::log_dead(sub.name(), event, attempts, &error);
                settle(message, AckKind::Term).await;
            }
            Err(db_error) => {
                tracing::warn!(event_id = %event.id, error = %db_error, "cannot record a dead letter; will retry");
                settle(message, AckKind::Nak(Some(sub.backoff(attempts)))).await;
            }
        }
    }

    /// Republishes a dead letter for its subscription only, then deletes it. The replay's
    /// message id is derived from the event id and the time it died, so a repeated replay
    /// request is deduplicated while a later death of the same event gets a new one.
    pub(crate) async fn replay(
        &self,
        db: &Db,
        subscription: &str,
        event_id: Uuid,
    ) -> Result<(), BusError> {
        let mut client = db.primary().await?;
        let tx = client.transaction().await?;
        let row = tx
            .query_opt(
                "SELECT topic, key, payload, headers::text, created_at,
                        (extract(epoch FROM dead_at) * 1000000)::bigint
                 FROM bus.dead_letters WHERE subscription = $1 AND event_id = $2
                 FOR UPDATE",
                &[&subscription, &event_id],
            )
            .await?
            .ok_or_else(|| BusError::NotFound {
                subscription: subscription.to_owned(),
                event_id,
            })?;
        let event = Event {
            id: event_id,
            topic: row.get(0),
            key: row.get(1),
            payload: row.get(2),
            headers: crate::event::headers_from_json(row.get(3)),
            created_at: row.get(4),
        };
        let replay_id = format!("{event_id}-replay-{}", row.get::<_, i64>(5));
        self.publish(
            std::slice::from_ref(&event),
            Some((subscription, &replay_id)),
        )
        .await?;
        tx.execute(
            "DELETE FROM bus.dead_letters WHERE subscription = $1 AND event_id = $2",
            &[&subscription, &event_id],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

async fn settle(message: &jetstream::Message, kind: AckKind) {
    // A lost ack means a redelivery, which the inbox absorbs.
    if let Err(error) = message.ack_with(kind).await {
        tracing::warn!(%error, "cannot ack a NATS message; it will be redelivered");
    }
}

/// The envelope of `event` as NATS headers (event headers that NATS cannot carry are dropped).
fn envelope_headers(event: &Event) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(EVENT_ID, event.id.to_string());
    headers.insert(KEY, event.key.as_str());
    headers.insert(CREATED_AT, event.created_at.to_rfc3339());
    for (name, value) in &event.headers {
        match (HeaderName::from_str(name), HeaderValue::from_str(value)) {
            (Ok(name), Ok(value)) => headers.insert(name, value),
            _ => tracing::warn!(event_id = %event.id, header = %name,
                "header cannot travel on NATS; dropped"),
        }
    }
    headers
}

/// The event in `message`, and the subscription it is replayed for, if it is a replay.
fn parse_envelope(message: &async_nats::Message) -> Result<(Event, Option<String>), String> {
    let topic = message
        .subject
        .strip_prefix("waybill.")
        .ok_or("subject outside waybill.>")?;
    let headers = message.headers.as_ref().ok_or("no headers")?;
    let get = |name: &str| headers.get(name).map(|value| value.as_str().to_owned());
    let id = get(EVENT_ID)
        .ok_or("no event id")?
        .parse::<Uuid>()
        .map_err(|e| format!("bad event id: {e}"))?;
    let created_at = get(CREATED_AT)
        .and_then(|text| DateTime::parse_from_rfc3339(&text).ok())
        .map_or_else(Utc::now, |time| time.with_timezone(&Utc));
    let extra = headers
        .iter()
        .filter(|(name, _)| {
            let name: &str = name.as_ref();
            !name.starts_with("Nats-") && !name.starts_with("Waybill-")
        })
        .filter_map(|(name, values)| {
            let value = values.first()?;
            Some((name.to_string(), value.as_str().to_owned()))
        })
        .collect();
    let event = Event {
        id,
        topic: topic.to_owned(),
        key: get(KEY).unwrap_or_default(),
        payload: message.payload.to_vec(),
        headers: extra,
        created_at,
    };
    Ok((event, get(REPLAY_FOR)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_envelope_survives_headers() {
        let event = Event::from_payload("orders.order_confirmed", "o-1", vec![7, 8])
            .with_header("traceparent", "00-abc-def-01")
            .with_header("bad:name", "x");
        let message = async_nats::Message {
            subject: subject(&event.topic).into(),
            reply: None,
            payload: event.payload.clone().into(),
            headers: Some(envelope_headers(&event)),
            status: None,
            description: None,
            length: 0,
        };
        let (back, replay) = parse_envelope(&message).unwrap();
        assert_eq!(replay, None);
        assert_eq!(back.id, event.id);
        assert_eq!(back.topic, event.topic);
        assert_eq!(back.key, event.key);
        assert_eq!(back.payload, event.payload);
        assert_eq!(back.created_at, event.created_at);
        assert_eq!(back.headers.len(), 1);
        assert_eq!(back.headers["traceparent"], "00-abc-def-01");
    }
}
