"""Prometheus end to end: a real Prometheus scrapes a worker's /metrics.

The worker runs with the OpenTelemetry Prometheus exporter, configured by the
environment through `pgflow_observe.otel`; it heartbeats, is the fleet's
elected instance, and runs tasks on a pgmq queue. A Prometheus server
started here scrapes it on loopback every second, and its query API must
return the series the dashboard uses, with the right values. ``promtool
check metrics`` must accept the exposition text.

Needs the ``prometheus`` and ``promtool`` binaries (Debian package
``prometheus``). Without them these tests are skipped, or fail when
PGFLOW_OBSERVE_REQUIRE_PROMETHEUS=1, as in CI.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgflow_observe import Fleet, Registry, Settings, running_task
from pgflow_observe.otel import Telemetry, configure_opentelemetry

from helpers import DOCUMENTED_SERIES, prometheus_binary, wait_for

pytestmark = pytest.mark.prometheus


class TaskFailed(Exception):
    pass


def promtool_check_metrics(promtool: str, text: str) -> None:
    """Fail unless ``promtool check metrics`` accepts the exposition *text*."""
    checked = subprocess.run(
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrometheusServer:
    """A Prometheus process scraping one target, with a temporary store."""

    def __init__(self, executable: str, directory: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = directory / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: pgflow-worker\n"
            "    static_configs:\n"
            f"      - targets: ['{target}']\n"
        )
        self.log = directory / "prometheus.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    executable,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, ConnectionError):
            return False

    def api(self, path: str, **parameters: str) -> Any:
        query = urllib.parse.urlencode(parameters)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=5) as reply:
            body = json.load(reply)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expression: str) -> list[dict[str, Any]]:
        data = self.api("/api/v1/query", query=expression)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def value(self, expression: str) -> float:
        result = self.query(expression)
        assert len(result) == 1, (expression, result)
        return float(result[0]["value"][1])


@pytest.fixture
def prometheus_binaries() -> tuple[str, str]:
    return prometheus_binary("prometheus"), prometheus_binary("promtool")


@pytest.fixture
def filled_queue(pgmq_dsn: str, pgmq_queue: str) -> str:
    with psycopg.connect(pgmq_dsn, autocommit=True) as conn:
        for n in range(4):
            conn.execute("select pgmq.send(%s, %s::jsonb)", (pgmq_queue, json.dumps(n)))
        # A reader holds one message: still in the queue, no longer visible.
        conn.execute("select * from pgmq.read(%s, 300, 1)", (pgmq_queue,))
    return pgmq_queue


@pytest.fixture
def telemetry(monkeypatch: pytest.MonkeyPatch) -> Iterator[Telemetry]:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_HOST", "127.0.0.1")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", "0")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "pgflow-e2e")
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    instance_id = f"e2e-{secrets.token_hex(3)}"
    telemetry = configure_opentelemetry(instance_id, set_global=False)
    yield telemetry
    telemetry.shutdown()


def exposition(telemetry: Telemetry) -> str:
    assert telemetry.prometheus_address is not None
    host, port = telemetry.prometheus_address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def test_prometheus_scrapes_the_documented_series_with_their_values(
    prometheus_binaries: tuple[str, str],
    fleet: Fleet,
    make_settings: Callable[..., Settings],
    filled_queue: str,
    telemetry: Telemetry,
    tmp_path: Path,
) -> None:
    prometheus, promtool = prometheus_binaries
    instance_id = str(telemetry.resource.attributes["service.instance.id"])
    settings = make_settings(instance_id=instance_id, fleet_metrics_interval=0.2)
    error_type = f"{TaskFailed.__module__}.TaskFailed"
    registry = Registry(settings, meter_provider=telemetry.meter_provider).start()
    server: PrometheusServer | None = None
    in_flight = running_task(None, task_id="long", queue="reports")
    try:
        for n in range(3):
            with running_task(None, task_id=n, queue=filled_queue):
                pass
        for n in range(2):
            with (
                pytest.raises(TaskFailed),
                running_task(None, task_id=f"bad-{n}", queue=filled_queue),
            ):
                raise TaskFailed
        in_flight.__enter__()

        def fleet_seen() -> bool:
            snapshot = registry.fleet_snapshot()
            heartbeat = registry.stats().heartbeat
            return (
                snapshot is not None
                and any(depth.queue == filled_queue for depth in snapshot.queues)
                and heartbeat is not None
                and heartbeat.clock_skew is not None
            )

        wait_for(fleet_seen, what="fleet snapshot and a heartbeat", timeout=30)

        # promtool lints the exposition text as Prometheus would read it.
        text = exposition(telemetry)
        promtool_check_metrics(promtool, text)

        assert telemetry.prometheus_address is not None
        host, port = telemetry.prometheus_address
        server = PrometheusServer(prometheus, tmp_path, f"{host}:{port}")
        wait_for(server.ready, what="prometheus ready", timeout=30)
        queue = f'pgflow_queue="{filled_queue}"'
        wait_for(
            lambda: server.query(f"pgflow_queue_messages{{{queue}}}"),
            what="a scrape with every series",
            timeout=30,
        )

        # Task series.
        assert server.value(f"pgflow_tasks_started_total{{{queue}}}") == 5
        assert server.value('pgflow_tasks_started_total{pgflow_queue="reports"}') == 1
        assert server.value(f"pgflow_tasks_executing{{{queue}}}") == 0
        assert server.value('pgflow_tasks_executing{pgflow_queue="reports"}') == 1
        succeeded = f'{queue},error_type=""'
        failed = f'{queue},error_type="{error_type}"'
        assert server.value(f"pgflow_task_duration_seconds_count{{{succeeded}}}") == 3
        assert server.value(f"pgflow_task_duration_seconds_count{{{failed}}}") == 2
        assert (
            server.value(f'pgflow_task_duration_seconds_bucket{{{failed},le="+Inf"}}')
            == 2
        )
        assert server.value(f"pgflow_task_duration_seconds_sum{{{succeeded}}}") < 1
        buckets = server.query(f"pgflow_task_duration_seconds_bucket{{{succeeded}}}")
        assert len(buckets) == 19  # 18 boundaries, 5 ms to 1 h, and +Inf

        # Heartbeat series.
        assert server.value("pgflow_instance_heartbeats_total") >= 1
        assert 0 <= server.value("pgflow_instance_heartbeat_age_seconds") < 5
        assert abs(server.value("pgflow_instance_clock_skew_seconds")) < 1

        # Fleet-wide series, from this elected instance.
        alive = 'pgflow_instance_status="online",pgflow_instance_liveness="alive"'
        assert server.value(f"pgflow_instances{{{alive}}}") == 1
        assert server.value(f"pgflow_queue_messages{{{queue}}}") == 4
        assert server.value(f"pgflow_queue_visible_messages{{{queue}}}") == 3
        assert server.value(f"pgflow_queue_oldest_message_age_seconds{{{queue}}}") >= 0

        # Identity: on target_info only, never on a pgflow series.
        target = server.query(f'target_info{{service_instance_id="{instance_id}"}}')
        assert len(target) == 1
        assert target[0]["metric"]["service_name"] == "pgflow-e2e"
        labelled = server.query('{__name__=~"pgflow_.+",service_instance_id!=""}')
        assert labelled == []

        # Every documented series, and no other pgflow series.
        names = set(server.api("/api/v1/label/__name__/values"))
        assert {name for name in names if name.startswith("pgflow_")} == (
            DOCUMENTED_SERIES
        )
    finally:
        if server is not None:
            server.stop()
        in_flight.__exit__(None, None, None)
        registry.close()


def test_promtool_accepts_the_exposition_of_a_metrics_only_worker(
    prometheus_binaries: tuple[str, str], telemetry: Telemetry
) -> None:
    _, promtool = prometheus_binaries
    settings = Settings(dsn=None, instance_id="promtool-worker")
    with Registry(settings, meter_provider=telemetry.meter_provider):
        with running_task(None, task_id=1, queue="q"):
            with pytest.raises(KeyError), running_task(None, task_id=2, queue="q"):
                raise KeyError("x")
            text = exposition(telemetry)

    promtool_check_metrics(promtool, text)
    assert "pgflow_task_duration_seconds_count{" in text
    assert 'error_type="KeyError"' in text
