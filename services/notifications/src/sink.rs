//! Where notifications go once recorded: the log, or a webhook.
//!
//! The webhook gets one HTTP POST per notification, JSON, with an `Idempotency-Key` of the
//! event id and customer: delivery is at least once (a POST that succeeded before its
//! transaction failed to commit is sent again), so receivers deduplicate on that key. The
//! POST runs inside the consumer's transaction: a failure rolls the notification back, and
//! the bus retries the event with backoff, then dead-letters it. A 4xx answer other than 408
//! and 429 means the receiver will never take it: the event goes to dead letters at once.

use std::time::Duration;

use http::{Request, StatusCode, Uri, header};
use http_body_util::Full;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde::Serialize;
use waybill_events::HandlerError;

use crate::handler::Notice;

/// The sink's settings.
#[derive(Clone, Debug, clap::Args)]
pub struct SinkConfig {
    /// POST each notification as JSON to this http:// URL; unset: write it to the log.
    #[arg(long, env = "WAYBILL_NOTIFY_WEBHOOK")]
    pub notify_webhook: Option<String>,
    /// How long a webhook call may take before it counts as failed (and is retried).
    #[arg(long, env = "WAYBILL_NOTIFY_WEBHOOK_TIMEOUT", default_value = "5s", value_parser = waybill_runtime::config::parse_duration)]
    pub notify_webhook_timeout: Duration,
}

/// Where notifications go.
#[derive(Clone)]
pub enum Sink {
    /// One log line each.
    Log,
    /// An HTTP POST each.
    Webhook(Box<Webhook>),
}

/// A webhook's client and address.
#[derive(Clone)]
pub struct Webhook {
    client: Client<HttpConnector, Full<bytes::Bytes>>,
    url: Uri,
    timeout: Duration,
}

/// The JSON a webhook receives.
#[derive(Serialize)]
struct Payload<'a> {
    event_id: String,
    customer_id: &'a str,
    order_id: &'a str,
    kind: &'static str,
    message: &'a str,
}

impl Sink {
    /// The sink `config` describes; an unusable URL is refused at startup.
    pub fn from_config(config: &SinkConfig) -> Result<Self, String> {
        let Some(url) = &config.notify_webhook else {
            return Ok(Sink::Log);
        };
        let url: Uri = url
            .parse()
            .map_err(|error| format!("--notify-webhook {url:?}: {error}"))?;
        if url.scheme_str() != Some("http") || url.host().is_none() {
            return Err(format!(
                "--notify-webhook {url}: an http://host[:port]/path URL is required (https is \
                 not supported yet; put a TLS-terminating proxy in front)"
            ));
        }
        Ok(Sink::Webhook(Box::new(Webhook {
            client: Client::builder(TokioExecutor::new()).build_http(),
            url,
            timeout: config.notify_webhook_timeout,
        })))
    }

    /// Sends one notification.
    pub async fn send(&self, event_id: uuid::Uuid, notice: &Notice) -> Result<(), HandlerError> {
        let Sink::Webhook(webhook) = self else {
            tracing::info!(
                customer_id = %notice.customer_id,
                order_id = %notice.order_id,
                kind = notice.kind.as_str(),
                message = %notice.message,
                "notification"
            );
            return Ok(());
        };
        let Webhook {
            client,
            url,
            timeout,
        } = webhook.as_ref();
        let body = serde_json::to_vec(&Payload {
            event_id: event_id.to_string(),
            customer_id: &notice.customer_id,
            order_id: &notice.order_id,
            kind: notice.kind.as_str(),
            message: &notice.message,
        })
        .map_err(|error| HandlerError::Permanent(format!("encoding the webhook body: {error}")))?;
        let request = Request::post(url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                "idempotency-key",
                format!("{event_id}:{}", notice.customer_id),
            )
            .body(Full::new(bytes::Bytes::from(body)))
            .map_err(|error| {
                HandlerError::Permanent(format!("building the webhook call: {error}"))
            })?;
        let response = tokio::time::timeout(*timeout, client.request(request))
            .await
            .map_err(|_| HandlerError::Retry(format!("webhook {url}: no answer in {timeout:?}")))?
            .map_err(|error| HandlerError::Retry(format!("webhook {url}: {error}")))?;
        match response.status() {
            status if status.is_success() => Ok(()),
            status
                if status.is_client_error()
                    && status != StatusCode::REQUEST_TIMEOUT
                    && status != StatusCode::TOO_MANY_REQUESTS =>
            {
                Err(HandlerError::Permanent(format!(
                    "webhook {url} refused it: {status}"
                )))
            }
            status => Err(HandlerError::Retry(format!(
                "webhook {url} answered {status}"
            ))),
        }
    }
}
