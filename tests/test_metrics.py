"""The OpenTelemetry instruments, read back through the SDK's in-memory reader."""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    InMemoryMetricReader,
    Metric,
    Sum,
)
from psycopg import sql

from pgflow_observe import Fleet, Registry, Settings, __version__, running_task
from pgflow_observe import metrics as metrics_module
from pgflow_observe.fleet import FleetSnapshot
from pgflow_observe.queues import QueueDepth

from helpers import wait_for

# name -> (unit, kind, monotonic for sums)
DOCUMENTED = {
    "pgflow.tasks.executing": ("{task}", Sum, False),
    "pgflow.tasks.started": ("{task}", Sum, True),
    "pgflow.task.duration": ("s", Histogram, None),
    "pgflow.instance.heartbeats": ("{heartbeat}", Sum, True),
    "pgflow.instance.heartbeat.age": ("s", Gauge, None),
    "pgflow.instance.clock.skew": ("s", Gauge, None),
    "pgflow.instances": ("{instance}", Sum, False),
    "pgflow.queue.messages": ("{message}", Sum, False),
    "pgflow.queue.visible_messages": ("{message}", Sum, False),
    "pgflow.queue.oldest_message.age": ("s", Gauge, None),
}
FLEET_INSTRUMENTS = {
    "pgflow.instances",
    "pgflow.queue.messages",
    "pgflow.queue.visible_messages",
    "pgflow.queue.oldest_message.age",
}
HEARTBEAT_INSTRUMENTS = {
    "pgflow.instance.heartbeats",
    "pgflow.instance.heartbeat.age",
    "pgflow.instance.clock.skew",
}
DATA_POINT_ATTRIBUTES = {
    "pgflow.queue",
    "error.type",
    "pgflow.instance.status",
    "pgflow.instance.liveness",
}


class Executor:
    pass


class TaskFailed(Exception):
    pass


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def meter_provider(reader: InMemoryMetricReader) -> Iterator[MeterProvider]:
    provider = MeterProvider(metric_readers=[reader])
    yield provider
    provider.shutdown()


@pytest.fixture
def metrics_only() -> Settings:
    return Settings(dsn=None, instance_id=f"metrics-only-{secrets.token_hex(3)}")


def collect(reader: InMemoryMetricReader) -> dict[str, Metric]:
    """Collect once; every metric of the pgflow_observe meter, by name."""
    data = reader.get_metrics_data()
    found: dict[str, Metric] = {}
    if data is None:
        return found
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            if scope_metrics.scope.name == "pgflow_observe":
                for metric in scope_metrics.metrics:
                    found[metric.name] = metric
    return found


def values(metric: Metric) -> dict[frozenset[tuple[str, Any]], Any]:
    """Data points by attribute set: the value, or (count, sum) for histograms."""
    result: dict[frozenset[tuple[str, Any]], Any] = {}
    for point in metric.data.data_points:
        key = frozenset((point.attributes or {}).items())
        if isinstance(metric.data, Histogram):
            result[key] = (point.count, point.sum)  # type: ignore[union-attr]
        else:
            result[key] = point.value  # type: ignore[union-attr]
    return result


def instances(status: str, liveness: str) -> frozenset[tuple[str, str]]:
    return frozenset(
        {("pgflow.instance.status", status), ("pgflow.instance.liveness", liveness)}
    )


def queue(name: str) -> frozenset[tuple[str, str]]:
    return frozenset({("pgflow.queue", name)})


def failed(name: str, error_type: str) -> frozenset[tuple[str, str]]:
    return frozenset({("pgflow.queue", name), ("error.type", error_type)})


def run_tasks(executor: object, name: str, ok: int, failing: int = 0) -> None:
    for n in range(ok):
        with running_task(executor, task_id=f"{name}-ok-{n}", queue=name):
            pass
    for n in range(failing):
        with (
            pytest.raises(TaskFailed),
            running_task(executor, task_id=f"{name}-bad-{n}", queue=name),
        ):
            raise TaskFailed(n)


def heartbeat_count(registry: Registry, field: str = "beats") -> int:
    stats = registry.stats().heartbeat
    return 0 if stats is None else int(getattr(stats, field))


def clock_skew(registry: Registry) -> float | None:
    stats = registry.stats().heartbeat
    return None if stats is None else stats.clock_skew


class SnapshotRegistry(Registry):
    """A metrics-only registry that reports given fleet-wide figures."""

    snapshot: FleetSnapshot | None = None

    def fleet_snapshot(self) -> FleetSnapshot | None:
        return self.snapshot


