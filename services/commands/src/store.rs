//! The command log's SQL. Every status change writes its audit row in the same statement, and
//! every change tells the other processes on [`CHANNEL`] (delivered at commit): `r` when work
//! became ready, `c:<id>,<id>…` when commands changed (watchers and caches).

use std::time::Duration;

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;
use uuid::Uuid;
use waybill_runtime::{Db, DbError};

use crate::domain::{Command, NewCommand, Payload, Status, Transition};

/// The channel workers, watchers and caches listen on.
pub const CHANNEL: &str = "waybill_commands";
/// Postgres refuses NOTIFY payloads of 8,000 bytes or more; a UUID and a comma are 37.
const IDS_PER_NOTIFY: usize = 200;

const COLUMNS: &str = "c.id, c.shard, c.user_id, c.payload, c.status, c.attempts, c.result, \
                       c.last_error, c.undo_of, c.undone_by, c.traceparent, c.run_after, c.created_at, \
                       c.updated_at";

/// A command `c` that may be claimed now: due (or its lease ran out), and its user's oldest
/// open command with none of that user's running. This is what keeps one user's commands
/// in submission order whichever way they were dispatched.
/// `phase = 'open'` (not the statuses it stands for) is what the partial indexes are on.
const CLAIMABLE: &str = "c.phase = 'open'
    AND ((c.status <> 'RUNNING' AND c.run_after <= now())
         OR (c.status = 'RUNNING' AND c.lease_until < now()))
    AND NOT EXISTS (
        SELECT 1 FROM commands.commands p
        WHERE p.user_id = c.user_id AND p.id <> c.id
          AND p.phase = 'open'
          AND (p.seq < c.seq OR (p.status = 'RUNNING' AND p.lease_until >= now())))";

/// Whether command `c` waits behind an older open command of its user.
const BEHIND_OLDER: &str = "EXISTS (SELECT 1 FROM commands.commands p
    WHERE p.user_id = c.user_id AND p.phase = 'open' AND p.seq < c.seq)";

/// Most commands one claim round marks blocked: enough that a deep queue is marked in a few
/// rounds, few enough that the round's transaction stays short.
pub const MARK_BATCH: i64 = 4_096;
/// How many times [`release_heads`] looks again for a user whose head left the queue while
/// it waited for the head's lock.
const RELEASE_ROUNDS: usize = 3;

/// What one claim round did.
#[derive(Debug)]
pub struct ClaimRound {
    pub claims: Vec<Claim>,
    /// Commands found waiting behind an older one of their user and marked blocked.
    pub marked: u64,
    /// How long the claim statement took: mostly the walk, when it claimed few.
    pub walked: Duration,
}

/// A submission that could not be stored.
#[derive(Debug)]
pub enum Rejected {
    /// The user's key was used before for a different command.
    KeyReused(Command),
}

/// Why a change of a command was refused.
#[derive(Debug)]
pub enum Refused {
    NotFound,
    /// The command's status (or kind) forbids it; the message says why.
    State(Box<Command>, String),
}

/// A claimed command for a worker to run.
#[derive(Debug, Clone)]
pub struct Claim {
    pub command: Command,
    /// The attempt this claim is (1 for the first); a completion names it so that a worker
    /// whose lease was taken over cannot overwrite the newer attempt.
    pub attempt: i32,
}

/// How an attempt ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Succeeded {
        result: String,
    },
    /// Failed; try again after the delay.
    Retry {
        error: String,
        after: Duration,
    },
    /// Failed for good (refused, or attempts exhausted).
    Dead {
        error: String,
    },
}

/// What recording a batch of outcomes changed.
#[derive(Debug)]
pub struct Recorded {
    /// The commands whose outcome was applied (and originals an undo marked UNDONE).
    pub changed: Vec<Uuid>,
    /// For each user whose command left the queue, the user's next open command, which may
    /// be claimable now (released: no longer marked blocked). A user whose head kept
    /// changing while this was looked up is left out (see `release_heads`).
    pub successors: Vec<Uuid>,
}

/// One attempt's end, to record.
#[derive(Debug, Clone)]
pub struct Completion {
    pub shard: i32,
    pub id: Uuid,
    pub attempt: i32,
    pub outcome: Outcome,
}

#[derive(Clone)]
pub struct CommandStore {
    db: Db,
}

