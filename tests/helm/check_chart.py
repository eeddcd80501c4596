"""Offline checks of the Helm chart in helm/waybill (run by scripts/helm-check).

Lints the chart, renders it for every values file in tests/helm/values/, validates each
rendered object with kubernetes-validate --strict for the oldest and newest supported
Kubernetes, checks the Prometheus Operator objects against the part of their CRD schema the
chart uses, and asserts the chart's production properties. Needs helm-python-sdk and
kubernetes-validate (scripts/helm-check installs them); no helm binary, no cluster.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "waybill"
VALUES = Path(__file__).resolve().parent / "values"
INVALID = VALUES / "invalid"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion: lifecycle.preStop.sleep is
# on by default from 1.30) and the newest kubernetes-validate ships schemas for.
KUBE_VERSIONS = ("1.30.0", "1.37.0")
RELEASE = "waybill"
NAMESPACE = "shop"
# The scenarios: every values file directly in tests/helm/values/ (not invalid/).
SCENARIOS = sorted(p.stem for p in VALUES.glob("*.yaml"))
# The delivery platform the chart deploys by default (`waybill serve --services <name>` each)
# with each one's gRPC service (the readiness probe's name), and who calls whom: the orders saga
# calls inventory and delivery; the command pipeline's handlers call orders, inventory and
# notifications. Caller -> {callee: the variable that tells the caller where it is}.
PLATFORM = ("commands", "delivery", "inventory", "notifications", "orders")
GRPC_SERVICES = {
    "commands": "waybill.commands.v1.CommandService",
    "delivery": "waybill.delivery.v1.DeliveryService",
    "inventory": "waybill.inventory.v1.InventoryService",
    "notifications": "waybill.notifications.v1.NotificationsService",
    "orders": "waybill.orders.v1.OrdersService",
}
CALLS = {
    "orders": {"inventory": "WAYBILL_INVENTORY_TARGET", "delivery": "WAYBILL_DELIVERY_TARGET"},
    "commands": {"orders": "WAYBILL_ORDERS_TARGET", "inventory": "WAYBILL_INVENTORY_TARGET",
                 "notifications": "WAYBILL_NOTIFICATIONS_TARGET"},
}
# The settings groups the chart exposes as values, per service: values key -> variable.
SETTINGS = {
    ("orders", "saga"): {"lease": "WAYBILL_SAGA_LEASE", "stepTimeout": "WAYBILL_SAGA_STEP_TIMEOUT",
                         "maxAttempts": "WAYBILL_SAGA_MAX_ATTEMPTS", "poll": "WAYBILL_SAGA_POLL",
                         "maxPlacing": "WAYBILL_SAGA_MAX_PLACING"},
    ("inventory", "reservations"): {"ttl": "WAYBILL_RESERVATION_TTL", "sweep": "WAYBILL_RESERVATION_SWEEP"},
    ("inventory", "catalogCache"): {"ttl": "WAYBILL_CATALOG_CACHE_TTL"},
    ("commands", "pipeline"): {"shards": "WAYBILL_COMMAND_SHARDS", "workers": "WAYBILL_COMMAND_WORKERS",
                               "concurrency": "WAYBILL_COMMAND_CONCURRENCY", "lease": "WAYBILL_COMMAND_LEASE",
                               "maxAttempts": "WAYBILL_COMMAND_MAX_ATTEMPTS",
                               "retention": "WAYBILL_COMMAND_RETENTION", "queue": "WAYBILL_COMMAND_QUEUE"},
}
REGISTRY = ROOT / "cli" / "src" / "registry.rs"
CRD_GROUP = "monitoring.coreos.com/"
WAYBILL_UID = 10001
POSTGRES_UID = 999  # the postgres image's own user (see templates/_helpers.tpl)


def load_values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def render(values: dict[str, Any], release: str = RELEASE) -> list[dict[str, Any]]:
    """Renders the chart and returns its objects (NOTES.txt left out), each with `_template`."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=release, namespace=NAMESPACE, is_install=True)
    objects = []
    for template, text in sorted(manifests.items()):
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["_template"] = template
                objects.append(doc)
    return objects


def notes(values: dict[str, Any]) -> str:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return next(text for name, text in manifests.items() if name.endswith("NOTES.txt"))


def strip(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != "_template"}


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels + matchExpressions, or a plain map) matches."""
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        present = expr["key"] in labels
        value = labels.get(expr["key"])
        op = expr["operator"]
        if op == "In" and value not in expr["values"]:
            return False
        if op == "NotIn" and value in expr["values"]:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


def pod_specs(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(kind/name, pod spec) of every workload."""
    out = []
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet", "Job"):
            out.append((f'{o["kind"]}/{o["metadata"]["name"]}', o["spec"]["template"]["spec"]))
    return out


DOCS_METRICS = ROOT / "docs" / "metrics.md"
# PromQL's functions, aggregations and keywords: words in an expression that are not metrics.
PROMQL_WORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "offset", "inf", "nan",
}


def documented_metrics() -> set[str]:
    """The metric names in docs/metrics.md's tables, with the series a histogram exports."""
    names = set()
    for line in DOCS_METRICS.read_text().splitlines():
        match = re.match(r"^\| `([a-z_:][a-z0-9_:]*)` \| (\w+) \|", line)
        if not match:
            continue
        name, kind = match.groups()
        names.add(name)
        if kind == "histogram":
            names.update(f"{name}_{suffix}" for suffix in ("bucket", "sum", "count"))
    assert len(names) > 20, f"{DOCS_METRICS} lists {names}"
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or Grafana variable query) reads."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"label_values\(\s*([^,)]*)(?:,[^)]*)?\)", r" \1 ", text)  # Grafana: the metric only
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        if text[match.end():].lstrip().startswith("("):
            continue  # a function or aggregation
        if word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def container_env(deployment: dict[str, Any]) -> dict[str, Any]:
    return env_of(deployment["spec"]["template"]["spec"]["containers"][0])


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def grpc_peers(spec: dict[str, Any], direction: str, port: int = 50051) -> list[dict[str, Any]]:
    """The peers a NetworkPolicy admits on `port` ("ingress": from, "egress": to)."""
    side = "from" if direction == "ingress" else "to"
    return [peer for rule in spec.get(direction) or [] if any(p.get("port") == port for p in rule.get("ports", []))
            for peer in rule.get(side, [])]


def admits_pods(peers: list[dict[str, Any]], labels: dict[str, str]) -> bool:
    """Whether a same-namespace podSelector peer selects pods with these labels."""
    return any("podSelector" in p and "namespaceSelector" not in p and selects(p["podSelector"], labels) for p in peers)


def event_bus(values: dict[str, Any]) -> str:
    """The bus the chart should pick for these values (eventBus.type, else nats when configured)."""
    bus = values.get("eventBus", {})
    nats = values.get("nats", {}).get("enabled", False) or bool(bus.get("nats", {}).get("url"))
    return bus.get("type") or ("nats" if nats else "postgres")


