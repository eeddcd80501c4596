//! The mesh layer's cost: a bare tonic echo server and client against the same echo behind
//! the full server stack (trace, deadline, faults, shedding, idempotency) and the full client
//! stack (deadline, budgeted retry, p2c balancer, circuit breaker), in one run on loopback.
//!
//! Each server runs in its own process (this program re-executes itself with `--serve`), the
//! load comes from this process. Figures are printed as a markdown table for
//! docs/benchmarks.md.
//!
//! Run: `cargo bench --bench mesh` (options after `--`: `--seconds N` per phase, `--rate R`
//! calls/s for the fixed-rate phase, `--rounds N` interleaved rounds (each phase runs every setup in turn, in alternating order), `--tracing` to trace
//! every mesh call).
//!
//! `--tracing`: the mesh server and the mesh clients export every call's span (full
//! sampling) over OTLP/gRPC to a receiver in its own process that counts and drops them, as a
//! node-local collector would; the bare setups have no span to make, so the mesh rows'
//! ratios to bare, compared with a run without `--tracing`, are what tracing costs. (The
//! program re-executes itself with `OTEL_EXPORTER_OTLP_ENDPOINT` set, since the process's
//! own telemetry reads it from the environment.)

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;

// The allocator `waybill` itself runs with (cli/src/main.rs): the stacks are measured as they
// ship. Both sides of every comparison use it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use mesh_layer::{idempotency::MemoryStore, method::MethodTable, policy::Policy};
use tonic::transport::{Channel, Server};
use waybill_api::echo::v1::{EchoRequest, echo_service_client::EchoServiceClient};

const IN_FLIGHT: usize = 64;
const CONNECTIONS: usize = 16;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    // Counting instructions wants a deterministic client: one thread, no work stealing.
    // `--client-threads 1` runs the load on one thread too, to see what waking tasks across
    // worker threads costs each setup.
    let runtime = if flag("--calls").is_some() || flag("--client-threads").as_deref() == Some("1") {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    };
    if let Some(kind) = flag("--serve") {
        // Only the mesh server traces (when OTEL_EXPORTER_OTLP_ENDPOINT is set); its logs
        // go to stderr either way.
        let telemetry = (kind == "full").then(|| init_telemetry(&runtime, "bench-server"));
        let result = runtime.block_on(serve(&kind));
        flush(&runtime, telemetry);
        return result;
    }
    if args.iter().any(|a| a == "--tracing") && std::env::var_os(OTLP_ENDPOINT).is_none() {
        return traced(&args);
    }
    // `--calls N --client bare|mesh --endpoint URL`: N sequential calls and exit, for counting
    // instructions per call under callgrind (benches/instructions.sh). With
    // OTEL_EXPORTER_OTLP_ENDPOINT set, the mesh client traces its calls.
    if let Some(calls) = flag("--calls") {
        let calls: u64 = calls.parse()?;
        let kind = flag("--client").unwrap_or_else(|| "bare".into());
        let endpoint = flag("--endpoint").ok_or("--calls needs --endpoint")?;
        let telemetry = (kind == "mesh").then(|| init_telemetry(&runtime, "bench-client"));
        let result = runtime.block_on(async {
            let mut client = Client::connect(&kind, &endpoint).await?;
            for _ in 0..calls {
                if !client.echo().await {
                    return Err("a call failed".into());
                }
            }
            Ok(())
        });
        // The export of the last spans counts as part of the calls' cost.
        flush(&runtime, telemetry);
        return result;
    }
    let seconds: u64 = flag("--seconds").map_or(Ok(3), |s| s.parse())?;
    let rate: u64 = flag("--rate").map_or(Ok(2000), |s| s.parse())?;
    let rounds: usize = flag("--rounds").map_or(Ok(3), |s| s.parse())?;
    // `--only N`: run only setup N (0 bare, 1 server stack, 2 client stack, 3 both, 4 bare
    // client sending deadlines), for profiling one setup.
    let only: Option<usize> = flag("--only").map(|s| s.parse()).transpose()?;
    let telemetry = init_telemetry(&runtime, "bench-client");
    if telemetry.is_exporting() {
        eprintln!("tracing every mesh call (full sampling), exported over OTLP/gRPC");
    }
    let result = runtime.block_on(drive(Duration::from_secs(seconds), rate, rounds, only));
    flush(&runtime, Some(telemetry));
    result
}

const OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Logs on stderr (WARN and up unless RUST_LOG says otherwise), and traces when
/// OTEL_EXPORTER_OTLP_ENDPOINT is set: waybill's own telemetry, as a service would run it.
fn init_telemetry(
    runtime: &tokio::runtime::Runtime,
    name: &str,
) -> waybill_runtime::telemetry::Telemetry {
    let _entered = runtime.enter();
    waybill_runtime::telemetry::init(
        &waybill_runtime::LogConfig {
            log_format: waybill_runtime::config::LogFormat::Text,
        },
        name,
    )
}

/// Exports the spans still queued, from a blocking thread while `runtime` runs the export.
fn flush(
    runtime: &tokio::runtime::Runtime,
    telemetry: Option<waybill_runtime::telemetry::Telemetry>,
) {
    if let Some(telemetry) = telemetry {
        let _ = runtime
            .block_on(async { tokio::task::spawn_blocking(move || telemetry.shutdown()).await });
    }
}

/// `--tracing`: starts the OTLP receiver, runs this program again with the exporter's
/// endpoint in its environment (servers inherit it), and reports the spans received.
fn traced(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let receiver = ServerProcess::start("otlp")?;
    let status = Command::new(std::env::current_exe()?)
        .args(&args[1..])
        .env(OTLP_ENDPOINT, &receiver.endpoint)
        .status()?;
    drop(receiver);
    if status.success() {
        Ok(())
    } else {
        Err(format!("the traced run failed: {status}").into())
    }
}

fn policy() -> Policy {
    Policy::default()
}

fn methods() -> MethodTable {
    MethodTable::from_descriptor_sets(&[waybill_api::FILE_DESCRIPTOR_SET]).unwrap_or_default()
}

/// Serves the echo service bare or with the full server stack, or the OTLP receiver that
/// counts and drops spans (`otlp`), until stdin closes.
async fn serve(kind: &str) -> Result<(), Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("listening on {}", listener.local_addr()?);
    let stop = async {
        // The parent closes our stdin when it is done (or dies).
        let _ =
            tokio::task::spawn_blocking(|| std::io::stdin().read_line(&mut String::new())).await;
    };
    if kind == "otlp" {
        let collector = waybill_test_support::otlp::Collector::counting(listener);
        stop.await;
        eprintln!("OTLP receiver: {} spans received", collector.received());
        return Ok(());
    }
    let echo = waybill_echo::server(waybill_echo::Echo::new(policy())?);
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    match kind {
        "bare" => {
            Server::builder()
                .add_service(echo)
                .serve_with_incoming_shutdown(incoming, stop)
                .await?
        }
        "full" => {
            Server::builder()
                .layer(mesh_layer::server::trace())
                .layer(mesh_layer::server::stack(
                    &policy(),
                    &methods(),
                    Arc::new(MemoryStore::default()),
                    mesh_layer::shed::MethodCaps::default(),
                ))
                .add_service(echo)
                .serve_with_incoming_shutdown(incoming, stop)
                .await?
        }
        other => return Err(format!("unknown server kind {other}").into()),
    }
    Ok(())
}

struct ServerProcess {
    child: Child,
    endpoint: String,
}

impl ServerProcess {
    fn start(kind: &str) -> Result<Self, Box<dyn std::error::Error>> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["--serve", kind])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let address = line
            .trim()
            .strip_prefix("listening on ")
            .ok_or_else(|| format!("unexpected line {line:?}"))?;
        Ok(Self {
            endpoint: format!("http://{address}"),
            child,
        })
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// One way to call the echo: a bare tonic client, the mesh client stack, or part of it.
#[derive(Clone)]
enum Client {
    Bare(EchoServiceClient<Channel>),
    /// A bare tonic client that sends each call's deadline (`grpc-timeout`, 5 s), as the mesh
    /// client does: what deadlines cost in tonic itself, apart from the layers.
    BareDeadline(EchoServiceClient<Channel>),
    Mesh(
        EchoServiceClient<
            mesh_layer::client::MeshClient<
                mesh_layer::balance::Balancer<mesh_layer::connection::Connection>,
            >,
        >,
    ),
    /// The client stack up to a layer (`--client upto:LAYER`), boxed so that one type
    /// holds every depth; for counting each layer's cost (`LAYERS=1 benches/instructions.sh`).
    Partial(EchoServiceClient<PartialStack>),
}

