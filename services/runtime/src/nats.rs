//! Connecting to NATS so that a process starts whether NATS is up or not. The event bus and
//! the command queue both connect this way: a service whose NATS is down (not started yet,
//! restarting) still serves what does not need it, and its NATS work fails fast until the
//! client, reconnecting in the background, is back.

use std::time::Duration;

use async_nats::{Client, ConnectError, ConnectOptions, Event, connection::State};
use tokio::sync::watch;

/// A client for `url` (named `name` to the server) that connects in the background and keeps
/// reconnecting. Waits until the first connection, at most `wait`, so that a process whose
/// NATS is up starts with it connected. Fails only for a malformed URL.
pub async fn connect(url: &str, name: &str, wait: Duration) -> Result<Client, ConnectError> {
    let (connected, mut first) = watch::channel(false);
    let client = ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .retry_on_initial_connect()
        .event_callback(move |event| {
            if matches!(event, Event::Connected) {
                connected.send_replace(true);
            }
            std::future::ready(())
        })
        .connect(url)
        .await?;
    if tokio::time::timeout(wait, first.wait_for(|up| *up))
        .await
        .is_err()
    {
        tracing::warn!(%url, "NATS is not reachable; starting without it");
    }
    Ok(client)
}

/// Fails at once while `client` is not connected, rather than letting each request wait for
/// its timeout.
pub fn connected(client: &Client) -> Result<(), String> {
    match client.connection_state() {
        State::Connected => Ok(()),
        state => Err(format!(
            "not connected to NATS ({state:?}; reconnecting in the background)"
        )),
    }
}
