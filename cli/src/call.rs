//! `waybill orders …`: a command-line client over the generated stubs, so the README's example
//! call needs no other tool.

use anyhow::{Context, bail};
use mesh_layer::{client::MeshClient, method::MethodTable, policy::Policy};
use waybill_api::orders::v1::{self as pb, orders_service_client::OrdersServiceClient};

#[derive(clap::Subcommand)]
pub enum OrdersCommand {
    /// Place an order.
    Place {
        #[command(flatten)]
        target: Target,
        /// The customer's id.
        #[arg(long)]
        customer: String,
        /// A line item as SKU:QUANTITY; repeat for more lines.
        #[arg(long = "item", required = true)]
        items: Vec<String>,
        /// Delivery address.
        #[arg(long)]
        address: String,
        /// Delivery zone (empty: "default").
        #[arg(long, default_value = "")]
        zone: String,
        /// Makes the call safe to repeat: the same key returns the same order.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Show one order.
    Get {
        #[command(flatten)]
        target: Target,
        /// The order's id.
        order_id: String,
        /// A consistency token printed by a write: read that write back.
        #[arg(long, default_value = "")]
        after: String,
    },
    /// List a customer's orders, newest first.
    List {
        #[command(flatten)]
        target: Target,
        /// The customer's id.
        #[arg(long)]
        customer: String,
        /// Orders per page.
        #[arg(long, default_value_t = 20)]
        page_size: i32,
        /// Token from the previous page.
        #[arg(long, default_value = "")]
        page_token: String,
        /// A consistency token printed by a write: list with that write in.
        #[arg(long, default_value = "")]
        after: String,
    },
    /// Cancel an order.
    Cancel {
        #[command(flatten)]
        target: Target,
        /// The order's id.
        order_id: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// A command-line call waits at most 10 s, and retries a refused connection (UNAVAILABLE)
/// for idempotent methods.
const CLI_POLICY: &str = r#"{"methodConfig": [{
    "name": [{}],
    "timeout": "10s",
    "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.1s", "maxBackoff": "1s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}
}]}"#;

#[derive(clap::Args)]
pub struct Target {
    /// The server to call.
    #[arg(long, env = "WAYBILL_ADDR", default_value = "http://127.0.0.1:50051")]
    addr: String,
}

impl Target {
    /// A connection through the mesh client stack (deadline, budgeted retries), as services
    /// use; hand it to a generated client.
    pub fn mesh(&self) -> anyhow::Result<MeshClient> {
        let channel = mesh_layer::client::connect(&self.addr)
            .context("--addr must be a URL such as http://127.0.0.1:50051")?;
        let methods = MethodTable::from_descriptor_sets(&[waybill_api::FILE_DESCRIPTOR_SET])?;
        let policy = Policy::from_json(CLI_POLICY)?;
        Ok(mesh_layer::client::wrap(&policy, &methods, channel))
    }

    async fn client(&self) -> anyhow::Result<OrdersServiceClient<MeshClient>> {
        Ok(OrdersServiceClient::new(self.mesh()?))
    }
}

