//! The command pipeline end to end: real `waybill serve` processes (the command service, its
//! workers, and the services its handlers call), a real primary and replica. Each test checks
//! what the log, its audit trail and the called services end up holding, not only what the
//! calls answered.

// A failed unwrap is a failed test, which is what we want here.
#![allow(clippy::unwrap_used)]

use std::{net::SocketAddr, time::Duration};

use tokio_stream::StreamExt;
use tonic::{Code, Status, transport::Channel};
use tonic_types::StatusExt;
use waybill_api::{
    commands::v1::{
        self as pb, CommandStatus, command_payload::Kind,
        command_service_client::CommandServiceClient,
    },
    orders::v1::{self as orders, orders_service_client::OrdersServiceClient},
};
use waybill_test_support::{NatsServer, ServeOptions, TestDb, Waybill, eventually};

fn client(channel: &Channel) -> CommandServiceClient<Channel> {
    CommandServiceClient::new(channel.clone())
}

fn notify(customer: &str, message: &str) -> pb::CommandPayload {
    pb::CommandPayload {
        kind: Some(Kind::SendNotification(pb::SendNotification {
            customer_id: customer.into(),
            message: message.into(),
        })),
    }
}

fn restock(sku: &str, quantity: i32) -> pb::CommandPayload {
    pb::CommandPayload {
        kind: Some(Kind::RestockItem(pb::RestockItem {
            sku: sku.into(),
            quantity,
        })),
    }
}

async fn submit(
    commands: &mut CommandServiceClient<Channel>,
    user: &str,
    key: &str,
    payload: pb::CommandPayload,
) -> pb::Command {
    commands
        .submit_command(pb::SubmitCommandRequest {
            user_id: user.into(),
            payload: Some(payload),
            idempotency_key: key.into(),
        })
        .await
        .unwrap_or_else(|status| panic!("SubmitCommand {user}/{key}: {status:?}"))
        .into_inner()
        .command
        .unwrap()
}

async fn get(commands: &CommandServiceClient<Channel>, id: &str) -> pb::Command {
    commands
        .clone()
        .get_command(pb::GetCommandRequest {
            command_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .command
        .unwrap()
}

/// CancelCommand, UndoCommand, RequeueCommand: the command they answer with, or the status.
async fn cancel_command(
    commands: &CommandServiceClient<Channel>,
    id: &str,
) -> Result<pb::Command, Status> {
    let request = pb::CancelCommandRequest {
        command_id: id.into(),
    };
    let response = commands.clone().cancel_command(request).await?;
    Ok(response.into_inner().command.unwrap())
}

async fn undo_command(
    commands: &CommandServiceClient<Channel>,
    id: &str,
) -> Result<pb::Command, Status> {
    let request = pb::UndoCommandRequest {
        command_id: id.into(),
    };
    let response = commands.clone().undo_command(request).await?;
    Ok(response.into_inner().command.unwrap())
}

async fn requeue_command(
    commands: &CommandServiceClient<Channel>,
    id: &str,
) -> Result<pb::Command, Status> {
    let request = pb::RequeueCommandRequest {
        command_id: id.into(),
    };
    let response = commands.clone().requeue_command(request).await?;
    Ok(response.into_inner().command.unwrap())
}

/// Waits until the command's status is `status` and returns it (with history).
/// The DEAD commands' first page (read from a replica).
async fn list_dead(commands: &CommandServiceClient<Channel>) -> Vec<pb::Command> {
    commands
        .clone()
        .list_dead_commands(pb::ListDeadCommandsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .commands
}

async fn reaches(
    commands: &CommandServiceClient<Channel>,
    id: &str,
    status: CommandStatus,
) -> pb::Command {
    eventually(&format!("command {id} is {status:?}"), || async {
        let command = get(commands, id).await;
        (command.status() == status).then_some(command)
    })
    .await
}

fn statuses(history: &[pb::CommandTransition]) -> Vec<CommandStatus> {
    history.iter().map(|t| t.status()).collect()
}

async fn on_hand(db: &TestDb, sku: &str) -> i32 {
    db.primary()
        .await
        .query_one(
            "SELECT on_hand FROM inventory.items WHERE sku = $1",
            &[&sku],
        )
        .await
        .unwrap()
        .get(0)
}

/// `users` users at once, each submitting `per_user` notifications one after another (each
/// acknowledged before the next): each user (`{prefix}-N`) with its command ids in order.
async fn submit_per_user(
    channel: &Channel,
    prefix: &str,
    users: usize,
    per_user: usize,
) -> Vec<(String, Vec<String>)> {
    let mut submitters = Vec::new();
    for user in 0..users {
        let mut commands = client(channel);
        let user = format!("{prefix}-{user}");
        submitters.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 0..per_user {
                let payload = notify(&user, &format!("message {n}"));
                let command = submit(&mut commands, &user, &format!("k-{n}"), payload).await;
                ids.push(command.command_id);
            }
            (user, ids)
        }));
    }
    let mut by_user = Vec::new();
    for submitter in submitters {
        by_user.push(submitter.await.unwrap());
    }
    by_user
}

