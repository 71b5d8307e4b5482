"""OTLP export end to end: the real exporters, configured by the environment.

A receiver on loopback stands in for the collector. It decodes what arrives
with the OTLP protobuf definitions, and the tests check names, units,
attributes and the resource as a collector would see them.
"""

from __future__ import annotations

import gzip
import http.server
import secrets
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import pytest
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric

from pgflow_observe import Registry, Settings, running_task
from pgflow_observe.otel import configure_opentelemetry

ExportRequest = metrics_service_pb2.ExportMetricsServiceRequest


class TaskFailed(Exception):
    pass


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.server.received.append((self.path, self.headers["Content-Type"], body))
        reply = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Receiver(http.server.ThreadingHTTPServer):
    received: list[tuple[str, str, bytes]]


@pytest.fixture
def http_receiver() -> Iterator[_Receiver]:
    server = _Receiver(("127.0.0.1", 0), _Handler)
    server.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self) -> None:
        self.received: list[Any] = []

    def Export(self, request: Any, context: Any) -> Any:
        self.received.append(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


@pytest.fixture
def grpc_receiver() -> Iterator[tuple[int, _MetricsService]]:
    grpc = pytest.importorskip("grpc", reason="pip install -e '.[dev]'")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    service = _MetricsService()
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(  # type: ignore[no-untyped-call]
        service, server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, service
    finally:
        server.stop(grace=None).wait(5)


@pytest.fixture
def otel_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "pgflow-test-worker")
    monkeypatch.setenv(
        "OTEL_RESOURCE_ATTRIBUTES",
        "deployment.environment.name=test,team=payments",
    )
    # One export, at shutdown: the interval never runs out during a test.
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "3600000")
    for variable in (
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_COMPRESSION",
    ):
        monkeypatch.delenv(variable, raising=False)
    return monkeypatch


def run_worker(instance_id: str) -> None:
    """Configure from the environment, run tasks, close, export at shutdown."""
    telemetry = configure_opentelemetry(instance_id, set_global=False)
    try:
        settings = Settings(dsn=None, instance_id=instance_id)
        with Registry(settings, meter_provider=telemetry.meter_provider):
            for n in range(3):
                with running_task(None, task_id=n, queue="emails"):
                    pass
            with (
                pytest.raises(TaskFailed),
                running_task(None, task_id=9, queue="emails"),
            ):
                raise TaskFailed
    finally:
        telemetry.shutdown()


def plain(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    assert kind is not None
    return getattr(value, kind)


def attributes(pairs: list[KeyValue]) -> dict[str, Any]:
    return {pair.key: plain(pair.value) for pair in pairs}


def check_request(request: Any, instance_id: str) -> None:
    (resource_metrics,) = request.resource_metrics
    resource = attributes(list(resource_metrics.resource.attributes))
    assert resource["service.instance.id"] == instance_id
    assert resource["service.name"] == "pgflow-test-worker"
    assert resource["deployment.environment.name"] == "test"
    assert resource["team"] == "payments"
    assert isinstance(resource["process.pid"], int)
    assert resource["host.name"]

    (scope_metrics,) = [
        scope
        for scope in resource_metrics.scope_metrics
        if scope.scope.name == "pgflow_observe"
    ]
    metrics: dict[str, Metric] = {m.name: m for m in scope_metrics.metrics}
    assert {name: metrics[name].unit for name in metrics} == {
        "pgflow.tasks.executing": "{task}",
        "pgflow.tasks.started": "{task}",
        "pgflow.task.duration": "s",
    }

    (started,) = metrics["pgflow.tasks.started"].sum.data_points
    assert metrics["pgflow.tasks.started"].sum.is_monotonic
    assert attributes(list(started.attributes)) == {"pgflow.queue": "emails"}
    assert started.as_int == 4
    assert not metrics["pgflow.tasks.executing"].sum.is_monotonic

    durations = {
        tuple(sorted(attributes(list(point.attributes)).items())): point
        for point in metrics["pgflow.task.duration"].histogram.data_points
    }
    error_type = f"{TaskFailed.__module__}.TaskFailed"
    succeeded = durations[(("pgflow.queue", "emails"),)]
    failed = durations[(("error.type", error_type), ("pgflow.queue", "emails"))]
    assert (succeeded.count, failed.count) == (3, 1)
    assert list(succeeded.explicit_bounds)[:2] == [0.005, 0.01]
    for point in (started, succeeded, failed):
        for pair in point.attributes:
            assert pair.key in {"pgflow.queue", "error.type"}


def test_otlp_http_export_carries_the_documented_metrics_and_resource(
    http_receiver: _Receiver, otel_environment: pytest.MonkeyPatch
) -> None:
    port = http_receiver.server_address[1]
    otel_environment.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    otel_environment.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    instance_id = f"otlp-http-{secrets.token_hex(3)}"

    run_worker(instance_id)

    assert http_receiver.received, "nothing was exported"
    path, content_type, body = http_receiver.received[-1]
    assert path == "/v1/metrics"
    assert content_type == "application/x-protobuf"
    request = ExportRequest()
    request.ParseFromString(body)
    check_request(request, instance_id)


def test_otlp_grpc_export_carries_the_documented_metrics_and_resource(
    grpc_receiver: tuple[int, _MetricsService],
    otel_environment: pytest.MonkeyPatch,
) -> None:
    port, service = grpc_receiver
    otel_environment.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    otel_environment.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    otel_environment.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    instance_id = f"otlp-grpc-{secrets.token_hex(3)}"

    run_worker(instance_id)

    assert service.received, "nothing was exported"
    check_request(service.received[-1], instance_id)
