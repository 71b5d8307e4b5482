"""Stale detection, the sweeper, duplicates and zombies."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import conninfo, sql

from pgflow_observe import (
    DuplicateInstance,
    Fleet,
    InstanceIsLive,
    InstanceNotFound,
    Registry,
    Settings,
)

from helpers import wait_for
from worker_process import WorkerProcess


def execute(pg: psycopg.Connection[Any], settings: Settings, query: str) -> None:
    """Run *query* with {} standing for this test's table; %s is the id."""
    pg.execute(
        sql.SQL(query).format(sql.Identifier(settings.schema, settings.table)),
        (settings.instance_id,),
    )


def test_killed_instance_turns_stale_and_the_sweeper_marks_it_offline(
    fleet: Fleet, make_settings: Callable[..., Settings]
) -> None:
    crashed = make_settings(instance_id="crashed")
    survivor = make_settings(instance_id="survivor")
    worker = WorkerProcess(crashed)
    worker.kill()
    killed_at = time.monotonic()

    with Registry(survivor, metrics=False) as registry:
        wait_for(lambda: registry.leader)
        assert fleet.get("crashed").liveness == "alive"  # type: ignore[union-attr]
        wait_for(
            lambda: fleet.get("crashed").status == "offline",  # type: ignore[union-attr]
            timeout=crashed.stale_timeout + 2 * survivor.sweep_interval + 2,  # type: ignore[operator]
        )
        took = time.monotonic() - killed_at

    assert crashed.stale_timeout <= took
    assert took <= crashed.stale_timeout + survivor.sweep_interval + 1.0  # type: ignore[operator]
    assert fleet.get("crashed").load == 0  # type: ignore[union-attr]


def test_only_one_sweeper_runs_and_another_takes_over(
    fleet: Fleet, make_settings: Callable[..., Settings]
) -> None:
    registries = [
        Registry(make_settings(instance_id=f"worker-{n}"), metrics=False).start()
        for n in range(4)
    ]
    try:
        wait_for(lambda: sum(r.leader for r in registries) == 1)
        time.sleep(0.5)
        assert sum(r.leader for r in registries) == 1
        leader = next(r for r in registries if r.leader)
        assert leader.fleet_snapshot() is not None
        assert all(r.fleet_snapshot() is None for r in registries if r is not leader)

        leader.close()
        rest = [r for r in registries if r is not leader]
        wait_for(lambda: sum(r.leader for r in rest) == 1, timeout=5)
    finally:
        for registry in registries:
            registry.close()


def test_fleet_snapshot_counts_instances_by_status_and_liveness(
    fleet: Fleet, make_settings: Callable[..., Settings], pg: psycopg.Connection[Any]
) -> None:
    gone = make_settings(instance_id="gone")
    with Registry(gone, metrics=False):
        pass
    settings = make_settings(fleet_metrics_interval=0.2)
    with Registry(settings, metrics=False) as registry:
        wait_for(lambda: registry.leader)
        snapshot = wait_for(
            lambda: (
                (s := registry.fleet_snapshot()) is not None
                and ("online", "alive") in s.instances
                and s
            )
        )

    assert snapshot.instances == {("online", "alive"): 1, ("offline", "offline"): 1}


def test_crashed_instance_restarted_on_the_same_host_takes_its_row_at_once(
    fleet: Fleet, settings: Settings
) -> None:
    worker = WorkerProcess(settings)
    worker.kill()
    assert fleet.get(settings.instance_id).liveness == "alive"  # type: ignore[union-attr]

    with Registry(settings, metrics=False):
        row = fleet.get(settings.instance_id)

    assert row is not None and row.pid != str(worker.pid)


def test_live_duplicate_on_the_same_host_is_refused(
    fleet: Fleet, settings: Settings
) -> None:
    worker = WorkerProcess(settings)
    try:
        with pytest.raises(DuplicateInstance) as raised:
            Registry(settings, metrics=False).start()
        row = fleet.get(settings.instance_id)
    finally:
        worker.stop()

    assert f"pid {worker.pid}" in str(raised.value)
    assert repr(socket.gethostname()) in str(raised.value)
    assert row is not None and row.pid == str(worker.pid)


def test_live_duplicate_on_another_host_is_refused(
    fleet: Fleet, settings: Settings, pg: psycopg.Connection[Any]
) -> None:
    with Registry(settings, metrics=False):
        execute(
            pg, settings, "update {} set hostname = 'elsewhere' where instance_id = %s"
        )
        # The in-process guard keys on the DSN; an equivalent DSN spelled
        # differently passes it, so the row check itself is what refuses.
        assert settings.dsn is not None
        dsn = conninfo.make_conninfo(settings.dsn, application_name="second")
        other = Registry(Settings(**{**_fields(settings), "dsn": dsn}), metrics=False)

        with pytest.raises(DuplicateInstance, match="'elsewhere'"):
            other.start()