/// Each of `user`'s commands (`ids`, in submission order) started only after the one before it
/// finished, as the audit trail shows, and each took effect once: one notification each.
async fn assert_ran_in_order_once(db: &TestDb, user: &str, ids: &[String]) {
    let primary = db.primary().await;
    for pair in ids.windows(2) {
        let row = primary
            .query_one(
                "SELECT (SELECT max(at) FROM commands.audit WHERE command_id = $1::text::uuid AND status = 'SUCCEEDED')
                      <= (SELECT min(at) FROM commands.audit WHERE command_id = $2::text::uuid AND status = 'RUNNING')",
                &[&pair[0], &pair[1]],
            )
            .await
            .unwrap();
        assert!(
            row.get::<_, bool>(0),
            "{user}: {} overlapped {}",
            pair[1],
            pair[0]
        );
    }
    let sent: i64 = primary
        .query_one(
            "SELECT count(*) FROM notifications.notifications WHERE customer_id = $1",
            &[&user],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(sent, ids.len() as i64, "{user}");
}

/// A policy under which every SendNotification answers only after `delay` (e.g. "200ms").
fn notifications_delayed(delay: &str) -> String {
    format!(
        r#"{{"methodConfig": [{{"name": [{{"service": "waybill.notifications.v1.NotificationsService", "method": "SendNotification"}}],
            "faults": {{"delay": {{"duration": "{delay}", "percent": 100}}}}}}]}}"#
    )
}

/// A notifications service whose SendNotification answers only after 1.5 s, so a worker
/// calling it is surely mid-call for a while.
fn slow_notifications(db: &TestDb) -> Waybill {
    Waybill::start(
        db,
        ServeOptions {
            services: Some("notifications"),
            policy: Some(&notifications_delayed("1500ms")),
            ..ServeOptions::default()
        },
    )
}

/// Many users, each submitting commands one after another (each acknowledged before the next),
/// all users at once: every command runs once, and each user's run one at a time in the order
/// submitted, as the audit trail shows.
#[tokio::test]
async fn each_users_commands_run_in_order_and_users_run_in_parallel() {
    let db = TestDb::new().await;
    let server = Waybill::serve(&db, &["--command-shards", "4"]);
    let channel = server.channel().await;
    const USERS: usize = 12;
    const PER_USER: usize = 8;
    let by_user = submit_per_user(&channel, "user", USERS, PER_USER).await;
    let commands = client(&channel);
    for (_, ids) in &by_user {
        for id in ids {
            let command = reaches(&commands, id, CommandStatus::Succeeded).await;
            assert_eq!(
                statuses(&command.history),
                [
                    CommandStatus::Accepted,
                    CommandStatus::Running,
                    CommandStatus::Succeeded
                ]
            );
        }
    }
    for (user, ids) in &by_user {
        assert_ran_in_order_once(&db, user, ids).await;
    }
    let primary = db.primary().await;
    // The users are spread over the shards.
    let shards: i64 = primary
        .query_one("SELECT count(DISTINCT shard) FROM commands.commands", &[])
        .await
        .unwrap()
        .get(0);
    assert!(shards > 1, "{USERS} users landed on {shards} shard(s)");
}

/// A worker killed (SIGKILL) while its handler's call is in flight: its lease runs out, a
/// worker in another process claims the command again, and the effect happens once.
#[tokio::test]
async fn a_command_whose_worker_dies_is_claimed_again_and_takes_effect_once() {
    let db = TestDb::new().await;
    // The first worker is surely mid-call when it is killed.
    let notifications = slow_notifications(&db);
    let target = notifications.endpoint();
    let worker_args = [
        "--services",
        "commands",
        "--notifications-target",
        &target,
        "--command-lease",
        "4s",
        "--command-poll",
        "100ms",
    ];
    let mut first = Waybill::serve(&db, &worker_args);
    let mut commands = client(&first.channel().await);
    let command = submit(&mut commands, "u-1", "once", notify("u-1", "hello")).await;
    reaches(&commands, &command.command_id, CommandStatus::Running).await;
    first.kill();

    let second = Waybill::serve(&db, &worker_args);
    let commands = client(&second.channel().await);
    let done = reaches(&commands, &command.command_id, CommandStatus::Succeeded).await;
    assert_eq!(done.attempts, 2);
    assert_eq!(
        statuses(&done.history),
        [
            CommandStatus::Accepted,
            CommandStatus::Running,
            CommandStatus::Failed,
            CommandStatus::Running,
            CommandStatus::Succeeded
        ]
    );
    assert!(
        done.history[2].error.contains("lease expired"),
        "{:?}",
        done.history[2]
    );
    assert_ne!(done.history[1].worker, done.history[3].worker);
    assert_eq!(
        db.count("notifications.notifications").await,
        1,
        "the message was recorded once"
    );
}

/// SIGTERM while a handler's call is in flight: the process stops claiming, lets the attempt
/// end and records it before it exits, so the command is SUCCEEDED after one attempt instead
/// of waiting out its lease for another worker to run it again.
#[tokio::test]
async fn a_draining_worker_finishes_and_records_its_attempts_before_exiting() {
    let db = TestDb::new().await;
    let notifications = slow_notifications(&db);
    let target = notifications.endpoint();
    let mut worker = Waybill::serve(
        &db,
        &[
            "--services",
            "commands",
            "--notifications-target",
            &target,
            "--command-poll",
            "100ms",
        ],
    );
    let mut commands = client(&worker.channel().await);
    let command = submit(&mut commands, "u-drain", "k", notify("u-drain", "hello")).await;
    reaches(&commands, &command.command_id, CommandStatus::Running).await;
    worker.terminate();
    let status = worker.wait_for_exit(Duration::from_secs(20)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "exit: {status:?}\n{}",
        worker.log()
    );
    assert!(
        worker.log().contains("command workers drained"),
        "{}",
        worker.log()
    );
    let row = db
        .primary()
        .await
        .query_one(
            "SELECT status, attempts FROM commands.commands WHERE id = $1::text::uuid",
            &[&command.command_id],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0).as_str(), row.get::<_, i32>(1)),
        ("SUCCEEDED", 1)
    );
    assert_eq!(db.count("notifications.notifications").await, 1);
}