def rust_env_defaults() -> dict[str, str]:
    """WAYBILL_* variable -> the binary's default, read from the clap attributes in the source."""
    defaults = {}
    pattern = re.compile(r'env = "(WAYBILL_[A-Z_]+)",\s*(?:value_enum,\s*)?default_value(?:_t)? = "?([^",)]+)"?')
    for path in [p for top in ("cli", "services", "mesh-layer") for p in (ROOT / top).glob("**/src/**/*.rs")]:
        for name, value in pattern.findall(path.read_text()):
            defaults[name] = value
    return defaults


def env_text(value: Any) -> str:
    """A values scalar as the chart writes it into an env var (booleans lower-case)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def binary_default_services() -> set[str]:
    """What `waybill migrate` (and serve) take when WAYBILL_SERVICES is unset: the names of
    ServiceName::all() in cli/src/registry.rs."""
    text = REGISTRY.read_text()
    body = re.search(r"pub fn all\(\) -> Vec<Self> \{\s*vec!\[(.*?)\]", text, re.S)
    assert body, f"ServiceName::all() not found in {REGISTRY}"
    names = dict(re.findall(r'ServiceName::(\w+) => f\.write_str\("([a-z0-9-]+)"\)', text))
    variants = re.findall(r"ServiceName::(\w+)", body.group(1))
    assert variants and all(v in names for v in variants), (variants, names)
    return {names[v] for v in variants}


def seconds(duration: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(ms|s|m|h)?", duration)
    assert match, f"not a duration: {duration!r}"
    scale = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600}[match.group(2)]
    return float(match.group(1)) * scale


# ---------------------------------------------------------------------------------------------
# Rendered once for every test (module-level cache).
RENDERED: dict[str, list[dict[str, Any]]] = {}
SCENARIO_VALUES: dict[str, dict[str, Any]] = {}


def setUpModule() -> None:  # noqa: N802 (unittest's name)
    for scenario in SCENARIOS:
        SCENARIO_VALUES[scenario] = load_values(VALUES / f"{scenario}.yaml")
        RENDERED[scenario] = render(SCENARIO_VALUES[scenario])


def services_of(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The waybill services rendered: component name -> Deployment."""
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in of_kind(objects, "Deployment")}


class Lint(unittest.TestCase):
    def test_strict_lint_is_clean_for_every_scenario_and_kubernetes_version(self) -> None:
        for scenario in SCENARIOS:
            for version in KUBE_VERSIONS:
                with self.subTest(scenario=scenario, kube=version):
                    report = helm.lint(CHART, load_values(VALUES / f"{scenario}.yaml"), strict=True,
                                       namespace=NAMESPACE, kube_version=f"v{version}")
                    problems = report["errors"] + [
                        f'{m["path"]}: {m["error"]}' for m in report["messages"] if m["severity"] >= 2
                    ]
                    self.assertEqual(problems, [], f"helm lint --strict ({scenario}, {version})")

    def test_lint_without_a_database_names_the_missing_value(self) -> None:
        # The chart's defaults alone have neither the bundled Postgres nor a Secret: refused.
        report = helm.lint(CHART, None, strict=True, kube_version=f"v{KUBE_VERSIONS[0]}")
        self.assertTrue(any("/database/existingSecret" in e for e in report["errors"]), report["errors"])


class KubernetesValidate(unittest.TestCase):
    """kubernetes-validate --strict on every rendered object, oldest and newest version."""

    def test_every_object_is_valid_for_the_oldest_and_newest_kubernetes(self) -> None:
        workdir = Path(tempfile.mkdtemp(prefix="helm-check-"))
        try:
            files = []
            skipped = []
            for scenario in SCENARIOS:
                for i, obj in enumerate(RENDERED[scenario]):
                    if obj["apiVersion"].startswith(CRD_GROUP):
                        skipped.append(f'{scenario}: {obj["kind"]}/{obj["metadata"]["name"]}')
                        continue
                    path = workdir / f'{scenario}-{i:03d}-{obj["kind"].lower()}.yaml'
                    path.write_text(yaml.safe_dump(strip(obj)))
                    files.append(path)
            if skipped:
                print(f"\n  kubernetes-validate: skipped {len(skipped)} monitoring.coreos.com objects "
                      "(CRDs, not in its schemas; checked by MonitoringObjects instead)", flush=True)
            validator = Path(sys.executable).with_name("kubernetes-validate")

            def run(version: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run([str(validator), "--strict", "-k", version, *map(str, files)],
                                      capture_output=True, text=True, check=False)

            # One process per version, in parallel (each loads its own schema set).
            with concurrent.futures.ThreadPoolExecutor(len(KUBE_VERSIONS)) as pool:
                results = dict(zip(KUBE_VERSIONS, pool.map(run, KUBE_VERSIONS)))
            for version, result in results.items():
                with self.subTest(kube=version):
                    lines = result.stdout.splitlines()
                    passed = [line for line in lines if line.startswith("INFO") and " passed " in line]
                    problems = [line for line in lines if not line.startswith("INFO")]
                    self.assertEqual(problems, [], f"kubernetes-validate {version}:\n" + result.stderr)
                    self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
                    # Every object was checked against a schema (none silently unknown).
                    self.assertEqual(len(passed), len(files), result.stdout)
            print(f"  kubernetes-validate --strict: {len(files)} objects x {', '.join(KUBE_VERSIONS)}",
                  flush=True)
        finally:
            shutil.rmtree(workdir)


# The part of the prometheus-operator CRD schemas (monitoring.coreos.com/v1) that the chart uses,
# strict: an unknown or misspelt field is an error, as the API server's structural schema would
# prune or reject it.
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {"type": "object", "required": ["name"],
            "properties": {"name": {"type": "string"}, "labels": LABELS, "annotations": LABELS}}
SERVICE_MONITOR = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": METADATA,
        "spec": {"type": "object", "required": ["selector", "endpoints"], "additionalProperties": False, "properties": {
            "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
            "selector": {"type": "object", "additionalProperties": False, "properties": {
                "matchLabels": LABELS,
                "matchExpressions": {"type": "array", "items": {
                    "type": "object", "required": ["key", "operator"], "additionalProperties": False,
                    "properties": {"key": {"type": "string"},
                                   "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                                   "values": {"type": "array", "items": {"type": "string"}}}}}}},
            "endpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "properties": {
                    "port": {"type": "string"}, "path": {"type": "string"},
                    "interval": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                    "scheme": {"enum": ["http", "https"]}}}}}},
    },
}
PROMETHEUS_RULE = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
        "metadata": METADATA,
        "spec": {"type": "object", "required": ["groups"], "additionalProperties": False, "properties": {
            "groups": {"type": "array", "items": {
                "type": "object", "required": ["name", "rules"], "additionalProperties": False, "properties": {
                    "name": {"type": "string", "minLength": 1}, "interval": {"type": "string"},
                    "rules": {"type": "array", "items": {
                        "type": "object", "required": ["expr"], "additionalProperties": False,
                        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                        "properties": {
                            "alert": {"type": "string"}, "record": {"type": "string"},
                            "expr": {"type": "string", "minLength": 1}, "for": {"type": "string"},
                            "labels": LABELS, "annotations": LABELS}}}}}}}},
    },
}