# -- task instruments ------------------------------------------------------------------


def test_task_counts_and_durations_after_running_tasks(
    metrics_only: Settings,
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
) -> None:
    executor = Executor()
    with Registry(metrics_only, meter_provider=meter_provider):
        run_tasks(executor, "emails", ok=3, failing=2)
        run_tasks(executor, "reports", ok=1)
        with running_task(executor, task_id=99, queue="exports"):
            found = collect(reader)

    error_type = f"{TaskFailed.__module__}.TaskFailed"
    assert values(found["pgflow.tasks.executing"]) == {
        queue("emails"): 0,
        queue("reports"): 0,
        queue("exports"): 1,
    }
    assert values(found["pgflow.tasks.started"]) == {
        queue("emails"): 5,
        queue("reports"): 1,
        queue("exports"): 1,
    }
    durations = values(found["pgflow.task.duration"])
    assert set(durations) == {
        queue("emails"),
        failed("emails", error_type),
        queue("reports"),
    }
    assert durations[queue("emails")][0] == 3
    assert durations[failed("emails", error_type)][0] == 2
    assert durations[queue("reports")][0] == 1
    assert all(0 <= total < 1 for _, total in durations.values())


def test_builtin_exception_has_its_bare_name_as_error_type(
    metrics_only: Settings,
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
) -> None:
    with Registry(metrics_only, meter_provider=meter_provider):
        with pytest.raises(KeyError), running_task(None, task_id=1, queue="q"):
            raise KeyError("missing")
        found = collect(reader)

    assert values(found["pgflow.task.duration"]) == {
        failed("q", "KeyError"): (1, pytest.approx(0, abs=1))
    }


def test_executing_equals_the_tasks_in_flight(
    metrics_only: Settings,
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
) -> None:
    executor = Executor()
    with Registry(metrics_only, meter_provider=meter_provider) as registry:
        with (
            running_task(executor, task_id=1, queue="a"),
            running_task(executor, task_id=2, queue="b"),
            running_task(executor, task_id=3, queue="b"),
        ):
            during = values(collect(reader)["pgflow.tasks.executing"])
            load_during = registry.load
        after = values(collect(reader)["pgflow.tasks.executing"])

    assert sum(during.values()) == load_during == 3
    assert during == {queue("a"): 1, queue("b"): 2}
    assert after == {queue("a"): 0, queue("b"): 0}


def test_executing_stays_exact_with_tasks_on_many_threads(
    metrics_only: Settings,
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
) -> None:
    executor = Executor()
    release = threading.Event()
    started = threading.Barrier(9)

    def worker(number: int) -> None:
        with running_task(executor, task_id=number, queue=f"q{number % 2}"):
            started.wait(5)
            release.wait(5)

    with Registry(metrics_only, meter_provider=meter_provider):
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        started.wait(5)
        during = values(collect(reader)["pgflow.tasks.executing"])
        release.set()
        for thread in threads:
            thread.join(5)
        after = collect(reader)

    assert during == {queue("q0"): 4, queue("q1"): 4}
    assert values(after["pgflow.tasks.executing"]) == {queue("q0"): 0, queue("q1"): 0}
    assert sum(n for n, _ in values(after["pgflow.task.duration"]).values()) == 8


def test_duration_histogram_uses_the_task_buckets(
    metrics_only: Settings,
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
) -> None:
    with Registry(metrics_only, meter_provider=meter_provider):
        run_tasks(None, "q", ok=1)
        metric = collect(reader)["pgflow.task.duration"]

    (point,) = metric.data.data_points
    assert tuple(point.explicit_bounds) == metrics_module.DURATION_BUCKETS  # type: ignore[union-attr]
    assert point.explicit_bounds[0] == 0.005  # type: ignore[union-attr]
    assert point.explicit_bounds[-1] == 3600  # type: ignore[union-attr]


def test_no_instance_identity_or_task_id_on_data_points(
    metrics_only: Settings,
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
) -> None:
    snapshot = FleetSnapshot(
        instances={("online", "alive"): 2},
        queues=[QueueDepth("q", 3, 2, 7.5)],
        taken_at=time.monotonic(),
    )
    registry = SnapshotRegistry(metrics_only, meter_provider=meter_provider)
    registry.snapshot = snapshot
    with registry:
        run_tasks(None, "q", ok=2, failing=1)
        with running_task(None, task_id="in-flight", queue="q"):
            found = collect(reader)

    assert found
    for metric in found.values():
        for point in metric.data.data_points:
            attributes = dict(point.attributes or {})
            assert set(attributes) <= DATA_POINT_ATTRIBUTES, metric.name
            assert metrics_only.instance_id not in attributes.values()
            assert not any(
                "ok-" in str(v) or "bad-" in str(v) for v in attributes.values()
            )


