"""Pause and resume one instance, from another connection."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgflow_observe import (
    Fleet,
    InstanceNotFound,
    InstanceNotLive,
    Registry,
    Settings,
    instance_paused,
    instance_resumed,
    running_task,
)

from helpers import wait_for
from worker_process import WorkerProcess


class SignalLog:
    """Records when each instance signal arrives, per sender."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any, float]] = []
        self.arrived = threading.Event()

    def __call__(self, sender: Any, **payload: Any) -> None:
        self.events.append((threading.current_thread().name, sender, time.monotonic()))
        self.arrived.set()

    def wait(self, timeout: float) -> float:
        """Wait for the next signal; return when it arrived (monotonic)."""
        assert self.arrived.wait(timeout), f"no signal within {timeout} s"
        self.arrived.clear()
        return self.events[-1][2]


@pytest.fixture
def paused_log() -> Iterator[SignalLog]:
    log = SignalLog()
    instance_paused.connect(log)
    yield log
    instance_paused.disconnect(log)


@pytest.fixture
def resumed_log() -> Iterator[SignalLog]:
    log = SignalLog()
    instance_resumed.connect(log)
    yield log
    instance_resumed.disconnect(log)


def test_pause_reaches_the_instance_quickly_through_notify(
    fleet: Fleet,
    make_settings: Callable[..., Settings],
    paused_log: SignalLog,
    resumed_log: SignalLog,
) -> None:
    # A long heartbeat interval: only the notification can be this fast.
    settings = make_settings(heartbeat_interval=10, stale_timeout=60)
    with Registry(settings, metrics=False) as registry:
        assert registry.accepting_work

        requested = time.monotonic()
        result = fleet.pause(settings.instance_id)
        latency = paused_log.wait(timeout=1.0) - requested

        assert result.changed
        assert result.instance.pause_requested
        assert paused_log.events[-1][1] is registry
        assert registry.paused and not registry.accepting_work
        acknowledged = wait_for(
            lambda: (
                (row := fleet.get(settings.instance_id)) is not None
                and row.pause_acknowledged_at is not None
                and row
            )
        )
        assert acknowledged.status == "paused"

        requested = time.monotonic()
        fleet.resume(settings.instance_id)
        resume_latency = resumed_log.wait(timeout=1.0) - requested

        assert registry.accepting_work and not registry.paused
        resumed = wait_for(
            lambda: (
                (row := fleet.get(settings.instance_id)) is not None
                and row.status == "online"
                and row
            )
        )
        assert resumed.pause_acknowledged_at is None
        assert not resumed.pause_requested
    assert latency < 1.0 and resume_latency < 1.0


def test_pause_without_notifications_arrives_with_the_heartbeat(
    fleet: Fleet,
    make_settings: Callable[..., Settings],
    paused_log: SignalLog,
    resumed_log: SignalLog,
) -> None:
    settings = make_settings(listen=False, heartbeat_interval=0.5, stale_timeout=5)
    with Registry(settings, metrics=False):
        requested = time.monotonic()
        fleet.pause(settings.instance_id)
        latency = paused_log.wait(timeout=2.0) - requested

        wait_for(lambda: fleet.get(settings.instance_id).status == "paused")  # type: ignore[union-attr]
        requested = time.monotonic()
        fleet.resume(settings.instance_id)
        resume_latency = resumed_log.wait(timeout=2.0) - requested

    assert paused_log.events[-1][0].startswith("pgflow-observe-heartbeat")
    # Within one heartbeat interval, plus a margin for a loaded machine.
    assert latency < 0.5 + 0.4
    assert resume_latency < 0.5 + 0.4


def test_wait_until_resumed_blocks_while_paused(
    fleet: Fleet, settings: Settings
) -> None:
    with Registry(settings, metrics=False) as registry:
        assert registry.wait_until_resumed(timeout=0)

        fleet.pause(settings.instance_id)
        wait_for(lambda: registry.paused)

        assert registry.wait_until_resumed(timeout=0.1) is False
        threading.Timer(0.2, fleet.resume, args=(settings.instance_id,)).start()
        assert registry.wait_until_resumed(timeout=3) is True


