//! `waybill commands …`: submit and inspect commands of the command pipeline.

use anyhow::bail;
use tokio_stream::StreamExt;
use waybill_api::commands::v1::{
    self as pb, command_payload::Kind, command_service_client::CommandServiceClient,
};

use crate::call::Target;

#[derive(clap::Subcommand)]
pub enum CommandsCommand {
    /// Submit a command (exactly one of --cancel-order, --change-address, --restock, --notify).
    Submit {
        #[command(flatten)]
        target: Target,
        /// The user the command belongs to (its commands run in the order submitted).
        #[arg(long)]
        user: String,
        /// Makes the call safe to repeat: the same user and key return the same command.
        #[arg(long)]
        idempotency_key: String,
        /// Cancel this order (a UUID).
        #[arg(long, value_name = "ORDER_ID")]
        cancel_order: Option<String>,
        /// Change an order's delivery address: ORDER_ID=ADDRESS.
        #[arg(long, value_name = "ORDER_ID=ADDRESS")]
        change_address: Option<String>,
        /// Add stock to an item: SKU:QUANTITY.
        #[arg(long, value_name = "SKU:QUANTITY")]
        restock: Option<String>,
        /// Send a customer a message: CUSTOMER=MESSAGE.
        #[arg(long, value_name = "CUSTOMER=MESSAGE")]
        notify: Option<String>,
        /// Why (for --cancel-order).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Show a command with its history.
    Get {
        #[command(flatten)]
        target: Target,
        command_id: String,
    },
    /// List a user's commands, newest first.
    List {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        user: String,
        #[arg(long, default_value_t = 20)]
        page_size: i32,
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Follow a command's status changes until it is final.
    Watch {
        #[command(flatten)]
        target: Target,
        command_id: String,
    },
    /// Cancel a command that has not run.
    Cancel {
        #[command(flatten)]
        target: Target,
        command_id: String,
    },
    /// Undo a succeeded command (submits its inverse).
    Undo {
        #[command(flatten)]
        target: Target,
        command_id: String,
    },
    /// List DEAD commands.
    Dead {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 20)]
        page_size: i32,
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Put a DEAD command back in its queue.
    Requeue {
        #[command(flatten)]
        target: Target,
        command_id: String,
    },
}

pub async fn run(command: CommandsCommand) -> anyhow::Result<()> {
    let client = |target: &Target| target.mesh().map(CommandServiceClient::new);
    let result = match command {
        CommandsCommand::Submit {
            target,
            user,
            idempotency_key,
            cancel_order,
            change_address,
            restock,
            notify,
            reason,
        } => {
            let payload = payload(cancel_order, change_address, restock, notify, reason)?;
            client(&target)?
                .submit_command(pb::SubmitCommandRequest {
                    user_id: user,
                    payload: Some(payload),
                    idempotency_key,
                })
                .await
                .map(|r| print_command(r.into_inner().command))
        }
        CommandsCommand::Get { target, command_id } => client(&target)?
            .get_command(pb::GetCommandRequest { command_id })
            .await
            .map(|r| {
                let command = r.into_inner().command;
                if let Some(command) = &command {
                    for change in &command.history {
                        println!("  {}", transition(change));
                    }
                }
                print_command(command);
            }),
        CommandsCommand::List {
            target,
            user,
            page_size,
            page_token,
        } => client(&target)?
            .list_commands(pb::ListCommandsRequest {
                user_id: user,
                page_size,
                page_token,
            })
            .await
            .map(|r| {
                let page = r.into_inner();
                print_page(page.commands, &page.next_page_token);
            }),
        CommandsCommand::Watch { target, command_id } => {
            let mut stream = client(&target)?
                .watch_command(pb::WatchCommandRequest { command_id })
                .await
                .map_err(|status| anyhow::anyhow!("{}: {}", status.code(), status.message()))?
                .into_inner();
            while let Some(message) = stream.next().await {
                let message = message
                    .map_err(|status| anyhow::anyhow!("{}: {}", status.code(), status.message()))?;
                if let Some(change) = &message.transition {
                    println!("{}", transition(change));
                }
            }
            Ok(())
        }
        CommandsCommand::Cancel { target, command_id } => client(&target)?
            .cancel_command(pb::CancelCommandRequest { command_id })
            .await
            .map(|r| print_command(r.into_inner().command)),
        CommandsCommand::Undo { target, command_id } => client(&target)?
            .undo_command(pb::UndoCommandRequest { command_id })
            .await
            .map(|r| print_command(r.into_inner().command)),
        CommandsCommand::Dead {
            target,
            page_size,
            page_token,
        } => client(&target)?
            .list_dead_commands(pb::ListDeadCommandsRequest {
                page_size,
                page_token,
            })
            .await
            .map(|r| {
                let page = r.into_inner();
                print_page(page.commands, &page.next_page_token);
            }),
        CommandsCommand::Requeue { target, command_id } => client(&target)?
            .requeue_command(pb::RequeueCommandRequest { command_id })
            .await
            .map(|r| print_command(r.into_inner().command)),
    };
    result.map_err(|status| anyhow::anyhow!("{}: {}", status.code(), status.message()))
}

fn payload(
    cancel_order: Option<String>,
    change_address: Option<String>,
    restock: Option<String>,
    notify: Option<String>,
    reason: String,
) -> anyhow::Result<pb::CommandPayload> {
    let kind = match (cancel_order, change_address, restock, notify) {
        (Some(order_id), None, None, None) => {
            Kind::CancelOrder(pb::CancelOrder { order_id, reason })
        }
        (None, Some(change), None, None) => {
            let Some((order_id, address)) = change.split_once('=') else {
                bail!("--change-address {change:?}: expected ORDER_ID=ADDRESS");
            };
            Kind::ChangeDeliveryAddress(pb::ChangeDeliveryAddress {
                order_id: order_id.to_owned(),
                delivery_address: address.to_owned(),
            })
        }
        (None, None, Some(restock), None) => {
            let Some((sku, quantity)) = restock.rsplit_once(':') else {
                bail!("--restock {restock:?}: expected SKU:QUANTITY");
            };
            let Ok(quantity) = quantity.parse() else {
                bail!("--restock {restock:?}: the quantity is not a number");
            };
            Kind::RestockItem(pb::RestockItem {
                sku: sku.to_owned(),
                quantity,
            })
        }
        (None, None, None, Some(notify)) => {
            let Some((customer, message)) = notify.split_once('=') else {
                bail!("--notify {notify:?}: expected CUSTOMER=MESSAGE");
            };
            Kind::SendNotification(pb::SendNotification {
                customer_id: customer.to_owned(),
                message: message.to_owned(),
            })
        }
        _ => bail!("name exactly one of --cancel-order, --change-address, --restock, --notify"),
    };
    Ok(pb::CommandPayload { kind: Some(kind) })
}

fn status_name(status: i32) -> String {
    pb::CommandStatus::try_from(status)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("COMMAND_STATUS_")
                .to_owned()
        })
        .unwrap_or_else(|_| status.to_string())
}

