"""The OpenTelemetry instrumentor: a registry per process, started and closed."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from pgflow_observe import (
    ConfigurationError,
    Fleet,
    Registry,
    Settings,
    TableMissing,
    running_task,
    signals,
)
from pgflow_observe.instrumentation import PgflowObserveInstrumentor


def receiver_counts() -> dict[str, int]:
    return {
        signal.name: len(signal.receivers)
        for signal in (signals.task_start, signals.task_stop, signals.task_exception)
    }


@pytest.fixture
def instrumentor() -> Iterator[PgflowObserveInstrumentor]:
    instrumentor = PgflowObserveInstrumentor()
    yield instrumentor
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()


@pytest.fixture
def meter_provider() -> Iterator[MeterProvider]:
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    yield provider
    provider.shutdown()


def test_the_entry_point_names_the_instrumentor() -> None:
    (entry_point,) = [
        entry
        for entry in entry_points(group="opentelemetry_instrumentor")
        if entry.name == "pgflow_observe"
    ]

    assert entry_point.load() is PgflowObserveInstrumentor


def test_instrument_starts_a_registry_and_uninstrument_disconnects_everything(
    instrumentor: PgflowObserveInstrumentor,
) -> None:
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    before = receiver_counts()

    instrumentor.instrument(
        settings=Settings(dsn=None, instance_id=f"inst-{secrets.token_hex(3)}"),
        meter_provider=meter_provider,
        tracing=True,
        tracer_provider=tracer_provider,
    )
    registry = instrumentor.registry
    during = receiver_counts()
    with running_task(None, task_id=1, queue="q"):
        load_during = registry.load if registry is not None else None
    data = reader.get_metrics_data()
    instrumentor.uninstrument()
    after = receiver_counts()

    assert isinstance(registry, Registry)
    assert load_during == 1
    # One receiver per signal for the load count and one for the spans.
    assert during == {name: count + 2 for name, count in before.items()}
    assert after == before
    assert instrumentor.registry is None
    assert not instrumentor.is_instrumented_by_opentelemetry
    assert len(exporter.get_finished_spans()) == 1
    assert data is not None
    names = {
        metric.name
        for resource_metrics in data.resource_metrics
        for scope_metrics in resource_metrics.scope_metrics
        for metric in scope_metrics.metrics
    }
    assert "pgflow.tasks.started" in names
    meter_provider.shutdown()
    tracer_provider.shutdown()


def test_instrument_twice_then_uninstrument_leaves_no_receiver(
    instrumentor: PgflowObserveInstrumentor, meter_provider: MeterProvider
) -> None:
    before = receiver_counts()
    settings = Settings(dsn=None, instance_id=f"twice-{secrets.token_hex(3)}")

    for _ in range(2):
        instrumentor.instrument(settings=settings, meter_provider=meter_provider)
        instrumentor.instrument(settings=settings, meter_provider=meter_provider)
        instrumentor.uninstrument()

    assert receiver_counts() == before


def test_the_instrumentor_is_one_per_process() -> None:
    assert PgflowObserveInstrumentor() is PgflowObserveInstrumentor()


def test_instrument_without_arguments_reads_the_environment_and_heartbeats(
    instrumentor: PgflowObserveInstrumentor,
    fleet: Fleet,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert settings.dsn is not None
    monkeypatch.setenv("PGFLOW_OBSERVE_DSN", settings.dsn)
    monkeypatch.setenv("PGFLOW_OBSERVE_SCHEMA", settings.schema)
    monkeypatch.setenv("INSTANCE_ID", settings.instance_id)
    monkeypatch.setenv("PGFLOW_OBSERVE_HEARTBEAT_INTERVAL", "0.2")
    monkeypatch.setenv("PGFLOW_OBSERVE_STALE_TIMEOUT", "2")
    before = receiver_counts()

    instrumentor.instrument()
    registry = instrumentor.registry
    online = fleet.get(settings.instance_id)
    instrumentor.uninstrument()
    offline = fleet.get(settings.instance_id)

    assert registry is not None
    assert registry.settings.instance_id == settings.instance_id
    assert online is not None and online.status == "online"
    assert offline is not None and offline.status == "offline"
    assert receiver_counts() == before


def test_a_failed_instrument_leaves_nothing_connected(
    instrumentor: PgflowObserveInstrumentor,
    make_settings: Callable[..., Settings],
    meter_provider: MeterProvider,
) -> None:
    before = receiver_counts()
    # No table in this test's schema: the registry refuses to start.
    settings = make_settings()

    with pytest.raises(TableMissing):
        instrumentor.instrument(
            settings=settings, meter_provider=meter_provider, tracing=True
        )

    assert receiver_counts() == before
    assert not instrumentor.is_instrumented_by_opentelemetry
    assert instrumentor.registry is None


def test_settings_of_the_wrong_type_are_refused(
    instrumentor: PgflowObserveInstrumentor,
) -> None:
    with pytest.raises(ConfigurationError, match="Settings"):
        instrumentor.instrument(settings={"dsn": None})

    assert not instrumentor.is_instrumented_by_opentelemetry


def test_unknown_keywords_are_ignored(
    instrumentor: PgflowObserveInstrumentor, meter_provider: MeterProvider
) -> None:
    instrumentor.instrument(
        settings=Settings(dsn=None, instance_id=f"kw-{secrets.token_hex(3)}"),
        meter_provider=meter_provider,
        some_future_option=True,
    )

    assert instrumentor.registry is not None