class MonitoringObjects(unittest.TestCase):
    def test_prometheus_operator_objects_match_their_crd_schema(self) -> None:
        seen = set()
        for scenario in SCENARIOS:
            for obj in RENDERED[scenario]:
                if not obj["apiVersion"].startswith(CRD_GROUP):
                    continue
                schema = {"ServiceMonitor": SERVICE_MONITOR, "PrometheusRule": PROMETHEUS_RULE}.get(obj["kind"])
                self.assertIsNotNone(schema, f'unexpected {obj["kind"]}')
                with self.subTest(scenario=scenario, kind=obj["kind"]):
                    jsonschema.validate(strip(obj), schema)
                seen.add(obj["kind"])
        self.assertEqual(seen, {"ServiceMonitor", "PrometheusRule"}, "production.yaml enables both")

    def test_service_monitor_scrapes_the_metrics_port_of_each_service_once(self) -> None:
        objects = RENDERED["production"]
        monitor = of_kind(objects, "ServiceMonitor")[0]
        ports = {e["port"] for e in monitor["spec"]["endpoints"]}
        scraped = [s for s in of_kind(objects, "Service") if selects(monitor["spec"]["selector"], s["metadata"]["labels"])
                   and {p["name"] for p in s["spec"]["ports"]} & ports]
        self.assertEqual(sorted(s["metadata"]["labels"]["app.kubernetes.io/component"] for s in scraped),
                         sorted(services_of(objects)))
        for service in scraped:
            self.assertNotEqual(service["spec"].get("clusterIP"), "None", "headless Services carry no metrics port")

    def test_rules_file_has_the_alerts_the_issue_asks_for(self) -> None:
        rules = yaml.safe_load((CHART / "rules" / "waybill.rules.yaml").read_text())
        exprs = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
        self.assertIn("mesh_server_requests_total", exprs["WaybillHighErrorRate"])
        self.assertIn("mesh_server_request_duration_seconds_bucket", exprs["WaybillHighLatency"])
        self.assertIn("mesh_breaker_open", exprs["WaybillBreakerOpen"])
        self.assertIn("mesh_server_shed_total", exprs["WaybillLoadShedding"])
        self.assertIn("waybill_db_replica_lag_seconds", exprs["WaybillReplicaLag"])
        self.assertIn("waybill_outbox_lag_seconds", exprs["WaybillOutboxLag"])
        self.assertIn("waybill_consumer_dead_letters_total", exprs["WaybillDeadLetters"])
        self.assertIn("waybill_command_queue_oldest_age_seconds", exprs["WaybillCommandQueueAge"])
        self.assertIn('waybill_command_attempts_total{outcome="dead"}', exprs["WaybillCommandsDead"])
        rule = of_kind(RENDERED["production"], "PrometheusRule")[0]
        self.assertEqual(rule["spec"], rules, "the PrometheusRule carries the rules file verbatim")

    def test_promtool_checks_and_unit_tests_the_rules(self) -> None:
        promtool = shutil.which("promtool") or "/usr/bin/promtool"
        self.assertTrue(os.path.exists(promtool),
                        "promtool is missing: install it with scripts/prereqs prometheus (Debian package prometheus)")
        for args in (["check", "rules", str(CHART / "rules" / "waybill.rules.yaml")],
                     ["test", "rules", str(Path(__file__).resolve().parent / "rules.test.yaml")]):
            with self.subTest(command=" ".join(args[:2])):
                done = subprocess.run([promtool, *args], capture_output=True, text=True, check=False)
                self.assertEqual(done.returncode, 0, done.stdout + done.stderr)

    def test_dashboards_and_rules_use_only_exported_metrics(self) -> None:
        # docs/metrics.md is the list of what /metrics exports: tests/metrics.rs fails when a
        # scrape and that list disagree, so checking against the list checks against a scrape.
        exported = documented_metrics()
        used: dict[str, set[str]] = {}
        rules = yaml.safe_load((CHART / "rules" / "waybill.rules.yaml").read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                used[f'rules: {rule["alert"]}'] = metric_names(rule["expr"])
        for path in sorted((CHART / "dashboards").glob("*.json")):
            dashboard = json.loads(path.read_text())
            for panel in dashboard["panels"]:
                for target in panel.get("targets", []):
                    used[f'{path.name}: {panel["title"]}'] = metric_names(target["expr"])
            for variable in dashboard["templating"]["list"]:
                query = variable.get("query")
                if isinstance(query, dict):
                    used[f'{path.name}: ${variable["name"]}'] = metric_names(query["query"])
        self.assertGreater(len(used), 30)
        for where, names in used.items():
            with self.subTest(where=where):
                self.assertTrue(names, "no metric found: is the expression parsed?")
                self.assertLessEqual(names, exported, f"not exported: {sorted(names - exported)}")

    def test_command_pipeline_dashboard_charts_every_pipeline_metric(self) -> None:
        dashboard = json.loads((CHART / "dashboards" / "waybill-commands.json").read_text())
        exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
        used = set().union(*map(metric_names, exprs))
        pipeline = {m for m in documented_metrics() if m.startswith("waybill_command_")
                    and not m.endswith(("_bucket", "_sum", "_count"))}
        self.assertGreaterEqual(len(pipeline), 6, pipeline)
        for metric in sorted(pipeline):
            with self.subTest(metric=metric):
                self.assertTrue({metric, f"{metric}_bucket", f"{metric}_sum", f"{metric}_count"} & used,
                                "not on the dashboard")
        # Its RED panels read the command service's own calls.
        red = [e for e in exprs if "mesh_server_" in e]
        self.assertTrue(red)
        for expr in red:
            self.assertIn('service="waybill.commands.v1.CommandService"', expr)

    def test_dashboards_are_labelled_configmaps_of_valid_grafana_json(self) -> None:
        files = sorted((CHART / "dashboards").glob("*.json"))
        self.assertTrue(files)
        maps = [c for c in of_kind(RENDERED["production"], "ConfigMap")
                if c["metadata"]["labels"].get("grafana_dashboard") == "1"]
        self.assertEqual(len(maps), len(files))
        for path in files:
            dashboard = json.loads(path.read_text())
            exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
            self.assertTrue(dashboard["title"] and dashboard["uid"] and exprs, path.name)
            self.assertTrue(any(path.name in c["data"] and json.loads(c["data"][path.name]) == dashboard
                                for c in maps), path.name)
        for scenario in ("default", "bundled-database"):
            kinds = {o["apiVersion"] for o in RENDERED[scenario]}
            self.assertFalse(any(k.startswith(CRD_GROUP) for k in kinds), "monitoring objects are off by default")


class Workloads(unittest.TestCase):
    def test_every_deployment_has_grpc_probes_resources_prestop_and_grace(self) -> None:
        for scenario in SCENARIOS:
            objects = RENDERED[scenario]
            self.assertTrue(services_of(objects), scenario)
            for name, deployment in services_of(objects).items():
                with self.subTest(scenario=scenario, service=name):
                    pod = deployment["spec"]["template"]["spec"]
                    (container,) = pod["containers"]
                    env = env_of(container)
                    for probe in ("livenessProbe", "readinessProbe"):
                        self.assertEqual(container[probe]["grpc"]["port"], 50051, probe)
                    self.assertEqual(container["livenessProbe"]["grpc"].get("service"), "liveness")
                    grpc_service = container["readinessProbe"]["grpc"]["service"]
                    self.assertRegex(grpc_service, r"^waybill\.[a-z]+\.v1\.[A-Za-z]+Service$")
                    for part in ("requests", "limits"):
                        self.assertTrue({"cpu", "memory"} <= set(container["resources"][part]), part)
                    sleep = container["lifecycle"]["preStop"]["sleep"]["seconds"]
                    self.assertGreater(sleep, 0)
                    grace = seconds(env["WAYBILL_SHUTDOWN_GRACE"])
                    self.assertGreater(pod["terminationGracePeriodSeconds"], grace + sleep)
                    self.assertEqual(env["WAYBILL_LISTEN"], "0.0.0.0:50051")
                    # The admin endpoint is on the pod network only when Prometheus may scrape it,
                    # on the port the container and the Service declare.
                    metrics_ports = [p["containerPort"] for p in container["ports"] if p["name"] == "metrics"]
                    if metrics_ports:
                        self.assertEqual(env["WAYBILL_ADMIN_LISTEN"], f"0.0.0.0:{metrics_ports[0]}")
                    else:
                        self.assertNotIn("WAYBILL_ADMIN_LISTEN", env)
                    self.assertEqual(env["WAYBILL_SERVICES"], name)
                    self.assertEqual(env["WAYBILL_LOG_FORMAT"], "json")
                    self.assertEqual(env["OTEL_SERVICE_NAME"], f"waybill-{name}")
                    self.assertEqual(env["OTEL_TRACES_SAMPLER"], "parentbased_traceidratio")
                    self.assertIn("OTEL_TRACES_SAMPLER_ARG", env)
                    self.assertEqual(env["WAYBILL_PRIMARY_URL"]["secretKeyRef"]["key"], "primary-url")
                    self.assertEqual(env["WAYBILL_REPLICA_URLS"]["secretKeyRef"]["key"], "replica-urls")
                    self.assertEqual(container["args"], ["serve"])
                    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                    self.assertIn(os.path.dirname(env["WAYBILL_MESH_POLICY"]), mounts)
                    self.assertEqual(mounts["/tmp"], "tmp")
                    spread = {c["topologyKey"]: c["whenUnsatisfiable"] for c in pod["topologySpreadConstraints"]}
                    self.assertEqual(spread, {"topology.kubernetes.io/zone": "ScheduleAnyway",
                                              "kubernetes.io/hostname": "ScheduleAnyway"})

    def test_every_pod_and_container_is_locked_down(self) -> None:
        for scenario in SCENARIOS:
            for workload, pod in pod_specs(RENDERED[scenario]):
                postgres = "postgres" in workload
                uid = POSTGRES_UID if postgres else WAYBILL_UID
                with self.subTest(scenario=scenario, workload=workload):
                    psc = pod["securityContext"]
                    self.assertIs(psc["runAsNonRoot"], True)
                    self.assertEqual(psc["runAsUser"], uid)
                    self.assertEqual(psc["seccompProfile"]["type"], "RuntimeDefault")
                    self.assertIs(pod["automountServiceAccountToken"], False)
                    for container in pod.get("initContainers", []) + pod["containers"]:
                        csc = container["securityContext"]
                        where = f'{workload} container {container["name"]}'
                        self.assertIs(csc["runAsNonRoot"], True, where)
                        self.assertEqual(csc.get("runAsUser", psc["runAsUser"]), uid, where)
                        self.assertIs(csc["readOnlyRootFilesystem"], True, where)
                        self.assertIs(csc["allowPrivilegeEscalation"], False, where)
                        self.assertEqual(csc["capabilities"]["drop"], ["ALL"], where)
                        self.assertEqual(csc["seccompProfile"]["type"], "RuntimeDefault", where)
                        for part in ("requests", "limits"):
                            self.assertTrue({"cpu", "memory"} <= set(container["resources"][part]), where)

    def test_mesh_policy_configmap_is_the_values_json(self) -> None:
        objects = RENDERED["production"]
        policy = SCENARIO_VALUES["production"]["services"]["orders"]["meshPolicy"]
        config = next(c for c in of_kind(objects, "ConfigMap") if c["metadata"]["name"] == "waybill-orders")
        self.assertEqual(json.loads(config["data"]["mesh-policy.json"]), policy)
        deployment = services_of(objects)["orders"]
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        self.assertEqual(volumes["mesh-policy"]["configMap"]["name"], "waybill-orders")
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        self.assertIn("checksum/mesh-policy", annotations)

    def test_event_bus_is_nats_exactly_when_nats_is_configured(self) -> None:
        for scenario in SCENARIOS:
            values = SCENARIO_VALUES[scenario]
            bus = event_bus(values)
            for name, deployment in services_of(RENDERED[scenario]).items():
                with self.subTest(scenario=scenario, service=name):
                    env = container_env(deployment)
                    self.assertEqual(env["WAYBILL_EVENT_BUS"], bus)
                    self.assertEqual("WAYBILL_NATS_URL" in env, bus == "nats")
            bundled = values.get("nats", {}).get("enabled", False)
            statefulsets = [s["metadata"]["name"] for s in of_kind(RENDERED[scenario], "StatefulSet")]
            self.assertEqual("waybill-nats" in statefulsets, bundled, scenario)
        nats = next(s for s in of_kind(RENDERED["nats-enabled"], "StatefulSet") if s["metadata"]["name"] == "waybill-nats")
        container = nats["spec"]["template"]["spec"]["containers"][0]
        self.assertEqual(container["image"], "nats:2.10-alpine")
        self.assertIn("--jetstream", container["args"])
        # The default install needs nothing but Postgres.
        self.assertEqual(event_bus(SCENARIO_VALUES["default"]), "postgres")

    def test_bundled_nats_url_is_the_bundled_nats_service(self) -> None:
        objects = RENDERED["nats-enabled"]
        nats = next(s for s in of_kind(objects, "StatefulSet") if s["metadata"]["name"] == "waybill-nats")
        client_port = next(p["containerPort"] for p in nats["spec"]["template"]["spec"]["containers"][0]["ports"]
                           if p["name"] == "client")
        urls = {container_env(d)["WAYBILL_NATS_URL"] for d in services_of(objects).values()}
        self.assertEqual(len(urls), 1, urls)
        match = re.fullmatch(r"nats://([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:([0-9]+)", urls.pop())
        self.assertIsNotNone(match, "nats://<service>.<namespace>.svc.cluster.local:<port>")
        name, namespace, port = match.group(1), match.group(2), int(match.group(3))
        self.assertEqual(namespace, NAMESPACE)
        (service,) = [s for s in of_kind(objects, "Service") if s["metadata"]["name"] == name]
        self.assertNotEqual(service["spec"].get("clusterIP"), "None", "the ClusterIP Service, not the governing one")
        self.assertTrue(selects(service["spec"]["selector"], pod_labels(nats)), "the Service selects the NATS pod")
        (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == port]
        self.assertIn(service_port["targetPort"], ("client", client_port))
        # Every service may reach that pod on that port.
        for policy in of_kind(objects, "NetworkPolicy"):
            self.assertTrue(admits_pods(grpc_peers(policy["spec"], "egress", client_port), pod_labels(nats)),
                            f'{policy["metadata"]["name"]} cannot reach NATS')

    def test_external_nats_is_used_as_given_and_admitted_by_port(self) -> None:
        objects = RENDERED["production"]
        bus = SCENARIO_VALUES["production"]["eventBus"]["nats"]
        ports = {int(m) for m in re.findall(r":([0-9]+)(?:,|$)", bus["url"])}
        self.assertEqual(ports, {4222, 4223})
        self.assertFalse([s for s in of_kind(objects, "StatefulSet") if s["metadata"]["name"].endswith("-nats")])
        for name, deployment in services_of(objects).items():
            self.assertEqual(container_env(deployment)["WAYBILL_NATS_URL"], bus["url"], name)
        for policy in of_kind(objects, "NetworkPolicy"):
            for port in ports:
                self.assertEqual(grpc_peers(policy["spec"], "egress", port), bus["egressTo"],
                                 f'{policy["metadata"]["name"]}: NATS port {port}')

    def test_default_values_deploy_the_platform_services(self) -> None:
        objects = RENDERED["default"]
        deployments = services_of(objects)
        self.assertEqual(sorted(deployments), list(PLATFORM))
        for name, deployment in deployments.items():
            env = container_env(deployment)
            self.assertEqual(env["WAYBILL_SERVICES"], name, "one service per Deployment")
            probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["service"]
            self.assertEqual(probe, GRPC_SERVICES[name])
        # The migration Job names no services, so `waybill migrate` takes the binary's full set
        # (mesh, bus and every service's schema): Hooks checks that set covers these.
        (job,) = of_kind(objects, "Job")
        self.assertNotIn("WAYBILL_SERVICES", env_of(job["spec"]["template"]["spec"]["containers"][0]))

    def test_targets_are_headless_services_of_the_release(self) -> None:
        for scenario in SCENARIOS:
            objects = RENDERED[scenario]
            deployments = services_of(objects)
            for caller, callee, variable in ((c, d, v) for c, calls in CALLS.items() for d, v in calls.items()):
                with self.subTest(scenario=scenario, caller=caller, callee=callee):
                    target = container_env(deployments[caller])[variable]
                    match = re.fullmatch(r"dns://([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:([0-9]+)", target)
                    self.assertIsNotNone(match, target)
                    name, namespace, port = match.group(1), match.group(2), int(match.group(3))
                    self.assertEqual(namespace, NAMESPACE)
                    (service,) = [s for s in of_kind(objects, "Service") if s["metadata"]["name"] == name]
                    self.assertEqual(service["spec"]["clusterIP"], "None", "headless: every ready pod, balanced per call")
                    self.assertIs(service["spec"].get("publishNotReadyAddresses", False), False)
                    self.assertTrue(selects(service["spec"]["selector"], pod_labels(deployments[callee])))
                    self.assertFalse(selects(service["spec"]["selector"], pod_labels(deployments[caller])))
                    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == port]
                    self.assertEqual(service_port["targetPort"], "grpc")
            # Only orders and commands call anything, and only what they call has a target.
            for name, deployment in deployments.items():
                targets = sorted(k for k in container_env(deployment) if k.endswith("_TARGET"))
                self.assertEqual(targets, sorted(CALLS.get(name, {}).values()), f"{scenario}/{name}")

    def test_service_settings_reach_their_services(self) -> None:
        chart = yaml.safe_load((CHART / "values.yaml").read_text())
        for scenario in SCENARIOS:
            deployments = services_of(RENDERED[scenario])
            overrides = SCENARIO_VALUES[scenario].get("services", {})
            for (service, group), names in SETTINGS.items():
                env = container_env(deployments[service])
                expected = {**chart["services"][service][group], **overrides.get(service, {}).get(group, {})}
                self.assertEqual(set(expected), set(names), f"values.yaml: services.{service}.{group}")
                for key, variable in names.items():
                    self.assertEqual(env[variable], env_text(expected[key]), f"{scenario}/{service}: {variable}")
                for other, deployment in deployments.items():
                    if other != service:
                        self.assertFalse(set(names.values()) & set(container_env(deployment)), f"{scenario}/{other}")
            for name, deployment in deployments.items():
                self.assertEqual(container_env(deployment)["WAYBILL_OUTBOX_RELAY"], "true", f"{scenario}/{name}")
        # production.yaml overrides part of the saga and of the pipeline: the rest keeps the
        # chart's defaults.
        env = container_env(services_of(RENDERED["production"])["orders"])
        self.assertEqual((env["WAYBILL_SAGA_LEASE"], env["WAYBILL_SAGA_STEP_TIMEOUT"]), ("15s", "2s"))
        env = container_env(services_of(RENDERED["production"])["commands"])
        self.assertEqual((env["WAYBILL_COMMAND_CONCURRENCY"], env["WAYBILL_COMMAND_SHARDS"]), ("128", "16"))

    def test_command_workers_off_is_rendered_not_dropped(self) -> None:
        # false is "empty" to Helm's `with`: the template must still write it.
        values = {"database": {"existingSecret": "db"}, "services": {"commands": {"pipeline": {"workers": False}}}}
        env = container_env(services_of(render(values))["commands"])
        self.assertEqual(env["WAYBILL_COMMAND_WORKERS"], "false")
        self.assertEqual(env["WAYBILL_COMMAND_SHARDS"], "16", "the other pipeline settings stay")

    def test_notification_webhook_is_set_only_with_a_url_and_admitted(self) -> None:
        webhook_vars = {"WAYBILL_NOTIFY_WEBHOOK", "WAYBILL_NOTIFY_WEBHOOK_TIMEOUT"}
        # Without a URL the variables are absent (an empty WAYBILL_NOTIFY_WEBHOOK is refused at
        # startup) and no policy opens a port for it.
        for name, deployment in services_of(RENDERED["default"]).items():
            self.assertFalse(webhook_vars & set(container_env(deployment)), name)
        # production.yaml: a URL with a port and narrowed peers.
        objects = RENDERED["production"]
        webhook = SCENARIO_VALUES["production"]["services"]["notifications"]["webhook"]
        port = int(re.fullmatch(r"http://[^/:]+:([0-9]+)/.*", webhook["url"]).group(1))
        for name, deployment in services_of(objects).items():
            env = container_env(deployment)
            if name == "notifications":
                self.assertEqual(env["WAYBILL_NOTIFY_WEBHOOK"], webhook["url"])
                self.assertEqual(env["WAYBILL_NOTIFY_WEBHOOK_TIMEOUT"], "5s")
            else:
                self.assertFalse(webhook_vars & set(env), name)
        for policy in of_kind(objects, "NetworkPolicy"):
            peers = grpc_peers(policy["spec"], "egress", port)
            component = policy["metadata"]["labels"]["app.kubernetes.io/component"]
            self.assertEqual(peers, webhook["egressTo"] if component == "notifications" else [], component)
        # A URL without a port: port 80, to any address when no peers are given.
        values = {"database": {"existingSecret": "db"},
                  "services": {"notifications": {"webhook": {"url": "http://hooks.example.internal/notify"}}}}
        policy = next(n["spec"] for n in of_kind(render(values), "NetworkPolicy")
                      if n["metadata"]["name"] == "waybill-notifications")
        rules = [r for r in policy["egress"] if any(p.get("port") == 80 for p in r.get("ports", []))]
        self.assertEqual(rules, [{"ports": [{"port": 80, "protocol": "TCP"}]}])

    def test_chart_defaults_are_the_binarys_defaults(self) -> None:
        # The chart sets every variable explicitly; its defaults must not drift from the binary's.
        binary = rust_env_defaults()
        chart = yaml.safe_load((CHART / "values.yaml").read_text())
        defaults, services = chart["serviceDefaults"], chart["services"]
        expected = {
            "WAYBILL_SAGA_LEASE": services["orders"]["saga"]["lease"],
            "WAYBILL_SAGA_STEP_TIMEOUT": services["orders"]["saga"]["stepTimeout"],
            "WAYBILL_SAGA_MAX_ATTEMPTS": services["orders"]["saga"]["maxAttempts"],
            "WAYBILL_SAGA_POLL": services["orders"]["saga"]["poll"],
            "WAYBILL_SAGA_MAX_PLACING": services["orders"]["saga"]["maxPlacing"],
            "WAYBILL_RESERVATION_TTL": services["inventory"]["reservations"]["ttl"],
            "WAYBILL_RESERVATION_SWEEP": services["inventory"]["reservations"]["sweep"],
            "WAYBILL_CATALOG_CACHE_TTL": services["inventory"]["catalogCache"]["ttl"],
            "WAYBILL_NOTIFY_WEBHOOK_TIMEOUT": services["notifications"]["webhook"]["timeout"],
            **{variable: services["commands"]["pipeline"][key]
               for key, variable in SETTINGS[("commands", "pipeline")].items()},
            "WAYBILL_OUTBOX_RELAY": defaults["outboxRelay"],
            "WAYBILL_INBOX_RETENTION": chart["eventBus"]["inboxRetention"],
            "WAYBILL_DB_POOL_SIZE": defaults["dbPoolSize"],
            "WAYBILL_DB_TIMEOUT": defaults["dbTimeout"],
            "WAYBILL_HEALTH_INTERVAL": defaults["healthInterval"],
            "WAYBILL_SHUTDOWN_GRACE": f'{defaults["shutdownGraceSeconds"]}s',
        }
        for variable, value in expected.items():
            self.assertIn(variable, binary, f"{variable} is no longer a flag of the binary")
            self.assertEqual(str(value).lower(), binary[variable], variable)


