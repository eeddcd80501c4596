//! The NATS JetStream queue (`--command-queue nats`): the scale-out way for workers to learn
//! which commands to run, instead of scanning the log.
//!
//! The log stays in Postgres: a command is accepted when its row commits, and its status,
//! attempts and audit trail live there whatever the queue. What JetStream carries is the
//! dispatch: one message per command id on the subject of its shard
//! (`waybill-commands.<shard>`) in a work-queue stream, consumed through one durable pull
//! consumer per shard that every process working on that shard shares. A worker claims the
//! ids it is handed by primary key, with the same rule as the scan (the user's oldest open
//! command, none of the user's running), so per-user order never depends on message order;
//! a message whose command is not claimable yet comes back later (nak with a delay).
//!
//! A message is acked only after the attempt's outcome committed, so a worker that dies
//! mid-command has its message redelivered after the ack wait (the lease). A publish that is
//! lost (the process died between commit and publish, NATS was down) is covered by the scan,
//! which in this mode only takes commands that stayed unclaimed for a while.

use std::time::Duration;

use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
    message::PublishMessage,
    stream,
};
use tokio::sync::mpsc;
use uuid::Uuid;

/// The stream every dispatch goes to. Its subjects must not overlap the event bus's
/// (`waybill.>`): NATS refuses two streams on one subject.
pub const STREAM: &str = "WAYBILL_COMMANDS";
/// How long the stream drops a re-published message id (a publish retried after a lost ack).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// The subject of `shard`'s dispatches.
pub fn subject(shard: i32) -> String {
    format!("waybill-commands.{shard}")
}

/// The durable consumer of `shard`.
fn consumer_name(shard: i32) -> String {
    format!("shard-{shard}")
}

/// How long starting up waits for NATS before going on without it.
const STARTUP_WAIT: Duration = Duration::from_secs(2);

/// A connection to the queue. Cheap to clone.
#[derive(Clone)]
pub struct JetStream {
    client: async_nats::Client,
    js: jetstream::Context,
    /// Whether the stream is known to exist; cleared when a call fails, so that a NATS that
    /// came back without its storage gets the stream again.
    stream_ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl JetStream {
    /// A client for `url` that connects in the background and keeps reconnecting, so that a
    /// process whose NATS is down still starts: submissions are stored as ever, dispatches
    /// fail fast and the fallback scan runs the commands, and workers keep trying to pull.
    /// Waits up to [`STARTUP_WAIT`] for the first connection; fails only for a malformed URL.
    /// The stream is created (or updated) once NATS answers.
    pub async fn connect(url: &str) -> Result<Self, String> {
        let client = waybill_runtime::nats::connect(url, "waybill-commands", STARTUP_WAIT)
            .await
            .map_err(|e| format!("connect to {url}: {e}"))?;
        let queue = Self {
            js: jetstream::new(client.clone()),
            client,
            stream_ready: Default::default(),
        };
        if let Err(error) = queue.stream().await {
            tracing::warn!(%url, %error, "the command queue is not reachable; starting without it (the fallback scan runs commands)");
        }
        Ok(queue)
    }

    /// Creates or updates the stream unless it is known to exist.
    async fn stream(&self) -> Result<(), String> {
        use std::sync::atomic::Ordering;
        waybill_runtime::nats::connected(&self.client)?;
        if self.stream_ready.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.js
            .create_or_update_stream(stream::Config {
                name: STREAM.to_owned(),
                subjects: vec!["waybill-commands.*".to_owned()],
                storage: stream::StorageType::File,
                // A message is gone once one worker acked it: a queue, not a log.
                retention: stream::RetentionPolicy::WorkQueue,
                duplicate_window: DUPLICATE_WINDOW,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("create stream {STREAM}: {e}"))?;
        self.stream_ready.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// `result`, after forgetting that the stream exists if it is an error.
    fn checked<T>(&self, result: Result<T, String>) -> Result<T, String> {
        if result.is_err() {
            self.stream_ready
                .store(false, std::sync::atomic::Ordering::Relaxed);
        }
        result
    }

    /// Publishes one message per `(shard, id, message id)` and waits for every ack. The
    /// message id deduplicates a publish retried within the window; a requeue needs its own.
    pub async fn publish(&self, dispatches: &[Dispatch]) -> Result<(), String> {
        self.stream().await?;
        let published = self.publish_to_stream(dispatches).await;
        self.checked(published)
    }

    async fn publish_to_stream(&self, dispatches: &[Dispatch]) -> Result<(), String> {
        let mut acks = Vec::with_capacity(dispatches.len());
        for (shard, id, message_id) in dispatches {
            let message = PublishMessage::build()
                .payload(id.to_string().into())
                .message_id(message_id);
            let ack = self
                .js
                .send_publish(subject(*shard), message)
                .await
                .map_err(|e| format!("publish: {e}"))?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.map_err(|e| format!("publish ack: {e}"))?;
        }
        Ok(())
    }

    /// Opens `shard`'s durable consumer (created if missing) and starts pulling. A message
    /// not acked within `ack_wait` is delivered again: that is the lease.
    pub async fn pull(
        &self,
        shard: i32,
        ack_wait: Duration,
        batch: usize,
    ) -> Result<pull::Stream, String> {
        self.stream().await?;
        let opened = self.open_pull(shard, ack_wait, batch).await;
        self.checked(opened)
    }

    async fn open_pull(
        &self,
        shard: i32,
        ack_wait: Duration,
        batch: usize,
    ) -> Result<pull::Stream, String> {
        let stream = self
            .js
            .get_stream(STREAM)
            .await
            .map_err(|e| format!("get stream {STREAM}: {e}"))?;
        let consumer: PullConsumer = stream
            .get_or_create_consumer(
                &consumer_name(shard),
                pull::Config {
                    durable_name: Some(consumer_name(shard)),
                    filter_subject: subject(shard),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait,
                    // Messages delivered and not yet acked, naked ones waiting to come back
                    // included: the server's default (1,000) stalls a shard behind its
                    // retrying and blocked commands.
                    max_ack_pending: 20_000,
                    deliver_policy: DeliverPolicy::All,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("consumer of shard {shard}: {e}"))?;
        consumer
            .stream()
            .max_messages_per_batch(batch)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|e| format!("pull shard {shard}: {e}"))
    }
}

/// One command to dispatch: its shard, its id, and the message id that deduplicates it.
pub type Dispatch = (i32, Uuid, String);

/// Dispatches waiting to be published before new ones are dropped (the fallback scan takes
/// their commands later).
const DISPATCH_QUEUE: usize = 100_000;
/// Most dispatches published before their acks are awaited.
const PUBLISH_BATCH: usize = 1_024;

/// Where the service hands dispatches: a queue in front of one publishing task, so neither a
/// submission nor the ingest writers ever wait on NATS (a publish to a server that is down
/// waits for its ack timeout). Cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    queue: mpsc::Sender<Dispatch>,
}

impl Dispatcher {
    /// Starts the publishing task on `stream`.
    pub fn start(stream: JetStream) -> Self {
        let (queue, mut pending) = mpsc::channel::<Dispatch>(DISPATCH_QUEUE);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(PUBLISH_BATCH);
            while pending.recv_many(&mut batch, PUBLISH_BATCH).await > 0 {
                if let Err(error) = stream.publish(&batch).await {
                    tracing::warn!(%error, count = batch.len(), "dispatching commands failed; the fallback scan will take them");
                }
                batch.clear();
            }
        });
        Self { queue }
    }