impl CommandStore {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Records the shard count on first start. A different count than the log was created
    /// with is refused: it would move users between shards, and a user's commands could then
    /// run out of order.
    pub async fn ensure_shards(&self, count: u32) -> Result<(), String> {
        let client = self.db.primary().await.map_err(|e| e.to_string())?;
        let count = i32::try_from(count).map_err(|e| e.to_string())?;
        let stored: i32 = client
            .query_one(
                "WITH first AS (INSERT INTO commands.settings (shard_count) VALUES ($1)
                                ON CONFLICT (singleton) DO NOTHING RETURNING shard_count)
                 SELECT shard_count FROM first
                 UNION ALL SELECT shard_count FROM commands.settings
                 LIMIT 1",
                &[&count],
            )
            .await
            .map_err(|e| DbError::from(e).to_string())?
            .get(0);
        if stored != count {
            return Err(format!(
                "the command log was created with {stored} shards; --command-shards {count} \
                 would move users between shards (changing the count is not supported on a \
                 live log)"
            ));
        }
        Ok(())
    }

    /// Stores a batch of submissions in one transaction (the ingestion path's group commit).
    /// Each result is the stored command: new, or the one an earlier call with the same user
    /// and key stored.
    pub async fn insert_batch(
        &self,
        batch: &[NewCommand],
    ) -> Result<Vec<Result<Command, Rejected>>, DbError> {
        // One statement, so one round trip and an implicit transaction: the insert, the audit
        // rows and the workers' wake-up commit together.
        let client = self.db.primary().await?;
        insert(&client, batch).await
    }

    /// One command by id, read on the primary.
    pub async fn get(&self, id: Uuid) -> Result<Option<Command>, DbError> {
        read(&self.db.primary().await?, id).await
    }

    /// A command's status changes after audit row `after` (0: all), oldest first.
    pub async fn history(&self, id: Uuid, after: i64) -> Result<Vec<Transition>, DbError> {
        let client = self.db.primary().await?;
        let statement = client
            .prepare_cached(
                "SELECT id, status, attempt, worker, error, at FROM commands.audit
                 WHERE command_id = $1 AND id > $2 ORDER BY id",
            )
            .await?;
        client
            .query(&statement, &[&id, &after])
            .await?
            .iter()
            .map(transition)
            .collect()
    }

    /// A user's commands, newest first, after `after` (a page's last id), from a replica.
    pub async fn list(
        &self,
        user_id: &str,
        shard: i32,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<Command>, DbError> {
        let client = self.db.replica().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM commands.commands c
                     WHERE c.shard = $1 AND c.user_id = $2 AND ($3::uuid IS NULL OR c.id < $3)
                     ORDER BY c.id DESC LIMIT $4"
                ),
                &[&shard, &user_id, &after, &limit],
            )
            .await?;
        rows.iter().map(command).collect()
    }

    /// DEAD commands, oldest first, after `after`, from a replica.
    pub async fn list_dead(
        &self,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<Command>, DbError> {
        let client = self.db.replica().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM commands.commands c
                     WHERE c.phase = 'dead' AND ($1::uuid IS NULL OR c.id > $1)
                     ORDER BY c.id LIMIT $2"
                ),
                &[&after, &limit],
            )
            .await?;
        rows.iter().map(command).collect()
    }

    /// Cancels a command that has not started (ACCEPTED) or is waiting to be tried again
    /// (RETRYING). An undo command that is cancelled frees its original to be undone again.
    pub async fn cancel(&self, id: Uuid) -> Result<Result<Command, Refused>, DbError> {
        let mut client = self.db.primary().await?;
        let tx = client.transaction().await?;
        let Some(current) = lock(&tx, id).await? else {
            return Ok(Err(Refused::NotFound));
        };
        match current.status {
            Status::Cancelled => return Ok(Ok(current)),
            Status::Accepted | Status::Retrying => {}
            status => {
                let why = format!(
                    "the command is {}; only ACCEPTED or RETRYING commands can be cancelled",
                    status.as_str()
                );
                return Ok(Err(Refused::State(Box::new(current), why)));
            }
        }
        let row = tx
            .query_one(
                &format!(
                    "WITH changed AS (
                         UPDATE commands.commands c
                         SET status = 'CANCELLED', updated_at = now(), closed_at = now()
                         WHERE c.shard = $1 AND c.id = $2 RETURNING {COLUMNS}),
                     audit AS (INSERT INTO commands.audit (command_id, status, attempt)
                               SELECT id, 'CANCELLED', attempts FROM changed),
                     freed AS (UPDATE commands.commands o SET undone_by = NULL
                               FROM changed WHERE o.shard = changed.shard
                                 AND o.id = changed.undo_of AND o.undone_by = changed.id)
                     SELECT * FROM changed"
                ),
                &[&current.shard, &id],
            )
            .await?;
        let cancelled = command(&row)?;
        // Its user's next command may be the head now. Only when nothing older is open (as a
        // statement after the cancel sees it): the transaction that takes an older one out
        // of the queue releases the next head itself, and locking that older command here
        // could deadlock with it (it waits for this command's lock).
        let was_head: bool = tx
            .query_one(
                &format!("SELECT NOT {BEHIND_OLDER} FROM commands.commands c WHERE c.id = $1"),
                &[&id],
            )
            .await?
            .try_get(0)?;
        if was_head
            && !release_heads(&tx, std::slice::from_ref(&cancelled.user_id))
                .await?
                .is_empty()
        {
            notify(&tx, "r").await?;
        }
        notify_changed(&tx, &[id]).await?;
        tx.commit().await?;
        Ok(Ok(cancelled))
    }

    /// Submits the undo of a SUCCEEDED reversible command (its inverse, as a new command of
    /// the same user) and links the two. A repeat returns the same undo command.
    pub async fn undo(&self, id: Uuid) -> Result<Result<Command, Refused>, DbError> {
        let mut client = self.db.primary().await?;
        let tx = client.transaction().await?;
        let Some(original) = lock(&tx, id).await? else {
            return Ok(Err(Refused::NotFound));
        };
        if let Some(undo_id) = original.undone_by {
            // Read, not locked: the undo's own completion locks it and then the original
            // (to mark it UNDONE), so locking it here, behind the original, could deadlock.
            let undo = read(&tx, undo_id).await?.ok_or_else(|| {
                DbError::Invariant(format!("command {id} names a missing undo {undo_id}"))
            })?;
            return Ok(Ok(undo));
        }
        let refuse = |why: String| Ok(Err(Refused::State(Box::new(original.clone()), why)));
        if original.undo_of.is_some() {
            return refuse("an undo command cannot be undone; submit the original again".into());
        }
        if original.status != Status::Succeeded {
            return refuse(format!(
                "the command is {}; only SUCCEEDED commands can be undone",
                original.status.as_str()
            ));
        }
        let Some(inverse) = original.payload.inverse(&original.result) else {
            return refuse(format!(
                "{} commands cannot be undone",
                original.payload.kind().as_str()
            ));
        };
        let undo = NewCommand {
            id: Uuid::now_v7(),
            shard: original.shard,
            user_id: original.user_id.clone(),
            idempotency_key: format!("{}{id}", crate::UNDO_KEY_PREFIX),
            payload: inverse,
            undo_of: Some(id),
            traceparent: waybill_runtime::telemetry::current_traceparent().unwrap_or_default(),
        };
        let undo = match insert(&tx, std::slice::from_ref(&undo)).await?.pop() {
            Some(Ok(undo)) => undo,
            Some(Err(Rejected::KeyReused(other))) => {
                return Err(DbError::Invariant(format!(
                    "undo key of {id} already names command {}",
                    other.id
                )));
            }
            None => return Err(DbError::Invariant("insert returned nothing".into())),
        };
        tx.execute(
            "UPDATE commands.commands SET undone_by = $3 WHERE shard = $1 AND id = $2",
            &[&original.shard, &id, &undo.id],
        )
        .await?;
        notify(&tx, "r").await?;
        notify_changed(&tx, &[id]).await?;
        tx.commit().await?;
        Ok(Ok(undo))
    }

    /// Puts a DEAD command back in its queue with its attempts reset.
    pub async fn requeue(&self, id: Uuid) -> Result<Result<Command, Refused>, DbError> {
        let mut client = self.db.primary().await?;
        let tx = client.transaction().await?;
        let Some(current) = lock(&tx, id).await? else {
            return Ok(Err(Refused::NotFound));
        };
        match current.status {
            Status::Dead => {}
            Status::Accepted | Status::Running | Status::Retrying => return Ok(Ok(current)),
            status => {
                let why = format!(
                    "the command is {}; only DEAD commands can be requeued",
                    status.as_str()
                );
                return Ok(Err(Refused::State(Box::new(current), why)));
            }
        }
        let row = tx
            .query_one(
                &format!(
                    "WITH changed AS (
                         UPDATE commands.commands c
                         SET status = 'ACCEPTED', attempts = 0, run_after = now(),
                             updated_at = now(), closed_at = NULL, blocked = false
                         WHERE c.shard = $1 AND c.id = $2 RETURNING {COLUMNS}),
                     audit AS (INSERT INTO commands.audit (command_id, status, attempt, error)
                               SELECT id, 'ACCEPTED', 0, 'requeued' FROM changed)
                     SELECT * FROM changed"
                ),
                &[&current.shard, &id],
            )
            .await?;
        let requeued = command(&row)?;
        notify(&tx, "r").await?;
        notify_changed(&tx, &[id]).await?;
        tx.commit().await?;
        Ok(Ok(requeued))
    }

    /// Claims up to `limit` commands of `shards` that are due: each the oldest open command
    /// of its user, with no other command of that user running. A RUNNING command whose lease
    /// ran out is claimed again (its worker is presumed dead; the audit says so). Only
    /// commands unchanged for `quiet_for` are taken: with the JetStream queue, the scan is
    /// the fallback for dispatches that were lost, and must not race the messages.
    ///
    /// The walk skips commands marked blocked. A round that found fewer than `limit` walked
    /// past every queued command of busy users; with `mark`, it then marks blocked up to
    /// [`MARK_BATCH`] open commands of `shards` that wait behind an older one of their user,
    /// oldest first, so that later rounds do not probe them again (see [`mark_blocked`]).
    /// Marking and later releasing a command are two updates that cannot be HOT, worth it
    /// only when walks are long again and again: the caller decides from
    /// [`ClaimRound::walked`].
    pub async fn claim(
        &self,
        shards: &[i32],
        worker: &str,
        lease: Duration,
        limit: i64,
        quiet_for: Duration,
        mark: bool,
    ) -> Result<ClaimRound, DbError> {
        let pick = format!(
            "c.shard = ANY($3) AND NOT c.blocked
             AND c.updated_at <= now() - make_interval(secs => $5)
             AND {CLAIMABLE} ORDER BY c.seq LIMIT $4"
        );
        let mut client = self.db.primary().await?;
        let tx = client.transaction().await?;
        let walk = std::time::Instant::now();
        let claims = claim_picked(
            &tx,
            &pick,
            worker,
            lease,
            &[&shards, &limit, &quiet_for.as_secs_f64()],
        )
        .await?;
        let walked = walk.elapsed();
        let short = i64::try_from(claims.len()).unwrap_or(i64::MAX) < limit;
        let marked = if mark && short {
            mark_blocked(&tx, shards).await?
        } else {
            0
        };
        tx.commit().await?;
        Ok(ClaimRound {
            claims,
            marked,
            walked,
        })
    }

    /// Claims those of `ids` that are claimable now (as [`claim`](Self::claim) decides), for
    /// commands dispatched by message. The others are left as they are.
    pub async fn claim_ids(
        &self,
        ids: &[Uuid],
        worker: &str,
        lease: Duration,
    ) -> Result<Vec<Claim>, DbError> {
        let pick = format!("c.id = ANY($3) AND {CLAIMABLE}");
        let mut client = self.db.primary().await?;
        let tx = client.transaction().await?;
        let claims = claim_picked(&tx, &pick, worker, lease, &[&ids]).await?;
        tx.commit().await?;
        Ok(claims)
    }

    /// The status and due time of each of `ids` that exists.
    pub async fn states(
        &self,
        ids: &[Uuid],
    ) -> Result<Vec<(Uuid, Status, chrono::DateTime<chrono::Utc>)>, DbError> {
        let client = self.db.primary().await?;
        let statement = client
            .prepare_cached(
                "SELECT id, status, run_after FROM commands.commands WHERE id = ANY($1)",
            )
            .await?;
        client
            .query(&statement, &[&ids])
            .await?
            .iter()
            .map(|row| {
                let status: String = row.try_get(1)?;
                let status = Status::parse(&status).ok_or_else(|| {
                    DbError::Invariant(format!("a command has status {status:?}"))
                })?;
                Ok((row.try_get(0)?, status, row.try_get(2)?))
            })
            .collect()
    }

    /// Records how attempts ended, in one transaction. An attempt whose claim was taken over
    /// (the lease ran out and another worker claimed the command again) is not recorded: the
    /// newer attempt owns the command. A succeeded undo marks its original UNDONE. Each user
    /// whose command left the queue has its next open command released (see [`Recorded`]).
    pub async fn complete(&self, worker: &str, done: &[Completion]) -> Result<Recorded, DbError> {
        let mut shards = Vec::with_capacity(done.len());
        let mut ids = Vec::with_capacity(done.len());
        let mut attempts = Vec::with_capacity(done.len());
        let mut statuses = Vec::with_capacity(done.len());
        let mut results = Vec::with_capacity(done.len());
        let mut errors = Vec::with_capacity(done.len());
        let mut delays = Vec::with_capacity(done.len());
        for completion in done {
            shards.push(completion.shard);
            ids.push(completion.id);
            attempts.push(completion.attempt);
            let (status, result, error, delay) = match &completion.outcome {
                Outcome::Succeeded { result } => (Status::Succeeded, result.as_str(), "", 0.0),
                Outcome::Retry { error, after } => {
                    (Status::Retrying, "", error.as_str(), after.as_secs_f64())
                }
                Outcome::Dead { error } => (Status::Dead, "", error.as_str(), 0.0),
            };
            statuses.push(status.as_str());
            results.push(result);
            errors.push(error);
            delays.push(delay);
        }
        let mut client = self.db.primary().await?;
        let tx = client.transaction().await?;
        // Each completion finds its row by primary key (LATERAL), locked, and the update goes
        // to that row by ctid. Written as a join, the plan depended on statistics that a queue
        // makes stale at once (no RUNNING rows when last analyzed): it scanned the table and
        // compared every row with every completion, 50–130 ms per batch of 512.
        let statement = tx
            .prepare_cached(
                "WITH done AS (
                     SELECT * FROM unnest($1::int4[], $2::uuid[], $3::int4[], $4::text[],
                                          $5::text[], $6::text[], $7::float8[])
                         AS d(shard, id, attempt, status, result, error, delay)),
                 mine AS (
                     SELECT d.*, c.row_at FROM done d,
                     LATERAL (SELECT c.ctid AS row_at FROM commands.commands c
                              WHERE c.id = d.id AND c.status = 'RUNNING' AND c.worker = $8
                                AND c.attempts = d.attempt
                              FOR UPDATE) c),
                 updated AS (
                     UPDATE commands.commands c
                     SET status = d.status, result = d.result,
                         last_error = CASE WHEN d.error <> '' THEN d.error ELSE c.last_error END,
                         run_after = now() + make_interval(secs => d.delay),
                         lease_until = NULL, updated_at = now(),
                         closed_at = CASE WHEN d.status = 'RETRYING' THEN NULL ELSE now() END
                     FROM mine d
                     WHERE c.ctid = d.row_at
                     RETURNING c.id, c.status, c.attempts, c.undo_of, c.user_id, d.error),
                 audit AS (
                     INSERT INTO commands.audit (command_id, status, attempt, worker, error)
                     SELECT id, 'FAILED', attempts, $8, error FROM updated
                     WHERE status IN ('RETRYING', 'DEAD')
                     UNION ALL
                     SELECT id, status, attempts, $8,
                            CASE WHEN status = 'SUCCEEDED' THEN '' ELSE error END
                     FROM updated)
                 SELECT id, status, undo_of, user_id FROM updated",
            )
            .await?;
        let rows = tx
            .query(
                &statement,
                &[
                    &shards, &ids, &attempts, &statuses, &results, &errors, &delays, &worker,
                ],
            )
            .await?;
        let mut changed = Vec::with_capacity(rows.len());
        let mut originals = Vec::new();
        // Users whose command left the queue (a RETRYING one still holds its user's turn).
        let mut freed_users = Vec::new();
        for row in &rows {
            changed.push(row.try_get::<_, Uuid>(0)?);
            let status: &str = row.try_get(1)?;
            let undo_of: Option<Uuid> = row.try_get(2)?;
            if let (true, Some(original)) = (status == Status::Succeeded.as_str(), undo_of) {
                originals.push(original);
            }
            if status != Status::Retrying.as_str() {
                freed_users.push(row.try_get::<_, String>(3)?);
            }
        }
        if !originals.is_empty() {
            // A succeeded undo marks its original UNDONE. Rare, so its own statement, with the
            // ids as a constant the planner can see (as a join or a subquery's array it was
            // planned as a scan of every SUCCEEDED command).
            let undone = tx
                .query(
                    "WITH undone AS (
                         UPDATE commands.commands o
                         SET status = 'UNDONE', updated_at = now(), closed_at = now()
                         WHERE o.id = ANY($1) AND o.status = 'SUCCEEDED'
                         RETURNING o.id, o.attempts),
                     audit AS (INSERT INTO commands.audit (command_id, status, attempt, worker)
                               SELECT id, 'UNDONE', attempts, $2 FROM undone)
                     SELECT id FROM undone",
                    &[&originals, &worker],
                )
                .await?;
            for row in &undone {
                changed.push(row.try_get(0)?);
            }
        }
        freed_users.sort_unstable();
        freed_users.dedup();
        // A statement of its own: it sees the update above (a CTE of the same statement
        // would see the finished commands still open).
        let next = if freed_users.is_empty() {
            Vec::new()
        } else {
            release_heads(&tx, &freed_users).await?
        };
        // The finished commands' successors may be ready now: wake the workers too.
        notify(&tx, "r").await?;
        notify_changed(&tx, &changed).await?;
        tx.commit().await?;
        Ok(Recorded {
            changed,
            successors: next,
        })
    }

    /// Releases blocked commands that are their user's oldest open command; the number
    /// released. None should be found: each is a command that waited for this sweep instead
    /// of being released when its user's previous command left the queue (a process of a
    /// version before commands V4 finished that one, or a bug).
    pub async fn release_stranded(&self) -> Result<u64, DbError> {
        let client = self.db.primary().await?;
        let released = client
            .execute(
                &format!(
                    "WITH stranded AS (
                         SELECT c.ctid AS row_at FROM commands.commands c
                         WHERE c.phase = 'open' AND c.blocked AND NOT {BEHIND_OLDER}
                         FOR UPDATE SKIP LOCKED)
                     UPDATE commands.commands c SET blocked = false
                     FROM stranded WHERE c.ctid = stranded.row_at"
                ),
                &[],
            )
            .await?;
        if released > 0 {
            notify(&client, "r").await?;
        }
        Ok(released)
    }

    /// Deletes up to `batch` commands that finished (SUCCEEDED, CANCELLED, UNDONE)
    /// more than `age` ago, with their audit rows; the number deleted. Rows being changed are
    /// skipped, not waited for, so retention never blocks ingestion or workers.
    pub async fn purge(&self, age: Duration, batch: i64) -> Result<u64, DbError> {
        let client = self.db.primary().await?;
        let row = client
            .query_one(
                "WITH old AS (
                     SELECT shard, id FROM commands.commands
                     WHERE phase = 'closed'
                       AND (closed_at < now() - make_interval(secs => $1)
                            -- Finished by a process older than commands V3, which did not
                            -- set closed_at (during a rolling upgrade).
                            OR (closed_at IS NULL AND updated_at < now() - make_interval(secs => $1)))
                     LIMIT $2 FOR UPDATE SKIP LOCKED),
                 gone AS (DELETE FROM commands.commands c USING old
                          WHERE c.id = old.id RETURNING c.id),
                 audit AS (DELETE FROM commands.audit a USING gone WHERE a.command_id = gone.id)
                 SELECT count(*) FROM gone",
                &[&age.as_secs_f64(), &batch],
            )
            .await?;
        Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }
}