# -- background recording ------------------------------------------------------------


def test_durations_are_recorded_by_the_background_thread(
    metrics_only: Settings,
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics_module, "DRAIN_INTERVAL", 0.05)
    with Registry(metrics_only, meter_provider=meter_provider) as registry:
        names = {thread.name for thread in threading.enumerate()}
        run_tasks(None, "q", ok=4)
        # The thread empties the tracker's buffer without any collection.
        wait_for(lambda: registry.tracker.snapshot().completed == 4)
        time.sleep(0.3)
        leftover, dropped = registry.tracker.drain_finished()
        found = collect(reader)

    assert f"pgflow-observe-metrics {metrics_only.instance_id}" in names
    assert (leftover, dropped) == ([], 0)
    assert values(found["pgflow.task.duration"])[queue("q")][0] == 4


def test_each_collection_includes_every_task_finished_before_it(
    metrics_only: Settings,
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics_module, "DRAIN_INTERVAL", 3600.0)
    with Registry(metrics_only, meter_provider=meter_provider):
        for round_number in range(1, 4):
            run_tasks(None, "q", ok=5)
            found = collect(reader)
            started = values(found["pgflow.tasks.started"])[queue("q")]
            count = values(found["pgflow.task.duration"])[queue("q")][0]
            assert started == count == 5 * round_number


def test_every_reader_gets_the_durations(
    metrics_only: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_module, "DRAIN_INTERVAL", 3600.0)
    first, second = InMemoryMetricReader(), InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[first, second])
    try:
        with Registry(metrics_only, meter_provider=provider):
            run_tasks(None, "q", ok=3)
            from_first = collect(first)
            from_second = collect(second)
    finally:
        provider.shutdown()

    assert values(from_first["pgflow.task.duration"])[queue("q")][0] == 3
    assert values(from_second["pgflow.task.duration"])[queue("q")][0] == 3


def test_close_records_the_last_durations_and_keeps_the_final_totals(
    metrics_only: Settings,
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics_module, "DRAIN_INTERVAL", 3600.0)
    registry = Registry(metrics_only, meter_provider=meter_provider).start()
    run_tasks(None, "q", ok=2)
    unfinished = running_task(None, task_id="left-running", queue="q")
    unfinished.__enter__()
    registry.close()
    found = collect(reader)
    unfinished.__exit__(None, None, None)

    # What an export made after the close (the provider's last) carries.
    assert values(found["pgflow.task.duration"])[queue("q")][0] == 2
    assert values(found["pgflow.tasks.started"]) == {queue("q"): 3}
    assert values(found["pgflow.tasks.executing"]) == {queue("q"): 0}
    assert not any(
        thread.name.startswith("pgflow-observe-metrics") and thread.is_alive()
        for thread in threading.enumerate()
    )
    assert registry.tracker.drain_finished() == ([], 0)


def test_the_next_registry_retires_the_final_totals_of_a_closed_one(
    metrics_only: Settings,
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
) -> None:
    with Registry(metrics_only, meter_provider=meter_provider):
        run_tasks(None, "q", ok=2)
    with Registry(metrics_only, meter_provider=meter_provider):
        run_tasks(None, "q", ok=1)
        data = reader.get_metrics_data()

    assert data is not None
    started = [
        values(metric)
        for resource_metrics in data.resource_metrics
        for scope_metrics in resource_metrics.scope_metrics
        for metric in scope_metrics.metrics
        if metric.name == "pgflow.tasks.started"
    ]
    assert started == [{queue("q"): 1}]


def test_a_closed_registry_reports_no_heartbeat_age_or_fleet_figures(
    fleet: Fleet,
    make_settings: Callable[..., Settings],
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
) -> None:
    settings = make_settings(fleet_metrics_interval=0.2)
    with Registry(settings, meter_provider=meter_provider) as registry:
        wait_for(lambda: clock_skew(registry) is not None)
        wait_for(lambda: registry.fleet_snapshot() is not None)
        run_tasks(None, "q", ok=1)
        live = set(collect(reader))
    found = collect(reader)

    assert HEARTBEAT_INSTRUMENTS | {"pgflow.instances"} <= live
    assert set(found) == {
        "pgflow.tasks.executing",
        "pgflow.tasks.started",
        "pgflow.task.duration",
        "pgflow.instance.heartbeats",
    }