def test_takeover_moves_the_row_and_the_old_holder_stops(
    fleet: Fleet, settings: Settings
) -> None:
    worker = WorkerProcess(settings, heartbeat_interval=0.1, stale_timeout=2)
    try:
        taking = Settings(**{**_fields(settings), "takeover": True})
        with Registry(taking, metrics=False) as registry:
            time.sleep(1.0)
            row = fleet.get(settings.instance_id)
            assert registry.stats().heartbeat.beats > 3  # type: ignore[union-attr]
    finally:
        worker.stop()

    assert row is not None and row.pid != str(worker.pid)
    assert row.liveness == "alive"


def _fields(settings: Settings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in Settings.__dataclass_fields__}


def test_zombie_whose_row_was_deleted_registers_again(
    fleet: Fleet,
    settings: Settings,
    pg: psycopg.Connection[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with Registry(settings, metrics=False) as registry:
        created = fleet.get(settings.instance_id).created_at  # type: ignore[union-attr]
        execute(pg, settings, "delete from {} where instance_id = %s")

        row = wait_for(lambda: fleet.get(settings.instance_id))
        stats = registry.stats().heartbeat

    assert row.status == "online"
    assert row.created_at > created
    assert stats is not None and stats.reregistrations == 1
    assert "found its row deleted while running" in caplog.text


def test_zombie_swept_offline_registers_again(
    fleet: Fleet,
    settings: Settings,
    pg: psycopg.Connection[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with Registry(settings, metrics=False):
        execute(pg, settings, "update {} set status = 'offline' where instance_id = %s")

        row = wait_for(
            lambda: (
                (r := fleet.get(settings.instance_id)) is not None
                and r.status == "online"
                and r
            )
        )

    assert row.liveness == "alive"
    assert "found its row marked offline while running" in caplog.text


def test_prune_dry_run_lists_without_changing(
    fleet: Fleet, make_settings: Callable[..., Settings], pg: psycopg.Connection[Any]
) -> None:
    stale = make_settings(instance_id="stale-one")
    old = make_settings(instance_id="old-one", retention=60)
    for settings in (stale, old):
        WorkerProcess(settings).kill()
    execute(
        pg,
        stale,
        "update {} set last_heartbeat = now() - interval '1 hour'"
        " where instance_id = %s",
    )
    execute(
        pg,
        old,
        "update {} set status = 'offline', last_heartbeat = now() - interval '2 days'"
        " where instance_id = %s",
    )

    preview = fleet.prune(dry_run=True)
    unchanged = {i.instance_id: i.status for i in fleet.list()}
    done = fleet.prune()

    assert (preview.marked_offline, preview.deleted) == (["stale-one"], ["old-one"])
    assert unchanged == {"old-one": "offline", "stale-one": "online"}
    assert (done.marked_offline, done.deleted) == (["stale-one"], ["old-one"])
    assert [(i.instance_id, i.status) for i in fleet.list()] == [
        ("stale-one", "offline")
    ]


def test_retention_spares_rows_with_a_pause_in_force(
    fleet: Fleet, settings: Settings, pg: psycopg.Connection[Any]
) -> None:
    with Registry(settings, metrics=False):
        fleet.pause(settings.instance_id)
    execute(
        pg,
        settings,
        "update {} set last_heartbeat = now() - interval '30 days'"
        " where instance_id = %s",
    )

    result = fleet.prune()

    assert result.deleted == []
    assert fleet.get(settings.instance_id) is not None


def test_forget_deletes_a_dead_row_and_refuses_a_live_one(
    fleet: Fleet, settings: Settings
) -> None:
    with Registry(settings, metrics=False):
        with pytest.raises(InstanceIsLive, match="alive"):
            fleet.forget(settings.instance_id)

    forgotten = fleet.forget(settings.instance_id)

    assert forgotten.instance_id == settings.instance_id
    assert fleet.get(settings.instance_id) is None
    with pytest.raises(InstanceNotFound):
        fleet.forget(settings.instance_id)


def test_clock_skew_is_measured_at_each_heartbeat_and_logged_once(
    fleet: Fleet,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # This host's clock runs 30 s ahead of the database's.
    monkeypatch.setattr(
        "pgflow_observe.heartbeat._wall_clock", lambda: time.time() + 30
    )

    with Registry(settings, metrics=False) as registry:
        skew = wait_for(lambda: registry.stats().heartbeat.clock_skew)  # type: ignore[union-attr]
        wait_for(lambda: registry.stats().heartbeat.beats > 5)  # type: ignore[union-attr]
        row = fleet.get(settings.instance_id)

    assert 29 < skew < 31
    assert row is not None and row.clock_skew is not None and 29 < row.clock_skew < 31
    assert caplog.text.count("clock differs from the database's") == 1