/// Claims the rows `pick` selects (`$1` is the worker, `$2` the lease, `$3`… `pick`'s).
async fn claim_picked(
    tx: &impl GenericClient,
    pick: &str,
    worker: &str,
    lease: Duration,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<Claim>, DbError> {
    let statement = tx
        .prepare_cached(&format!(
            "WITH ready AS (
                 SELECT c.ctid AS row_at, c.status AS was, c.worker AS previous_worker
                 FROM commands.commands c
                 WHERE {pick}
                 FOR UPDATE OF c SKIP LOCKED),
             claimed AS (
                 UPDATE commands.commands c
                 SET status = 'RUNNING', attempts = c.attempts + 1, worker = $1,
                     lease_until = now() + make_interval(secs => $2), updated_at = now(),
                     blocked = false
                 -- By ctid: the rows are ours (locked above). As a join on id it was
                 -- planned as a hash of the whole table.
                 FROM ready WHERE c.ctid = ready.row_at
                 RETURNING {COLUMNS}, ready.was, ready.previous_worker, c.seq),
             audit AS (
                 INSERT INTO commands.audit (command_id, status, attempt, worker, error)
                 SELECT id, 'FAILED', attempts - 1, previous_worker,
                        'lease expired: worker ' || previous_worker || ' did not finish'
                 FROM claimed WHERE was = 'RUNNING'
                 UNION ALL
                 SELECT id, 'RUNNING', attempts, $1, '' FROM claimed)
             SELECT * FROM claimed ORDER BY seq"
        ))
        .await?;
    let lease = lease.as_secs_f64();
    let mut all: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&worker, &lease];
    all.extend_from_slice(params);
    let rows = tx.query(&statement, &all).await?;
    let claims = rows
        .iter()
        .map(|row| {
            let command = command(row)?;
            Ok(Claim {
                attempt: command.attempts,
                command,
            })
        })
        .collect::<Result<Vec<_>, DbError>>()?;
    let ids: Vec<Uuid> = claims.iter().map(|claim| claim.command.id).collect();
    notify_changed(tx, &ids).await?;
    Ok(claims)
}

