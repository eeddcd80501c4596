//! SubmitCommand's fast path: submissions are stored by group commit
//! (`waybill_runtime::group_commit`), one transaction per batch of whatever has queued, and
//! each caller is answered once its batch committed. A full queue refuses at once
//! (RESOURCE_EXHAUSTED). A submission whose caller gave up is still stored: a retry with its
//! key finds it. With JetStream, each new command is dispatched once stored.

use waybill_runtime::{
    DbError,
    group_commit::{Abandoned, GroupCommit, Refused},
};

use crate::{
    domain::{Command, NewCommand},
    jetstream::Dispatcher,
    store::{CommandStore, Rejected},
};

/// What a submission got: the stored command, or why it was not stored.
pub type Reply = Result<Result<Command, Rejected>, DbError>;

/// The ingestion queue. Cheap to clone.
#[derive(Clone)]
pub struct Ingest {
    commit: GroupCommit<NewCommand, Reply>,
}

impl Ingest {
    /// Starts `writers` writer tasks storing batches of at most `max_batch` through `store`,
    /// behind a queue of `capacity` submissions. The writers stop when every `Ingest` clone
    /// is dropped, after storing what was queued.
    /// With `dispatch`, each new command is published to it once its batch committed.
    pub fn start(
        store: CommandStore,
        writers: usize,
        max_batch: usize,
        capacity: usize,
        dispatch: Option<Dispatcher>,
    ) -> Self {
        let commit = GroupCommit::start(
            "commands.submit",
            writers,
            max_batch,
            capacity,
            // A retry with the command's key finds it.
            Abandoned::Store,
            move |batch| write(store.clone(), dispatch.clone(), batch),
        );
        Self { commit }
    }

    /// Stores a submission with whatever else is queued; refused at once when the queue is
    /// full. A caller that gave up (deadline, cancelled) still gets its command stored: it was
    /// accepted into the queue, and a retry with its key will find it.
    pub async fn submit(&self, command: NewCommand) -> Result<Reply, Refused> {
        self.commit.submit(command).await
    }
}

async fn write(
    store: CommandStore,
    dispatch: Option<Dispatcher>,
    commands: Vec<NewCommand>,
) -> Vec<Reply> {
    let size = commands.len();
    match store.insert_batch(&commands).await {
        Ok(results) => {
            if let Some(dispatch) = &dispatch {
                // Stored by this batch, not a repeat of an earlier submission. A command is
                // accepted once stored: a lost dispatch delays it by the fallback scan's quiet
                // time; it does not lose it.
                dispatch.send(commands.iter().zip(&results).filter_map(|(new, result)| {
                    let command = result.as_ref().ok()?;
                    (command.id == new.id)
                        .then(|| (command.shard, command.id, command.id.to_string()))
                }));
            }
            results.into_iter().map(Ok).collect()
        }
        Err(error) => {
            tracing::warn!(%error, size, "storing a batch of commands failed");
            error.copies(size).into_iter().map(Err).collect()
        }
    }
}