def test_tasks_in_flight_finish_and_load_counts_while_paused(
    fleet: Fleet, settings: Settings
) -> None:
    executor = object()
    with Registry(settings, metrics=False) as registry:
        with running_task(executor, task_id=1, queue="q"):
            fleet.pause(settings.instance_id)
            wait_for(lambda: registry.paused)
            wait_for(lambda: fleet.get(settings.instance_id).load == 1)  # type: ignore[union-attr]
        wait_for(lambda: fleet.get(settings.instance_id).load == 0)  # type: ignore[union-attr]

        assert registry.stats().load.completed == 1


def test_pause_and_resume_are_idempotent(fleet: Fleet, settings: Settings) -> None:
    with Registry(settings, metrics=False):
        first = fleet.pause(settings.instance_id)
        second = fleet.pause(settings.instance_id)
        resumed = fleet.resume(settings.instance_id)
        again = fleet.resume(settings.instance_id)

    assert (first.changed, second.changed) == (True, False)
    assert second.instance.pause_requested_at == first.instance.pause_requested_at
    assert (resumed.changed, again.changed) == (True, False)


def test_unknown_id_is_refused_and_changes_nothing(fleet: Fleet) -> None:
    with pytest.raises(InstanceNotFound, match="'ghost'"):
        fleet.pause("ghost")
    with pytest.raises(InstanceNotFound, match="'ghost'"):
        fleet.resume("ghost")

    assert fleet.list() == []


def test_offline_instance_cannot_be_paused(fleet: Fleet, settings: Settings) -> None:
    with Registry(settings, metrics=False):
        pass

    with pytest.raises(InstanceNotLive, match="offline"):
        fleet.pause(settings.instance_id)

    assert not fleet.get(settings.instance_id).pause_requested  # type: ignore[union-attr]


def test_stale_instance_cannot_be_paused(
    fleet: Fleet, settings: Settings, pg: psycopg.Connection[Any]
) -> None:
    worker = WorkerProcess(settings)
    worker.kill()
    pg.execute(
        sql.SQL(
            "update {} set last_heartbeat = now() - interval '1 minute'"
            " where instance_id = %s"
        ).format(sql.Identifier(settings.schema, settings.table)),
        (settings.instance_id,),
    )

    with pytest.raises(InstanceNotLive, match="stale"):
        fleet.pause(settings.instance_id)

    assert not fleet.get(settings.instance_id).pause_requested  # type: ignore[union-attr]


def test_pause_survives_a_graceful_restart(
    fleet: Fleet, settings: Settings, paused_log: SignalLog
) -> None:
    with Registry(settings, metrics=False):
        fleet.pause(settings.instance_id)
        paused_log.wait(timeout=1)
    assert fleet.get(settings.instance_id).status == "offline"  # type: ignore[union-attr]

    with Registry(settings, metrics=False) as registry:
        assert registry.paused
        assert not registry.accepting_work
        paused_log.wait(timeout=1)
        assert paused_log.events[-1][1] is registry
        row = fleet.get(settings.instance_id)

    assert row is not None and row.status == "paused"
    assert row.pause_acknowledged_at is not None


def test_pause_survives_a_crash_and_a_sweep(
    fleet: Fleet, settings: Settings, pg: psycopg.Connection[Any]
) -> None:
    worker = WorkerProcess(settings)
    fleet.pause(settings.instance_id)
    wait_for(lambda: fleet.get(settings.instance_id).status == "paused")  # type: ignore[union-attr]
    worker.kill()
    wait_for(
        lambda: fleet.get(settings.instance_id).liveness == "stale",  # type: ignore[union-attr]
        timeout=settings.stale_timeout + 2,
    )

    swept = fleet.prune()

    assert swept.marked_offline == [settings.instance_id]
    assert fleet.get(settings.instance_id).pause_requested  # type: ignore[union-attr]
    with Registry(settings, metrics=False) as registry:
        assert registry.paused
        fleet.resume(settings.instance_id)
        wait_for(lambda: not registry.paused)
        assert registry.accepting_work


def test_pause_survives_a_crash_and_an_immediate_restart(
    fleet: Fleet, settings: Settings
) -> None:
    worker = WorkerProcess(settings)
    fleet.pause(settings.instance_id)
    wait_for(lambda: fleet.get(settings.instance_id).status == "paused")  # type: ignore[union-attr]
    worker.kill()

    with Registry(settings, metrics=False) as registry:
        row = fleet.get(settings.instance_id)
        assert registry.paused

    assert row is not None and row.status == "paused"
    assert row.pid != str(worker.pid)
