//! The event bus: Postgres (the default) or NATS JetStream (to scale out), one cloneable
//! [`Bus`] chosen by configuration ([`BusConfig`]).

pub(crate) mod nats;
pub(crate) mod postgres;

use std::{sync::Arc, time::Duration};

use waybill_runtime::{Db, DbError};

use crate::consumer::Subscription;

/// How long consumers remember handled events by default: longer than the NATS stream keeps
/// a message (7 days), the longest either bus can deliver one again.
pub const DEFAULT_INBOX_RETENTION: Duration = Duration::from_secs(8 * 24 * 3600);

/// Which bus carries events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BusKind {
    /// Tables in the `bus` schema, woken by LISTEN/NOTIFY: nothing more to run.
    Postgres,
    /// A NATS JetStream stream: more throughput, and consumers off the database's back.
    Nats,
}

/// How a process reaches the event bus (flags and `WAYBILL_*` variables).
#[derive(Clone, Debug, clap::Args)]
pub struct BusConfig {
    /// Which event bus carries events between services.
    #[arg(long, env = "WAYBILL_EVENT_BUS", value_enum, default_value_t = BusKind::Postgres)]
    pub event_bus: BusKind,

    /// NATS server URL(s), comma-separated, for `--event-bus nats` (nats://host:4222).
    #[arg(long, env = "WAYBILL_NATS_URL", hide_env_values = true)]
    pub nats_url: Option<String>,

    /// How long a consumer's inbox remembers a handled event (the duplicate check), after
    /// which its row is purged. Must be longer than the bus can deliver an event again: the
    /// NATS stream keeps messages 7 days.
    #[arg(long, env = "WAYBILL_INBOX_RETENTION", default_value = "192h", value_parser = waybill_runtime::config::parse_duration)]
    pub inbox_retention: Duration,
}

impl BusConfig {
    /// Connects the configured bus. Postgres: the `bus` schema of `db` (the services'
    /// database). NATS: see [`Bus::nats`].
    pub async fn connect(&self, db: Db) -> Result<Bus, BusError> {
        let bus = match self.event_bus {
            BusKind::Postgres => Bus::postgres(db),
            BusKind::Nats => {
                let url = self.nats_url.as_deref().ok_or_else(|| {
                    BusError::Config("--event-bus nats needs --nats-url (WAYBILL_NATS_URL)".into())
                })?;
                Bus::nats(url).await?
            }
        };
        Ok(bus.with_inbox_retention(self.inbox_retention))
    }
}

/// The event bus, cheap to clone.
#[derive(Clone)]
pub struct Bus {
    pub(crate) inner: BusInner,
    pub(crate) inbox_retention: Duration,
}

#[derive(Clone)]
pub(crate) enum BusInner {
    Postgres(Arc<postgres::PgBus>),
    Nats(Arc<nats::NatsBus>),
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Bus").field(&self.kind()).finish()
    }
}

impl Bus {
    /// The Postgres bus in the `bus` schema of `db`'s primary (migrate [`crate::SCHEMA`]
    /// there). Connects lazily.
    pub fn postgres(db: Db) -> Self {
        Self {
            inner: BusInner::Postgres(Arc::new(postgres::PgBus { db })),
            inbox_retention: DEFAULT_INBOX_RETENTION,
        }
    }

    /// Registers `subscription`: from now on the bus keeps the events of its topics for it.
    /// Both buses drop an event whose topic has no subscription when it is published, so a
    /// subscription must exist before the first event it wants: `waybill migrate` registers
    /// the platform's on the Postgres bus, and each consumer registers again (idempotent)
    /// before its process serves. Postgres: `bus.subscriptions` rows; NATS: the durable
    /// consumer.
    pub async fn register(&self, subscription: &Subscription) -> Result<(), BusError> {
        match &self.inner {
            BusInner::Postgres(pg) => pg.register(subscription).await?,
            BusInner::Nats(nats) => {
                nats.register(subscription).await?;
            }
        }
        Ok(())
    }

    /// A bus on NATS at `url`. The client connects in the background and keeps reconnecting:
    /// with NATS down the process still starts, publishing fails fast (the relays keep
    /// events in the outboxes and retry), and consumers keep trying to open. The `WAYBILL`
    /// stream is created or updated once NATS answers. Fails only for a malformed URL.
    pub async fn nats(url: &str) -> Result<Self, BusError> {
        Ok(Self {
            inner: BusInner::Nats(Arc::new(nats::NatsBus::connect(url).await?)),
            inbox_retention: DEFAULT_INBOX_RETENTION,
        })
    }

    /// Makes sure `subscriptions` exist before this process publishes its first event: NATS
    /// JetStream keeps a message only for the consumers that exist when it is published, and
    /// in a deployment a consumer's process may start after the publishers. Registers them
    /// now if NATS is up, else before the first publish once it is. The Postgres bus needs
    /// nothing: `waybill migrate` registered them.
    pub async fn register_before_publishing(&self, subscriptions: Vec<Subscription>) {
        if let BusInner::Nats(nats) = &self.inner {
            nats.register_before_publishing(subscriptions).await;
        }
    }

    /// Consumers of this bus purge their inbox rows older than `retention`.
    pub fn with_inbox_retention(mut self, retention: Duration) -> Self {
        self.inbox_retention = retention;
        self
    }

    /// Which bus this is.
    pub fn kind(&self) -> BusKind {
        match self.inner {
            BusInner::Postgres(_) => BusKind::Postgres,
            BusInner::Nats(_) => BusKind::Nats,
        }
    }
}

/// A failure of the bus or of the database behind it.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The database failed (classified as in the rest of waybill).
    #[error(transparent)]
    Db(#[from] DbError),
    /// NATS could not be reached or refused a request.
    #[error("nats: {0}")]
    Nats(String),
    /// The bus is configured wrongly.
    #[error("event bus configuration: {0}")]
    Config(String),
    /// There is no such dead letter (replayed already, or never dead).
    #[error("no dead letter of event {event_id} for subscription {subscription:?}")]
    NotFound {
        /// The subscription asked for.
        subscription: String,
        /// The event asked for.
        event_id: uuid::Uuid,
    },
}

impl From<tokio_postgres::Error> for BusError {
    fn from(error: tokio_postgres::Error) -> Self {
        BusError::Db(error.into())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bus: BusConfig,
    }

    #[test]
    fn postgres_is_the_default_bus() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(cli.bus.event_bus, BusKind::Postgres);
        let cli =
            Cli::try_parse_from(["x", "--event-bus", "nats", "--nats-url", "nats://h:1"]).unwrap();
        assert_eq!(cli.bus.event_bus, BusKind::Nats);
        assert_eq!(cli.bus.nats_url.as_deref(), Some("nats://h:1"));
    }
}
