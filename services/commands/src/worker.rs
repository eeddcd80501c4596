//! Workers: claim due commands, run them through the registry, record how each attempt ended.
//!
//! One claim loop per process takes as many commands as it has free slots (bounded
//! concurrency), each handler runs in its own task, and one recorder writes the outcomes in
//! batches, so neither claiming nor recording is one statement per command. The loop sleeps
//! until something can be due: a notification (commands submitted or finished anywhere), a
//! retry this process scheduled coming due, or — for leases of dead workers and retries
//! scheduled by other processes — a slow fallback poll.
//!
//! Claims are leases: a worker that dies mid-command loses nothing; when the lease runs out
//! another worker claims the command again (attempt + 1) and, because handlers pass the
//! command's idempotency key, its effect still happens once.
//!
//! With the JetStream queue (see `jetstream`), one task takes the dispatches of all this
//! process's shards from their consumers and claims their ids in batches, and claims at once
//! the commands this process's completions freed (a user's next command); the scan loop
//! stays, slowed to a fallback that only takes commands no message brought for
//! [`FALLBACK_QUIET`].

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_nats::jetstream::{AckKind, Message};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::{StreamExt, StreamMap};
use tracing::Instrument;
use uuid::Uuid;

use waybill_runtime::server::Drain;

use crate::{
    domain::{Status, backoff},
    handlers::{Execution, Failure, Registry},
    jetstream::{self, JetStream},
    store::{Claim, CommandStore, Completion, Outcome},
};

/// With the JetStream queue: how long a command must sit unclaimed before the scan takes it
/// (its dispatch was lost). Long enough that the scan never races a message in flight.
pub const FALLBACK_QUIET: Duration = Duration::from_secs(5);
/// With the JetStream queue, while dispatches flow: most commands one fallback scan claims.
/// The scan holds the slots it takes for as long as it runs (it walks the open commands), and
/// then it only picks up lost dispatches: taking every free slot would starve the dispatches
/// and the freed successors. While NATS is unreachable the scan is the only way in, and takes
/// every free slot again.
const FALLBACK_BATCH: usize = 32;
/// Batches of freed successors waiting for the dispatcher; more are dropped (their messages,
/// or the scan, bring those commands).
const SUCCESSOR_BATCHES: usize = 64;
/// Most dispatches claimed in one statement.
const DISPATCH_BATCH: usize = 256;
/// How soon a dispatch whose command cannot run yet (an earlier command of its user is open
/// or running) is first delivered again; it doubles per delivery up to [`BLOCKED_RETRY_MAX`].
const BLOCKED_RETRY: Duration = Duration::from_millis(100);
const BLOCKED_RETRY_MAX: Duration = Duration::from_secs(5);

/// What starting a claimed attempt needs. Cheap to clone.
#[derive(Clone)]
struct Runner {
    registry: Registry,
    settings: Arc<WorkerSettings>,
    outcomes: mpsc::UnboundedSender<Finished>,
}

/// An attempt that ended, and the dispatch that brought it (settled once it is recorded).
struct Finished {
    completion: Completion,
    message: Option<Message>,
}

/// How a process's workers behave.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// This worker's name in the audit trail (unique per process).
    pub name: String,
    /// The shards this process works on.
    pub shards: Vec<i32>,
    /// Commands running at once in this process.
    pub concurrency: usize,
    /// How long a claim holds before another worker may take the command over.
    pub lease: Duration,
    /// Attempts before a command is DEAD.
    pub max_attempts: i32,
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// The fallback poll (see the module comment).
    pub poll: Duration,
    /// A claim round that claims fewer than it could and takes at least this long (a long
    /// walk past queued commands of busy users) has the next round, if it too claims fewer
    /// than it could, mark queued commands blocked (see [`CommandStore::claim`]).
    pub mark_after: Duration,
}

/// Most outcomes recorded in one statement.
const RECORD_BATCH: usize = 512;

