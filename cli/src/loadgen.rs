//! `waybill loadgen`: an open-loop load generator.
//!
//! Calls start at a fixed arrival rate whatever earlier calls do, and each call's latency is
//! measured from the moment it was scheduled to start, as wrk2 does. A closed loop (the next
//! call waits for the previous one) slows down with the server and so hides exactly the
//! latency that overload causes (coordinated omission). The schedule ticks with tokio's timer
//! (1 ms resolution), so a latency can include up to 1 ms of the generator's own lateness.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::time::Instant;
use tonic::{Code, transport::Channel};
use waybill_api::{
    commands::v1::{self as commands, command_service_client::CommandServiceClient},
    delivery::v1::{self as delivery, delivery_service_client::DeliveryServiceClient},
    echo::v1::{EchoRequest, echo_service_client::EchoServiceClient},
    inventory::v1::{self as inventory, inventory_service_client::InventoryServiceClient},
    orders::v1::{self as pb, orders_service_client::OrdersServiceClient},
};

#[derive(clap::Args)]
pub struct LoadgenArgs {
    /// The server to load.
    #[arg(long, env = "WAYBILL_ADDR", default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// What to send.
    #[arg(long, value_enum, default_value_t = Scenario::PlaceOrders)]
    scenario: Scenario,
    /// Calls started per second.
    #[arg(long, default_value_t = 100)]
    rate: u64,
    /// How long to run; 0 runs until Ctrl-C.
    #[arg(long, default_value = "10s", value_parser = waybill_runtime::config::parse_duration)]
    duration: Duration,
    /// HTTP/2 connections the calls are spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Calls allowed in flight at once; calls due beyond it are not sent and are counted as
    /// `not_sent`, so an overloaded server cannot make the generator grow without bound.
    #[arg(long, default_value_t = 10_000)]
    max_in_flight: u64,
    /// Each call's deadline.
    #[arg(long, default_value = "5s", value_parser = waybill_runtime::config::parse_duration)]
    timeout: Duration,
    /// Distinct customers the orders are spread over.
    #[arg(long, default_value_t = 1000)]
    customers: u32,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// First stock the items the orders name (SKU-0 … SKU-49) and put couriers in the default
    /// zone, so placed orders can be confirmed (PutItem and PutCourier are idempotent).
    #[arg(long)]
    seed: bool,
}

/// Couriers `--seed` puts in the default zone, each of the largest capacity.
const SEED_COURIERS: usize = 200;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Scenario {
    /// PlaceOrder with an idempotency key per call.
    PlaceOrders,
    /// ListOrders for random customers (replica reads).
    ListOrders,
    /// 75 % ListOrders, 20 % PlaceOrder, 5 % SubmitCommand (a notification).
    Mixed,
    /// A whole delivery, watched: PlaceOrder, then TrackDelivery while the courier moves it
    /// PICKED_UP → IN_TRANSIT → DELIVERED; latency is the whole flow, and a watcher that
    /// misses or reorders an update counts as DataLoss. Needs `--seed` (or stock and couriers).
    TrackDeliveries,
    /// EchoService/Echo (needs `serve --services echo`).
    Echo,
    /// SubmitCommand: a SendNotification command for a random user, with a key per call
    /// (needs `serve --services commands`).
    SubmitCommands,
}

/// The summary, printed and optionally written as JSON.
#[derive(Serialize)]
struct Report {
    scenario: Scenario,
    target_rate: u64,
    duration_seconds: f64,
    /// Calls started.
    sent: u64,
    /// Calls due but not started because `max_in_flight` were outstanding.
    not_sent: u64,
    /// Calls that returned OK.
    ok: u64,
    /// Failed calls by gRPC code name.
    errors: std::collections::BTreeMap<String, u64>,
    /// OK calls per second over the run.
    throughput: f64,
    /// Latency of all finished calls from their scheduled start, in microseconds.
    latency_us: Percentiles,
    /// How the PlaceOrder calls that returned OK ended (their saga's outcome).
    orders: OrderOutcomes,
}

#[derive(Serialize, Default)]
struct OrderOutcomes {
    confirmed: u64,
    cancelled: u64,
    /// The saga was still running (deferred after a transient failure) when the call returned.
    pending: u64,
}

