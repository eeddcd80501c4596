//! The gRPC edge: protobuf in, domain types inside, protobuf and `Status` out.

use std::{pin::Pin, time::Duration};

use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};
use uuid::Uuid;
use waybill_api::commands::v1 as pb;
use waybill_runtime::{
    group_commit,
    page_token::Cursor,
    validate::{Violations, parse_uuid, precondition_failure, timestamp},
};

use crate::{
    UNDO_KEY_PREFIX,
    domain::{Command, NewCommand, Payload, Transition, shard_of},
    hub::Hub,
    ingest::Ingest,
    jetstream::Dispatcher,
    store::{CommandStore, Refused, Rejected},
};

const DEFAULT_PAGE_SIZE: i64 = 20;
const MAX_PAGE_SIZE: i64 = 100;
/// A watcher looks again this often even when told nothing, in case a notification was lost.
const WATCH_RECHECK: Duration = Duration::from_secs(10);
/// The listing of DEAD commands is not a user's: its page tokens are bound to this name.
const DEAD_LISTING: &str = "\u{0}dead";

/// The command service's gRPC implementation.
#[derive(Clone)]
pub struct CommandsApi {
    store: CommandStore,
    ingest: Ingest,
    hub: Hub,
    shard_count: u32,
    /// The JetStream queue, when workers take commands from it.
    dispatch: Option<Dispatcher>,
}

impl CommandsApi {
    pub(crate) fn new(
        store: CommandStore,
        ingest: Ingest,
        hub: Hub,
        shard_count: u32,
        dispatch: Option<Dispatcher>,
    ) -> Self {
        Self {
            store,
            ingest,
            hub,
            shard_count,
            dispatch,
        }
    }

    /// Tells the JetStream queue that `command` is ready to run (submissions do this in the
    /// ingest writer). If it is lost, the fallback scan takes the command later.
    fn dispatch(&self, command: &Command, message_id: String) {
        if let Some(dispatch) = &self.dispatch {
            dispatch.send([(command.shard, command.id, message_id)]);
        }
    }

    /// GetCommand's read: the cache, or the primary.
    async fn command_with_history(&self, id: Uuid) -> Result<pb::Command, Status> {
        if let Some(command) = self.hub.cached(id) {
            return Ok(command);
        }
        let epoch = self.hub.epoch();
        let command = self
            .store
            .get(id)
            .await?
            .ok_or_else(|| Status::not_found(format!("no command {id}")))?;
        let history = self.store.history(id, 0).await?;
        let mut message = command_to_proto(&command);
        message.history = history.iter().map(transition_to_proto).collect();
        if self.hub.epoch() == epoch {
            self.hub.cache(&message, id);
        }
        Ok(message)
    }