type PartialStack = tower::util::BoxCloneService<
    tonic::codegen::http::Request<tonic::body::Body>,
    tonic::codegen::http::Response<tonic::body::Body>,
    PartialError,
>;

/// The error of every depth of [`PartialStack`]: a concrete type, because tonic's clients
/// cannot take a boxed `dyn Error` from a spawned task (a higher-ranked `From` bound).
#[derive(Debug)]
struct PartialError(String);

impl std::fmt::Display for PartialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PartialError {}

fn box_error(error: impl std::error::Error) -> PartialError {
    PartialError(error.to_string())
}

/// The layers of the client stack, innermost first, as `--client upto:LAYER` names them.
const CLIENT_LAYERS: [&str; 6] = [
    "boxed",
    "connection",
    "balancer",
    "retry",
    "deadline",
    "trace",
];

/// The bench's client policy: every call gets a deadline, so the deadline layers on both sides
/// work, and UNAVAILABLE is retried.
fn client_policy() -> Result<Policy, Box<dyn std::error::Error>> {
    Ok(Policy::from_json(
        r#"{"methodConfig": [{"name": [{}], "timeout": "5s",
            "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "1s",
                            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}"#,
    )?)
}

/// The client stack built up to `layer` (see [`CLIENT_LAYERS`]): `boxed` is a bare channel
/// in the same box as the others, so each step's difference is that layer's cost.
async fn partial_stack(
    layer: &str,
    endpoint: &str,
) -> Result<PartialStack, Box<dyn std::error::Error>> {
    use mesh_layer::{balance::Balancer, deadline::DeadlineLayer, retry::RetryLayer};
    use tower::{Layer, ServiceExt};
    let policy = client_policy()?;
    let balancer = || Balancer::connect(endpoint, policy.breaker().clone());
    let retry = || {
        Ok::<_, Box<dyn std::error::Error>>(
            RetryLayer::new(policy.clone(), methods()).layer(balancer()?),
        )
    };
    Ok(match layer {
        "boxed" => PartialStack::new(
            Channel::from_shared(endpoint.to_owned())?
                .tcp_nodelay(true)
                .connect()
                .await?
                .map_err(box_error),
        ),
        "connection" => {
            PartialStack::new(mesh_layer::client::connect(endpoint)?.map_err(box_error))
        }
        "balancer" => PartialStack::new(balancer()?.map_err(box_error)),
        "retry" => PartialStack::new(retry()?.map_err(box_error)),
        "deadline" => PartialStack::new(
            DeadlineLayer::new(policy.clone())
                .layer(retry()?)
                .map_err(box_error),
        ),
        "trace" => PartialStack::new(
            mesh_layer::client::balanced(endpoint, &policy, &methods())?
                .map_response(|response| response.map(tonic::body::Body::new))
                .map_err(box_error),
        ),
        other => return Err(format!("unknown layer {other}; one of {CLIENT_LAYERS:?}").into()),
    })
}

impl Client {
    async fn connect(kind: &str, endpoint: &str) -> Result<Self, Box<dyn std::error::Error>> {
        Ok(match kind {
            "bare" | "bare-deadline" => {
                let client = EchoServiceClient::new(
                    Channel::from_shared(endpoint.to_owned())?
                        .tcp_nodelay(true)
                        .connect()
                        .await?,
                );
                if kind == "bare" {
                    Client::Bare(client)
                } else {
                    Client::BareDeadline(client)
                }
            }
            _ => match kind.strip_prefix("upto:") {
                Some(layer) => Client::Partial(EchoServiceClient::new(
                    partial_stack(layer, endpoint).await?,
                )),
                None => Client::Mesh(EchoServiceClient::new(mesh_layer::client::balanced(
                    endpoint,
                    &client_policy()?,
                    &methods(),
                )?)),
            },
        })
    }