/// Runs the workers until `drain` says the process is draining, then stops claiming, lets the
/// attempts in flight end, records them and returns (the process bounds that by its shutdown
/// grace). `wake` is notified when work may be ready. With `queue`, commands come as
/// JetStream dispatches and the scan is only the fallback.
pub async fn work_forever(
    store: CommandStore,
    registry: Registry,
    settings: WorkerSettings,
    wake: Arc<Notify>,
    queue: Option<JetStream>,
    mut drain: Drain,
) {
    let settings = Arc::new(settings);
    let slots = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    let (outcomes, outcome_queue) = mpsc::unbounded_channel();
    let settler = queue.as_ref().map(|_| jetstream::Settler::start());
    // With JetStream, the recorder hands the dispatcher the commands its completions freed.
    let (successors, successor_queue) = match &queue {
        Some(_) => {
            let (sender, receiver) = mpsc::channel(SUCCESSOR_BATCHES);
            (Some(sender), Some(receiver))
        }
        None => (None, None),
    };
    // Whether every shard's consumer is open (see FALLBACK_BATCH).
    let dispatching = Arc::new(AtomicBool::new(false));
    let recorder = tokio::spawn(record(
        store.clone(),
        settings.clone(),
        outcome_queue,
        wake.clone(),
        settler.clone(),
        successors,
    ));
    // Aborting the tasks with the loop keeps a stopped worker from writing later.
    let mut recorder = AbortOnDrop(recorder);
    let mut dispatcher = None;
    let runner = Runner {
        registry,
        settings: settings.clone(),
        outcomes,
    };
    let quiet_for = match (&queue, settler, successor_queue) {
        (Some(queue), Some(settler), Some(successors)) => {
            let dispatches = Dispatches {
                queue: queue.clone(),
                settler,
                successors,
                dispatching: dispatching.clone(),
            };
            dispatcher = Some(AbortOnDrop(tokio::spawn(dispatch_forever(
                dispatches,
                store.clone(),
                runner.clone(),
                slots.clone(),
                drain.clone(),
            ))));
            FALLBACK_QUIET
        }
        _ => Duration::ZERO,
    };
    let claiming = async {
        let mut failures = Duration::from_millis(100);
        // Whether the last round claimed fewer than it could, slowly. One such round can be
        // a passing burst; two in a row mean the walk stays long, and marking pays.
        let mut walked_long = false;
        loop {
            // Wait for at least one free slot, then take the free ones (every one, unless
            // JetStream dispatches flow) and claim that many. Taken before the claim: with
            // JetStream, the dispatcher takes slots meanwhile, and a claimed command without a
            // slot would sit RUNNING until its lease ran out. For the same reason the drain is
            // looked at only while waiting, never during a claim.
            let first = tokio::select! {
                biased;
                () = drain.started() => return,
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let most = if dispatching.load(Ordering::Relaxed) {
                FALLBACK_BATCH
            } else {
                usize::MAX
            };
            let mut permits = vec![first];
            permits.extend(free_slots(&slots, most - 1));
            let free = permits.len();
            let round = match store
                .claim(
                    &settings.shards,
                    &settings.name,
                    settings.lease,
                    i64::try_from(free).unwrap_or(i64::MAX),
                    quiet_for,
                    walked_long,
                )
                .await
            {
                Ok(round) => {
                    failures = Duration::from_millis(100);
                    round
                }
                Err(error) => {
                    drop(permits);
                    tracing::warn!(%error, retry_in = ?failures, "claiming commands failed");
                    tokio::select! {
                        () = drain.started() => return,
                        () = tokio::time::sleep(failures) => {}
                    }
                    failures = (failures * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            let claimed = round.claims.len();
            walked_long = claimed < free && round.walked >= settings.mark_after;
            waybill_runtime::metrics::commands_claimed("scan", claimed);
            waybill_runtime::metrics::commands_marked(round.marked);
            // The claim's LIMIT is the number of permits: each claim has one.
            for (claim, permit) in round.claims.into_iter().zip(permits.drain(..)) {
                start(&runner, claim, None, permit);
            }
            // Unused slots go back.
            drop(permits);
            if claimed >= free {
                continue;
            }
            let rest = async {
                if queue.is_some() {
                    // Messages bring the work; notifications would only wake the scan for
                    // nothing.
                    tokio::time::sleep(settings.poll).await;
                } else {
                    // Nothing more is due now: sleep until told, or the fallback poll.
                    let _ = tokio::time::timeout(settings.poll, wake.notified()).await;
                }
            };
            tokio::select! {
                () = drain.started() => return,
                () = rest => {}
            }
        }
    };
    claiming.await;
    // Draining: no new claims or dispatches; the attempts in flight end and are recorded, so
    // a restart does not wait out their leases to run them again. The dispatcher stops at its
    // next wait, as the claim loop did (a dispatch it is claiming is started first).
    if let Some(mut dispatcher) = dispatcher {
        let _ = (&mut dispatcher.0).await;
    }
    let total = u32::try_from(settings.concurrency.max(1)).unwrap_or(u32::MAX);
    let in_flight = settings.concurrency.max(1) - slots.available_permits();
    tracing::info!(in_flight, "command workers draining: no new claims");
    let _all_ended = slots.acquire_many(total).await;
    // The recorder ends once every sender is gone: this one and the attempts' clones.
    drop(runner);
    let _ = (&mut recorder.0).await;
    tracing::info!(in_flight, "command workers drained");
}

/// Runs a claimed attempt in its own task, holding its slot until it ends.
fn start(runner: &Runner, claim: Claim, message: Option<Message>, permit: OwnedSemaphorePermit) {
    let runner = runner.clone();
    tokio::spawn(async move {
        let completion = run(&runner.registry, &runner.settings, claim).await;
        let _ = runner.outcomes.send(Finished {
            completion,
            message,
        });
        drop(permit);
    });
}

/// Where the JetStream dispatcher's work comes from and goes.
struct Dispatches {
    queue: JetStream,
    settler: jetstream::Settler,
    /// The commands this process's completions freed (see [`claim_successors`]).
    successors: mpsc::Receiver<Vec<Uuid>>,
    /// Set while every shard's consumer is open (see [`FALLBACK_BATCH`]).
    dispatching: Arc<AtomicBool>,
}

/// Takes the dispatches of the worker's shards for the life of the worker, reopening the
/// consumers after a failure. The shards' streams are merged so that one claim statement covers whatever has
/// arrived on any of them (a task per shard made claims of a few ids each: half the rate). A
/// message is taken only with a free slot, so what this process cannot run now stays in the
/// stream for other processes. `successors` brings the commands this process's completions
/// freed (see [`claim_successors`]).
async fn dispatch_forever(
    dispatches: Dispatches,
    store: CommandStore,
    runner: Runner,
    slots: Arc<Semaphore>,
    mut drain: Drain,
) {
    let Dispatches {
        queue,
        settler,
        mut successors,
        dispatching,
    } = dispatches;
    let settings = runner.settings.clone();
    let shards = &settings.shards;
    let mut failures = Duration::from_millis(100);
    loop {
        let mut messages = StreamMap::new();
        for &shard in shards {
            // Nothing is claimed while opening: safe to leave for the drain.
            let opened = tokio::select! {
                biased;
                () = drain.started() => return,
                opened = queue.pull(shard, settings.lease, DISPATCH_BATCH) => opened,
            };
            match opened {
                Ok(stream) => {
                    messages.insert(shard, stream);
                }
                Err(error) => {
                    tracing::warn!(%error, shard, retry_in = ?failures, "cannot take command dispatches");
                    break;
                }
            }
        }
        if messages.len() == shards.len() {
            dispatching.store(true, Ordering::Relaxed);
            loop {
                // The message first, then a slot: a slot held while waiting for messages
                // would starve the fallback scan (with one slot, for good). Freed successors
                // come before messages, which under load are nearly always there and would
                // starve them (their channel would fill and the recorder drop them).
                let next = tokio::select! {
                    biased;
                    () = drain.started() => {
                        give_back(&settler, &mut messages).await;
                        return;
                    }
                    Some(ids) = successors.recv() => {
                        claim_successors(&store, &runner, &slots, &ids).await;
                        continue;
                    }
                    next = messages.next() => next,
                };
                let first = match next {
                    Some((_, Ok(message))) => message,
                    Some((shard, Err(error))) => {
                        tracing::warn!(%error, shard, "command dispatches failed");
                        break;
                    }
                    None => break,
                };
                let first_permit = tokio::select! {
                    biased;
                    () = drain.started() => {
                        // Someone else's to run: back to the stream at once.
                        settler.settle(first, AckKind::Nak(None));
                        give_back(&settler, &mut messages).await;
                        return;
                    }
                    permit = slots.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => return,
                    },
                };
                failures = Duration::from_millis(100);
                let mut batch = vec![(first, first_permit)];
                // Whatever else has arrived, while slots are free: one claim for all of it.
                while batch.len() < DISPATCH_BATCH {
                    let Ok(permit) = slots.clone().try_acquire_owned() else {
                        break;
                    };
                    // A zero timeout polls once: only messages already here.
                    match tokio::time::timeout(Duration::ZERO, messages.next()).await {
                        Ok(Some((_, Ok(message)))) => batch.push((message, permit)),
                        _ => break,
                    }
                }
                dispatch(&store, &runner, &settler, batch).await;
            }
        }
        // Every consumer is opened again: a failure is rare, and one loop stays simple.
        dispatching.store(false, Ordering::Relaxed);
        drop(messages);
        // Freed successors need no NATS: they are still claimed while it is away.
        let pause = tokio::time::sleep(failures);
        tokio::pin!(pause);
        loop {
            tokio::select! {
                biased;
                () = drain.started() => return,
                () = &mut pause => break,
                Some(ids) = successors.recv() => {
                    claim_successors(&store, &runner, &slots, &ids).await;
                }
            }
        }
        failures = (failures * 2).min(Duration::from_secs(10));
    }
}

/// Draining: naks the dispatches already pulled into this process, so that other processes
/// get them now rather than after the ack wait.
async fn give_back<S, E>(settler: &jetstream::Settler, messages: &mut S)
where
    S: tokio_stream::Stream<Item = (i32, Result<Message, E>)> + Unpin,
{
    // A zero timeout polls once: only messages already here.
    while let Ok(Some((_, Ok(message)))) =
        tokio::time::timeout(Duration::ZERO, messages.next()).await
    {
        settler.settle(message, AckKind::Nak(None));
    }
}

/// Claims, as far as slots are free, the commands that just became their users' oldest open
/// one because an earlier command finished. Their dispatches were delivered while that
/// earlier command ran and were sent back with a backoff (up to [`BLOCKED_RETRY_MAX`]), so
/// without this a user's queued commands would each wait out a redelivery. The message of a
/// command claimed here comes back later and is acked then (its command finished, or is
/// running). What finds no slot, or cannot be claimed, is left to its message.
async fn claim_successors(
    store: &CommandStore,
    runner: &Runner,
    slots: &Arc<Semaphore>,
    ids: &[Uuid],
) {
    let permits = free_slots(slots, ids.len());
    if permits.is_empty() {
        return;
    }
    let settings = &runner.settings;
    match store
        .claim_ids(&ids[..permits.len()], &settings.name, settings.lease)
        .await
    {
        Ok(claims) => {
            waybill_runtime::metrics::commands_claimed("successor", claims.len());
            for (claim, permit) in claims.into_iter().zip(permits) {
                start(runner, claim, None, permit);
            }
        }
        Err(error) => {
            tracing::debug!(%error, "claiming freed commands failed; their dispatches bring them");
        }
    }
}

/// Up to `most` of the slots free now, without waiting.
fn free_slots(slots: &Arc<Semaphore>, most: usize) -> Vec<OwnedSemaphorePermit> {
    std::iter::from_fn(|| slots.clone().try_acquire_owned().ok())
        .take(most)
        .collect()
}

/// Claims what a batch of dispatches names and starts it; the rest are settled: acked if
/// their command is finished or unknown, delivered again later if it cannot run yet.
async fn dispatch(
    store: &CommandStore,
    runner: &Runner,
    settler: &jetstream::Settler,
    batch: Vec<(Message, OwnedSemaphorePermit)>,
) {
    let mut waiting: HashMap<Uuid, (Message, OwnedSemaphorePermit)> = HashMap::new();
    for (message, permit) in batch {
        match jetstream::command_id(&message) {
            // A duplicate in one batch (a redelivery next to its original): one is enough.
            Some(id) if !waiting.contains_key(&id) => {
                waiting.insert(id, (message, permit));
            }
            Some(_) => settler.settle(message, AckKind::Ack),
            None => {
                tracing::error!(subject = %message.subject, "dropping a dispatch that names no command");
                settler.settle(message, AckKind::Term);
            }
        }
    }
    let ids: Vec<Uuid> = waiting.keys().copied().collect();
    let settings = &runner.settings;
    let claims = match store.claim_ids(&ids, &settings.name, settings.lease).await {
        Ok(claims) => claims,
        Err(error) => {
            tracing::warn!(%error, "claiming dispatched commands failed; they come back");
            for (message, _) in waiting.into_values() {
                let wait = jetstream::redelivery_delay(&message, BLOCKED_RETRY, BLOCKED_RETRY_MAX);
                settler.settle(message, AckKind::Nak(Some(wait)));
            }
            return;
        }
    };
    waybill_runtime::metrics::commands_claimed("jetstream", claims.len());
    for claim in claims {
        if let Some((message, permit)) = waiting.remove(&claim.command.id) {
            start(runner, claim, Some(message), permit);
        }
    }
    if waiting.is_empty() {
        return;
    }
    let left: Vec<Uuid> = waiting.keys().copied().collect();
    let states: Option<HashMap<Uuid, (Status, chrono::DateTime<chrono::Utc>)>> =
        match store.states(&left).await {
            Ok(states) => Some(
                states
                    .into_iter()
                    .map(|(id, status, due)| (id, (status, due)))
                    .collect(),
            ),
            Err(error) => {
                tracing::warn!(%error, "reading dispatched commands failed; they come back");
                None
            }
        };
    let now = chrono::Utc::now();
    for (id, (message, _permit)) in waiting {
        let blocked = jetstream::redelivery_delay(&message, BLOCKED_RETRY, BLOCKED_RETRY_MAX);
        let kind = match states.as_ref().map(|states| states.get(&id)) {
            None => AckKind::Nak(Some(blocked)),
            Some(Some((Status::Accepted | Status::Running | Status::Retrying, due))) => {
                let wait = (*due - now).to_std().unwrap_or_default();
                AckKind::Nak(Some(wait.max(blocked)))
            }
            // Finished (a requeue dispatches it again), or gone past retention.
            Some(_) => AckKind::Ack,
        };
        settler.settle(message, kind);
    }
}

/// One attempt: the handler, bounded by half the lease so that a hung call is abandoned well
/// before another worker could take the command over.
async fn run(registry: &Registry, settings: &WorkerSettings, claim: Claim) -> Completion {
    let command = claim.command;
    let kind = command.payload.kind();
    let execution = Execution {
        command_id: command.id,
        user_id: command.user_id.clone(),
        payload: command.payload.clone(),
        attempt: claim.attempt,
    };
    let started = std::time::Instant::now();
    let result = match registry.get(kind) {
        None => Err(Failure::Permanent(format!(
            "no handler for {} commands in this process",
            kind.as_str()
        ))),
        Some(handler) => {
            // A trace of its own per attempt, linked to the SubmitCommand call: the call
            // answered long before, and an attempt may come hours later on another worker.
            let span = tracing::info_span!(parent: None, "command",
                otel.name = format!("command {}", kind.as_str()),
                waybill.command.id = %command.id, waybill.command.kind = kind.as_str(),
                waybill.command.attempt = claim.attempt);
            waybill_runtime::telemetry::link(&span, &command.traceparent);
            let attempt = handler.run(&execution).instrument(span);
            match tokio::time::timeout(settings.lease / 2, attempt).await {
                Ok(result) => result,
                Err(_) => Err(Failure::Transient(format!(
                    "the handler did not finish within {:?}",
                    settings.lease / 2
                ))),
            }
        }
    };
    let outcome = match result {
        Ok(result) => Outcome::Succeeded { result },
        Err(Failure::Permanent(error)) => Outcome::Dead { error },
        Err(Failure::Transient(error)) if claim.attempt >= settings.max_attempts => Outcome::Dead {
            error: format!(
                "{error} (attempt {} of {})",
                claim.attempt, settings.max_attempts
            ),
        },
        Err(Failure::Transient(error)) => Outcome::Retry {
            error,
            after: backoff(claim.attempt, settings.retry_base, settings.retry_max),
        },
    };
    let label = match &outcome {
        Outcome::Succeeded { .. } => "succeeded",
        Outcome::Retry { .. } => "retrying",
        Outcome::Dead { .. } => "dead",
    };
    waybill_runtime::metrics::command_attempt(kind.as_str(), label, started.elapsed());
    tracing::debug!(command_id = %command.id, kind = kind.as_str(), attempt = claim.attempt, outcome = label, "command attempt ended");
    Completion {
        shard: command.shard,
        id: command.id,
        attempt: claim.attempt,
        outcome,
    }
}

/// Records outcomes in batches. A batch that cannot be written is tried again with backoff
/// for about one lease; after that its commands' leases have run out and other workers own
/// them, so the batch is dropped (the commands run again: at least once).
async fn record(
    store: CommandStore,
    settings: Arc<WorkerSettings>,
    mut queue: mpsc::UnboundedReceiver<Finished>,
    wake: Arc<Notify>,
    settler: Option<jetstream::Settler>,
    successors: Option<mpsc::Sender<Vec<Uuid>>>,
) {
    let mut finished = Vec::with_capacity(RECORD_BATCH);
    while queue.recv_many(&mut finished, RECORD_BATCH).await > 0 {
        let (batch, messages): (Vec<Completion>, Vec<Option<Message>>) = finished
            .drain(..)
            .map(|f| (f.completion, f.message))
            .unzip();
        let given_up_at = tokio::time::Instant::now() + settings.lease;
        let mut pause = Duration::from_millis(50);
        // The completions the log took; one whose claim was taken over is not among them.
        let mut applied = std::collections::HashSet::new();
        loop {
            match store.complete(&settings.name, &batch).await {
                Ok(recorded) => {
                    applied.extend(recorded.changed);
                    if let Some(successors) = &successors
                        && !recorded.successors.is_empty()
                    {
                        // Full (the dispatcher is behind) or gone (draining): their messages,
                        // or the scan, bring these commands instead.
                        let _ = successors.try_send(recorded.successors);
                    }
                    break;
                }
                Err(error) if tokio::time::Instant::now() < given_up_at => {
                    tracing::warn!(%error, size = batch.len(), "recording command outcomes failed; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                Err(error) => {
                    tracing::error!(%error, size = batch.len(), "could not record command outcomes; their leases will run out and they will run again");
                    break;
                }
            }
        }
        // Dispatches are settled once their outcome is stored: a retry comes back when due.
        // An outcome not stored (given up, or the claim was taken over) leaves its message to
        // be delivered again, where the claim rule sorts it out.
        for (completion, message) in batch.iter().zip(messages) {
            let (Some(settler), Some(message)) = (&settler, message) else {
                continue;
            };
            if !applied.contains(&completion.id) {
                continue;
            }
            let kind = match &completion.outcome {
                Outcome::Retry { after, .. } => AckKind::Nak(Some(*after)),
                Outcome::Succeeded { .. } | Outcome::Dead { .. } => AckKind::Ack,
            };
            settler.settle(message, kind);
        }
        // Successors of finished commands may be due now; retries come due later.
        wake.notify_one();
        for completion in &batch {
            if let Outcome::Retry { after, .. } = completion.outcome {
                let wake = wake.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    wake.notify_one();
                });
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
