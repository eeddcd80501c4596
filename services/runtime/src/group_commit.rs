//! Group commit: concurrent writes of one kind queue here, and a writer task takes whatever
//! has queued (up to a batch) and stores it with one statement and one commit. No timer waits
//! for a batch to fill: while one batch commits, the next gathers by itself, so a lone write is
//! not delayed and a crowd shares round trips, statements and WAL flushes. Under load the
//! batches grow by themselves, which is when sharing pays.
//!
//! The queue is bounded: a write that finds it full is refused at once instead of waiting
//! without bound. Callers sit behind the server's admission limits, so a full queue means the
//! database is far behind.

use std::{future::Future, sync::Arc};

use tokio::{
    sync::{Mutex, mpsc, oneshot},
    time::Instant,
};

/// The span fields [`GroupCommit::submit`] fills in on the caller's span, when it declares
/// them (`tracing::field::Empty`): how long the write queued before a writer gathered it, in
/// milliseconds, and how many writes its batch held. Without them, a span around a write
/// would count the queueing as database time.
pub const QUEUED_MS: &str = "waybill.group_commit.queued_ms";
/// See [`QUEUED_MS`].
pub const BATCH_SIZE: &str = "waybill.group_commit.batch_size";

/// Why a write got no answer from its batch.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The queue is full: the database is behind.
    #[error("too many writes are waiting for the database")]
    Full,
    /// The writers are gone (the process is stopping), or a batch answered fewer writes than
    /// it was given.
    #[error("the write was not stored: its writer stopped")]
    Lost,
}

/// What becomes of a write whose caller stopped waiting before its batch was gathered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abandoned {
    /// Store it anyway: a retry finds it by its own key (a command's idempotency key).
    Store,
    /// Leave it out: a retry would not find it, and storing it would make a second one (a new
    /// order, whose idempotency key the mesh layer gives up when the call is abandoned).
    Skip,
}

struct Pending<T, R> {
    item: T,
    reply: oneshot::Sender<Answer<R>>,
}

/// A write's answer, with when its batch was gathered and how large it was.
struct Answer<R> {
    answer: R,
    gathered: Instant,
    batch_size: usize,
}

/// A queue of writes of one kind and the tasks that store them in batches. Cheap to clone.
pub struct GroupCommit<T, R> {
    queue: mpsc::Sender<Pending<T, R>>,
}

impl<T, R> Clone for GroupCommit<T, R> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
        }
    }
}

impl<T: Send + 'static, R: Send + 'static> GroupCommit<T, R> {
    /// Starts `writers` tasks that store batches of at most `max_batch` writes with `write`,
    /// behind a queue of `capacity`; `kind` names the writes in the batch size histogram, and
    /// `abandoned` says whether a write whose caller has gone is still stored. `write` answers each write of its batch, in order. The
    /// writers stop when every clone is dropped, after storing what was queued. Must be called
    /// inside a tokio runtime.
    pub fn start<F, Fut>(
        kind: &'static str,
        writers: usize,
        max_batch: usize,
        capacity: usize,
        abandoned: Abandoned,
        write: F,
    ) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        let (queue, receiver) = mpsc::channel(capacity.max(1));
        let receiver = Arc::new(Mutex::new(receiver));
        let write = Arc::new(write);
        for _ in 0..writers.max(1) {
            tokio::spawn(run(
                kind,
                receiver.clone(),
                max_batch.max(1),
                abandoned,
                write.clone(),
            ));
        }
        Self { queue }
    }

    /// Stores `item` with whatever else is queued, and returns its answer once its batch
    /// committed (or failed). A caller that gives up waiting takes its write back only with
    /// [`Abandoned::Skip`], and only if its batch has not been gathered yet. Records
    /// [`QUEUED_MS`] and [`BATCH_SIZE`] on the current span.
    pub async fn submit(&self, item: T) -> Result<R, Refused> {
        let submitted = Instant::now();
        let (reply, answer) = oneshot::channel();
        self.queue
            .try_send(Pending { item, reply })
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => Refused::Full,
                mpsc::error::TrySendError::Closed(_) => Refused::Lost,
            })?;
        let Answer {
            answer,
            gathered,
            batch_size,
        } = answer.await.map_err(|_| Refused::Lost)?;
        let span = tracing::Span::current();
        if !span.is_disabled() {
            let queued = gathered.saturating_duration_since(submitted);
            span.record(QUEUED_MS, queued.as_secs_f64() * 1e3);
            // i64: tracing-opentelemetry exports a u64 as a string.
            span.record(BATCH_SIZE, i64::try_from(batch_size).unwrap_or(i64::MAX));
        }
        Ok(answer)
    }
}

