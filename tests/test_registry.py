from __future__ import annotations

import datetime
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgflow_observe import (
    DatabaseUnavailable,
    DuplicateInstance,
    Fleet,
    Instance,
    Registry,
    Settings,
    TableMissing,
    running_task,
)

from helpers import wait_for


class Executor:
    pass


def row(pg: psycopg.Connection[Any], settings: Settings) -> dict[str, Any]:
    cur = pg.cursor(row_factory=psycopg.rows.dict_row)
    found = cur.execute(
        sql.SQL("select * from {} where instance_id = %s").format(
            sql.Identifier(settings.schema, settings.table)
        ),
        (settings.instance_id,),
    ).fetchone()
    assert found is not None
    return found


def test_start_registers_the_instance_online(
    fleet: Fleet, settings: Settings, pg: psycopg.Connection[Any]
) -> None:
    with Registry(settings) as registry:
        instance = registry.get()

        assert isinstance(instance, Instance)
        assert instance.instance_id == settings.instance_id == registry.instance_id()
        assert instance.status == "online"
        assert instance.liveness == "alive"
        assert instance.load == 0
        assert instance.pid is not None and int(instance.pid) > 0
        stored = row(pg, settings)
        assert stored["library_version"]
        assert stored["started_at"] is not None


def test_heartbeat_advances_last_heartbeat_by_the_database_clock(
    fleet: Fleet, settings: Settings, pg: psycopg.Connection[Any]
) -> None:
    with Registry(settings):
        first = row(pg, settings)["last_heartbeat"]
        later = wait_for(
            lambda: row(pg, settings)["last_heartbeat"] > first and row(pg, settings)
        )
        database_now = pg.execute("select now()").fetchone()[0]  # type: ignore[index]

    assert later["last_heartbeat"].tzinfo is not None
    assert abs((database_now - later["last_heartbeat"]).total_seconds()) < 2
    assert later["clock_skew"] is not None
    assert abs(later["clock_skew"]) < 1


def test_row_load_equals_in_process_load_after_a_beat(
    fleet: Fleet, settings: Settings, pg: psycopg.Connection[Any]
) -> None:
    executor = Executor()
    with Registry(settings) as registry:
        with (
            running_task(executor, task_id=1, queue="a"),
            running_task(executor, task_id=2, queue="b"),
            running_task(executor, task_id=3, queue="b"),
        ):
            assert registry.load == 3
            wait_for(lambda: row(pg, settings)["load"] == 3)
        wait_for(lambda: row(pg, settings)["load"] == 0)


def test_close_marks_offline_with_load_zero(
    fleet: Fleet, settings: Settings, pg: psycopg.Connection[Any]
) -> None:
    executor = Executor()
    registry = Registry(settings).start()
    task = running_task(executor, task_id=1, queue="q")
    task.__enter__()
    wait_for(lambda: row(pg, settings)["load"] == 1)

    registry.close()
    task.__exit__(None, None, None)

    stored = row(pg, settings)
    assert stored["status"] == "offline"
    assert stored["load"] == 0
    assert fleet.get(settings.instance_id).liveness == "offline"  # type: ignore[union-attr]