class PerService(unittest.TestCase):
    def test_every_service_has_pdb_hpa_networkpolicy_configmap_and_both_services(self) -> None:
        for scenario in SCENARIOS:
            objects = RENDERED[scenario]
            for name, deployment in services_of(objects).items():
                labels = deployment["spec"]["template"]["metadata"]["labels"]
                with self.subTest(scenario=scenario, service=name):
                    pdbs = [p for p in of_kind(objects, "PodDisruptionBudget") if selects(p["spec"]["selector"], labels)]
                    self.assertEqual(len(pdbs), 1, "one PodDisruptionBudget")
                    self.assertEqual(len({"minAvailable", "maxUnavailable"} & set(pdbs[0]["spec"])), 1)
                    hpas = [h for h in of_kind(objects, "HorizontalPodAutoscaler")
                            if h["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                               "name": deployment["metadata"]["name"]}]
                    self.assertEqual(len(hpas), 1, "one HorizontalPodAutoscaler")
                    self.assertEqual(hpas[0]["apiVersion"], "autoscaling/v2")
                    self.assertEqual(hpas[0]["spec"]["metrics"][0]["resource"]["name"], "cpu")
                    self.assertNotIn("replicas", deployment["spec"], "the HPA owns the replica count")
                    policies = [n for n in of_kind(objects, "NetworkPolicy") if selects(n["spec"]["podSelector"], labels)]
                    self.assertEqual(len(policies), 1, "one NetworkPolicy")
                    self.assertEqual(sorted(policies[0]["spec"]["policyTypes"]), ["Egress", "Ingress"])
                    services = [s for s in of_kind(objects, "Service") if s["spec"].get("selector")
                                and selects(s["spec"]["selector"], labels)]
                    headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
                    self.assertEqual(len(headless), 1, "one headless Service")
                    self.assertEqual(len(services), 2, "a ClusterIP and a headless Service")
                    for service in services:
                        self.assertIn(50051, [p["port"] for p in service["spec"]["ports"]])
                    configmaps = [c for c in of_kind(objects, "ConfigMap") if c["metadata"]["name"] == deployment["metadata"]["name"]]
                    self.assertEqual(len(configmaps), 1, "one mesh-policy ConfigMap")
                    json.loads(configmaps[0]["data"]["mesh-policy.json"])

    def test_autoscaling_off_sets_replicas_and_renders_no_hpa(self) -> None:
        values = {"database": {"existingSecret": "db"}, "serviceDefaults": {"autoscaling": {"enabled": False}, "replicas": 3}}
        objects = render(values)
        self.assertEqual(services_of(objects)["orders"]["spec"]["replicas"], 3)
        self.assertEqual(of_kind(objects, "HorizontalPodAutoscaler"), [])

    def test_adding_a_service_is_a_values_change(self) -> None:
        values = {"database": {"existingSecret": "db"},
                  "services": {"billing": {"grpcService": "waybill.billing.v1.BillingService", "callers": ["orders"]}}}
        objects = render(values)
        self.assertEqual(sorted(services_of(objects)), sorted([*PLATFORM, "billing"]))
        kinds = {o["kind"] for o in objects if o["metadata"]["labels"].get("app.kubernetes.io/component") == "billing"}
        self.assertEqual(kinds, {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget",
                                 "HorizontalPodAutoscaler", "NetworkPolicy"})

    def test_network_policy_admits_only_declared_callers(self) -> None:
        objects = RENDERED["production"]
        policies = {n["metadata"]["labels"]["app.kubernetes.io/component"]: n["spec"] for n in of_kind(objects, "NetworkPolicy")}
        pods = {name: pod_labels(d) for name, d in services_of(objects).items()}
        clients = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}

        def callers(name: str) -> list[str]:
            peers = grpc_peers(policies[name], "ingress")
            return sorted(other for other, labels in pods.items() if admits_pods(peers, labels))

        def callees(name: str) -> list[str]:
            peers = grpc_peers(policies[name], "egress")
            return sorted(other for other, labels in pods.items() if admits_pods(peers, labels))

        def pods_of(component: str) -> dict[str, Any]:
            return {"podSelector": {"matchLabels": {
                "app.kubernetes.io/name": "waybill", "app.kubernetes.io/instance": "waybill",
                "app.kubernetes.io/component": component}}}

        # echo declares orders as its only caller and takes no outside clients.
        self.assertEqual(callers("echo"), ["orders"])
        self.assertEqual(grpc_peers(policies["echo"], "ingress"), [pods_of("orders")])
        # orders is the public API: clients from the configured namespaces, and the command
        # pipeline's workers (CancelOrder, ChangeDeliveryAddress).
        self.assertEqual(grpc_peers(policies["orders"], "ingress"), [pods_of("commands"), clients])
        # commands takes clients only: no service calls it.
        self.assertEqual(grpc_peers(policies["commands"], "ingress"), [clients])
        # The saga: orders may call inventory and delivery (services.orders.calls), and echo (its
        # declared caller). The pipeline: commands may call orders, inventory and notifications
        # (services.commands.calls). Each callee admits exactly those callers.
        self.assertEqual(callees("orders"), ["delivery", "echo", "inventory"])
        self.assertEqual(callees("commands"), ["inventory", "notifications", "orders"])
        self.assertEqual(callers("orders"), ["commands"])
        self.assertEqual(callers("inventory"), ["commands", "orders"])
        self.assertEqual(callers("delivery"), ["orders"])
        self.assertEqual(callers("notifications"), ["commands"])
        self.assertEqual(callers("commands"), [])
        for name in ("delivery", "echo", "inventory", "notifications"):
            self.assertEqual(callees(name), [], name)
        # Egress to DNS, the database CIDR and the collector port.
        ports = {p["port"] for rule in policies["orders"]["egress"] for p in rule.get("ports", [])}
        self.assertTrue({53, 5432, 4317} <= ports, ports)
        # Prometheus may reach the metrics port (metrics.enabled in production.yaml).
        self.assertTrue(any(p["port"] == 9464 for rule in policies["orders"]["ingress"] for p in rule["ports"]))

    def test_network_policy_admits_the_saga_and_the_pipeline_in_every_scenario(self) -> None:
        for scenario in SCENARIOS:
            objects = RENDERED[scenario]
            policies = {n["metadata"]["labels"]["app.kubernetes.io/component"]: n["spec"] for n in of_kind(objects, "NetworkPolicy")}
            pods = {name: pod_labels(d) for name, d in services_of(objects).items()}
            for caller, callee in ((c, d) for c, calls in CALLS.items() for d in calls):
                with self.subTest(scenario=scenario, caller=caller, callee=callee):
                    self.assertTrue(admits_pods(grpc_peers(policies[callee], "ingress"), pods[caller]), "ingress")
                    self.assertTrue(admits_pods(grpc_peers(policies[caller], "egress"), pods[callee]), "egress")
                    self.assertFalse(admits_pods(grpc_peers(policies[callee], "egress"), pods[caller]),
                                     f"no calls back to {caller}")

    def test_every_service_reaches_postgres(self) -> None:
        for scenario in SCENARIOS:
            values = SCENARIO_VALUES[scenario]
            bundled = values.get("postgresql", {}).get("enabled", False)
            cidrs = values.get("database", {}).get("egressCidrs", [])
            for policy in of_kind(RENDERED[scenario], "NetworkPolicy"):
                with self.subTest(scenario=scenario, policy=policy["metadata"]["name"]):
                    rules = [r for r in policy["spec"]["egress"] if any(p.get("port") == 5432 for p in r.get("ports", []))]
                    self.assertEqual(len(rules), 1)
                    if bundled:
                        continue  # podSelector peers: test_network_policy_reaches_bundled_databases_and_nats
                    if cidrs:
                        self.assertEqual([p["ipBlock"]["cidr"] for p in rules[0]["to"]], cidrs)
                    else:
                        self.assertNotIn("to", rules[0], "no CIDRs: the port to any address")

    def test_network_policy_default_denies_an_internal_service(self) -> None:
        values = {"database": {"existingSecret": "db"},
                  "services": {"echo": {"enabled": True}}}
        spec = next(n["spec"] for n in of_kind(render(values), "NetworkPolicy") if n["metadata"]["name"] == "waybill-echo")
        self.assertEqual(spec["ingress"], [])

    def test_network_policy_reaches_bundled_databases_and_nats(self) -> None:
        for scenario, component in (("bundled-database", "postgres-primary"), ("nats-enabled", "nats")):
            objects = RENDERED[scenario]
            target = next(s for s in of_kind(objects, "StatefulSet")
                          if s["metadata"]["labels"]["app.kubernetes.io/component"] == component)
            labels = target["spec"]["template"]["metadata"]["labels"]
            for policy in of_kind(objects, "NetworkPolicy"):
                peers = [peer for rule in policy["spec"]["egress"] for peer in rule.get("to", [])]
                self.assertTrue(any("podSelector" in p and selects(p["podSelector"], labels) for p in peers),
                                f'{scenario}: {policy["metadata"]["name"]} cannot reach {component}')


class Hooks(unittest.TestCase):
    def test_migration_job_is_a_pre_install_pre_upgrade_hook(self) -> None:
        for scenario in SCENARIOS:
            (job,) = of_kind(RENDERED[scenario], "Job")
            with self.subTest(scenario=scenario):
                annotations = job["metadata"]["annotations"]
                self.assertEqual(set(annotations["helm.sh/hook"].split(",")), {"pre-install", "pre-upgrade"})
                container = job["spec"]["template"]["spec"]["containers"][0]
                self.assertEqual(container["args"], ["migrate"])
                self.assertEqual(env_of(container)["WAYBILL_PRIMARY_URL"]["secretKeyRef"]["key"], "primary-url")
                self.assertEqual(job["spec"]["template"]["spec"]["restartPolicy"], "Never")
                self.assertIn("activeDeadlineSeconds", job["spec"])

    def test_migration_job_migrates_every_service_the_chart_deploys(self) -> None:
        # The Job names no services (WAYBILL_SERVICES unset), so `waybill migrate` takes
        # ServiceName::all(): every service the chart deploys that has a schema must be in it.
        text = REGISTRY.read_text()
        schema_fn = re.search(r"pub fn schema\(self\) -> Option<Schema> \{(.*?)\n    \}", text, re.S)
        self.assertIsNotNone(schema_fn, f"ServiceName::schema() not found in {REGISTRY}")
        names = dict(re.findall(r'ServiceName::(\w+) => f\.write_str\("([a-z0-9-]+)"\)', text))
        schemaless = {names[v] for v in re.findall(r"ServiceName::(\w+) => None", schema_fn.group(1))}
        migrated = binary_default_services()
        self.assertIn("commands", migrated)
        for scenario in SCENARIOS:
            (job,) = of_kind(RENDERED[scenario], "Job")
            self.assertNotIn("WAYBILL_SERVICES", env_of(job["spec"]["template"]["spec"]["containers"][0]))
            deployed = set(services_of(RENDERED[scenario])) - schemaless
            with self.subTest(scenario=scenario):
                self.assertLessEqual(deployed, migrated, f"not migrated: {sorted(deployed - migrated)}")

    def test_bundled_database_is_created_by_earlier_hooks_and_waited_for(self) -> None:
        objects = RENDERED["bundled-database"]
        (job,) = of_kind(objects, "Job")
        job_weight = int(job["metadata"]["annotations"].get("helm.sh/hook-weight", "0"))
        database = [o for o in objects if o["metadata"]["labels"].get("app.kubernetes.io/component", "").startswith("postgres-")]
        self.assertEqual(sorted({o["kind"] for o in database}), ["ConfigMap", "Secret", "Service", "StatefulSet"])
        for obj in database:
            annotations = obj["metadata"].get("annotations", {})
            where = f'{obj["kind"]}/{obj["metadata"]["name"]}'
            self.assertIn("pre-install", annotations.get("helm.sh/hook", "").split(","), where)
            self.assertLess(int(annotations["helm.sh/hook-weight"]), job_weight, where)
        # Helm does not wait for a hook StatefulSet to be ready: the Job waits, boundedly.
        (init,) = job["spec"]["template"]["spec"]["initContainers"]
        script = " ".join(init["command"])
        self.assertIn("pg_isready", script)
        self.assertIn("deadline", script)
        self.assertIn("exit 1", script)
        # The services and the Job read the generated Secret, which has the external Secret's keys.
        secret = next(o for o in database if o["kind"] == "Secret")
        self.assertTrue({"primary-url", "replica-urls"} <= set(secret["stringData"]))
        self.assertTrue(secret["stringData"]["primary-url"].startswith("postgres://waybill:"))
        for deployment in services_of(objects).values():
            env = env_of(deployment["spec"]["template"]["spec"]["containers"][0])
            self.assertEqual(env["WAYBILL_PRIMARY_URL"]["secretKeyRef"]["name"], secret["metadata"]["name"])

    def test_replica_bootstraps_with_pg_basebackup(self) -> None:
        objects = RENDERED["bundled-database"]
        replica = next(s for s in of_kind(objects, "StatefulSet") if s["metadata"]["name"] == "waybill-postgres-replica")
        (init,) = replica["spec"]["template"]["spec"]["initContainers"]
        script = init["command"][-1]
        self.assertIn("pg_basebackup", script)
        self.assertIn(" -R ", script)
        self.assertEqual(env_of(init)["PGPASSWORD"]["secretKeyRef"]["key"], "replication-password")
        for statefulset in of_kind(objects, "StatefulSet"):
            self.assertEqual(statefulset["spec"]["template"]["spec"]["containers"][0]["image"], "postgres:15")


class Names(unittest.TestCase):
    def test_names_fit_kubernetes_limits_with_the_longest_release_name(self) -> None:
        release = "a" * 53  # Helm's longest release name
        values = {"postgresql": {"enabled": True}, "nats": {"enabled": True},
                  "monitoring": {"dashboards": {"enabled": True}},
                  "services": {"echo": {"enabled": True},
                               "a" * 18: {"grpcService": "waybill.a.v1.AService"}}}
        for obj in render(values, release=release):
            name = obj["metadata"]["name"]
            self.assertRegex(name, r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
            self.assertLessEqual(len(name), 52 if obj["kind"] == "StatefulSet" else 63, name)
            for value in obj["metadata"]["labels"].values():
                self.assertLessEqual(len(value), 63, value)

    def test_notes_explain_how_to_reach_the_api(self) -> None:
        text = notes(SCENARIO_VALUES["default"])
        self.assertIn("port-forward svc/waybill-orders 50051:50051", text)
        self.assertIn("waybill orders list --addr http://localhost:50051 --customer c-1", text)
        self.assertIn("grpcurl -plaintext localhost:50051 list", text)
        self.assertIn("port-forward svc/waybill-commands 50052:50051", text)
        self.assertIn("waybill commands submit --addr http://localhost:50052", text)


class Schema(unittest.TestCase):
    """Every file in values/invalid/ is refused, naming the field (its `# expect:` line)."""

    def test_bad_values_are_rejected_with_a_message_naming_the_field(self) -> None:
        cases = sorted(INVALID.glob("*.yaml"))
        self.assertGreaterEqual(len(cases), 5)
        for path in cases:
            expect = re.search(r"^# expect: (.+)$", path.read_text(), re.M)
            self.assertIsNotNone(expect, f"{path.name} has no '# expect:' line")
            with self.subTest(case=path.stem):
                with self.assertRaises(helm.HelmError) as caught:
                    render(load_values(path))
                self.assertIn(expect.group(1).strip(), str(caught.exception))

    def test_negative_replicas_and_unknown_log_format_fail_validate_schema(self) -> None:
        with helm.Chart.load(CHART) as chart:
            for values, field in (({"services": {"orders": {"replicas": -1}}}, "/services/orders/replicas"),
                                  ({"logFormat": "xml"}, "/logFormat")):
                merged = chart.merge_values({"database": {"existingSecret": "db"}, **values})
                with self.assertRaises(helm.HelmValuesError) as caught:
                    chart.validate_schema(merged)
                self.assertIn(field, str(caught.exception))


def main() -> int:
    suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])
    result = unittest.TextTestRunner(verbosity=1, stream=sys.stdout).run(suite)
    # Count tests, not subtests; a failed module setup (e.g. a values file that does not render)
    # counts as one failure.
    failed = {getattr(test, "test_case", test).id() for test, _ in result.failures + result.errors}
    ran_and_failed = sum(1 for name in failed if not name.startswith("setUpModule"))
    print(f"helm-check: {result.testsRun - ran_and_failed} passed, {len(failed)} failed")
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
