"""Static checks on collector-config/: the collector, Prometheus and Grafana files.

No collector binary runs in CI, so these tests check what can be checked
without one: that the collector pipelines are wired consistently, that the
ports agree across the collector config, the OpenTelemetry SDK defaults,
prometheus.yml, compose.yaml and the Grafana datasource, and that the
dashboard queries only the metric names pgflow_observe exports. promtool, when
present, validates prometheus.yml and parses every dashboard query.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
    DEFAULT_ENDPOINT as OTLP_HTTP_DEFAULT_ENDPOINT,
)

from helpers import DOCUMENTED_SERIES, prometheus_binary

CONFIG_DIR = Path(__file__).resolve().parent.parent / "collector-config"
COLLECTOR_CONFIG = CONFIG_DIR / "otel-collector.yaml"
PROMETHEUS_CONFIG = CONFIG_DIR / "prometheus.yml"
COMPOSE_FILE = CONFIG_DIR / "compose.yaml"
GRAFANA_DIR = CONFIG_DIR / "grafana"
DATASOURCES_FILE = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS_FILE = (
    GRAFANA_DIR / "provisioning" / "dashboards" / "dashboards.yaml"
)
DASHBOARD_FILE = GRAFANA_DIR / "dashboards" / "pgflow-observe.json"

# The OTLP exporter packages expose the HTTP default as a constant but spell
# the gRPC one inline; 4317 is the port the OTLP specification documents.
OTLP_GRPC_DEFAULT_PORT = 4317
OTLP_HTTP_DEFAULT_PORT = urlsplit(OTLP_HTTP_DEFAULT_ENDPOINT).port

# Where the images read their configuration, and the ports their servers use
# unless told otherwise.
COLLECTOR_IMAGE = "otel/opentelemetry-collector-contrib"
COLLECTOR_CONFIG_IN_IMAGE = "/etc/otelcol-contrib/config.yaml"
PROMETHEUS_CONFIG_IN_IMAGE = "/etc/prometheus/prometheus.yml"
GRAFANA_PROVISIONING_IN_IMAGE = "/etc/grafana/provisioning"
PROMETHEUS_PORT = 9090
GRAFANA_PORT = 3000

# The documented series, plus target_info, which carries the resource.
DOCUMENTED_METRIC_NAMES = DOCUMENTED_SERIES | {"target_info"}

# One entry per instrument; the histogram counts as shown through any of its
# three series.
INSTRUMENT_SERIES = {
    "pgflow.tasks.executing": {"pgflow_tasks_executing"},
    "pgflow.tasks.started": {"pgflow_tasks_started_total"},
    "pgflow.task.duration": {
        "pgflow_task_duration_seconds_bucket",
        "pgflow_task_duration_seconds_sum",
        "pgflow_task_duration_seconds_count",
    },
    "pgflow.instance.heartbeats": {"pgflow_instance_heartbeats_total"},
    "pgflow.instance.heartbeat.age": {"pgflow_instance_heartbeat_age_seconds"},
    "pgflow.instance.clock.skew": {"pgflow_instance_clock_skew_seconds"},
    "pgflow.instances": {"pgflow_instances"},
    "pgflow.queue.messages": {"pgflow_queue_messages"},
    "pgflow.queue.visible_messages": {"pgflow_queue_visible_messages"},
    "pgflow.queue.oldest_message.age": {"pgflow_queue_oldest_message_age_seconds"},
}

COMPONENT_KINDS = ("receivers", "processors", "exporters")

# Words that are never metric names: clause keywords, binary operators,
# number literals and the aggregation operators, which may be followed by a
# clause instead of a parenthesis.
_PROMQL_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"and", "or", "unless", "bool", "offset", "inf", "nan"}
    | {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count"}
    | {"count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
)


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def collector() -> dict[str, Any]:
    config: dict[str, Any] = _load_yaml(COLLECTOR_CONFIG)
    return config


@pytest.fixture(scope="module")
def prometheus() -> dict[str, Any]:
    config: dict[str, Any] = _load_yaml(PROMETHEUS_CONFIG)
    return config


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    config: dict[str, Any] = _load_yaml(COMPOSE_FILE)
    return config


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    return loaded


def _pipelines(collector: dict[str, Any]) -> dict[str, dict[str, list[str]]]:
    pipelines: dict[str, dict[str, list[str]]] = collector["service"]["pipelines"]
    return pipelines


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def _host(endpoint: str) -> str:
    return endpoint.rsplit(":", 1)[0]


def _collector_servers(collector: dict[str, Any]) -> dict[str, str]:
    """Every server endpoint in the collector config, by a readable name."""
    protocols = collector["receivers"]["otlp"]["protocols"]
    return {
        "otlp grpc": protocols["grpc"]["endpoint"],
        "otlp http": protocols["http"]["endpoint"],
        "prometheus exporter": collector["exporters"]["prometheus"]["endpoint"],
        "health_check": collector["extensions"]["health_check"]["endpoint"],
    }


def _published_ports(service: dict[str, Any]) -> dict[int, int]:
    """Map each published container port of a compose service to its host port."""
    published: dict[int, int] = {}
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            published[int(entry["target"])] = int(entry["published"])
            continue

        # Short syntax: [host_ip:]host_port:container_port[/protocol]
        parts = str(entry).split("/")[0].split(":")
        published[int(parts[-1])] = int(parts[-2])
    return published


def _volume_targets(service: dict[str, Any]) -> dict[str, str]:
    """Map each bind-mount source of a compose service to its container path."""
    targets: dict[str, str] = {}
    for entry in service.get("volumes", []):
        source, target = str(entry).split(":")[:2]
        if source.startswith("."):
            targets[os.path.normpath(source)] = target
    return targets


def _pinned_collector_version() -> str:
    header = []
    for line in COLLECTOR_CONFIG.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    pattern = re.escape(COLLECTOR_IMAGE) + r":(\d+\.\d+\.\d+)"
    match = re.search(pattern, "\n".join(header))
    assert match is not None, f"no '{COLLECTOR_IMAGE}:X.Y.Z' in the header comment"
    return match.group(1)


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [
        target["expr"]
        for panel in _panels(dashboard)
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def _metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    # Drop what can hold words that are not metric names: string literals,
    # label matchers, label lists of grouping and matching clauses, ranges.
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    clause = r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"
    expr = re.sub(clause, r"\1", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)

    names = set()
    for match in re.finditer(r"\b([A-Za-z_:][A-Za-z0-9_:]*)\b(\s*\()?", expr):
        word, is_call = match.group(1), match.group(2)
        if is_call or word.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


def test_pipelines_reference_only_defined_components(
    collector: dict[str, Any],
) -> None:
    for name, pipeline in _pipelines(collector).items():
        for kind in COMPONENT_KINDS:
            defined = set(collector.get(kind) or {})
            missing = set(pipeline.get(kind, [])) - defined
            assert not missing, f"pipeline {name!r} uses undefined {kind}: {missing}"


def test_every_defined_component_is_used(collector: dict[str, Any]) -> None:
    for kind in COMPONENT_KINDS:
        used = {
            component
            for pipeline in _pipelines(collector).values()
            for component in pipeline.get(kind, [])
        }
        unused = set(collector.get(kind) or {}) - used
        assert not unused, f"{kind} defined but in no pipeline: {unused}"

    unused_extensions = set(collector.get("extensions") or {}) - set(
        collector["service"].get("extensions", [])
    )
    assert not unused_extensions, f"extensions not enabled: {unused_extensions}"


def test_service_extensions_are_defined(collector: dict[str, Any]) -> None:
    enabled = collector["service"]["extensions"]
    assert "health_check" in enabled
    assert set(enabled) <= set(collector["extensions"])


def test_memory_limiter_comes_first_and_before_batch(
    collector: dict[str, Any],
) -> None:
    for name, pipeline in _pipelines(collector).items():
        processors = pipeline["processors"]
        assert processors[0] == "memory_limiter", f"pipeline {name!r}: {processors}"
        assert "batch" in processors, f"pipeline {name!r} has no batch processor"
        assert processors.index("memory_limiter") < processors.index("batch")


def test_memory_limiter_settings_pass_the_collectors_validation(
    collector: dict[str, Any],
) -> None:
    limiter = collector["processors"]["memory_limiter"]

    # The collector refuses a zero check_interval and a spike limit that is
    # not below the limit.
    assert re.fullmatch(r"[1-9]\d*(ms|s|m)", limiter["check_interval"])
    assert 0 < limiter["spike_limit_percentage"] < limiter["limit_percentage"] <= 100


def test_metrics_pipeline_takes_otlp_and_exports_prometheus(
    collector: dict[str, Any],
) -> None:
    metrics = _pipelines(collector)["metrics"]
    assert "otlp" in metrics["receivers"]
    assert "prometheus" in metrics["exporters"]


def test_otlp_receiver_ports_match_the_sdk_defaults(
    collector: dict[str, Any],
) -> None:
    servers = _collector_servers(collector)
    assert OTLP_HTTP_DEFAULT_PORT == 4318
    assert _port(servers["otlp grpc"]) == OTLP_GRPC_DEFAULT_PORT
    assert _port(servers["otlp http"]) == OTLP_HTTP_DEFAULT_PORT


def test_collector_servers_listen_on_all_interfaces(
    collector: dict[str, Any],
) -> None:
    # An unset or localhost endpoint is unreachable from outside the container.
    for name, endpoint in _collector_servers(collector).items():
        assert _host(endpoint) == "0.0.0.0", f"{name} listens on {endpoint!r}"


def test_health_check_listens_on_its_usual_port(collector: dict[str, Any]) -> None:
    assert _port(collector["extensions"]["health_check"]["endpoint"]) == 13133


def test_prometheus_scrapes_the_collector_exporter_port(
    collector: dict[str, Any],
    prometheus: dict[str, Any],
    compose: dict[str, Any],
) -> None:
    exporter_port = _port(collector["exporters"]["prometheus"]["endpoint"])
    assert exporter_port == 8889

    targets = {
        target
        for job in prometheus["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    collector_service = next(
        name
        for name, service in compose["services"].items()
        if service["image"].startswith(COLLECTOR_IMAGE + ":")
    )
    assert f"{collector_service}:{exporter_port}" in targets


def test_collector_scrape_keeps_the_workers_job_and_instance(
    prometheus: dict[str, Any],
) -> None:
    # Without honor_labels, instance would become the collector's address and
    # the registry instance id would move to exported_instance.
    job = next(
        job
        for job in prometheus["scrape_configs"]
        if any(
            target.endswith(":8889")
            for static in job.get("static_configs", [])
            for target in static["targets"]
        )
    )
    assert job.get("honor_labels") is True


def test_compose_publishes_the_ports_the_configs_use(
    collector: dict[str, Any],
    compose: dict[str, Any],
) -> None:
    services = compose["services"]

    collector_ports = _published_ports(services["collector"])
    for name, endpoint in _collector_servers(collector).items():
        port = _port(endpoint)
        assert collector_ports.get(port) == port, f"{name} port {port} not published"

    datasource = _load_yaml(DATASOURCES_FILE)["datasources"][0]
    prometheus_port = urlsplit(datasource["url"]).port
    assert prometheus_port == PROMETHEUS_PORT
    assert _published_ports(services["prometheus"]) == {
        PROMETHEUS_PORT: PROMETHEUS_PORT
    }
    assert _published_ports(services["grafana"]) == {GRAFANA_PORT: GRAFANA_PORT}


def test_compose_collector_image_is_the_version_the_config_is_written_for(
    compose: dict[str, Any],
) -> None:
    image = compose["services"]["collector"]["image"]
    assert image == f"{COLLECTOR_IMAGE}:{_pinned_collector_version()}"


def test_compose_images_are_pinned_to_versions(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        image = service["image"]
        assert re.search(r":v?\d+\.\d+\.\d+$", image), f"{name}: {image!r}"


def test_compose_mounts_the_configs_where_the_images_read_them(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    assert _volume_targets(services["collector"])["otel-collector.yaml"] == (
        COLLECTOR_CONFIG_IN_IMAGE
    )
    assert _volume_targets(services["prometheus"])["prometheus.yml"] == (
        PROMETHEUS_CONFIG_IN_IMAGE
    )

    grafana = _volume_targets(services["grafana"])
    assert grafana["grafana/provisioning"] == GRAFANA_PROVISIONING_IN_IMAGE
    provider = _load_yaml(DASHBOARD_PROVIDERS_FILE)["providers"][0]
    assert grafana["grafana/dashboards"] == provider["options"]["path"]


def test_grafana_datasource_points_at_the_compose_prometheus(
    prometheus: dict[str, Any],
    compose: dict[str, Any],
) -> None:
    datasource = _load_yaml(DATASOURCES_FILE)["datasources"][0]
    assert datasource["type"] == "prometheus"
    assert urlsplit(datasource["url"]).hostname in compose["services"]
    assert (
        datasource["jsonData"]["timeInterval"]
        == (prometheus["global"]["scrape_interval"])
    )


def test_dashboard_panels_query_the_provisioned_datasource(
    dashboard: dict[str, Any],
) -> None:
    uid = _load_yaml(DATASOURCES_FILE)["datasources"][0]["uid"]
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue

        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_dashboard_queries_use_only_documented_metric_names(
    dashboard: dict[str, Any],
) -> None:
    exprs = _dashboard_exprs(dashboard)
    assert exprs

    for expr in exprs:
        names = _metric_names(expr)
        assert names, f"no metric name found in {expr!r}"
        unknown = names - DOCUMENTED_METRIC_NAMES
        assert not unknown, f"{expr!r} uses undocumented names {unknown}"


def test_dashboard_shows_every_instrument(dashboard: dict[str, Any]) -> None:
    shown = set().union(*map(_metric_names, _dashboard_exprs(dashboard)))
    missing = [name for name, series in INSTRUMENT_SERIES.items() if not series & shown]
    assert not missing, f"instruments missing from the dashboard: {missing}"


def test_metric_name_extraction_skips_labels_functions_and_ranges() -> None:
    expr = (
        "histogram_quantile(0.9, sum by (le, pgflow_queue) (rate("
        'pgflow_task_duration_seconds_bucket{error_type!="x"}[5m])))'
        " * on (job, instance) group_left (host_name) target_info"
    )
    assert _metric_names(expr) == {"pgflow_task_duration_seconds_bucket", "target_info"}
    assert _metric_names("sum(pgflow_tasks_started) by (pgflow_queue)") == {
        "pgflow_tasks_started"
    }


@pytest.mark.prometheus
def test_promtool_accepts_the_prometheus_config() -> None:
    result = subprocess.run(
        [prometheus_binary("promtool"), "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.prometheus
def test_promtool_parses_every_dashboard_query(
    dashboard: dict[str, Any],
    tmp_path: Path,
) -> None:
    promtool = prometheus_binary("promtool")

    # Recording rules are the one thing promtool parses PromQL for offline.
    rules = [
        {"record": f"pgflow:dashboard_query_{number}", "expr": expr}
        for number, expr in enumerate(_dashboard_exprs(dashboard))
    ]
    rules_file = tmp_path / "dashboard-queries.yml"
    rules_file.write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}),
        encoding="utf-8",
    )

    result = subprocess.run(
        [promtool, "check", "rules", str(rules_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