def test_close_is_prompt_mid_interval_and_idempotent(
    fleet: Fleet, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(heartbeat_interval=30, stale_timeout=120)
    registry = Registry(settings).start()
    time.sleep(0.1)

    began = time.perf_counter()
    registry.close()
    took = time.perf_counter() - began
    registry.close()

    assert fleet.get(settings.instance_id).status == "offline"  # type: ignore[union-attr]
    assert took < 1.0, f"close() took {took:.3f} s"


def test_close_from_another_thread(fleet: Fleet, settings: Settings) -> None:
    registry = Registry(settings).start()

    closer = threading.Thread(target=registry.close)
    closer.start()
    closer.join(5)
    registry.close()

    assert not closer.is_alive()
    assert fleet.get(settings.instance_id).status == "offline"  # type: ignore[union-attr]


def test_registering_again_keeps_created_at(
    fleet: Fleet, settings: Settings, pg: psycopg.Connection[Any]
) -> None:
    with Registry(settings):
        created = row(pg, settings)["created_at"]
        started = row(pg, settings)["started_at"]
    time.sleep(0.05)

    with Registry(settings):
        again = row(pg, settings)

    assert again["created_at"] == created
    assert again["started_at"] > started


def test_heartbeat_is_a_hot_update(
    fleet: Fleet, make_settings: Callable[..., Settings], pg: psycopg.Connection[Any]
) -> None:
    settings = make_settings(heartbeat_interval=0.02, listen=False, sweep=False)
    stats = sql.SQL(
        "select n_tup_upd, n_tup_hot_upd from pg_stat_user_tables"
        " where schemaname = %s and relname = %s"
    )

    def counts() -> tuple[int, int]:
        pg.execute("select pg_stat_clear_snapshot()")
        found = pg.execute(stats, (settings.schema, settings.table)).fetchone()
        assert found is not None
        return int(found[0]), int(found[1])

    with Registry(settings) as registry:
        wait_for(lambda: registry.stats().heartbeat.beats >= 40, timeout=20)  # type: ignore[union-attr]
    # Backends report their statistics when idle; wait until they arrive.
    updates, hot = wait_for(lambda: counts()[0] >= 40 and counts(), timeout=15)

    assert hot / updates >= 0.9, f"{hot} of {updates} updates were HOT"


def test_table_has_no_index_but_the_primary_key(
    fleet: Fleet, settings: Settings, pg: psycopg.Connection[Any]
) -> None:
    indexes = pg.execute(
        "select indexname from pg_indexes where schemaname = %s and tablename = %s",
        (settings.schema, settings.table),
    ).fetchall()

    assert [name for (name,) in indexes] == [f"{settings.table}_pkey"]


def test_status_check_refuses_unknown_status(
    fleet: Fleet, settings: Settings, pg: psycopg.Connection[Any]
) -> None:
    with pytest.raises(psycopg.errors.CheckViolation):
        pg.execute(
            sql.SQL(
                "insert into {} (instance_id, status) values ('x', 'dancing')"
            ).format(sql.Identifier(settings.schema, settings.table))
        )


def test_create_table_is_idempotent(fleet: Fleet, settings: Settings) -> None:
    fleet.create_table()
    fleet.create_table()

    assert fleet.list() == []


def test_original_table_is_upgraded_in_place(
    settings: Settings, pg: psycopg.Connection[Any]
) -> None:
    # The table as the original Ecto migration creates it.
    table = sql.Identifier(settings.schema, settings.table)
    pg.execute(
        sql.SQL(
            "create table {} (instance_id text primary key, hostname text,"
            " pid text, status text, load integer default 0,"
            " last_heartbeat timestamp(0), created_at timestamp(0))"
        ).format(table)
    )
    pg.execute(
        sql.SQL(
            "insert into {} values ('elixir-1', 'h', '<0.1.0>', 'online', 2,"
            " (now() at time zone 'UTC')::timestamp(0),"
            " (now() at time zone 'UTC')::timestamp(0))"
        ).format(table)
    )

    Fleet(settings).create_table()
    elixir = Fleet(settings).get("elixir-1")

    assert elixir is not None
    assert elixir.liveness == "alive"
    assert elixir.heartbeat_age is not None and -1 < elixir.heartbeat_age < 5
    assert elixir.load == 2


def test_missing_table_is_a_clear_error(settings: Settings) -> None:
    with pytest.raises(TableMissing, match=settings.table):
        Registry(settings).start()


def test_create_table_at_start_is_opt_in(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(create_table=True)

    with Registry(settings) as registry:
        assert registry.get() is not None


def test_list_and_get_return_typed_records(
    fleet: Fleet, make_settings: Callable[..., Settings]
) -> None:
    first = make_settings(instance_id="a-worker", capacity=4, metadata={"zone": "x"})
    second = make_settings(instance_id="b-worker")
    with Registry(first) as registry, Registry(second):
        instances = registry.list()
        absent = registry.get("nobody")

    assert [i.instance_id for i in instances] == ["a-worker", "b-worker"]
    assert instances[0].capacity == 4
    assert instances[0].metadata == {"zone": "x"}
    assert isinstance(instances[0].created_at, datetime.datetime)
    assert absent is None


def test_silent_instance_turns_stale_by_the_database_clock(
    fleet: Fleet, settings: Settings, pg: psycopg.Connection[Any]
) -> None:
    with Registry(settings):
        pass
    pg.execute(
        sql.SQL(
            "update {} set status = 'online',"
            " last_heartbeat = now() - interval '1 hour' where instance_id = %s"
        ).format(sql.Identifier(settings.schema, settings.table)),
        (settings.instance_id,),
    )

    instance = fleet.get(settings.instance_id)

    assert instance is not None
    assert instance.liveness == "stale"
    assert [i.instance_id for i in fleet.stale()] == [settings.instance_id]


def test_metrics_only_mode_touches_no_database() -> None:
    settings = Settings(dsn=None, instance_id="metrics-only")
    executor = Executor()

    with Registry(settings) as registry:
        with running_task(executor, task_id=1, queue="q"):
            assert registry.load == 1
        stats = registry.stats()

    assert stats.heartbeat is None
    assert stats.load.completed == 1
    assert threading.active_count() >= 1
    assert not any(t.name.startswith("pgflow-observe") for t in threading.enumerate())


def test_unreachable_database_does_not_raise_by_default(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(
        dsn="host=127.0.0.1 port=1 dbname=none user=nobody password=hunter2",
        heartbeat_interval=0.2,
        stale_timeout=2,
        connect_timeout=1,
    )

    registry = Registry(settings).start()
    try:
        with running_task(Executor(), task_id=1, queue="q"):
            assert registry.load == 1
        wait_for(lambda: registry.stats().heartbeat.failures >= 2)  # type: ignore[union-attr]
    finally:
        registry.close()

    assert "hunter2" not in caplog.text
    assert "cannot reach the database" in caplog.text


def test_strict_start_raises_when_database_is_unreachable() -> None:
    settings = Settings(
        dsn="host=127.0.0.1 port=1 dbname=none password=hunter2",
        strict=True,
        connect_timeout=1,
    )

    with pytest.raises(DatabaseUnavailable) as raised:
        Registry(settings).start()

    assert "hunter2" not in str(raised.value)


def test_same_id_twice_in_one_process_is_refused(
    fleet: Fleet, settings: Settings
) -> None:
    with Registry(settings), pytest.raises(DuplicateInstance):
        Registry(settings).start()


def test_closed_registry_cannot_start_again(fleet: Fleet, settings: Settings) -> None:
    registry = Registry(settings)
    registry.start()
    registry.close()

    with pytest.raises(Exception, match="closed"):
        registry.start()


def test_interpreter_exit_marks_the_row_offline(
    fleet: Fleet, settings: Settings
) -> None:
    script = (
        "import sys\n"
        "from pgflow_observe import Registry, Settings\n"
        f"settings = Settings(dsn={settings.dsn!r}, schema={settings.schema!r},"
        f" instance_id={settings.instance_id!r}, heartbeat_interval=30,"
        " stale_timeout=120)\n"
        "Registry(settings, metrics=False).start()\n"
        "print('started', flush=True)\n"
    )

    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "started"
    instance = fleet.get(settings.instance_id)
    assert instance is not None and instance.status == "offline"
