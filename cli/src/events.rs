//! `waybill events`: the operator's view of the event bus — dead letters listed and replayed.

use std::path::PathBuf;

use uuid::Uuid;
use waybill_events::{BusConfig, dead_letters};
use waybill_runtime::{DatabaseConfig, Db};

use crate::dev;

#[derive(clap::Args)]
pub struct EventsArgs {
    #[command(subcommand)]
    command: EventsCommand,
    #[command(flatten)]
    database: DatabaseConfig,
    #[command(flatten)]
    bus: BusConfig,
    /// Folder of the `waybill dev up` cluster, used when no database URL is configured.
    #[arg(long, env = "WAYBILL_DEV_DIR", default_value = dev::DEFAULT_DIR)]
    dev_dir: PathBuf,
}

#[derive(clap::Subcommand)]
enum EventsCommand {
    /// Lists events a subscription gave up on, oldest first (one line each).
    DeadLetters {
        /// Only this subscription's (default: all).
        #[arg(long)]
        subscription: Option<String>,
    },
    /// Sends a dead-lettered event to its subscription again, attempts reset.
    Replay {
        /// The subscription that gave up on it.
        #[arg(long)]
        subscription: String,
        /// The event's id (from `dead-letters`).
        event_id: Uuid,
    },
}

pub async fn run(args: EventsArgs) -> anyhow::Result<()> {
    let (primary, _) = dev::resolve_database(&args.database, &args.dev_dir)?;
    let db = Db::connect(&args.database, &primary)?;
    match args.command {
        EventsCommand::DeadLetters { subscription } => {
            for letter in dead_letters::list(&db, subscription.as_deref()).await? {
                println!(
                    "{} subscription={} topic={} key={} attempts={} dead_at={} error={:?}",
                    letter.event_id,
                    letter.subscription,
                    letter.topic,
                    letter.key,
                    letter.attempts,
                    letter.dead_at.to_rfc3339(),
                    letter.last_error
                );
            }
        }
        EventsCommand::Replay {
            subscription,
            event_id,
        } => {
            let bus = args.bus.connect(db.clone()).await?;
            dead_letters::replay(&db, &bus, &subscription, event_id).await?;
            eprintln!("replayed {event_id} to {subscription}");
        }
    }
    Ok(())
}
