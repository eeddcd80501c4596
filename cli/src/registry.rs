//! The services this binary can run. Adding a service means one variant here.

use std::fmt;

use mesh_layer::policy::Policy;
use waybill_runtime::{Db, Schema, server::Services};

/// A service by its short name, as given to `--services`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ServiceName {
    /// Orders: place, get, list, cancel.
    Orders,
    /// Diagnostic echo (deadlines and retries across hops); not in the default set.
    Echo,
}

impl ServiceName {
    /// The services `serve` and `migrate` run when none are named: the delivery platform.
    pub fn all() -> Vec<Self> {
        vec![ServiceName::Orders]
    }

    /// The service's own schema, if it stores anything.
    pub fn schema(self) -> Option<Schema> {
        match self {
            ServiceName::Orders => Some(waybill_orders::SCHEMA),
            ServiceName::Echo => None,
        }
    }

    pub fn register(self, services: &mut Services, db: &Db, policy: &Policy) -> anyhow::Result<()> {
        match self {
            ServiceName::Orders => services.add(waybill_orders::server(db.clone())),
            ServiceName::Echo => services.add(waybill_echo::server(waybill_echo::Echo::new(
                policy.clone(),
            )?)),
        };
        Ok(())
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServiceName::Orders => f.write_str("orders"),
            ServiceName::Echo => f.write_str("echo"),
        }
    }
}
