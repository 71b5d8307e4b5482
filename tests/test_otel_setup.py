"""The opt-in SDK setup helper: resource, exporters chosen by the environment."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.metrics.export import (
    InMemoryMetricReader,
    PeriodicExportingMetricReader,
)

from pgflow_observe import ConfigurationError, Registry, Settings, running_task
from pgflow_observe.otel import Telemetry, build_resource, configure_opentelemetry

OTEL_VARIABLES = (
    "OTEL_METRICS_EXPORTER",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_PROMETHEUS_HOST",
    "OTEL_EXPORTER_PROMETHEUS_PORT",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_METRIC_EXPORT_INTERVAL",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in OTEL_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def telemetries() -> Iterator[list[Telemetry]]:
    """Collects what a test configures and shuts it all down afterwards."""
    made: list[Telemetry] = []
    yield made
    for telemetry in made:
        telemetry.shutdown()


def configure(made: list[Telemetry], instance_id: str, **options: object) -> Telemetry:
    telemetry = configure_opentelemetry(
        instance_id,
        set_global=False,
        **options,  # type: ignore[arg-type]
    )
    made.append(telemetry)
    return telemetry


# -- resource ---------------------------------------------------------------------


def test_resource_names_the_instance_host_and_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "billing-worker")
    monkeypatch.setenv(
        "OTEL_RESOURCE_ATTRIBUTES",
        "deployment.environment.name=staging,service.instance.id=ignored",
    )

    attributes = build_resource("worker-1").attributes

    assert attributes["service.instance.id"] == "worker-1"
    assert attributes["service.name"] == "billing-worker"
    assert attributes["deployment.environment.name"] == "staging"
    assert attributes["host.name"] == socket.gethostname()
    assert attributes["process.pid"] == os.getpid()
    assert attributes["telemetry.sdk.language"] == "python"


def test_service_name_argument_is_a_default_under_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    unset = build_resource("w", service_name="pgflow-worker").attributes
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attributes")
    from_attributes = build_resource("w", service_name="pgflow-worker").attributes
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-service-name")
    from_service_name = build_resource("w", service_name="pgflow-worker").attributes

    assert unset["service.name"] == "pgflow-worker"
    assert from_attributes["service.name"] == "from-attributes"
    assert from_service_name["service.name"] == "from-service-name"


def test_environment_may_override_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "host.name=node-7")

    assert build_resource("w").attributes["host.name"] == "node-7"


def test_empty_instance_id_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="instance_id"):
        build_resource("")


def test_metrics_carry_the_instance_id_on_the_resource_only(
    monkeypatch: pytest.MonkeyPatch, telemetries: list[Telemetry]
) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    reader = InMemoryMetricReader()
    settings = Settings(dsn=None, instance_id=f"resource-{secrets.token_hex(3)}")
    telemetry = configure(telemetries, settings.instance_id, readers=[reader])

    with Registry(settings, meter_provider=telemetry.meter_provider):
        with running_task(None, task_id=1, queue="q"):
            data = reader.get_metrics_data()

    assert data is not None
    (resource_metrics,) = data.resource_metrics
    assert resource_metrics.resource.attributes["service.instance.id"] == (
        settings.instance_id
    )
    points = [
        point
        for scope in resource_metrics.scope_metrics
        for metric in scope.metrics
        for point in metric.data.data_points
    ]
    assert points
    assert all("service.instance.id" not in (p.attributes or {}) for p in points)


# -- exporter choice --------------------------------------------------------------


def test_none_configures_no_reader(
    monkeypatch: pytest.MonkeyPatch, telemetries: list[Telemetry]
) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")

    telemetry = configure(telemetries, "w")

    assert telemetry.metric_readers == ()
    assert telemetry.tracer_provider is None
    assert telemetry.prometheus_address is None


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("OTEL_METRICS_EXPORTER", "zipkin", "OTEL_METRICS_EXPORTER"),
        ("OTEL_METRICS_EXPORTER", "none,console", "cannot be combined"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", "http/protobuf, grpc"),
        ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "udp", "METRICS_PROTOCOL"),
        ("OTEL_EXPORTER_PROMETHEUS_PORT", "http", "port number"),
    ],
)
def test_invalid_environment_is_refused_with_the_variable_named(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    if variable == "OTEL_EXPORTER_PROMETHEUS_PORT":
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    monkeypatch.setenv(variable, value)

    with pytest.raises(ConfigurationError, match=expected) as raised:
        configure_opentelemetry("w", set_global=False)

    assert repr(value) in str(raised.value)


@pytest.mark.parametrize(
    ("exporter", "protocol", "module", "extra"),
    [
        ("prometheus", None, "opentelemetry.exporter.prometheus", "prometheus"),
        (
            "otlp",
            "http/protobuf",
            "opentelemetry.exporter.otlp.proto.http.metric_exporter",
            "otlp-http",
        ),
        (
            "otlp",
            "grpc",
            "opentelemetry.exporter.otlp.proto.grpc.metric_exporter",
            "otlp-grpc",
        ),
    ],
)
def test_missing_exporter_package_names_the_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
    exporter: str,
    protocol: str | None,
    module: str,
    extra: str,
) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", exporter)
    if protocol is not None:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    # An entry of None in sys.modules makes the import fail, as if absent.
    monkeypatch.setitem(sys.modules, module, None)

    with pytest.raises(ConfigurationError) as raised:
        configure_opentelemetry("w", set_global=False)

    assert f"pip install 'pgflow-observe[{extra}]'" in str(raised.value)


def test_a_failing_exporter_stops_the_servers_already_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus,otlp")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_HOST", "127.0.0.1")
    port = free_port()
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", str(port))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setitem(
        sys.modules, "opentelemetry.exporter.otlp.proto.grpc.metric_exporter", None
    )

    with pytest.raises(ConfigurationError, match="otlp-grpc"):
        configure_opentelemetry("w", set_global=False)

    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_per_signal_protocol_wins_over_the_general_one(
    monkeypatch: pytest.MonkeyPatch, telemetries: list[Telemetry]
) -> None:
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
        OTLPMetricExporter as GrpcMetricExporter,
    )

    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")

    telemetry = configure(telemetries, "w")

    (reader,) = telemetry.metric_readers
    assert isinstance(reader, PeriodicExportingMetricReader)
    assert isinstance(reader._exporter, GrpcMetricExporter)


def test_console_exporter_prints_the_metrics_and_the_resource(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "console")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "3600000")
    settings = Settings(dsn=None, instance_id="console-worker")
    telemetry = configure_opentelemetry(settings.instance_id, set_global=False)
    try:
        with Registry(settings, meter_provider=telemetry.meter_provider):
            with running_task(None, task_id=1, queue="printed"):
                pass
    finally:
        telemetry.shutdown()

    printed = json.loads(capsys.readouterr().out)
    (resource_metrics,) = printed["resource_metrics"]
    assert resource_metrics["resource"]["attributes"]["service.instance.id"] == (
        "console-worker"
    )
    names = {
        metric["name"]
        for scope in resource_metrics["scope_metrics"]
        for metric in scope["metrics"]
    }
    assert {"pgflow.tasks.started", "pgflow.task.duration"} <= names


def test_prometheus_exporter_serves_metrics_until_shutdown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_HOST", "127.0.0.1")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", "0")
    settings = Settings(dsn=None, instance_id="scraped-worker")
    telemetry = configure_opentelemetry(settings.instance_id, set_global=False)
    try:
        assert telemetry.prometheus_address is not None
        host, port = telemetry.prometheus_address
        with Registry(settings, meter_provider=telemetry.meter_provider):
            with running_task(None, task_id=1, queue="scraped"):
                pass
            url = f"http://{host}:{port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
    finally:
        telemetry.shutdown()

    assert host == "127.0.0.1" and port > 0
    assert "pgflow_tasks_started_total{" in text
    assert 'pgflow_queue="scraped"' in text
    assert 'service_instance_id="scraped-worker"' in text
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)


def test_tracing_builds_a_tracer_provider_with_the_same_resource(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    settings = Settings(dsn=None, instance_id="traced-worker")
    telemetry = configure_opentelemetry(
        settings.instance_id, tracing=True, set_global=False
    )
    try:
        assert telemetry.tracer_provider is not None
        with Registry(
            settings,
            meter_provider=telemetry.meter_provider,
            tracing=True,
            tracer_provider=telemetry.tracer_provider,
        ):
            with running_task(None, task_id=5, queue="traced"):
                pass
    finally:
        telemetry.shutdown()

    span = json.loads(capsys.readouterr().out)
    assert span["name"] == "process traced"
    assert span["resource"]["attributes"]["service.instance.id"] == "traced-worker"


def test_set_global_installs_the_providers_for_the_registry(tmp_path: object) -> None:
    # The global providers can be set once per process: try it in a fresh one.
    script = textwrap.dedent(
        """
        import os
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from pgflow_observe import Registry, Settings, running_task
        from pgflow_observe.otel import configure_opentelemetry

        os.environ["OTEL_METRICS_EXPORTER"] = "none"
        os.environ["OTEL_TRACES_EXPORTER"] = "none"
        reader = InMemoryMetricReader()
        telemetry = configure_opentelemetry("global-worker", tracing=True,
                                            readers=[reader])
        assert metrics.get_meter_provider() is telemetry.meter_provider
        assert trace.get_tracer_provider() is telemetry.tracer_provider
        with Registry(Settings(dsn=None, instance_id="global-worker")):
            with running_task(None, task_id=1, queue="q"):
                pass
            data = reader.get_metrics_data()
        names = {m.name for rm in data.resource_metrics
                 for sm in rm.scope_metrics for m in sm.metrics}
        assert "pgflow.tasks.started" in names, names
        telemetry.shutdown()
        print("ok")
        """
    )
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith("OTEL_")
    }
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
