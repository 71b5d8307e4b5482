"""The library's own SQL makes no spans, even with psycopg instrumented.

An application that instruments psycopg would otherwise get a span for every
heartbeat, control tick and sweep of every worker. The background threads run
with OpenTelemetry instrumentation suppressed; a query of the application's
own, on its own thread, is still traced, which shows the instrumentation was
on while the registry worked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import psycopg
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from pgflow_observe import Fleet, Registry, Settings, running_task

from helpers import wait_for

psycopg_instrumentation = pytest.importorskip(
    "opentelemetry.instrumentation.psycopg", reason="pip install -e '.[dev]'"
)


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = psycopg_instrumentation.PsycopgInstrumentor()
    instrumentor.instrument(tracer_provider=provider, skip_dep_check=True)
    try:
        yield exporter
    finally:
        instrumentor.uninstrument()
        provider.shutdown()


def beats(registry: Registry) -> int:
    stats = registry.stats().heartbeat
    return 0 if stats is None else stats.beats


def statements(exporter: InMemorySpanExporter) -> list[str]:
    found = []
    for span in exporter.get_finished_spans():
        attributes = span.attributes or {}
        text = attributes.get("db.statement", attributes.get("db.query.text", ""))
        found.append(str(text or span.name))
    return found


def test_heartbeat_control_and_sweep_sql_make_no_spans(
    fleet: Fleet,
    make_settings: Callable[..., Settings],
    database_dsn: str,
    exporter: InMemorySpanExporter,
) -> None:
    settings = make_settings(fleet_metrics_interval=0.2)
    exporter.clear()

    with Registry(settings) as registry:
        with running_task(None, task_id=1, queue="q"):
            wait_for(lambda: beats(registry) >= 5)
        wait_for(lambda: registry.fleet_snapshot() is not None)
        with psycopg.connect(database_dsn, autocommit=True) as conn:
            conn.execute("select 'application query' as probe")
    # Closing marked the row offline: one more statement of the library's.

    assert statements(exporter) == ["select 'application query' as probe"]