/// Marks blocked up to [`MARK_BATCH`] open commands of `shards` that wait behind an older
/// open command of their user; the number marked.
///
/// In two statements, so that a mark cannot hide a command that was just released: the first
/// locks the candidates, the second marks those still behind an older command as it sees them
/// then. A transaction releasing one of them (taking its user's last older command out of the
/// queue, [`release_heads`]) either holds it already, and the first statement skips it, or
/// waits for this one to commit and releases it afterwards; one that committed before the
/// second statement is seen by it.
async fn mark_blocked(tx: &impl GenericClient, shards: &[i32]) -> Result<u64, DbError> {
    // Both statements ask the same of a command; RUNNING ones are never marked (a claim
    // clears the mark, and a running head releases the next one itself).
    let markable =
        format!("c.phase = 'open' AND NOT c.blocked AND c.status <> 'RUNNING' AND {BEHIND_OLDER}");
    let lock = tx
        .prepare_cached(&format!(
            "SELECT c.id FROM commands.commands c
             WHERE c.shard = ANY($1) AND {markable}
             ORDER BY c.seq LIMIT $2
             FOR UPDATE OF c SKIP LOCKED"
        ))
        .await?;
    let candidates: Vec<Uuid> = tx
        .query(&lock, &[&shards, &MARK_BATCH])
        .await?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;
    if candidates.is_empty() {
        return Ok(0);
    }
    // Not `updated_at`: a mark is no change of the command's (watchers, the JetStream
    // fallback's quiet period).
    let mark = tx
        .prepare_cached(&format!(
            "UPDATE commands.commands c SET blocked = true WHERE c.id = ANY($1) AND {markable}"
        ))
        .await?;
    Ok(tx.execute(&mark, &[&candidates]).await?)
}