#[derive(Serialize)]
struct Percentiles {
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    max: u64,
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    confirmed: AtomicU64,
    cancelled: AtomicU64,
    pending: AtomicU64,
    in_flight: AtomicU64,
    errors: Mutex<std::collections::BTreeMap<String, u64>>,
}

#[derive(Clone)]
struct Clients {
    orders: Vec<OrdersServiceClient<Channel>>,
    delivery: Vec<DeliveryServiceClient<Channel>>,
    echo: Vec<EchoServiceClient<Channel>>,
    commands: Vec<CommandServiceClient<Channel>>,
}

pub async fn run(args: LoadgenArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.rate > 0, "--rate must be at least 1");
    anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
    let mut channels = Vec::new();
    for _ in 0..args.connections {
        channels.push(
            Channel::from_shared(args.addr.clone())
                .context("--addr must be a URL such as http://127.0.0.1:50051")?
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await
                .with_context(|| format!("cannot connect to {}", args.addr))?,
        );
    }
    let clients = Clients {
        orders: channels
            .iter()
            .cloned()
            .map(OrdersServiceClient::new)
            .collect(),
        echo: channels
            .iter()
            .cloned()
            .map(EchoServiceClient::new)
            .collect(),
        commands: channels
            .iter()
            .cloned()
            .map(CommandServiceClient::new)
            .collect(),
        delivery: channels
            .iter()
            .cloned()
            .map(DeliveryServiceClient::new)
            .collect(),
    };

    if args.seed {
        seed(channels[0].clone()).await?;
    }

    let tally = Arc::new(Tally::default());
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1,
        3_600_000_000,
        3,
    )?));
    let progress = ProgressBar::new_spinner();
    progress.set_style(ProgressStyle::with_template("{spinner} {elapsed} {msg}")?);
    progress.enable_steady_tick(Duration::from_millis(200));

    let started = Instant::now();
    let until = (!args.duration.is_zero()).then(|| started + args.duration);
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    // Tick at least every millisecond so a call starts at most 1 ms after it is due.
    let mut ticker = tokio::time::interval(Duration::from_millis(1).min(interval));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let (mut sent, mut not_sent, mut sequence) = (0u64, 0u64, 0u64);
    let mut last_report = started;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = &mut ctrl_c => break,
        }
        let now = Instant::now();
        if until.is_some_and(|until| now >= until) {
            break;
        }
        // Every call due by now (call k is due at k × interval, so the first at once), each
        // measured from the time it was due.
        let due = (now.duration_since(started).as_secs_f64() * args.rate as f64) as u64 + 1;
        while sequence < due {
            let scheduled = started + interval.mul_f64(sequence as f64);
            sequence += 1;
            if tally.in_flight.load(Ordering::Relaxed) >= args.max_in_flight {
                not_sent += 1;
                continue;
            }
            sent += 1;
            tally.in_flight.fetch_add(1, Ordering::Relaxed);
            let (clients, tally, histogram) = (clients.clone(), tally.clone(), histogram.clone());
            let (scenario, timeout, customers) = (args.scenario, args.timeout, args.customers);
            tokio::spawn(async move {
                let result = call(&clients, scenario, sequence, customers, timeout).await;
                let micros = scheduled.elapsed().as_micros() as u64;
                if let Ok(mut histogram) = histogram.lock() {
                    let _ = histogram.record(micros.max(1));
                }
                match result {
                    Ok(outcome) => {
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                        let counter = match outcome {
                            Some(pb::OrderStatus::Confirmed) => Some(&tally.confirmed),
                            Some(pb::OrderStatus::Cancelled) => Some(&tally.cancelled),
                            Some(_) => Some(&tally.pending),
                            None => None,
                        };
                        if let Some(counter) = counter {
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(code) => {
                        if let Ok(mut errors) = tally.errors.lock() {
                            *errors.entry(format!("{code:?}")).or_default() += 1;
                        }
                    }
                }
                tally.in_flight.fetch_sub(1, Ordering::Relaxed);
            });
        }
        if now.duration_since(last_report) >= Duration::from_millis(250) {
            last_report = now;
            let elapsed = now.duration_since(started).as_secs_f64();
            let ok = tally.ok.load(Ordering::Relaxed);
            let errors: u64 = tally.errors.lock().map(|e| e.values().sum()).unwrap_or(0);
            let p99 = histogram
                .lock()
                .map(|h| h.value_at_quantile(0.99))
                .unwrap_or(0);
            progress.set_message(format!(
                "{:?} at {}/s: {ok} ok ({:.0}/s), {errors} failed, {not_sent} not sent, {} in flight, p99 {:.1} ms",
                args.scenario,
                args.rate,
                ok as f64 / elapsed.max(0.001),
                tally.in_flight.load(Ordering::Relaxed),
                p99 as f64 / 1000.0,
            ));
        }
    }
    // Let the calls in flight finish (each is bounded by its deadline).
    let drain_until = Instant::now() + args.timeout + Duration::from_secs(1);
    while tally.in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    progress.finish_and_clear();

    let elapsed = started.elapsed().as_secs_f64();
    let histogram = histogram
        .lock()
        .map_err(|_| anyhow::anyhow!("histogram lock poisoned"))?;
    let ok = tally.ok.load(Ordering::Relaxed);
    let report = Report {
        scenario: args.scenario,
        target_rate: args.rate,
        duration_seconds: elapsed,
        sent,
        not_sent,
        ok,
        errors: tally.errors.lock().map(|e| e.clone()).unwrap_or_default(),
        throughput: ok as f64 / elapsed,
        latency_us: Percentiles {
            p50: histogram.value_at_quantile(0.5),
            p90: histogram.value_at_quantile(0.9),
            p99: histogram.value_at_quantile(0.99),
            p999: histogram.value_at_quantile(0.999),
            max: histogram.max(),
        },
        orders: OrderOutcomes {
            confirmed: tally.confirmed.load(Ordering::Relaxed),
            cancelled: tally.cancelled.load(Ordering::Relaxed),
            pending: tally.pending.load(Ordering::Relaxed),
        },
    };
    println!(
        "{:?} at {}/s for {:.1} s: sent {}, ok {} ({:.0}/s), failed {:?}, not sent {}",
        report.scenario,
        report.target_rate,
        report.duration_seconds,
        report.sent,
        report.ok,
        report.throughput,
        report.errors,
        report.not_sent
    );
    println!(
        "latency from scheduled start: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        report.latency_us.p50 as f64 / 1000.0,
        report.latency_us.p90 as f64 / 1000.0,
        report.latency_us.p99 as f64 / 1000.0,
        report.latency_us.p999 as f64 / 1000.0,
        report.latency_us.max as f64 / 1000.0,
    );
    let orders = &report.orders;
    if orders.confirmed + orders.cancelled + orders.pending > 0 {
        println!(
            "orders: {} confirmed, {} cancelled, {} pending",
            orders.confirmed, orders.cancelled, orders.pending
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

async fn call(
    clients: &Clients,
    scenario: Scenario,
    sequence: u64,
    customers: u32,
    timeout: Duration,
) -> Result<Option<pb::OrderStatus>, Code> {
    let connection = sequence as usize % clients.orders.len();
    let customer = format!("loadgen-{}", fastrand::u32(..customers.max(1)));
    let roll = fastrand::u8(..20);
    let place = match scenario {
        Scenario::PlaceOrders | Scenario::TrackDeliveries => true,
        Scenario::ListOrders | Scenario::Echo | Scenario::SubmitCommands => false,
        Scenario::Mixed => roll < 4,
    };
    let submit = scenario == Scenario::SubmitCommands || (scenario == Scenario::Mixed && roll == 4);
    let result = match scenario {
        _ if submit => {
            let mut request = tonic::Request::new(commands::SubmitCommandRequest {
                payload: Some(commands::CommandPayload {
                    kind: Some(commands::command_payload::Kind::SendNotification(
                        commands::SendNotification {
                            customer_id: customer.clone(),
                            message: format!("load {sequence}"),
                        },
                    )),
                }),
                user_id: customer,
                idempotency_key: format!("loadgen-{}-{sequence}", run_id()),
            });
            request.set_timeout(timeout);
            clients.commands[connection]
                .clone()
                .submit_command(request)
                .await
                .map(|_| None)
        }
        Scenario::Echo => {
            let mut request = tonic::Request::new(EchoRequest {
                message: sequence.to_string(),
                relay: vec![],
                delay_ms: 0,
            });
            request.set_timeout(timeout);
            clients.echo[connection]
                .clone()
                .echo(request)
                .await
                .map(|_| None)
        }
        _ if place => {
            let mut request = tonic::Request::new(pb::PlaceOrderRequest {
                customer_id: customer,
                items: vec![pb::LineItem {
                    sku: format!("SKU-{}", fastrand::u8(..50)),
                    quantity: i32::from(fastrand::u8(1..5)),
                }],
                delivery_address: "1 Load Street".into(),
                zone: String::new(),
            });
            request.set_timeout(timeout);
            let key = format!("loadgen-{}-{sequence}", run_id());
            if let Ok(key) = key.parse() {
                request.metadata_mut().insert("idempotency-key", key);
            }
            let order = clients.orders[connection]
                .clone()
                .place_order(request)
                .await
                .map(|response| response.into_inner().order);
            match order {
                Ok(Some(order))
                    if scenario == Scenario::TrackDeliveries
                        && order.status() == pb::OrderStatus::Confirmed =>
                {
                    let delivery = clients.delivery[connection].clone();
                    track(delivery, order.order_id, timeout)
                        .await
                        .map(|()| Some(pb::OrderStatus::Confirmed))
                }
                Ok(order) => Ok(order.map(|order| order.status())),
                Err(status) => Err(status),
            }
        }
        _ => {
            let mut request = tonic::Request::new(pb::ListOrdersRequest {
                customer_id: customer,
                page_size: 10,
                page_token: String::new(),
                consistency_token: String::new(),
            });
            request.set_timeout(timeout);
            clients.orders[connection]
                .clone()
                .list_orders(request)
                .await
                .map(|_| None)
        }
    };
    result.map_err(|status| status.code())
}

/// Stocks SKU-0 … SKU-49 and puts [`SEED_COURIERS`] couriers in the default zone.
async fn seed(channel: Channel) -> anyhow::Result<()> {
    let mut inventory = InventoryServiceClient::new(channel.clone());
    for n in 0..50 {
        inventory
            .put_item(inventory::PutItemRequest {
                sku: format!("SKU-{n}"),
                name: format!("Load item {n}"),
                on_hand: 1_000_000_000,
            })
            .await
            .context("seeding the catalog (is the inventory service running?)")?;
    }
    let mut delivery = DeliveryServiceClient::new(channel);
    for n in 0..SEED_COURIERS {
        delivery
            .put_courier(delivery::PutCourierRequest {
                courier_id: format!("loadgen-courier-{n}"),
                name: String::new(),
                zone: "default".into(),
                capacity: 1000,
            })
            .await
            .context("seeding couriers (is the delivery service running?)")?;
    }
    eprintln!("seeded 50 items and {SEED_COURIERS} couriers in zone \"default\"");
    Ok(())
}

/// Watches one delivery while moving it to DELIVERED; every update must reach the watcher, in
/// order. A missed or reordered update is reported as DATA_LOSS.
async fn track(
    mut delivery: DeliveryServiceClient<Channel>,
    order_id: String,
    timeout: Duration,
) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(delivery::TrackDeliveryRequest {
        order_id: order_id.clone(),
    });
    request.set_timeout(timeout);
    let mut updates = delivery.track_delivery(request).await?.into_inner();
    let expect = |updates: Option<delivery::TrackDeliveryResponse>,
                  want: delivery::DeliveryStatus| {
        match updates.and_then(|u| u.delivery) {
            Some(d) if d.status() == want => Ok(()),
            other => Err(tonic::Status::data_loss(format!(
                "watcher expected {want:?}, got {other:?}"
            ))),
        }
    };
    expect(updates.message().await?, delivery::DeliveryStatus::Assigned)?;
    for next in [
        delivery::DeliveryStatus::PickedUp,
        delivery::DeliveryStatus::InTransit,
        delivery::DeliveryStatus::Delivered,
    ] {
        let mut update = tonic::Request::new(delivery::UpdateStatusRequest {
            order_id: order_id.clone(),
            status: next as i32,
            location: None,
            reason: String::new(),
        });
        update.set_timeout(timeout);
        delivery.update_status(update).await?;
        expect(updates.message().await?, next)?;
    }
    Ok(())
}

/// This run's part of the idempotency keys it sends. Keys are remembered (an order keeps its
/// key for good, a command for its retention), so a later run must not reuse them; a process
/// id would (containers start at 1).
fn run_id() -> &'static str {
    static RUN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    RUN.get_or_init(|| uuid::Uuid::now_v7().simple().to_string())
}
