"""Optional task spans: one per task, from the task signals."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode

from pgflow_observe import Registry, Settings, __version__, running_task, signals
from pgflow_observe.metrics import SCHEMA_URL


class Executor:
    pass


class TaskFailed(Exception):
    pass


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer_provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


@pytest.fixture
def metrics_only() -> Settings:
    return Settings(dsn=None, instance_id=f"tracing-{secrets.token_hex(3)}")


def receiver_counts() -> tuple[int, int, int]:
    return (
        len(signals.task_start.receivers),
        len(signals.task_stop.receivers),
        len(signals.task_exception.receivers),
    )


def spans_by_task(exporter: InMemorySpanExporter) -> dict[object, ReadableSpan]:
    return {
        (span.attributes or {})["pgflow.task.id"]: span
        for span in exporter.get_finished_spans()
    }


def test_tracing_is_off_by_default(
    metrics_only: Settings,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    with Registry(metrics_only, metrics=False, tracer_provider=tracer_provider):
        with running_task(Executor(), task_id=1, queue="q"):
            pass

    assert exporter.get_finished_spans() == ()


def test_one_consumer_span_per_task_with_its_attributes(
    metrics_only: Settings,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    executor = Executor()
    with Registry(
        metrics_only, metrics=False, tracing=True, tracer_provider=tracer_provider
    ):
        with running_task(
            executor, task_id=7, queue="emails", run_id="run-1", step_slug="send"
        ):
            assert exporter.get_finished_spans() == ()
        with running_task(executor, task_id="m-8", queue="emails", task_index=2):
            pass

    spans = spans_by_task(exporter)
    assert set(spans) == {7, "m-8"}
    first = spans[7]
    assert first.name == "process emails"
    assert first.kind is SpanKind.CONSUMER
    assert dict(first.attributes or {}) == {
        "pgflow.queue": "emails",
        "pgflow.task.id": 7,
        "pgflow.run.id": "run-1",
        "pgflow.step.slug": "send",
    }
    assert first.status.status_code is StatusCode.UNSET
    assert first.start_time is not None and first.end_time is not None
    assert first.end_time >= first.start_time
    assert (spans["m-8"].attributes or {})["pgflow.task.index"] == 2
    assert first.instrumentation_scope is not None
    assert first.instrumentation_scope.name == "pgflow_observe"
    assert first.instrumentation_scope.version == __version__
    assert first.instrumentation_scope.schema_url == SCHEMA_URL


def test_a_failed_task_span_has_error_status_type_and_exception_event(
    metrics_only: Settings,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    with Registry(
        metrics_only, metrics=False, tracing=True, tracer_provider=tracer_provider
    ):
        with (
            pytest.raises(TaskFailed),
            running_task(Executor(), task_id=1, queue="q"),
        ):
            raise TaskFailed("boom")

    (span,) = exporter.get_finished_spans()
    error_type = f"{TaskFailed.__module__}.TaskFailed"
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == error_type
    assert (span.attributes or {})["error.type"] == error_type
    (event,) = span.events
    assert event.name == "exception"
    assert (event.attributes or {})["exception.message"] == "boom"


def test_overlapping_runs_of_one_task_get_one_span_each(
    metrics_only: Settings,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    executor = Executor()
    with Registry(
        metrics_only, metrics=False, tracing=True, tracer_provider=tracer_provider
    ):
        first = running_task(executor, task_id=1, queue="q")
        second = running_task(executor, task_id=1, queue="q")
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)
        assert len(exporter.get_finished_spans()) == 1
        second.__exit__(None, None, None)

    assert len(exporter.get_finished_spans()) == 2


def test_only_the_registry_executor_is_traced(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    mine, other = Executor(), Executor()
    registry = Registry(
        Settings(dsn=None, instance_id="traced"),
        executor=mine,
        metrics=False,
        tracing=True,
        tracer_provider=tracer_provider,
    )
    with registry:
        with running_task(other, task_id=1, queue="q"):
            pass
        with running_task(mine, task_id=2, queue="q"):
            pass

    assert set(spans_by_task(exporter)) == {2}


def test_close_disconnects_the_span_receivers_and_ends_open_spans(
    metrics_only: Settings,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    before = receiver_counts()
    registry = Registry(
        metrics_only, metrics=False, tracing=True, tracer_provider=tracer_provider
    ).start()
    during = receiver_counts()
    task = running_task(Executor(), task_id=1, queue="q")
    task.__enter__()
    registry.close()
    after = receiver_counts()
    task.__exit__(None, None, None)

    # The load tracker and the span receivers: two per signal.
    assert during == tuple(count + 2 for count in before)
    assert after == before
    (span,) = exporter.get_finished_spans()
    assert (span.attributes or {})["pgflow.task.unfinished"] is True


def test_a_malformed_signal_makes_no_span_and_does_not_raise(
    metrics_only: Settings,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    with Registry(
        metrics_only, metrics=False, tracing=True, tracer_provider=tracer_provider
    ):
        signals.task_start.send(Executor(), task_id=None, queue="q")
        signals.task_stop.send(Executor(), task_id=True, queue="q")
        signals.task_exception.send(Executor(), task_id=1, queue=3, exception=None)

    assert exporter.get_finished_spans() == ()