    fn changed(&self, command: &Command) {
        self.hub.changed(command.id);
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchCommandResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::command_service_server::CommandService for CommandsApi {
    async fn submit_command(
        &self,
        request: Request<pb::SubmitCommandRequest>,
    ) -> Result<Response<pb::SubmitCommandResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::default();
        violations.check_key(&request.user_id, "user_id");
        violations.check_key(&request.idempotency_key, "idempotency_key");
        if request.idempotency_key.starts_with(UNDO_KEY_PREFIX) {
            violations.add(
                "idempotency_key",
                format!("keys starting with {UNDO_KEY_PREFIX:?} are reserved for undo commands"),
            );
        }
        let payload = Payload::check(request.payload.as_ref(), "payload", &mut violations);
        let payload = violations.into_parsed(payload)?;
        let new = NewCommand {
            id: Uuid::now_v7(),
            shard: shard_of(&request.user_id, self.shard_count),
            user_id: request.user_id,
            idempotency_key: request.idempotency_key,
            payload,
            undo_of: None,
            traceparent: waybill_runtime::telemetry::current_traceparent().unwrap_or_default(),
        };
        let stored = self
            .ingest
            .submit(new)
            .await
            .map_err(|refused| match refused {
                group_commit::Refused::Full => Status::resource_exhausted(
                    "too many commands waiting to be stored; retry later",
                ),
                group_commit::Refused::Lost => {
                    Status::unavailable("the service stopped before storing the command")
                }
            })??;
        match stored {
            Ok(command) => Ok(Response::new(pb::SubmitCommandResponse {
                command: Some(command_to_proto(&command)),
            })),
            Err(Rejected::KeyReused(existing)) => {
                let mut violations = Violations::default();
                violations.add(
                    "idempotency_key",
                    format!(
                        "already used by this user for command {} with a different payload",
                        existing.id
                    ),
                );
                Err(violations.into_status())
            }
        }
    }

    async fn get_command(
        &self,
        request: Request<pb::GetCommandRequest>,
    ) -> Result<Response<pb::GetCommandResponse>, Status> {
        let id = parse_uuid(&request.get_ref().command_id, "command_id")?;
        let command = self.command_with_history(id).await?;
        Ok(Response::new(pb::GetCommandResponse {
            command: Some(command),
        }))
    }

    async fn list_commands(
        &self,
        request: Request<pb::ListCommandsRequest>,
    ) -> Result<Response<pb::ListCommandsResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::default();
        violations.check_key(&request.user_id, "user_id");
        let page_size = violations.page_size(
            request.page_size,
            "page_size",
            DEFAULT_PAGE_SIZE,
            MAX_PAGE_SIZE,
        );
        let after = violations.page_cursor(&request.page_token, &request.user_id, "page_token");
        violations.into_result(())?;
        let shard = shard_of(&request.user_id, self.shard_count);
        let mut commands = self
            .store
            .list(&request.user_id, shard, after, page_size + 1)
            .await?;
        let next_page_token = next_page(&mut commands, page_size, &request.user_id);
        Ok(Response::new(pb::ListCommandsResponse {
            commands: commands.iter().map(command_to_proto).collect(),
            next_page_token,
        }))
    }

    type WatchCommandStream = WatchStream;

