//! The services this binary can run. Adding a service means one variant here.

use std::fmt;

use waybill_runtime::{Db, Schema, server::Services};

/// A service by its short name, as given to `--services`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ServiceName {
    /// Orders: place, get, list, cancel.
    Orders,
}

impl ServiceName {
    pub fn all() -> Vec<Self> {
        vec![ServiceName::Orders]
    }

    pub fn schema(self) -> Schema {
        match self {
            ServiceName::Orders => waybill_orders::SCHEMA,
        }
    }

    pub fn register(self, services: &mut Services, db: &Db) {
        match self {
            ServiceName::Orders => services.add(waybill_orders::server(db.clone())),
        };
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServiceName::Orders => f.write_str("orders"),
        }
    }
}
