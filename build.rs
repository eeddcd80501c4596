//! Compiles `proto/` into the API crate: message types, clients, servers, and an encoded
//! `FileDescriptorSet` that the servers hand to gRPC reflection.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/waybill/commands/v1/commands.proto",
        "proto/waybill/delivery/v1/delivery.proto",
        "proto/waybill/echo/v1/echo.proto",
        "proto/waybill/events/v1/events.proto",
        "proto/waybill/inventory/v1/inventory.proto",
        "proto/waybill/notifications/v1/notifications.proto",
        "proto/waybill/orders/v1/orders.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }

    // A vendored protoc keeps the build offline and free of a system package.
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);

    let descriptor_path = PathBuf::from(env::var("OUT_DIR")?).join("waybill_descriptor.bin");
    let well_known = protoc_bin_vendored::include_path()?;
    let includes = [PathBuf::from("proto"), well_known];
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor_path)
        .compile_with_config(config, &protos.map(PathBuf::from), &includes)?;
    Ok(())
}