pub async fn run(command: OrdersCommand) -> anyhow::Result<()> {
    let result = match command {
        OrdersCommand::Place {
            target,
            customer,
            items,
            address,
            zone,
            idempotency_key,
        } => {
            let items = items
                .iter()
                .map(|text| parse_item(text))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mut request = tonic::Request::new(pb::PlaceOrderRequest {
                customer_id: customer,
                items,
                delivery_address: address,
                zone,
            });
            if let Some(key) = idempotency_key {
                let key = key
                    .parse()
                    .context("--idempotency-key must be visible ASCII")?;
                request.metadata_mut().insert("idempotency-key", key);
            }
            target.client().await?.place_order(request).await.map(|r| {
                let r = r.into_inner();
                print_order(r.order);
                eprintln!("consistency token: {}", r.consistency_token);
            })
        }
        OrdersCommand::Get {
            target,
            order_id,
            after,
        } => target
            .client()
            .await?
            .get_order(pb::GetOrderRequest {
                order_id,
                consistency_token: after,
            })
            .await
            .map(|r| print_order(r.into_inner().order)),
        OrdersCommand::List {
            target,
            customer,
            page_size,
            page_token,
            after,
        } => target
            .client()
            .await?
            .list_orders(pb::ListOrdersRequest {
                customer_id: customer,
                page_size,
                page_token,
                consistency_token: after,
            })
            .await
            .map(|r| {
                let page = r.into_inner();
                for order in page.orders {
                    print_order(Some(order));
                }
                if !page.next_page_token.is_empty() {
                    println!("next page: --page-token {}", page.next_page_token);
                }
            }),
        OrdersCommand::Cancel {
            target,
            order_id,
            reason,
        } => target
            .client()
            .await?
            .cancel_order(pb::CancelOrderRequest { order_id, reason })
            .await
            .map(|r| print_order(r.into_inner().order)),
    };
    result.map_err(|status| anyhow::anyhow!("{}: {}", status.code(), status.message()))
}

fn parse_item(text: &str) -> anyhow::Result<pb::LineItem> {
    let Some((sku, quantity)) = text.rsplit_once(':') else {
        bail!("--item {text:?}: expected SKU:QUANTITY");
    };
    Ok(pb::LineItem {
        sku: sku.to_owned(),
        quantity: quantity
            .parse()
            .with_context(|| format!("--item {text:?}: quantity is not a number"))?,
    })
}

fn print_order(order: Option<pb::Order>) {
    let Some(order) = order else { return };
    let items: Vec<String> = order
        .items
        .iter()
        .map(|i| format!("{}x{}", i.sku, i.quantity))
        .collect();
    let status = pb::OrderStatus::try_from(order.status)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("ORDER_STATUS_")
                .to_owned()
        })
        .unwrap_or_else(|_| order.status.to_string());
    println!(
        "{}  {status:9}  customer={}  items={}  address={:?}{}",
        order.order_id,
        order.customer_id,
        items.join(","),
        order.delivery_address,
        if order.cancel_reason.is_empty() {
            String::new()
        } else {
            format!("  reason={:?}", order.cancel_reason)
        }
    );
}

/// `waybill echo`: send an echo through a chain of servers and show what each hop saw.
#[derive(clap::Args)]
pub struct EchoArgs {
    #[command(flatten)]
    target: Target,
    /// Further echo servers to relay through, in order (http://host:port).
    #[arg(long)]
    relay: Vec<String>,
    /// The call's deadline.
    #[arg(long, default_value = "5s", value_parser = waybill_runtime::config::parse_duration)]
    timeout: std::time::Duration,
    /// The message.
    #[arg(default_value = "hello")]
    message: String,
}

pub async fn echo(args: EchoArgs) -> anyhow::Result<()> {
    use waybill_api::echo::v1::{EchoRequest, echo_service_client::EchoServiceClient};
    let channel = mesh_layer::client::connect(&args.target.addr)
        .context("--addr must be a URL such as http://127.0.0.1:50051")?;
    let methods = MethodTable::from_descriptor_sets(&[waybill_api::FILE_DESCRIPTOR_SET])?;
    let mut client = EchoServiceClient::new(mesh_layer::client::wrap(
        &Policy::from_json(CLI_POLICY)?,
        &methods,
        channel,
    ));
    let mut request = tonic::Request::new(EchoRequest {
        message: args.message,
        relay: args.relay,
        delay_ms: 0,
    });
    request.set_timeout(args.timeout);
    let response = client
        .echo(request)
        .await
        .map_err(|status| anyhow::anyhow!("{}: {}", status.code(), status.message()))?
        .into_inner();
    println!("{}", response.message);
    for (index, hop) in response.hops.iter().enumerate() {
        println!(
            "hop {index}: deadline left {} ms, previous attempts {}",
            hop.deadline_remaining_ms, hop.previous_attempts
        );
    }
    Ok(())
}
