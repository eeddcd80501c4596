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

use std::{sync::Arc, time::Duration};

use tokio::sync::{Notify, Semaphore, mpsc};
use tracing::Instrument;

use crate::{
    domain::backoff,
    handlers::{Execution, Failure, Registry},
    store::{Claim, CommandStore, Completion, Outcome},
};

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
}

/// Most outcomes recorded in one statement.
const RECORD_BATCH: usize = 512;

/// Runs the workers until the task is dropped. `wake` is notified when work may be ready.
pub async fn work_forever(
    store: CommandStore,
    registry: Registry,
    settings: WorkerSettings,
    wake: Arc<Notify>,
) {
    let settings = Arc::new(settings);
    let slots = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    let (outcomes, outcome_queue) = mpsc::unbounded_channel();
    let recorder = tokio::spawn(record(
        store.clone(),
        settings.clone(),
        outcome_queue,
        wake.clone(),
    ));
    // Aborting the recorder with the loop keeps a stopped worker from writing later.
    let _recorder = AbortOnDrop(recorder);
    let mut failures = Duration::from_millis(100);
    loop {
        // Wait for at least one free slot, then claim as many as are free.
        let Ok(first) = slots.clone().acquire_owned().await else {
            return;
        };
        let free = slots.available_permits() + 1;
        let claims = match store
            .claim(
                &settings.shards,
                &settings.name,
                settings.lease,
                i64::try_from(free).unwrap_or(i64::MAX),
            )
            .await
        {
            Ok(claims) => {
                failures = Duration::from_millis(100);
                claims
            }
            Err(error) => {
                drop(first);
                tracing::warn!(%error, retry_in = ?failures, "claiming commands failed");
                tokio::time::sleep(failures).await;
                failures = (failures * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let claimed = claims.len();
        let mut first = Some(first);
        for claim in claims {
            let permit = match first.take() {
                Some(permit) => permit,
                None => match slots.clone().try_acquire_owned() {
                    Ok(permit) => permit,
                    // Cannot happen (we claimed no more than were free); the lease covers it.
                    Err(_) => break,
                },
            };
            let outcomes = outcomes.clone();
            let registry = registry.clone();
            let settings = settings.clone();
            tokio::spawn(async move {
                let completion = run(&registry, &settings, claim).await;
                let _ = outcomes.send(completion);
                drop(permit);
            });
        }
        drop(first);
        if claimed >= free {
            continue;
        }
        // Nothing more is due now: sleep until told, or the fallback poll.
        let _ = tokio::time::timeout(settings.poll, wake.notified()).await;
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
    mut queue: mpsc::UnboundedReceiver<Completion>,
    wake: Arc<Notify>,
) {
    let mut batch = Vec::with_capacity(RECORD_BATCH);
    while queue.recv_many(&mut batch, RECORD_BATCH).await > 0 {
        let given_up_at = tokio::time::Instant::now() + settings.lease;
        let mut pause = Duration::from_millis(50);
        loop {
            match store.complete(&settings.name, &batch).await {
                Ok(_) => break,
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
        batch.clear();
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