/// For each of `users` (sorted, so that concurrent callers lock in one order), whose command
/// just left the queue in this transaction: locks the user's oldest open command and clears
/// its blocked mark; the users' heads now. The lock is what a concurrent [`mark_blocked`]
/// waits for or skips. A RUNNING head is not locked: it is never marked (claims clear the
/// mark, marking skips RUNNING commands), it releases the next head itself when it leaves
/// the queue, and its own completion may hold it while waiting for a lock this transaction
/// holds (after a DEAD command was requeued behind it, or a lease taken over), a deadlock.
/// A user whose head keeps leaving the queue under it is given up after [`RELEASE_ROUNDS`]
/// (logged; the retention sweep releases whatever that leaves blocked).
async fn release_heads(tx: &impl GenericClient, users: &[String]) -> Result<Vec<Uuid>, DbError> {
    // `f` is the head as this statement's snapshot sees it; `l` is the same row after
    // waiting for its lock. Where a concurrent transaction took it out of the queue
    // meanwhile, `l` is empty and the next round looks again with a newer snapshot.
    let statement = tx
        .prepare_cached(
            "SELECT u.user_id, f.id, f.status = 'RUNNING' AS running, l.blocked
             FROM unnest($1::text[]) WITH ORDINALITY AS u(user_id, n)
             CROSS JOIN LATERAL (SELECT c.id, c.status FROM commands.commands c
                                 WHERE c.user_id = u.user_id AND c.phase = 'open'
                                 ORDER BY c.seq LIMIT 1) f
             LEFT JOIN LATERAL (SELECT c.blocked FROM commands.commands c
                                WHERE c.id = f.id AND f.status <> 'RUNNING'
                                  AND c.phase = 'open'
                                FOR NO KEY UPDATE) l ON true
             ORDER BY u.n",
        )
        .await?;
    let mut heads = Vec::with_capacity(users.len());
    let mut blocked = Vec::new();
    let mut pending: Vec<String> = users.to_vec();
    for _ in 0..RELEASE_ROUNDS {
        if pending.is_empty() {
            break;
        }
        let rows = tx.query(&statement, &[&pending]).await?;
        pending.clear();
        for row in &rows {
            let id: Uuid = row.try_get(1)?;
            if row.try_get::<_, bool>(2)? {
                heads.push(id);
                continue;
            }
            match row.try_get::<_, Option<bool>>(3)? {
                Some(true) => {
                    blocked.push(id);
                    heads.push(id);
                }
                Some(false) => heads.push(id),
                None => pending.push(row.try_get(0)?),
            }
        }
    }
    if !pending.is_empty() {
        tracing::warn!(
            users = pending.len(),
            "the heads of some users' queues kept changing; the sweep releases them"
        );
    }
    if !blocked.is_empty() {
        tx.execute(
            "UPDATE commands.commands SET blocked = false WHERE id = ANY($1)",
            &[&blocked],
        )
        .await?;
    }
    Ok(heads)
}