    async fn echo(&mut self) -> bool {
        let request = EchoRequest {
            message: "ping".into(),
            relay: vec![],
            delay_ms: 0,
        };
        match self {
            Client::Bare(client) => client.echo(request).await.is_ok(),
            Client::BareDeadline(client) => {
                let mut request = tonic::Request::new(request);
                request.set_timeout(Duration::from_secs(5));
                client.echo(request).await.is_ok()
            }
            Client::Mesh(client) => client.echo(request).await.is_ok(),
            Client::Partial(client) => client.echo(request).await.is_ok(),
        }
    }
}

/// Calls per second with `IN_FLIGHT` calls outstanding over `clients` (one connection each).
async fn saturate(clients: &[Client], duration: Duration) -> (f64, u64) {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let per_client = (IN_FLIGHT / clients.len()).max(1);
    let mut tasks = Vec::new();
    for client in clients {
        for _ in 0..per_client {
            let (mut client, done, failed, stop) =
                (client.clone(), done.clone(), failed.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if client.echo().await {
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        // A failure can be immediate; yield so the stop timer still runs.
                        tokio::task::yield_now().await;
                    }
                }
            }));
        }
    }
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    eprintln!(
        "  {} clients: {} ok, {} failed",
        clients.len(),
        done.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    for task in tasks {
        let _ = task.await;
    }
    (
        done.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64(),
        failed.load(Ordering::Relaxed),
    )
}

