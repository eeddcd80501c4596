//! SubmitCommand's fast path: group commit. Concurrent submissions queue here and a few
//! writers each take whatever has queued (up to a batch) and store it in one transaction, so
//! ingestion costs one commit per batch, not per call. No timer waits for a batch to fill:
//! while one writer commits, the next batch gathers by itself, so a lone call is not delayed
//! and a crowd shares commits. Each caller is answered only after its batch committed.
//!
//! The queue is bounded: when it is full the call is refused at once (RESOURCE_EXHAUSTED)
//! instead of waiting without bound.

use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};
use waybill_runtime::DbError;

use crate::{
    domain::{Command, NewCommand},
    jetstream::Dispatcher,
    store::{CommandStore, Rejected},
};

/// What a submission got: the stored command, or why it was not stored.
pub type Reply = Result<Result<Command, Rejected>, DbError>;

struct Pending {
    command: NewCommand,
    reply: oneshot::Sender<Reply>,
}

/// Why a submission was not queued.
#[derive(Debug)]
pub enum Refused {
    /// The queue is full: the database is behind.
    Full,
    /// The writers are gone (the process is stopping).
    Closed,
}

/// The ingestion queue. Cheap to clone.
#[derive(Clone)]
pub struct Ingest {
    queue: mpsc::Sender<Pending>,
}

impl Ingest {
    /// Starts `writers` writer tasks storing batches of at most `max_batch` through `store`,
    /// behind a queue of `capacity` submissions. The writers stop when every `Ingest` clone
    /// is dropped, after storing what was queued.
    /// With `dispatch`, each new command is published to it after its batch committed.
    pub fn start(
        store: CommandStore,
        writers: usize,
        max_batch: usize,
        capacity: usize,
        dispatch: Option<Dispatcher>,
    ) -> Self {
        let (queue, receiver) = mpsc::channel(capacity.max(1));
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..writers.max(1) {
            tokio::spawn(write(
                store.clone(),
                receiver.clone(),
                max_batch.max(1),
                dispatch.clone(),
            ));
        }
        Self { queue }
    }

    /// Queues a submission; the reply comes once its batch committed (or failed).
    pub fn submit(&self, command: NewCommand) -> Result<oneshot::Receiver<Reply>, Refused> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .try_send(Pending { command, reply })
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => Refused::Full,
                mpsc::error::TrySendError::Closed(_) => Refused::Closed,
            })?;
        Ok(answer)
    }
}

async fn write(
    store: CommandStore,
    receiver: Arc<Mutex<mpsc::Receiver<Pending>>>,
    max: usize,
    dispatch: Option<Dispatcher>,
) {
    let mut batch = Vec::with_capacity(max);
    // The commands this batch stored, to dispatch.
    let mut fresh = Vec::new();
    loop {
        {
            // One writer gathers at a time; the others are committing meanwhile.
            let mut receiver = receiver.lock().await;
            if receiver.recv_many(&mut batch, max).await == 0 {
                return;
            }
        }
        // A caller that gave up (deadline, cancelled) still gets its command stored: it was
        // accepted into the queue, and a retry with its key will find it.
        let commands: Vec<NewCommand> = batch.iter().map(|p| p.command.clone()).collect();
        let size = commands.len();
        match store.insert_batch(&commands).await {
            Ok(results) => {
                for (pending, result) in batch.drain(..).zip(results) {
                    // Stored by this batch, not a repeat of an earlier submission.
                    if dispatch.is_some()
                        && let Ok(command) = &result
                        && command.id == pending.command.id
                    {
                        fresh.push((command.shard, command.id, command.id.to_string()));
                    }
                    let _ = pending.reply.send(Ok(result));
                }
            }
            Err(error) => {
                tracing::warn!(%error, size, "storing a batch of commands failed");
                let message = error.to_string();
                let retryable = matches!(error, DbError::Unavailable(_) | DbError::Conflict(_));
                for pending in batch.drain(..) {
                    // DbError is not Clone; each caller gets its own of the same kind.
                    let error = if retryable {
                        DbError::Unavailable(message.clone())
                    } else {
                        DbError::Invariant(message.clone())
                    };
                    let _ = pending.reply.send(Err(error));
                }
            }
        }
        waybill_runtime::metrics::command_batch_stored(size);
        // After the answers: a command is accepted once stored. A lost dispatch delays it by
        // the fallback scan's quiet time; it does not lose it.
        if let Some(dispatch) = &dispatch {
            dispatch.send(fresh.drain(..));
        }
    }
}