def test_dropped_durations_are_logged_when_dropping_starts_and_ends(
    metrics_only: Settings,
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(metrics_module, "DRAIN_INTERVAL", 3600.0)
    monkeypatch.setattr(metrics_module, "FINISHED_BUFFER", 3)
    with Registry(metrics_only, meter_provider=meter_provider):
        run_tasks(None, "q", ok=5)
        first = collect(reader)
        run_tasks(None, "q", ok=1)
        collect(reader)

    messages = [
        record.getMessage()
        for record in caplog.records
        if record.name == "pgflow_observe.metrics" and record.levelno == logging.WARNING
    ]
    assert values(first["pgflow.task.duration"])[queue("q")][0] == 3
    assert values(first["pgflow.tasks.started"])[queue("q")] == 5
    assert len(messages) == 2
    assert "started dropping task durations (2 so far)" in messages[0]
    assert metrics_only.instance_id in messages[0]
    assert "stopped dropping task durations (2 in all)" in messages[1]


def test_registries_sharing_a_provider_add_up_their_counts(
    meter_provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    first, second = Executor(), Executor()
    with (
        Registry(
            Settings(dsn=None, instance_id="first"),
            executor=first,
            meter_provider=meter_provider,
        ),
        Registry(
            Settings(dsn=None, instance_id="second"),
            executor=second,
            meter_provider=meter_provider,
        ),
    ):
        run_tasks(first, "q", ok=2)
        run_tasks(second, "q", ok=3)
        with running_task(first, task_id=1, queue="q"):
            found = collect(reader)

    assert values(found["pgflow.tasks.started"]) == {queue("q"): 6}
    assert values(found["pgflow.tasks.executing"]) == {queue("q"): 1}
    assert values(found["pgflow.task.duration"])[queue("q")][0] == 5


# -- robustness ------------------------------------------------------------------------


class BrokenFleetRegistry(Registry):
    def fleet_snapshot(self) -> FleetSnapshot | None:
        raise RuntimeError("fleet figures unavailable")


def test_a_failing_callback_is_logged_at_debug_and_others_still_report(
    metrics_only: Settings,
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with BrokenFleetRegistry(metrics_only, meter_provider=meter_provider):
        run_tasks(None, "q", ok=1)
        found = collect(reader)

    assert values(found["pgflow.tasks.started"]) == {queue("q"): 1}
    assert not FLEET_INSTRUMENTS & set(found)
    failures = [
        record
        for record in caplog.records
        if record.name == "pgflow_observe.metrics" and "callback of" in record.message
    ]
    assert {record.levelno for record in failures} == {logging.DEBUG}
    assert {record.getMessage() for record in failures} == {
        f"callback of {name} failed for instance {metrics_only.instance_id!r}"
        for name in FLEET_INSTRUMENTS
    }


def test_metrics_off_creates_no_instruments(
    metrics_only: Settings,
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
) -> None:
    with Registry(metrics_only, metrics=False, meter_provider=meter_provider):
        run_tasks(None, "q", ok=1)
        assert collect(reader) == {}


# -- heartbeat and fleet instruments ---------------------------------------------------


def test_metrics_only_observes_no_heartbeat_or_fleet_instruments(
    metrics_only: Settings,
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
) -> None:
    with Registry(metrics_only, meter_provider=meter_provider):
        run_tasks(None, "q", ok=1)
        found = collect(reader)

    assert set(found) == {
        "pgflow.tasks.executing",
        "pgflow.tasks.started",
        "pgflow.task.duration",
    }


def test_fleet_instruments_follow_the_elected_instance_snapshot(
    metrics_only: Settings,
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
) -> None:
    registry = SnapshotRegistry(metrics_only, meter_provider=meter_provider)
    with registry:
        registry.snapshot = FleetSnapshot(
            instances={("online", "alive"): 3, ("paused", "stale"): 1},
            queues=[
                QueueDepth("emails", messages=10, visible=4, oldest_age=12.5),
                QueueDepth("idle", messages=0, visible=0, oldest_age=None),
                QueueDepth("old_pgmq", messages=2, visible=None, oldest_age=1.0),
            ],
            taken_at=time.monotonic(),
        )
        elected = collect(reader)
        registry.snapshot = None
        not_elected = collect(reader)

    assert values(elected["pgflow.instances"]) == {
        instances("online", "alive"): 3,
        instances("paused", "stale"): 1,
    }
    assert values(elected["pgflow.queue.messages"]) == {
        queue("emails"): 10,
        queue("idle"): 0,
        queue("old_pgmq"): 2,
    }
    assert values(elected["pgflow.queue.visible_messages"]) == {
        queue("emails"): 4,
        queue("idle"): 0,
    }
    assert values(elected["pgflow.queue.oldest_message.age"]) == {
        queue("emails"): 12.5,
        queue("idle"): 0.0,
        queue("old_pgmq"): 1.0,
    }
    assert not FLEET_INSTRUMENTS & set(not_elected)


def test_every_instrument_has_the_documented_name_unit_kind_and_scope(
    fleet: Fleet,
    make_settings: Callable[..., Settings],
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
    pgmq_queue: str,
) -> None:
    settings = make_settings(fleet_metrics_interval=0.2)
    with Registry(settings, meter_provider=meter_provider) as registry:
        # The clock skew is measured by beats, not by the registration.
        wait_for(lambda: clock_skew(registry) is not None)
        wait_for(lambda: registry.fleet_snapshot() is not None)
        run_tasks(None, pgmq_queue, ok=1, failing=1)
        data = reader.get_metrics_data()

    assert data is not None
    (resource_metrics,) = data.resource_metrics
    (scope_metrics,) = resource_metrics.scope_metrics
    assert scope_metrics.scope.name == "pgflow_observe"
    assert scope_metrics.scope.version == __version__
    assert scope_metrics.scope.schema_url == metrics_module.SCHEMA_URL
    found = {metric.name: metric for metric in scope_metrics.metrics}
    assert set(found) == set(DOCUMENTED)
    for name, (unit, kind, monotonic) in DOCUMENTED.items():
        metric = found[name]
        assert metric.unit == unit, name
        assert isinstance(metric.data, kind), name
        assert metric.description, name
        if monotonic is not None:
            assert metric.data.is_monotonic is monotonic, name  # type: ignore[union-attr]


def test_heartbeat_instruments_report_beats_age_and_skew(
    fleet: Fleet,
    settings: Settings,
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
) -> None:
    with Registry(settings, meter_provider=meter_provider) as registry:
        wait_for(lambda: heartbeat_count(registry) >= 3)
        found = collect(reader)
        beats = heartbeat_count(registry)

    (count,) = values(found["pgflow.instance.heartbeats"]).values()
    assert 3 <= count <= beats
    (age,) = values(found["pgflow.instance.heartbeat.age"]).values()
    assert 0 <= age < 2
    (skew,) = values(found["pgflow.instance.clock.skew"]).values()
    assert abs(skew) < 1


def test_failed_heartbeats_carry_error_type(
    fleet: Fleet,
    settings: Settings,
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
    pg: psycopg.Connection[Any],
) -> None:
    with Registry(settings, meter_provider=meter_provider) as registry:
        wait_for(lambda: heartbeat_count(registry) >= 2)
        pg.execute(
            sql.SQL("drop table {}").format(
                sql.Identifier(settings.schema, settings.table)
            )
        )
        wait_for(lambda: heartbeat_count(registry, "failures") >= 2)
        found = collect(reader)

    heartbeats = values(found["pgflow.instance.heartbeats"])
    assert heartbeats[frozenset()] >= 2
    assert heartbeats[frozenset({("error.type", "UndefinedTable")})] >= 2


def test_elected_instance_reports_instances_and_queue_depths(
    fleet: Fleet,
    make_settings: Callable[..., Settings],
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
    pgmq_queue: str,
    pgmq_dsn: str,
) -> None:
    with psycopg.connect(pgmq_dsn, autocommit=True) as conn:
        for n in range(4):
            conn.execute("select pgmq.send(%s, %s::jsonb)", (pgmq_queue, json.dumps(n)))
        conn.execute("select * from pgmq.read(%s, 30, 1)", (pgmq_queue,))
    settings = make_settings(fleet_metrics_interval=0.2)
    with Registry(settings, meter_provider=meter_provider) as registry:

        def elected() -> dict[str, Metric] | None:
            snapshot = registry.fleet_snapshot()
            if snapshot is None or ("online", "alive") not in snapshot.instances:
                return None
            return collect(reader)

        found = wait_for(elected)

    online = instances("online", "alive")
    assert values(found["pgflow.instances"])[online] == 1
    assert values(found["pgflow.queue.messages"])[queue(pgmq_queue)] == 4
    assert values(found["pgflow.queue.visible_messages"])[queue(pgmq_queue)] == 3
    assert values(found["pgflow.queue.oldest_message.age"])[queue(pgmq_queue)] >= 0