    /// Queues dispatches; any that do not fit are dropped and left to the fallback scan.
    pub fn send(&self, dispatches: impl IntoIterator<Item = Dispatch>) {
        let mut dropped = 0usize;
        for dispatch in dispatches {
            if self.queue.try_send(dispatch).is_err() {
                dropped += 1;
            }
        }
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "the dispatch queue is full; the fallback scan will take those commands"
            );
        }
    }
}

/// The command id a dispatch carries.
pub fn command_id(message: &jetstream::Message) -> Option<Uuid> {
    std::str::from_utf8(&message.payload)
        .ok()
        .and_then(|text| Uuid::parse_str(text).ok())
}

/// Acks and naks waiting to be sent before new ones are dropped.
const SETTLE_QUEUE: usize = 100_000;
/// How long one ack may wait to be handed to the connection.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(1);

/// Where workers hand acks and naks: one task behind a bounded queue, each send bounded by a
/// timeout. While NATS is unreachable async-nats stops taking commands, and an ack awaited in
/// the recorder or the dispatch loop would stall them (and with them the recording of every
/// outcome). A settle dropped or timed out only means the message comes back after its ack
/// wait, which the claim rule makes harmless. Cheap to clone.
#[derive(Clone)]
pub struct Settler {
    queue: mpsc::Sender<(jetstream::Message, AckKind)>,
}

impl Settler {
    pub fn start() -> Self {
        let (queue, mut pending) = mpsc::channel::<(jetstream::Message, AckKind)>(SETTLE_QUEUE);
        tokio::spawn(async move {
            while let Some((message, kind)) = pending.recv().await {
                match tokio::time::timeout(SETTLE_TIMEOUT, message.ack_with(kind)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "settling a command dispatch failed; it comes back");
                    }
                    Err(_) => {
                        tracing::debug!("settling a command dispatch timed out; it comes back")
                    }
                }
            }
        });
        Self { queue }
    }

    pub fn settle(&self, message: jetstream::Message, kind: AckKind) {
        if self.queue.try_send((message, kind)).is_err() {
            tracing::debug!("the settle queue is full; the dispatch comes back after its ack wait");
        }
    }
}

/// How long a dispatch that could not run now waits before it comes back: `first`, doubling
/// with each delivery up to `max`, so a long wait (a user's earlier command retrying for
/// minutes, a database outage) is not a redelivery every `first`.
pub fn redelivery_delay(message: &jetstream::Message, first: Duration, max: Duration) -> Duration {
    let delivered = message.info().map(|info| info.delivered).unwrap_or(1);
    let doublings = u32::try_from(delivered.saturating_sub(1).min(16)).unwrap_or(16);
    first.saturating_mul(1 << doublings).min(max)
}