/// A handler whose service is down: retried with backoff, then DEAD with the last error once
/// the attempts run out; listed as dead; requeued after the service is back, it succeeds.
#[tokio::test]
async fn a_failing_command_retries_then_dies_and_can_be_requeued() {
    let db = TestDb::new().await;
    // An address nothing listens on yet: the inventory service starts there later.
    let inventory_addr: SocketAddr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let target = format!("http://{inventory_addr}");
    let server = Waybill::start(
        &db,
        ServeOptions {
            services: Some("commands"),
            // The breaker would keep failing the requeued attempt fast for a while after the
            // outage; it has its own tests, and is kept out of this one's way.
            policy: Some(r#"{"breaker": {"consecutiveFailures": 1000, "minimumCalls": 1000}}"#),
            args: &[
                "--inventory-target",
                &target,
                "--command-max-attempts",
                "3",
                "--command-retry-base",
                "50ms",
                "--command-poll",
                "100ms",
            ],
            ..ServeOptions::default()
        },
    );
    let mut commands = client(&server.channel().await);
    let command = submit(&mut commands, "ops", "restock-1", restock("BOLT", 5)).await;
    let dead = reaches(&commands, &command.command_id, CommandStatus::Dead).await;
    assert_eq!(dead.attempts, 3);
    assert_eq!(
        statuses(&dead.history),
        [
            CommandStatus::Accepted,
            CommandStatus::Running,
            CommandStatus::Failed,
            CommandStatus::Retrying,
            CommandStatus::Running,
            CommandStatus::Failed,
            CommandStatus::Retrying,
            CommandStatus::Running,
            CommandStatus::Failed,
            CommandStatus::Dead
        ]
    );
    assert!(
        dead.last_error.contains("Unavailable"),
        "{}",
        dead.last_error
    );
    // Listed from a replica, which may not have replayed the DEAD yet.
    let listed = eventually("the DEAD command is listed", || async {
        let listed = list_dead(&commands).await;
        (!listed.is_empty()).then_some(listed)
    })
    .await;
    assert_eq!(
        listed.iter().map(|c| &c.command_id).collect::<Vec<_>>(),
        [&command.command_id]
    );

    let inventory = Waybill::start(
        &db,
        ServeOptions {
            services: Some("inventory"),
            listen: Some(inventory_addr),
            ..ServeOptions::default()
        },
    );
    waybill_test_support::stock(&inventory.channel().await, "BOLT", 10).await;
    let requeued = requeue_command(&commands, &command.command_id)
        .await
        .unwrap();
    assert_eq!(requeued.status(), CommandStatus::Accepted);
    assert_eq!(requeued.attempts, 0);
    // Back in the open-work indexes, and no longer finished for retention (on the primary:
    // ListDeadCommands reads a replica, which may not have replayed the requeue yet).
    let row = db
        .primary()
        .await
        .query_one(
            "SELECT phase, closed_at IS NULL FROM commands.commands WHERE id = $1::text::uuid",
            &[&command.command_id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "open");
    assert!(row.get::<_, bool>(1), "a requeued command has no closed_at");
    let done = reaches(&commands, &command.command_id, CommandStatus::Succeeded).await;
    assert_eq!(done.attempts, 1);
    assert_eq!(on_hand(&db, "BOLT").await, 15);
    // No longer listed as DEAD, once the replica has replayed it.
    eventually(
        "the requeued command is no longer listed as DEAD",
        || async {
            let listed = list_dead(&commands).await;
            listed.is_empty().then_some(())
        },
    )
    .await;
    // Requeueing what is not DEAD is refused.
    let refused = requeue_command(&commands, &command.command_id)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
}

/// Retention deletes finished commands, with their audit rows, once they finished longer ago
/// than `--command-retention`; a DEAD command older than that stays (it waits to be requeued).
#[tokio::test]
async fn finished_commands_past_retention_are_purged_and_dead_ones_stay() {
    let db = TestDb::new().await;
    // Nothing listens here: a restock cannot reach inventory and dies after its one attempt.
    let unreachable = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let server = Waybill::serve(
        &db,
        &[
            "--services",
            "commands,notifications",
            "--inventory-target",
            &unreachable,
            "--command-max-attempts",
            "1",
            "--command-retention",
            "1s",
            "--command-retention-sweep",
            "100ms",
        ],
    );
    let mut commands = client(&server.channel().await);
    let dead = submit(&mut commands, "ops", "restock", restock("BOLT", 5)).await;
    reaches(&commands, &dead.command_id, CommandStatus::Dead).await;
    let done = submit(&mut commands, "ops", "notify", notify("c-1", "hello")).await;
    reaches(&commands, &done.command_id, CommandStatus::Succeeded).await;
    let primary = db.primary().await;
    let rows_of = |id: String| {
        let primary = &primary;
        async move {
            let row = primary
                .query_one(
                    "SELECT (SELECT count(*) FROM commands.commands WHERE id = $1::text::uuid),
                            (SELECT count(*) FROM commands.audit WHERE command_id = $1::text::uuid)",
                    &[&id],
                )
                .await
                .unwrap();
            (row.get::<_, i64>(0), row.get::<_, i64>(1))
        }
    };
    eventually("the finished command is purged", || async {
        (rows_of(done.command_id.clone()).await == (0, 0)).then_some(())
    })
    .await;
    // The DEAD command finished before the purged one: it was as old, and is still there.
    let (commands_left, audit_left) = rows_of(dead.command_id.clone()).await;
    assert_eq!(commands_left, 1);
    assert_eq!(audit_left, 4, "ACCEPTED, RUNNING, FAILED, DEAD");
    // The line is written just after the delete commits, so it may trail the rows' absence.
    server
        .wait_for_log("purged finished commands past retention")
        .await;
}

/// Stores `count` queued SendNotification commands of `user` on `shard` directly, as
/// benches/commands-drain.sh does (the payload is SendNotification{customer_id: "a",
/// message: "b"}), in submission order. The first call fixes the log at 16 shards.
async fn store_queue(db: &TestDb, user: &str, shard: i32, count: i32) {
    let primary = db.primary().await;
    primary
        .batch_execute("INSERT INTO commands.settings VALUES (true, 16) ON CONFLICT DO NOTHING")
        .await
        .unwrap();
    primary
        .execute(
            "INSERT INTO commands.commands
                 (shard, id, user_id, idempotency_key, kind, payload, status)
             SELECT $1, gen_random_uuid(), $2, 'k' || g, 'SEND_NOTIFICATION',
                    '\\x22060a0161120162'::bytea, 'ACCEPTED'
             FROM generate_series(1, $3) g ORDER BY g",
            &[&shard, &user, &count],
        )
        .await
        .unwrap();
}

/// Waits until every command in the log finished (none open or DEAD).
async fn finished_all(db: &TestDb) {
    let primary = db.primary().await;
    eventually("every command finished", || async {
        let unfinished: i64 = primary
            .query_one(
                "SELECT count(*) FROM commands.commands WHERE phase <> 'closed'",
                &[],
            )
            .await
            .ok()?
            .get(0);
        (unfinished == 0).then_some(())
    })
    .await;
}

/// A counter's value in a scrape (0 when absent). `series` is the name with its labels.
fn counter(scrape: &str, series: &str) -> u64 {
    waybill_test_support::sample(scrape, series).map_or(0, |value| value as u64)
}

/// A user's command behind another user's deep queue is claimed at once: the claim looks past
/// the 1,100 commands that wait behind their own user's first. (A claim that only looked at
/// the oldest 1,024 open commands, tried for speed, let 76 of the deep queue's run first.)
#[tokio::test]
async fn a_command_behind_another_users_deep_queue_is_claimed_at_once() {
    let db = TestDb::new().await;
    // 1,100 commands of one user, then one of another.
    store_queue(&db, "deep", 0, 1100).await;
    store_queue(&db, "behind", 1, 1).await;
    let _server = Waybill::serve(
        &db,
        &[
            "--services",
            "commands",
            "--command-dry-run",
            "--command-concurrency",
            "4",
        ],
    );
    let primary = db.primary().await;
    // How many of the deep queue's commands had finished when the other user's did.
    let finished_before = eventually("the command behind the deep queue ran", || async {
        // No row until the other user's command succeeded.
        let row = primary
            .query_opt(
                "SELECT (SELECT count(*) FROM commands.audit a
                         JOIN commands.commands c ON c.id = a.command_id
                         WHERE c.user_id = 'deep' AND a.status = 'SUCCEEDED' AND a.at < b.at)
                 FROM commands.audit b JOIN commands.commands bc ON bc.id = b.command_id
                 WHERE bc.user_id = 'behind' AND b.status = 'SUCCEEDED'",
                &[],
            )
            .await
            .ok()??;
        Some(row.get::<_, i64>(0))
    })
    .await;
    assert!(
        finished_before < 1100 - 1024,
        "{finished_before} of the deep queue's commands ran first"
    );
}

/// One user's deep queue (400 commands) runs in submission order, and the claim scan stops
/// walking it: an early round marks the commands behind the head blocked, and each
/// completion releases only the next one. Walking the whole queue every round, as before
/// commands V4, read 143,072 entries of the scan index in one run; marked, 3,420. Nothing is
/// left for the sweep.
#[tokio::test]
async fn a_deep_queue_is_marked_blocked_once_and_released_in_order() {
    let db = TestDb::new().await;
    const DEEP: i32 = 400;
    store_queue(&db, "deep", 0, DEEP).await;
    let server = Waybill::serve(
        &db,
        &[
            "--services",
            "commands",
            "--command-dry-run",
            "--command-concurrency",
            "4",
            "--command-retention-sweep",
            "1s",
            // Mark from the second short round on, however fast the walk (400 entries).
            "--command-mark-after",
            "0s",
        ],
    );
    finished_all(&db).await;
    let primary = db.primary().await;
    // In order: each command started after the one before it succeeded.
    let overlaps: i64 = primary
        .query_one(
            "WITH runs AS (
                 SELECT c.seq,
                        min(a.at) FILTER (WHERE a.status = 'RUNNING') AS started,
                        max(a.at) FILTER (WHERE a.status = 'SUCCEEDED') AS finished
                 FROM commands.commands c JOIN commands.audit a ON a.command_id = c.id
                 GROUP BY c.seq)
             SELECT count(*) FROM (
                 SELECT started, lag(finished) OVER (ORDER BY seq) AS before FROM runs) r
             WHERE started < before",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(overlaps, 0, "commands of the deep queue overlapped");
    let scrape = server.scrape().await;
    let marked = counter(&scrape, "waybill_command_marked_total");
    // Each at most once: a command is marked again only after it became its user's head,
    // which it stays until it runs.
    assert!(
        (u64::from(DEEP.unsigned_abs()) * 9 / 10..DEEP.unsigned_abs().into()).contains(&marked),
        "{marked} of {} queued commands were marked blocked",
        DEEP - 1
    );
    assert_eq!(counter(&scrape, "waybill_command_stranded_total"), 0);
    // Its backends report their statistics as they exit.
    drop(server);
    let read = db
        .settled_statistic(
            "SELECT idx_tup_read FROM pg_stat_user_indexes
             WHERE schemaname = 'commands' AND indexrelname = 'commands_ready'",
        )
        .await;
    assert!(
        read < i64::from(DEEP) * 40,
        "claims read {read} entries of the scan index for a queue of {DEEP}"
    );
}

/// Cancelling a user's head (here a command waiting a long time for its retry) releases
/// the user's next command at once, not at the next sweep, also when a blocked command
/// between them was cancelled first.
#[tokio::test]
async fn cancelling_a_users_head_releases_the_next_command() {
    let db = TestDb::new().await;
    let server = Waybill::serve(
        &db,
        &[
            "--inventory-target",
            "http://127.0.0.1:1",
            // The head waits for its retry for the whole test with near certainty (full
            // jitter below an hour).
            "--command-retry-base",
            "3600s",
            "--command-retry-max",
            "3600s",
            // A command left blocked would run within the test, at the sweep, and be counted.
            "--command-retention-sweep",
            "2s",
            "--command-mark-after",
            "0s",
        ],
    );
    let mut commands = client(&server.channel().await);
    let head = submit(&mut commands, "slow", "head", restock("ANY", 1)).await;
    reaches(&commands, &head.command_id, CommandStatus::Retrying).await;
    let second = submit(&mut commands, "slow", "second", notify("slow", "2")).await;
    let third = submit(&mut commands, "slow", "third", notify("slow", "3")).await;
    let primary = db.primary().await;
    let blocked = |id: String| {
        let primary = &primary;
        async move {
            primary
                .query_one(
                    "SELECT blocked FROM commands.commands WHERE id = $1::text::uuid",
                    &[&id],
                )
                .await
                .unwrap()
                .get::<_, bool>(0)
        }
    };
    eventually("the queued commands are marked blocked", || async {
        (blocked(second.command_id.clone()).await && blocked(third.command_id.clone()).await)
            .then_some(())
    })
    .await;
    // A blocked command can be cancelled; the head stays the head.
    cancel_command(&commands, &second.command_id).await.unwrap();
    cancel_command(&commands, &head.command_id).await.unwrap();
    reaches(&commands, &third.command_id, CommandStatus::Succeeded).await;
    let scrape = server.scrape().await;
    assert_eq!(
        counter(&scrape, "waybill_command_stranded_total"),
        0,
        "the third command waited for the sweep"
    );
}

/// A command marked blocked that is its user's next (left so by a process of a version
/// before commands V4, say) is released by the sweep and counted.
#[tokio::test]
async fn a_next_command_left_blocked_is_released_by_the_sweep() {
    let db = TestDb::new().await;
    store_queue(&db, "stranded", 0, 1).await;
    db.primary()
        .await
        .batch_execute("UPDATE commands.commands SET blocked = true")
        .await
        .unwrap();
    let server = Waybill::serve(
        &db,
        &[
            "--services",
            "commands",
            "--command-dry-run",
            "--command-retention-sweep",
            "1s",
        ],
    );
    finished_all(&db).await;
    assert_eq!(
        counter(&server.scrape().await, "waybill_command_stranded_total"),
        1
    );
}

/// Claiming a command (ACCEPTED → RUNNING) updates its row in place (HOT): no index names
/// what a claim changes, and pages keep room for the new versions (commands V3). Before,
/// each claim added an entry to five indexes. Finishing leaves the open-work indexes, so it
/// cannot be HOT; at least the claims must be.
#[tokio::test]
async fn claims_update_commands_in_place() {
    let db = TestDb::new().await;
    let server = Waybill::serve(&db, &["--services", "commands", "--command-dry-run"]);
    const USERS: usize = 300;
    let channel = server.channel().await;
    // In waves: 300 calls at once would be shed (the server's concurrency limit).
    let mut by_user = Vec::new();
    for wave in 0..10 {
        by_user.extend(submit_per_user(&channel, &format!("hot-{wave}"), USERS / 10, 1).await);
    }
    let commands = client(&channel);
    for (_, ids) in &by_user {
        reaches(&commands, &ids[0], CommandStatus::Succeeded).await;
    }
    let (_, hot) = db
        .update_counts("commands", "commands", 2 * USERS as i64)
        .await;
    // A claim that takes most rows of a page at once can run out of room on it; nearly all
    // fit (28,344 of 30,000 claims in benches/commands-drain.sh).
    assert!(
        hot >= (USERS * 9 / 10) as i64,
        "{hot} of {USERS} claims were HOT"
    );
}

/// A refusal (the item does not exist) is final at once: no retries. Cancel stops a command
/// that has not run; commands that ran cannot be cancelled.
#[tokio::test]
async fn refusals_die_at_once_and_cancel_stops_waiting_commands() {
    let db = TestDb::new().await;
    let server = Waybill::serve(&db, &[]);
    let mut commands = client(&server.channel().await);
    let refused = submit(&mut commands, "ops", "r-1", restock("NOPE", 1)).await;
    let dead = reaches(&commands, &refused.command_id, CommandStatus::Dead).await;
    assert_eq!(dead.attempts, 1);
    assert!(dead.last_error.contains("NotFound"), "{}", dead.last_error);

    // A DEAD command frees its user's queue; to hold a command back, put it behind one that
    // is waiting for its retry.
    let blocked_server = Waybill::serve(
        &db,
        &[
            "--services",
            "commands",
            "--inventory-target",
            "http://127.0.0.1:1",
            // Full jitter: the retry comes at a uniform time below this, so a long base keeps
            // the head waiting for the whole test with near certainty.
            "--command-retry-base",
            "3600s",
            "--command-retry-max",
            "3600s",
            "--command-workers",
            "true",
        ],
    );
    let mut blocked = client(&blocked_server.channel().await);
    drop(server);
    let head = submit(&mut blocked, "slow", "head", restock("ANY", 1)).await;
    reaches(&blocked, &head.command_id, CommandStatus::Retrying).await;
    let behind = submit(&mut blocked, "slow", "behind", notify("slow", "hi")).await;
    let cancelled = cancel_command(&blocked, &behind.command_id).await.unwrap();
    assert_eq!(cancelled.status(), CommandStatus::Cancelled);
    // Cancelling again returns it unchanged; the head (waiting to retry) can be cancelled too.
    let again = cancel_command(&blocked, &behind.command_id).await.unwrap();
    assert_eq!(again.status(), CommandStatus::Cancelled);
    let head = cancel_command(&blocked, &head.command_id).await.unwrap();
    assert_eq!(head.status(), CommandStatus::Cancelled);
    let behind = get(&blocked, &behind.command_id).await;
    assert_eq!(
        statuses(&behind.history),
        [CommandStatus::Accepted, CommandStatus::Cancelled]
    );
    // A command that ran cannot be cancelled.
    let status = cancel_command(&blocked, &refused.command_id)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(
        db.count("notifications.notifications").await,
        0,
        "the cancelled command never ran"
    );
}

/// Undo submits the inverse as a new command; when it succeeds the original is UNDONE. A
/// restock is taken back; an address change is changed back; a notification cannot be undone.
#[tokio::test]
async fn undo_reverses_reversible_commands() {
    let db = TestDb::new().await;
    let server = Waybill::serve(&db, &[]);
    let channel = server.channel().await;
    waybill_test_support::stock(&channel, "NUT", 10).await;
    waybill_test_support::courier(&channel, "bike-1", "north", 5).await;
    let mut commands = client(&channel);

    let restocked = submit(&mut commands, "ops", "r-1", restock("NUT", 5)).await;
    reaches(&commands, &restocked.command_id, CommandStatus::Succeeded).await;
    assert_eq!(on_hand(&db, "NUT").await, 15);
    let undo = undo_command(&commands, &restocked.command_id)
        .await
        .unwrap();
    assert_eq!(undo.undo_of, restocked.command_id);
    assert_eq!(undo.payload, Some(restock("NUT", -5)));
    // A repeat returns the same undo command.
    let repeat = undo_command(&commands, &restocked.command_id)
        .await
        .unwrap();
    assert_eq!(repeat.command_id, undo.command_id);
    reaches(&commands, &undo.command_id, CommandStatus::Succeeded).await;
    let original = reaches(&commands, &restocked.command_id, CommandStatus::Undone).await;
    assert_eq!(original.undone_by, undo.command_id);
    assert_eq!(on_hand(&db, "NUT").await, 10);

    // An address change, undone.
    let order = OrdersServiceClient::new(channel.clone())
        .place_order(orders::PlaceOrderRequest {
            customer_id: "c-1".into(),
            items: vec![orders::LineItem {
                sku: "NUT".into(),
                quantity: 1,
            }],
            delivery_address: "1 Old Street".into(),
            zone: "north".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    let change = submit(
        &mut commands,
        "c-1",
        "move",
        pb::CommandPayload {
            kind: Some(Kind::ChangeDeliveryAddress(pb::ChangeDeliveryAddress {
                order_id: order.order_id.clone(),
                delivery_address: "2 New Road".into(),
            })),
        },
    )
    .await;
    reaches(&commands, &change.command_id, CommandStatus::Succeeded).await;
    let address = || async {
        let row = db
            .primary()
            .await
            .query_one(
                "SELECT delivery_address FROM orders.orders WHERE id = $1::text::uuid",
                &[&order.order_id],
            )
            .await
            .unwrap();
        row.get::<_, String>(0)
    };
    assert_eq!(address().await, "2 New Road");
    let undo = undo_command(&commands, &change.command_id).await.unwrap();
    reaches(&commands, &undo.command_id, CommandStatus::Succeeded).await;
    reaches(&commands, &change.command_id, CommandStatus::Undone).await;
    assert_eq!(address().await, "1 Old Street");

    // Not reversible, or not (yet) succeeded: refused, naming why.
    let sent = submit(&mut commands, "c-1", "hello", notify("c-1", "hello")).await;
    reaches(&commands, &sent.command_id, CommandStatus::Succeeded).await;
    let status = undo_command(&commands, &sent.command_id).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("cannot be undone"), "{status:?}");
    let status = undo_command(&commands, &undo.command_id).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
}

/// The same key twice (and 20 times at once) stores one command; the same key with another
/// payload is refused and stores nothing.
#[tokio::test]
async fn the_same_idempotency_key_stores_one_command() {
    let db = TestDb::new().await;
    // No workers: the test is about what is stored.
    let server = Waybill::serve(
        &db,
        &["--services", "commands", "--command-workers", "false"],
    );
    let mut commands = client(&server.channel().await);
    let first = submit(&mut commands, "u-1", "key-1", notify("u-1", "a")).await;
    let second = submit(&mut commands, "u-1", "key-1", notify("u-1", "a")).await;
    assert_eq!(first.command_id, second.command_id);
    assert_eq!(second.status(), CommandStatus::Accepted);
    // Another user may use the same key.
    let other = submit(&mut commands, "u-2", "key-1", notify("u-2", "a")).await;
    assert_ne!(other.command_id, first.command_id);

    let status = commands
        .submit_command(pb::SubmitCommandRequest {
            user_id: "u-1".into(),
            payload: Some(notify("u-1", "b")),
            idempotency_key: "key-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("idempotency_key"), "{status:?}");

    let concurrent: Vec<_> = (0..20)
        .map(|_| {
            let mut commands = commands.clone();
            tokio::spawn(async move {
                submit(&mut commands, "u-3", "burst", notify("u-3", "x"))
                    .await
                    .command_id
            })
        })
        .collect();
    let mut ids = Vec::new();
    for task in concurrent {
        ids.push(task.await.unwrap());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(db.count("commands.commands").await, 3);
    assert_eq!(
        db.count("commands.audit").await,
        3,
        "one ACCEPTED row per command"
    );
}

/// WatchCommand replays what happened so far and then streams each change as it is recorded,
/// one message per transition, ending after a final status.
#[tokio::test]
async fn watch_sees_every_transition() {
    let db = TestDb::new().await;
    let server = Waybill::serve(&db, &[]);
    let channel = server.channel().await;
    waybill_test_support::stock(&channel, "WASHER", 1).await;
    let mut commands = client(&channel);

    for (key, payload, last) in [
        ("ok", restock("WASHER", 1), CommandStatus::Succeeded),
        ("refused", restock("MISSING", 1), CommandStatus::Dead),
    ] {
        let command = submit(&mut commands, "watcher", key, payload).await;
        let stream = commands
            .watch_command(pb::WatchCommandRequest {
                command_id: command.command_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let messages: Vec<pb::WatchCommandResponse> = tokio::time::timeout(
            Duration::from_secs(30),
            stream.map(Result::unwrap).collect(),
        )
        .await
        .expect("the stream ends after the final status");
        let seen: Vec<CommandStatus> = messages
            .iter()
            .map(|m| m.transition.as_ref().unwrap().status())
            .collect();
        let recorded = get(&commands, &command.command_id).await;
        assert_eq!(seen, statuses(&recorded.history), "{key}");
        assert_eq!(seen.last(), Some(&last), "{key}");
        assert_eq!(
            messages.last().unwrap().command.as_ref().unwrap().status(),
            last
        );
    }
}

/// A bad payload is refused with the field named, and nothing is stored.
#[tokio::test]
async fn bad_submissions_are_refused_and_store_nothing() {
    let db = TestDb::new().await;
    let server = Waybill::serve(&db, &["--services", "commands"]);
    let mut commands = client(&server.channel().await);
    let cases = [
        (
            pb::SubmitCommandRequest {
                user_id: "u".into(),
                payload: None,
                idempotency_key: "k".into(),
            },
            "payload",
        ),
        (
            pb::SubmitCommandRequest {
                user_id: String::new(),
                payload: Some(notify("c", "m")),
                idempotency_key: "k".into(),
            },
            "user_id",
        ),
        (
            pb::SubmitCommandRequest {
                user_id: "u".into(),
                payload: Some(notify("c", "m")),
                idempotency_key: String::new(),
            },
            "idempotency_key",
        ),
        (
            pb::SubmitCommandRequest {
                user_id: "u".into(),
                payload: Some(restock("A", 0)),
                idempotency_key: "k".into(),
            },
            "payload.restock_item.quantity",
        ),
        (
            pb::SubmitCommandRequest {
                user_id: "u".into(),
                payload: Some(pb::CommandPayload {
                    kind: Some(Kind::CancelOrder(pb::CancelOrder {
                        order_id: "not-a-uuid".into(),
                        reason: String::new(),
                    })),
                }),
                idempotency_key: "k".into(),
            },
            "payload.cancel_order.order_id",
        ),
        (
            pb::SubmitCommandRequest {
                user_id: "u".into(),
                payload: Some(notify("c", "nul\0byte")),
                idempotency_key: "k".into(),
            },
            "payload.send_notification.message",
        ),
        (
            pb::SubmitCommandRequest {
                user_id: "u".into(),
                payload: Some(notify("c", "m")),
                idempotency_key: "waybill-undo:forged".into(),
            },
            "idempotency_key",
        ),
    ];
    for (request, field) in cases {
        let status = commands.submit_command(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}");
        let details = status.get_error_details();
        let details = details
            .bad_request()
            .unwrap_or_else(|| panic!("{field}: no BadRequest detail in {status:?}"));
        assert!(
            details.field_violations.iter().any(|v| v.field == field),
            "{field}: {details:?}"
        );
    }
    assert_eq!(db.count("commands.commands").await, 0);
    assert_eq!(db.count("commands.audit").await, 0);
    let status = commands
        .get_command(pb::GetCommandRequest {
            command_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

/// ListCommands pages through a user's commands, newest first, from the replica.
#[tokio::test]
async fn list_pages_a_users_commands_newest_first() {
    let db = TestDb::new().await;
    let server = Waybill::serve(
        &db,
        &["--services", "commands", "--command-workers", "false"],
    );
    let mut commands = client(&server.channel().await);
    let mut submitted = Vec::new();
    for n in 0..5 {
        submitted.push(
            submit(
                &mut commands,
                "lister",
                &format!("k{n}"),
                notify("lister", "m"),
            )
            .await
            .command_id,
        );
    }
    submit(&mut commands, "someone-else", "k0", notify("x", "m")).await;
    waybill_test_support::wait_for_replica().await;
    let mut listed = Vec::new();
    let mut token = String::new();
    loop {
        let page = commands
            .list_commands(pb::ListCommandsRequest {
                user_id: "lister".into(),
                page_size: 2,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        listed.extend(page.commands.into_iter().map(|c| c.command_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    submitted.reverse();
    assert_eq!(listed, submitted);
    // A token is bound to its user.
    let first = commands
        .list_commands(pb::ListCommandsRequest {
            user_id: "lister".into(),
            page_size: 2,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let status = commands
        .list_commands(pb::ListCommandsRequest {
            user_id: "someone-else".into(),
            page_size: 2,
            page_token: first.next_page_token,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

/// Commands claimed `via` the scan, a JetStream dispatch or as a successor, in a scrape (0
/// when absent).
fn claims(scrape: &str, via: &str) -> u64 {
    counter(
        scrape,
        &format!(r#"waybill_command_claims_total{{via="{via}"}}"#),
    )
}

/// With the JetStream queue, a user's queued commands run back to back: each is claimed as
/// soon as the one before it finishes. Their messages were delivered while the first ran and
/// were sent back with a backoff that doubles up to 5 s, so waiting for them would leave the
/// user's later commands seconds apart.
#[tokio::test]
async fn with_the_jetstream_queue_a_users_queued_commands_run_back_to_back() {
    let db = TestDb::new().await;
    let nats = NatsServer::start().await;
    let server = Waybill::start(
        &db,
        ServeOptions {
            // Each notification takes 200 ms: the later commands are queued behind the first.
            policy: Some(&notifications_delayed("200ms")),
            args: &["--command-queue", "nats", "--nats-url", &nats.url],
            ..ServeOptions::default()
        },
    );
    let channel = server.channel().await;
    const QUEUED: usize = 10;
    let by_user = submit_per_user(&channel, "queued", 1, QUEUED).await;
    let (user, ids) = &by_user[0];
    let commands = client(&channel);
    for id in ids {
        reaches(&commands, id, CommandStatus::Succeeded).await;
    }
    assert_ran_in_order_once(&db, user, ids).await;
    let scrape = server.scrape().await;
    let successors = claims(&scrape, "successor");
    // All but the first could be; a message that comes back in the instant between a
    // completion and its successor's claim takes one now and then.
    assert!(
        successors >= (QUEUED as u64) / 2,
        "{successors} of {} successors claimed at once: {scrape}",
        QUEUED - 1
    );
}

/// The JetStream queue (`--command-queue nats`): commands reach the workers as messages and
/// are claimed by the same per-user rule, so each user's commands still run in order, and
/// each takes effect once. The claims counter shows the messages brought them, not the
/// fallback scan. With NATS gone, submissions still succeed at once, and the fallback scan
/// runs what no message will bring.
#[tokio::test]
async fn with_the_jetstream_queue_users_keep_their_order_and_nats_going_away_loses_nothing() {
    let db = TestDb::new().await;
    let nats = NatsServer::start().await;
    let server = Waybill::serve(
        &db,
        &[
            "--command-shards",
            "4",
            "--command-queue",
            "nats",
            "--nats-url",
            &nats.url,
            "--command-poll",
            "200ms",
        ],
    );
    let channel = server.channel().await;
    const USERS: usize = 6;
    const PER_USER: usize = 5;
    let by_user = submit_per_user(&channel, "js-user", USERS, PER_USER).await;
    let commands = client(&channel);
    for (user, ids) in &by_user {
        for id in ids {
            let done = reaches(&commands, id, CommandStatus::Succeeded).await;
            assert_eq!(done.attempts, 1, "{id}");
        }
        assert_ran_in_order_once(&db, user, ids).await;
    }
    let scrape = server.scrape().await;
    // A user's next command is claimed by message, or right after the one before it finished
    // (successor); the scan only takes a command neither brought within its quiet time, which
    // a loaded machine may cause once or twice.
    let (by_dispatch, by_successor) = (claims(&scrape, "jetstream"), claims(&scrape, "successor"));
    let by_message = by_dispatch + by_successor;
    let by_scan = claims(&scrape, "scan");
    let total = (USERS * PER_USER) as u64;
    // One claim per command (attempts were 1 each).
    assert_eq!(by_message + by_scan, total, "{scrape}");
    assert!(
        by_message >= total * 3 / 4,
        "{by_message} of {total} by message or as a successor"
    );

    // NATS goes away: submissions are answered at once, and the commands still run.
    drop(nats);
    let mut commands = client(&channel);
    let mut ids = Vec::new();
    for n in 0..3 {
        let started = std::time::Instant::now();
        let payload = notify("after-nats", &format!("message {n}"));
        ids.push(
            submit(&mut commands, "after-nats", &format!("k-{n}"), payload)
                .await
                .command_id,
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "SubmitCommand waited on NATS"
        );
    }
    for id in &ids {
        reaches(&commands, id, CommandStatus::Succeeded).await;
    }
    // No message brought them: the scan did, or, for the user's second and third, the
    // completion of the one before (successor claims need no NATS).
    let scrape = server.scrape().await;
    assert_eq!(claims(&scrape, "jetstream"), by_dispatch, "{scrape}");
    assert!(
        claims(&scrape, "scan") + claims(&scrape, "successor") >= by_scan + by_successor + 3,
        "{scrape}"
    );
}