    async fn watch_command(
        &self,
        request: Request<pb::WatchCommandRequest>,
    ) -> Result<Response<Self::WatchCommandStream>, Status> {
        let id = parse_uuid(&request.get_ref().command_id, "command_id")?;
        // Subscribe first: a change between the reads and the subscription is not lost.
        let mut changes = self.hub.watch(id);
        // Each round reads the history, then the command: the command sent with a transition
        // is at least as new as the transition. (Read the other way round, a change between
        // the two reads sent a DEAD transition with a RUNNING command.)
        let mut transitions = self.store.history(id, 0).await?;
        let mut command = self
            .store
            .get(id)
            .await?
            .ok_or_else(|| Status::not_found(format!("no command {id}")))?;
        let (sender, receiver) = mpsc::channel(16);
        let store = self.store.clone();
        tokio::spawn(async move {
            let mut seen = 0_i64;
            let mut last_sent: Option<Transition> = None;
            loop {
                for transition in transitions {
                    seen = transition.seq;
                    let message = pb::WatchCommandResponse {
                        transition: Some(transition_to_proto(&transition)),
                        command: Some(command_to_proto(&command)),
                    };
                    if sender.send(Ok(message)).await.is_err() {
                        return;
                    }
                    last_sent = Some(transition);
                }
                if ends(last_sent.as_ref(), &command) {
                    return;
                }
                tokio::select! {
                    () = sender.closed() => return,
                    heard = tokio::time::timeout(WATCH_RECHECK, changes.recv()) => {
                        if let Ok(Err(RecvError::Closed)) = heard {
                            return;
                        }
                    }
                }
                transitions = match store.history(id, seen).await {
                    Ok(transitions) => transitions,
                    Err(error) => {
                        let _ = sender.send(Err(Status::from(error))).await;
                        return;
                    }
                };
                command = match store.get(id).await {
                    Ok(Some(command)) => command,
                    // Purged by retention while watched.
                    Ok(None) => return,
                    Err(error) => {
                        let _ = sender.send(Err(Status::from(error))).await;
                        return;
                    }
                };
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn cancel_command(
        &self,
        request: Request<pb::CancelCommandRequest>,
    ) -> Result<Response<pb::CancelCommandResponse>, Status> {
        let id = parse_uuid(&request.get_ref().command_id, "command_id")?;
        let command = refused(self.store.cancel(id).await?, id)?;
        self.changed(&command);
        Ok(Response::new(pb::CancelCommandResponse {
            command: Some(command_to_proto(&command)),
        }))
    }

    async fn undo_command(
        &self,
        request: Request<pb::UndoCommandRequest>,
    ) -> Result<Response<pb::UndoCommandResponse>, Status> {
        let id = parse_uuid(&request.get_ref().command_id, "command_id")?;
        let undo = refused(self.store.undo(id).await?, id)?;
        self.hub.changed(id);
        self.dispatch(&undo, undo.id.to_string());
        Ok(Response::new(pb::UndoCommandResponse {
            command: Some(command_to_proto(&undo)),
        }))
    }

    async fn list_dead_commands(
        &self,
        request: Request<pb::ListDeadCommandsRequest>,
    ) -> Result<Response<pb::ListDeadCommandsResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::default();
        let page_size = violations.page_size(
            request.page_size,
            "page_size",
            DEFAULT_PAGE_SIZE,
            MAX_PAGE_SIZE,
        );
        let after = violations.page_cursor(&request.page_token, DEAD_LISTING, "page_token");
        violations.into_result(())?;
        let mut commands = self.store.list_dead(after, page_size + 1).await?;
        let next_page_token = next_page(&mut commands, page_size, DEAD_LISTING);
        Ok(Response::new(pb::ListDeadCommandsResponse {
            commands: commands.iter().map(command_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn requeue_command(
        &self,
        request: Request<pb::RequeueCommandRequest>,
    ) -> Result<Response<pb::RequeueCommandResponse>, Status> {
        let id = parse_uuid(&request.get_ref().command_id, "command_id")?;
        let command = refused(self.store.requeue(id).await?, id)?;
        self.changed(&command);
        // Its own message id: the first dispatch's may still be in the dedup window.
        let requeued = command.updated_at.timestamp_micros();
        self.dispatch(&command, format!("{id}/requeued/{requeued}"));
        Ok(Response::new(pb::RequeueCommandResponse {
            command: Some(command_to_proto(&command)),
        }))
    }
}

/// Whether a watch is done: the command is final and the last transition sent is the one
/// that made it so (same status and attempt; the command may have been read after a
/// transition the next round's history will bring).
fn ends(last_sent: Option<&Transition>, command: &Command) -> bool {
    command.status.is_final()
        && last_sent
            .is_some_and(|last| last.status == command.status && last.attempt == command.attempts)
}

fn refused(result: Result<Command, Refused>, id: Uuid) -> Result<Command, Status> {
    result.map_err(|refused| match refused {
        Refused::NotFound => Status::not_found(format!("no command {id}")),
        Refused::State(command, why) => {
            precondition_failure("COMMAND_STATUS", &command.id.to_string(), why)
        }
    })
}

/// Trims the look-ahead row and returns the next page's token.
fn next_page(commands: &mut Vec<Command>, page_size: i64, owner: &str) -> String {
    if commands.len() as i64 > page_size {
        commands.truncate(usize::try_from(page_size).unwrap_or(0));
        commands
            .last()
            .map(|last| {
                Cursor {
                    customer_id: owner.to_owned(),
                    after: last.id,
                }
                .encode()
            })
            .unwrap_or_default()
    } else {
        String::new()
    }
}

pub(crate) fn command_to_proto(command: &Command) -> pb::Command {
    let waiting = matches!(
        command.status,
        crate::domain::Status::Accepted | crate::domain::Status::Retrying
    );
    pb::Command {
        command_id: command.id.to_string(),
        user_id: command.user_id.clone(),
        shard: command.shard,
        payload: Some(command.payload.to_proto()),
        status: command.status.to_proto().into(),
        attempts: command.attempts,
        result: command.result.clone(),
        last_error: command.last_error.clone(),
        undo_of: command.undo_of.map(|id| id.to_string()).unwrap_or_default(),
        undone_by: command
            .undone_by
            .map(|id| id.to_string())
            .unwrap_or_default(),
        history: Vec::new(),
        create_time: Some(timestamp(command.created_at)),
        update_time: Some(timestamp(command.updated_at)),
        next_attempt_time: waiting.then(|| timestamp(command.run_after)),
    }
}

fn transition_to_proto(transition: &Transition) -> pb::CommandTransition {
    pb::CommandTransition {
        status: transition.status.to_proto().into(),
        time: Some(timestamp(transition.at)),
        worker: transition.worker.clone(),
        error: transition.error.clone(),
        attempt: transition.attempt,
    }
}
