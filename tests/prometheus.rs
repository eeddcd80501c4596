//! The dashboards against a real Prometheus server (Debian package `prometheus`,
//! `scripts/prereqs prometheus`): it scrapes a running `waybill serve` under traffic, and every
//! PromQL query of every panel the chart ships must answer with data.
//!
//! Panels of events this traffic does not cause (retries, sheds, breaker trips, dead letters)
//! answer 0 through `or vector(0)` (or `or (calls * 0)` for ratios), since a counter appears
//! only once it first counts; a misspelt metric would hide behind that, so every metric name
//! the dashboards use must also be one docs/metrics.md lists, which tests/metrics.rs holds to
//! what a scrape exports.

// A failed unwrap is a failed test, which is what we want here.
#![allow(clippy::unwrap_used)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use tonic::Request;
use waybill_api::{
    commands::v1::{self as commands, command_service_client::CommandServiceClient},
    orders::v1::{self as pb, orders_service_client::OrdersServiceClient},
};
use waybill_test_support::{TestDb, Waybill, eventually, http_get};

/// The namespace label Prometheus gives the target, as Kubernetes service discovery would.
const NAMESPACE: &str = "waybill-test";

/// A Prometheus server scraping one target every second, stopped when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Self {
        let dir = std::env::temp_dir().join(format!("waybill-prometheus-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: waybill\n    static_configs:\n\
                 \x20     - targets: ['{target}']\n        labels:\n          namespace: {NAMESPACE}\n"
            ),
        )
        .unwrap();
        let addr: SocketAddr = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let bin = std::env::var_os("WAYBILL_PROMETHEUS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/bin/prometheus"));
        assert!(
            bin.is_file(),
            "prometheus is missing: install it with scripts/prereqs prometheus (Debian package prometheus)"
        );
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Self { child, addr, dir }
    }

    /// Waits until Prometheus listens and says it is ready: on a loaded machine its start
    /// (the TSDB's) can take seconds, and a query before it would find the port closed. A
    /// Prometheus that exits first (its port, picked free, taken meanwhile) fails the test
    /// with its log.
    async fn ready(&mut self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log =
                    std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default();
                panic!("prometheus exited ({status}) before it was ready:\n{log}");
            }
            let listening = tokio::net::TcpStream::connect(self.addr).await.is_ok();
            if listening && http_get(self.addr, "/-/ready").await.0 == 200 {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "prometheus not ready within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The result vector of an instant query, or the error Prometheus gave.
    async fn query(&self, promql: &str) -> Result<Vec<serde_json::Value>, String> {
        let (status, body) = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", percent_encode(promql)),
        )
        .await;
        let answer: serde_json::Value = serde_json::from_str(&body)
            .map_err(|error| format!("HTTP {status}, not JSON ({error}): {body:.300}"))?;
        if answer["status"] != "success" {
            return Err(format!("HTTP {status}: {}", answer["error"]));
        }
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// Every panel query of the chart's dashboards: (dashboard file, panel title, PromQL), with
/// Grafana's variables filled in as a user looking at this test's namespace would have them.
fn dashboard_queries() -> Vec<(String, String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("helm/waybill/dashboards");
    let mut queries = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();
    for file in files {
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        for panel in dashboard["panels"].as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?").to_owned();
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    let promql = expr
                        .replace("$namespace", NAMESPACE)
                        .replace("$service", "waybill.orders.v1.OrdersService")
                        .replace("$__rate_interval", "1m");
                    queries.push((name.clone(), title.clone(), promql));
                }
            }
        }
    }
    assert!(queries.len() > 30, "found only {} queries", queries.len());
    queries
}

#[tokio::test]
async fn prometheus_answers_every_dashboard_query_with_data() {
    let db = TestDb::new().await;
    let server = Waybill::serve(&db, &["--health-interval", "200ms"]);
    let channel = server.channel().await;
    let mut prometheus = Prometheus::start(server.admin_addr().await);
    prometheus.ready().await;

    // Traffic the panels chart: orders confirmed and cancelled (events through the bus to
    // notifications), and a command run by a worker.
    waybill_test_support::stock(&channel, "SKU-1", 3).await;
    waybill_test_support::courier(&channel, "bike-1", "north", 10).await;
    let mut orders = OrdersServiceClient::new(channel.clone());
    for quantity in [1, 1, 5] {
        let mut request = Request::new(pb::PlaceOrderRequest {
            customer_id: "c-1".into(),
            items: vec![pb::LineItem {
                sku: "SKU-1".into(),
                quantity,
            }],
            delivery_address: "1 Main St".into(),
            zone: "north".into(),
        });
        request.set_timeout(Duration::from_secs(20));
        orders.place_order(request).await.unwrap();
    }
    CommandServiceClient::new(channel)
        .submit_command(commands::SubmitCommandRequest {
            user_id: "ops".into(),
            payload: Some(commands::CommandPayload {
                kind: Some(commands::command_payload::Kind::SendNotification(
                    commands::SendNotification {
                        customer_id: "c-1".into(),
                        message: "hello".into(),
                    },
                )),
            }),
            idempotency_key: "prometheus".into(),
        })
        .await
        .unwrap();

    // Scraped, with the traffic's counters in at least two samples (rates need two).
    eventually("Prometheus scrapes the traffic", || async {
        let result = prometheus
            .query(&format!(
                "count_over_time(waybill_command_attempts_total{{namespace=\"{NAMESPACE}\",outcome=\"succeeded\"}}[1m]) >= 2"
            ))
            .await
            .ok()?;
        (!result.is_empty()).then_some(())
    })
    .await;
    eventually("the events reach notifications in the scrapes", || async {
        let result = prometheus
            .query(&format!(
                "count_over_time(waybill_consumer_events_total{{namespace=\"{NAMESPACE}\",outcome=\"handled\"}}[1m]) >= 2"
            ))
            .await
            .ok()?;
        (!result.is_empty()).then_some(())
    })
    .await;

    let mut empty = Vec::new();
    for (dashboard, panel, promql) in dashboard_queries() {
        match prometheus.query(&promql).await {
            Ok(result) if !result.is_empty() => {}
            Ok(_) => empty.push(format!("{dashboard} / {panel}: {promql}")),
            Err(error) => panic!("{dashboard} / {panel}: {promql}\n  refused: {error}"),
        }
    }
    assert!(
        empty.is_empty(),
        "{} dashboard queries answered with no data:\n{}",
        empty.len(),
        empty.join("\n")
    );
}

#[test]
fn every_metric_a_dashboard_uses_is_documented() {
    let documented =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/metrics.md"))
            .unwrap();
    let mut unknown = Vec::new();
    for (dashboard, panel, promql) in dashboard_queries() {
        for name in metric_names(&promql) {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(&name);
            if !documented.contains(&format!("`{family}`")) {
                unknown.push(format!("{dashboard} / {panel}: {name}"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "not in docs/metrics.md:\n{}",
        unknown.join("\n")
    );
}

/// The `mesh_…` and `waybill_…` identifiers in a query.
fn metric_names(promql: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = promql;
    while let Some(start) = ["mesh_", "waybill_"]
        .iter()
        .filter_map(|prefix| rest.find(prefix))
        .min()
    {
        let preceded_by_word = rest[..start]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if !preceded_by_word {
            names.push(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}