fn transition(change: &pb::CommandTransition) -> String {
    let time = change
        .time
        .as_ref()
        .map(|t| format!("{}.{:03}", t.seconds, t.nanos / 1_000_000))
        .unwrap_or_default();
    format!(
        "{time}  {:9}  attempt {}{}{}",
        status_name(change.status),
        change.attempt,
        if change.worker.is_empty() {
            String::new()
        } else {
            format!("  worker={}", change.worker)
        },
        if change.error.is_empty() {
            String::new()
        } else {
            format!("  error={:?}", change.error)
        }
    )
}

/// A page of a listing, and how to ask for the next one.
fn print_page(commands: Vec<pb::Command>, next_page_token: &str) {
    commands.into_iter().for_each(|c| print_command(Some(c)));
    if !next_page_token.is_empty() {
        println!("next page: --page-token {next_page_token}");
    }
}

fn print_command(command: Option<pb::Command>) {
    let Some(command) = command else { return };
    let kind = match command.payload.as_ref().and_then(|p| p.kind.as_ref()) {
        Some(Kind::CancelOrder(c)) => format!("cancel-order {}", c.order_id),
        Some(Kind::ChangeDeliveryAddress(c)) => {
            format!("change-address {}={:?}", c.order_id, c.delivery_address)
        }
        Some(Kind::RestockItem(r)) => format!("restock {}:{}", r.sku, r.quantity),
        Some(Kind::SendNotification(s)) => format!("notify {}={:?}", s.customer_id, s.message),
        None => "?".to_owned(),
    };
    println!(
        "{}  {:9}  user={}  shard={}  attempts={}  {kind}{}{}",
        command.command_id,
        status_name(command.status),
        command.user_id,
        command.shard,
        command.attempts,
        if command.result.is_empty() {
            String::new()
        } else {
            format!("  result={:?}", command.result)
        },
        if command.last_error.is_empty() {
            String::new()
        } else {
            format!("  last_error={:?}", command.last_error)
        },
    );
}