/// Inserts a batch (and wakes the workers, at commit); results in input order.
async fn insert(
    tx: &impl GenericClient,
    batch: &[NewCommand],
) -> Result<Vec<Result<Command, Rejected>>, DbError> {
    let mut ids = Vec::with_capacity(batch.len());
    let mut shards = Vec::with_capacity(batch.len());
    let mut users = Vec::with_capacity(batch.len());
    let mut keys = Vec::with_capacity(batch.len());
    let mut kinds = Vec::with_capacity(batch.len());
    let mut payloads = Vec::with_capacity(batch.len());
    let mut undo_of = Vec::with_capacity(batch.len());
    let mut traceparents = Vec::with_capacity(batch.len());
    for new in batch {
        ids.push(new.id);
        shards.push(new.shard);
        users.push(new.user_id.as_str());
        keys.push(new.idempotency_key.as_str());
        kinds.push(new.payload.kind().as_str());
        payloads.push(new.payload.encode());
        undo_of.push(new.undo_of);
        traceparents.push(new.traceparent.as_str());
    }
    // `WITH ORDINALITY … ORDER BY n`: the sequence numbers follow the batch's order.
    let statement = tx
        .prepare_cached(&format!(
            "WITH input AS (
                 SELECT * FROM unnest($1::uuid[], $2::int4[], $3::text[], $4::text[], $5::text[],
                                      $6::bytea[], $7::uuid[], $8::text[]) WITH ORDINALITY
                     AS i(id, shard, user_id, key, kind, payload, undo_of, traceparent, n)),
             inserted AS (
                 INSERT INTO commands.commands AS c
                     (id, shard, user_id, idempotency_key, kind, payload, undo_of, traceparent, status)
                 SELECT id, shard, user_id, key, kind, payload, undo_of, traceparent, 'ACCEPTED'
                 FROM input ORDER BY n
                 ON CONFLICT (user_id, idempotency_key) DO NOTHING
                 RETURNING {COLUMNS}, c.idempotency_key),
             audit AS (INSERT INTO commands.audit (command_id, status, attempt)
                       SELECT id, 'ACCEPTED', 0 FROM inserted)
             -- An initplan: the workers are woken once per batch that stored anything.
             SELECT *, (SELECT pg_notify('{CHANNEL}', 'r')) AS woken FROM inserted"
        ))
        .await?;
    let rows = tx
        .query(
            &statement,
            &[
                &ids,
                &shards,
                &users,
                &keys,
                &kinds,
                &payloads,
                &undo_of,
                &traceparents,
            ],
        )
        .await?;
    let mut stored = std::collections::HashMap::with_capacity(rows.len());
    for row in &rows {
        let command = command(row)?;
        stored.insert(command.id, command);
    }
    let mut results = Vec::with_capacity(batch.len());
    let mut existing_needed = Vec::new();
    for (index, new) in batch.iter().enumerate() {
        match stored.remove(&new.id) {
            Some(command) => results.push(Some(Ok(command))),
            None => {
                results.push(None);
                existing_needed.push(index);
            }
        }
    }
    if !existing_needed.is_empty() {
        // Repeats: the key is taken, by an earlier call or by an earlier entry of this batch.
        let wanted_users: Vec<&str> = existing_needed
            .iter()
            .map(|&i| batch[i].user_id.as_str())
            .collect();
        let wanted_keys: Vec<&str> = existing_needed
            .iter()
            .map(|&i| batch[i].idempotency_key.as_str())
            .collect();
        let rows = tx
            .query(
                &format!(
                    "SELECT {COLUMNS}, c.idempotency_key FROM commands.commands c
                     JOIN unnest($1::text[], $2::text[]) AS w(user_id, key)
                       ON c.user_id = w.user_id AND c.idempotency_key = w.key"
                ),
                &[&wanted_users, &wanted_keys],
            )
            .await?;
        let mut by_key = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            let key: String = row.get("idempotency_key");
            let command = command(row)?;
            by_key.insert((command.user_id.clone(), key), command);
        }
        for index in existing_needed {
            let new = &batch[index];
            let existing = by_key
                .get(&(new.user_id.clone(), new.idempotency_key.clone()))
                .cloned()
                .ok_or_else(|| {
                    DbError::Invariant(format!(
                        "key {:?} of user {:?} conflicted but no command holds it",
                        new.idempotency_key, new.user_id
                    ))
                })?;
            results[index] = Some(
                if existing.payload == new.payload && existing.undo_of == new.undo_of {
                    Ok(existing)
                } else {
                    Err(Rejected::KeyReused(existing))
                },
            );
        }
    }
    results
        .into_iter()
        .map(|result| result.ok_or_else(|| DbError::Invariant("a submission got no result".into())))
        .collect()
}

