//! The services this binary can run. Adding a service means one variant here.

use std::fmt;

use mesh_layer::policy::Policy;
use waybill_events::{Bus, Relay};
use waybill_runtime::{Db, Schema, server::Services};

/// Every service's own settings, as flags and `WAYBILL_*` variables of `serve`.
#[derive(Clone, Debug, clap::Args)]
pub struct Settings {
    #[command(flatten)]
    pub targets: waybill_runtime::TargetsConfig,
    #[command(flatten)]
    pub orders: waybill_orders::OrdersConfig,
    #[command(flatten)]
    pub commands: waybill_commands::CommandsConfig,
    #[command(flatten)]
    pub inventory: waybill_inventory::InventoryConfig,
    #[command(flatten)]
    pub notifications: waybill_notifications::SinkConfig,
}

/// What a service needs to be built.
pub struct ServiceDeps<'a> {
    pub db: &'a Db,
    pub policy: &'a Policy,
    pub settings: &'a Settings,
    /// This process's own address (`http://127.0.0.1:PORT`): the default target of calls to
    /// services not configured elsewhere, since all services run in this process by default.
    pub own_target: &'a str,
    /// The event bus outboxes are relayed to and consumers read from.
    pub bus: &'a Bus,
    /// Whether to relay the services' outboxes from this process.
    pub outbox_relay: bool,
    /// The NATS server(s) (`--nats-url`), for whatever is configured to use NATS.
    pub nats_url: Option<&'a str>,
}

/// A service by its short name, as given to `--services`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ServiceName {
    /// Orders: place, get, list, cancel.
    Orders,
    /// Inventory: the catalog, stock and reservations.
    Inventory,
    /// Delivery: couriers, assignments and live tracking.
    Delivery,
    /// Notifications: consumes events, tells customers.
    Notifications,
    /// Commands: asynchronous commands, their workers, retries and audit trail.
    Commands,
    /// Diagnostic echo (deadlines and retries across hops); not in the default set.
    Echo,
}

impl ServiceName {
    /// The services `serve` and `migrate` run when none are named: the delivery platform.
    pub fn all() -> Vec<Self> {
        vec![
            ServiceName::Orders,
            ServiceName::Inventory,
            ServiceName::Delivery,
            ServiceName::Notifications,
            ServiceName::Commands,
        ]
    }

    /// The service's own schema, if it stores anything.
    pub fn schema(self) -> Option<Schema> {
        match self {
            ServiceName::Orders => Some(waybill_orders::SCHEMA),
            ServiceName::Inventory => Some(waybill_inventory::SCHEMA),
            ServiceName::Delivery => Some(waybill_delivery::SCHEMA),
            ServiceName::Notifications => Some(waybill_notifications::SCHEMA),
            ServiceName::Commands => Some(waybill_commands::SCHEMA),
            ServiceName::Echo => None,
        }
    }

    /// The event subscription the service consumes, if any (registered by `waybill migrate`,
    /// by every process that relays an outbox and by the consumer itself, since the bus drops
    /// events nobody subscribes to yet).
    pub fn subscription(
        self,
    ) -> Result<Option<waybill_events::Subscription>, waybill_events::BusError> {
        match self {
            ServiceName::Notifications => waybill_notifications::subscription().map(Some),
            ServiceName::Orders
            | ServiceName::Inventory
            | ServiceName::Delivery
            | ServiceName::Commands
            | ServiceName::Echo => Ok(None),
        }
    }

    /// The schema whose outbox the service writes events to, if it emits any.
    pub(crate) fn outbox(self) -> Option<&'static str> {
        match self {
            ServiceName::Orders => Some("orders"),
            ServiceName::Delivery => Some("delivery"),
            ServiceName::Inventory
            | ServiceName::Notifications
            | ServiceName::Commands
            | ServiceName::Echo => None,
        }
    }

    pub async fn register(
        self,
        services: &mut Services,
        deps: &ServiceDeps<'_>,
    ) -> anyhow::Result<()> {
        let ServiceDeps {
            db,
            policy,
            settings,
            own_target,
            bus,
            outbox_relay,
            nats_url,
        } = deps;
        match self {
            ServiceName::Orders => {
                let (server, driver) = waybill_orders::server(
                    (*db).clone(),
                    &settings.orders,
                    policy,
                    &settings.targets,
                    own_target,
                )?;
                services
                    .add(server)
                    .cap(
                        waybill_orders::PLACE_ORDER,
                        settings.orders.saga_max_placing,
                    )
                    .background(driver)
            }
            ServiceName::Inventory => {
                let (server, sweeper) =
                    waybill_inventory::server((*db).clone(), &settings.inventory);
                services.add(server).background(sweeper)
            }
            ServiceName::Delivery => services.add(waybill_delivery::server((*db).clone())),
            ServiceName::Notifications => {
                let (server, consumer) = waybill_notifications::server(
                    (*db).clone(),
                    (*bus).clone(),
                    &settings.notifications,
                )
                .await?;
                services.add(server).background(consumer)
            }
            ServiceName::Commands => {
                let registry = if settings.commands.command_dry_run {
                    tracing::warn!(
                        "--command-dry-run: commands succeed without calling any service"
                    );
                    waybill_commands::dry_run_registry()
                } else {
                    waybill_commands::platform_registry(
                        &settings.commands,
                        policy,
                        &settings.targets,
                        own_target,
                    )?
                };
                let (server, background) = waybill_commands::server(
                    (*db).clone(),
                    &settings.commands,
                    registry,
                    *nats_url,
                )
                .await?;
                services.add(server).background_draining(background)
            }
            ServiceName::Echo => services.add(waybill_echo::server(waybill_echo::Echo::new(
                (*policy).clone(),
            )?)),
        };
        if let Some(schema) = self.outbox().filter(|_| *outbox_relay) {
            let relay = Relay::new((*db).clone(), schema, (*bus).clone())?;
            // Stopped with the other background work when draining starts; a move in
            // progress is one transaction, so stopping midway loses nothing.
            services.background(relay.run(std::future::pending::<()>()));
        }
        Ok(())
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServiceName::Orders => f.write_str("orders"),
            ServiceName::Inventory => f.write_str("inventory"),
            ServiceName::Delivery => f.write_str("delivery"),
            ServiceName::Notifications => f.write_str("notifications"),
            ServiceName::Commands => f.write_str("commands"),
            ServiceName::Echo => f.write_str("echo"),
        }
    }
}