/// Latency at a fixed arrival rate (open loop: calls start on schedule whatever earlier calls
/// do, so a slow response cannot hide the calls behind it). Latency is measured from each
/// call's actual start, because tokio's timer wakes up to 1 ms late; how far starts lagged
/// their schedule is returned too, so a sender that fell behind is visible.
async fn fixed_rate(client: &Client, rate: u64, duration: Duration) -> (Histogram<u64>, Duration) {
    let histogram = Arc::new(std::sync::Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
    ));
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let total = rate * duration.as_secs();
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    let mut max_lag = Duration::ZERO;
    for n in 0..total {
        let scheduled = start + interval.mul_f64(n as f64);
        tokio::time::sleep_until(scheduled).await;
        let sent = tokio::time::Instant::now();
        max_lag = max_lag.max(sent - scheduled);
        let (mut client, histogram) = (client.clone(), histogram.clone());
        tasks.push(tokio::spawn(async move {
            client.echo().await;
            let micros = sent.elapsed().as_micros() as u64;
            if let Ok(mut h) = histogram.lock() {
                let _ = h.record(micros.max(1));
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let histogram = Arc::try_unwrap(histogram)
        .ok()
        .and_then(|m| m.into_inner().ok())
        .unwrap_or_else(|| Histogram::new(3).expect("valid"));
    (histogram, max_lag)
}

/// Latency with one call in flight at a time.
async fn one_at_a_time(client: &Client, duration: Duration) -> Histogram<u64> {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    let mut client = client.clone();
    let started = Instant::now();
    while started.elapsed() < duration {
        let call = Instant::now();
        client.echo().await;
        let _ = histogram.record((call.elapsed().as_micros() as u64).max(1));
    }
    histogram
}

/// What one setup measured over all rounds.
struct Row {
    name: &'static str,
    multiplexed: Vec<f64>,
    connections: Vec<f64>,
    fixed: Histogram<u64>,
    serial: Histogram<u64>,
    failed: u64,
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

async fn drive(
    duration: Duration,
    rate: u64,
    rounds: usize,
    only: Option<usize>,
) -> Result<(), Box<dyn std::error::Error>> {
    let bare_server = ServerProcess::start("bare")?;
    let full_server = ServerProcess::start("full")?;
    // (row name, client stack, server): bare, each stack alone, both, and bare with deadlines.
    let setups = [
        ("bare client → bare server", "bare", &bare_server),
        ("bare client → mesh server stack", "bare", &full_server),
        ("mesh client stack → bare server", "mesh", &bare_server),
        ("mesh client → mesh server (full)", "mesh", &full_server),
        (
            "bare client sending deadlines → bare server",
            "bare-deadline",
            &bare_server,
        ),
    ];
    let mut clients = Vec::new();
    let mut rows = Vec::new();
    let chosen = setups
        .iter()
        .enumerate()
        .filter(|(i, _)| only.is_none_or(|only| only == *i))
        .map(|(_, setup)| setup);
    // MESH_CLIENT=upto:LAYER runs the mesh rows with the client stack up to LAYER (see
    // [`CLIENT_LAYERS`]), to see what each layer costs in wall-clock terms.
    let partial = std::env::var("MESH_CLIENT").ok();
    for (name, kind, server) in chosen {
        let kind = match (*kind, &partial) {
            ("mesh", Some(partial)) => partial.as_str(),
            (kind, _) => kind,
        };
        let one = Client::connect(kind, &server.endpoint).await?;
        let mut many = Vec::new();
        for _ in 0..CONNECTIONS {
            many.push(Client::connect(kind, &server.endpoint).await?);
        }
        saturate(std::slice::from_ref(&one), Duration::from_secs(1)).await;
        clients.push((one, many));
        rows.push(Row {
            name,
            multiplexed: Vec::new(),
            connections: Vec::new(),
            fixed: Histogram::new_with_bounds(1, 60_000_000, 3)?,
            serial: Histogram::new_with_bounds(1, 60_000_000, 3)?,
            failed: 0,
        });
    }
    // Rounds interleave the setups phase by phase, so that each setup is measured within
    // seconds of bare, and alternate their order (ABBA), so that steady drift in the machine
    // (other tenants, frequency) favours none. The ratios below pair each round's figures
    // with bare's from the same round.
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..rows.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for &i in &order {
            eprintln!("round {round}: {} (1 connection)", rows[i].name);
            let (multiplexed, failed) =
                saturate(std::slice::from_ref(&clients[i].0), duration).await;
            rows[i].multiplexed.push(multiplexed);
            rows[i].failed += failed;
        }
        for &i in &order {
            eprintln!(
                "round {round}: {} ({CONNECTIONS} connections)",
                rows[i].name
            );
            let (connections, failed) = saturate(&clients[i].1, duration).await;
            rows[i].connections.push(connections);
            rows[i].failed += failed;
        }
        for &i in &order {
            let (fixed, lag) = fixed_rate(&clients[i].0, rate, duration).await;
            eprintln!(
                "round {round}: {}: fixed rate, sender lagged its schedule by at most {lag:?}",
                rows[i].name
            );
            rows[i].fixed.add(&fixed)?;
        }
        for &i in &order {
            let serial = one_at_a_time(&clients[i].0, duration).await;
            rows[i].serial.add(&serial)?;
        }
    }

    println!(
        "| setup | req/s, 1 connection, {IN_FLIGHT} in flight | req/s, {CONNECTIONS} connections | p50 / p99 / p99.9 at {rate}/s (µs) | p50 / p99, one in flight (µs) | failed |"
    );
    println!("|---|---|---|---|---|---|");
    for row in &rows {
        println!(
            "| {} | {:.0} | {:.0} | {} / {} / {} | {} / {} | {} |",
            row.name,
            median(&row.multiplexed),
            median(&row.connections),
            row.fixed.value_at_quantile(0.5),
            row.fixed.value_at_quantile(0.99),
            row.fixed.value_at_quantile(0.999),
            row.serial.value_at_quantile(0.5),
            row.serial.value_at_quantile(0.99),
            row.failed,
        );
    }
    if only.is_some() {
        return Ok(());
    }
    println!();
    let bare = &rows[0];
    let p = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as i64;
    // Per-round ratios to bare: their median, and their range, which says how far to trust it.
    let ratios = |of: &[f64], to: &[f64]| {
        let each: Vec<f64> = of.iter().zip(to).map(|(a, b)| a / b).collect();
        let low = each.iter().copied().fold(f64::INFINITY, f64::min);
        let high = each.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{:.3} ({low:.3}–{high:.3})", median(&each))
    };
    for row in &rows[1..] {
        println!(
            "- {}: throughput {} (1 connection) and {} ({CONNECTIONS} connections) of bare, median (range) of {rounds} paired rounds; added latency at {rate}/s p50 {:+} µs, p99 {:+} µs; one in flight p50 {:+} µs, p99 {:+} µs",
            row.name,
            ratios(&row.multiplexed, &bare.multiplexed),
            ratios(&row.connections, &bare.connections),
            p(&row.fixed, 0.5) - p(&bare.fixed, 0.5),
            p(&row.fixed, 0.99) - p(&bare.fixed, 0.99),
            p(&row.serial, 0.5) - p(&bare.serial, 0.5),
            p(&row.serial, 0.99) - p(&bare.serial, 0.99),
        );
    }
    Ok(())
}
