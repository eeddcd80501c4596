//! waybill's public gRPC contract, generated from `proto/` at build time.
//!
//! Clients in Rust depend on this crate alone; clients in other languages generate their own
//! stubs from the same `.proto` files. Services implement the generated server traits.

#![deny(missing_docs)]

/// `waybill.commands.v1`: asynchronous commands, their workers, retries and audit trail.
pub mod commands {
    /// Version 1 of the command API.
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("waybill.commands.v1");
    }
}

/// `waybill.delivery.v1`: couriers, assignments and live delivery tracking.
pub mod delivery {
    /// Version 1 of the delivery API.
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("waybill.delivery.v1");
    }
}

/// `waybill.events.v1`: the events services publish through their outboxes.
pub mod events {
    /// Version 1 of the events API.
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("waybill.events.v1");
    }
}

/// `waybill.inventory.v1`: the item catalog, stock and reservations.
pub mod inventory {
    /// Version 1 of the inventory API.
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("waybill.inventory.v1");
    }
}

/// `waybill.notifications.v1`: what customers are told about their orders.
pub mod notifications {
    /// Version 1 of the notifications API.
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("waybill.notifications.v1");
    }
}

/// `waybill.echo.v1`: a diagnostic echo service (deadlines and retries across hops).
pub mod echo {
    /// Version 1 of the echo API.
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("waybill.echo.v1");
    }
}

/// `waybill.orders.v1`: placing, reading and cancelling orders.
pub mod orders {
    /// Version 1 of the orders API.
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("waybill.orders.v1");
    }
}

/// The encoded `FileDescriptorSet` of every waybill proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("waybill_descriptor");