/// Reads a command by id.
async fn read(client: &impl GenericClient, id: Uuid) -> Result<Option<Command>, DbError> {
    let statement = client
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM commands.commands c WHERE c.id = $1"
        ))
        .await?;
    client
        .query_opt(&statement, &[&id])
        .await?
        .map(|row| command(&row))
        .transpose()
}

/// Reads a command by id, locked until the transaction ends.
async fn lock(tx: &impl GenericClient, id: Uuid) -> Result<Option<Command>, DbError> {
    tx.query_opt(
        &format!("SELECT {COLUMNS} FROM commands.commands c WHERE c.id = $1 FOR UPDATE"),
        &[&id],
    )
    .await?
    .map(|row| command(&row))
    .transpose()
}

async fn notify(tx: &impl GenericClient, payload: &str) -> Result<(), DbError> {
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
        .await?;
    Ok(())
}

async fn notify_changed(tx: &impl GenericClient, ids: &[Uuid]) -> Result<(), DbError> {
    for chunk in ids.chunks(IDS_PER_NOTIFY) {
        let list: Vec<String> = chunk.iter().map(Uuid::to_string).collect();
        notify(tx, &format!("c:{}", list.join(","))).await?;
    }
    Ok(())
}

fn command(row: &Row) -> Result<Command, DbError> {
    let id: Uuid = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    let payload: Vec<u8> = row.try_get("payload")?;
    Ok(Command {
        id,
        shard: row.try_get("shard")?,
        user_id: row.try_get("user_id")?,
        payload: Payload::decode(&payload)
            .map_err(|e| DbError::Invariant(format!("command {id}: {e}")))?,
        status: Status::parse(&status)
            .ok_or_else(|| DbError::Invariant(format!("command {id} has status {status:?}")))?,
        attempts: row.try_get("attempts")?,
        result: row.try_get("result")?,
        last_error: row.try_get("last_error")?,
        undo_of: row.try_get("undo_of")?,
        undone_by: row.try_get("undone_by")?,
        traceparent: row.try_get("traceparent")?,
        run_after: row.try_get("run_after")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn transition(row: &Row) -> Result<Transition, DbError> {
    let status: String = row.try_get("status")?;
    Ok(Transition {
        seq: row.try_get("id")?,
        status: Status::parse(&status)
            .ok_or_else(|| DbError::Invariant(format!("audit row has status {status:?}")))?,
        attempt: row.try_get("attempt")?,
        worker: row.try_get("worker")?,
        error: row.try_get("error")?,
        at: row.try_get("at")?,
    })
}