async fn run<T, R, F, Fut>(
    kind: &'static str,
    receiver: Arc<Mutex<mpsc::Receiver<Pending<T, R>>>>,
    max: usize,
    abandoned: Abandoned,
    write: Arc<F>,
) where
    F: Fn(Vec<T>) -> Fut,
    Fut: Future<Output = Vec<R>>,
{
    let mut batch = Vec::with_capacity(max);
    loop {
        {
            // One writer gathers at a time; the others are committing meanwhile.
            let mut receiver = receiver.lock().await;
            if receiver.recv_many(&mut batch, max).await == 0 {
                return;
            }
        }
        let (items, replies): (Vec<T>, Vec<_>) = batch
            .drain(..)
            .filter(|pending| abandoned == Abandoned::Store || !pending.reply.is_closed())
            .map(|pending| (pending.item, pending.reply))
            .unzip();
        if items.is_empty() {
            continue;
        }
        let gathered = Instant::now();
        let batch_size = items.len();
        crate::metrics::group_commit_batch(kind, batch_size);
        // Fewer answers than writes leaves the rest to `Refused::Lost` (their senders drop).
        for (reply, answer) in replies.into_iter().zip(write(items).await) {
            let _ = reply.send(Answer {
                answer,
                gathered,
                batch_size,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::task::JoinHandle;

    use super::*;

    /// Submits `n` from a task of its own, so that the test can go on while it waits.
    fn spawn_submit<R: Send + 'static>(
        commit: &GroupCommit<u32, R>,
        n: u32,
    ) -> JoinHandle<Result<R, Refused>> {
        let commit = commit.clone();
        tokio::spawn(async move { commit.submit(n).await })
    }

    /// Writes that arrive while a batch is being stored share the next batch, and each
    /// caller gets its own answer.
    #[tokio::test(start_paused = true)]
    async fn writes_queued_behind_a_batch_share_the_next_one() {
        let batches = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = batches.clone();
        let commit = GroupCommit::start(
            "test",
            1,
            100,
            100,
            Abandoned::Store,
            move |items: Vec<u32>| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(items.len());
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    items.into_iter().map(|n| n * 2).collect::<Vec<_>>()
                }
            },
        );
        let first = spawn_submit(&commit, 1);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let rest: Vec<_> = (2..=6).map(|n| spawn_submit(&commit, n)).collect();
        assert_eq!(first.await.unwrap().unwrap(), 2);
        for (n, answer) in (2..=6).zip(rest) {
            assert_eq!(answer.await.unwrap().unwrap(), n * 2);
        }
        assert_eq!(*batches.lock().unwrap(), vec![1, 5]);
    }

    /// A full queue refuses at once; a batch that answers short loses the rest.
    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_and_a_short_answer_is_lost() {
        let commit = GroupCommit::start(
            "test",
            1,
            1,
            1,
            Abandoned::Store,
            |items: Vec<u32>| async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                items.into_iter().filter(|n| *n != 2).collect::<Vec<_>>()
            },
        );
        let first = spawn_submit(&commit, 1);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let second = spawn_submit(&commit, 2);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(matches!(commit.submit(3).await, Err(Refused::Full)));
        assert_eq!(first.await.unwrap().unwrap(), 1);
        assert!(matches!(second.await.unwrap(), Err(Refused::Lost)));
    }

    /// With `Abandoned::Skip`, a write whose caller left before its batch was gathered is
    /// not stored; with `Store` it is.
    #[tokio::test(start_paused = true)]
    async fn abandoned_writes_are_skipped_or_stored_as_asked() {
        for (abandoned, stored) in [
            (Abandoned::Skip, vec![1, 3]),
            (Abandoned::Store, vec![1, 2, 3]),
        ] {
            let written = Arc::new(std::sync::Mutex::new(Vec::new()));
            let seen = written.clone();
            let commit =
                GroupCommit::start("test", 1, 10, 10, abandoned, move |items: Vec<u32>| {
                    let seen = seen.clone();
                    async move {
                        seen.lock().unwrap().extend(items.iter().copied());
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        items
                    }
                });
            let first = spawn_submit(&commit, 1);
            tokio::time::sleep(Duration::from_millis(1)).await;
            // Queued behind the first batch, then abandoned.
            let gone = spawn_submit(&commit, 2);
            tokio::time::sleep(Duration::from_millis(1)).await;
            gone.abort();
            let third = commit.submit(3).await.unwrap();
            assert_eq!((first.await.unwrap().unwrap(), third), (1, 3));
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(*written.lock().unwrap(), stored, "{abandoned:?}");
        }
    }
}
