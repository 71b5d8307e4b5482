"""The pgflow_instances table: its DDL, its rows, and every statement on it.

All SQL of the library lives here. Identifiers (schema, table, channel) go
through `psycopg.sql`; values always travel as query parameters.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
from collections.abc import Mapping
from importlib import resources
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from .config import Settings

__all__ = [
    "Instance",
    "Liveness",
    "Status",
    "apply_schema",
    "notification_channel",
    "qualified_name",
    "select_instances",
]

Status = Literal["online", "offline", "paused"]
Liveness = Literal["alive", "stale", "offline"]

#: First key of every advisory lock the library takes (the second is a hash).
ADVISORY_LOCK_CLASS = 0x70676F62  # "pgob"

_STATUS_CHECK = "{table}_status_check"


def qualified_name(settings: Settings) -> sql.Identifier:
    """The schema-qualified, quoted table name."""
    return sql.Identifier(settings.schema, settings.table)


def notification_channel(settings: Settings) -> str:
    """The LISTEN/NOTIFY channel that carries pause and resume for this table.

    Derived from the table's full name, so two tables in one database never
    hear each other, and short enough for Postgres' 63-byte limit.
    """
    digest = hashlib.sha256(f"{settings.schema}.{settings.table}".encode()).hexdigest()
    return f"pgflow_observe_{digest[:16]}"


def lock_key(settings: Settings, purpose: str) -> int:
    """A stable signed 32-bit advisory-lock key for *purpose* on this table."""
    text = f"{settings.schema}.{settings.table}:{purpose}".encode()
    value = int.from_bytes(hashlib.sha256(text).digest()[:4], "big")
    return value - (1 << 32) if value >= 1 << 31 else value


def apply_schema(conn: psycopg.Connection[Any], settings: Settings) -> None:
    """Create the table, or bring an existing one up to date. Idempotent.

    Runs in one transaction under an advisory lock, so concurrent callers
    wait for each other instead of failing. A table made by the original
    ex_pgflow migration is upgraded in place: its timestamp columns become
    timestamptz (their values were UTC) and the added columns appear.
    """
    table = qualified_name(settings)
    text = resources.files(__package__).joinpath("sql", "schema.sql").read_text()
    with conn.transaction():
        conn.execute(
            "select pg_advisory_xact_lock(%s, %s)",
            (ADVISORY_LOCK_CLASS, lock_key(settings, "schema")),
        )
        conn.execute(sql.SQL(text).format(table=table))
        _upgrade_timestamps(conn, settings)
        _add_status_check(conn, settings)


def _upgrade_timestamps(conn: psycopg.Connection[Any], settings: Settings) -> None:
    rows = conn.execute(
        "select column_name from information_schema.columns"
        " where table_schema = %s and table_name = %s"
        " and column_name in ('last_heartbeat', 'created_at')"
        " and data_type = 'timestamp without time zone'",
        (settings.schema, settings.table),
    ).fetchall()
    for (column,) in rows:
        conn.execute(
            sql.SQL(
                "alter table {table} alter column {column} type timestamptz"
                " using {column} at time zone 'UTC'"
            ).format(table=qualified_name(settings), column=sql.Identifier(column))
        )


def _add_status_check(conn: psycopg.Connection[Any], settings: Settings) -> None:
    name = _STATUS_CHECK.format(table=settings.table)[:63]
    exists = conn.execute(
        "select 1 from pg_constraint where conname = %s and conrelid = %s::regclass",
        (name, f"{_quote(settings.schema)}.{_quote(settings.table)}"),
    ).fetchone()
    if exists:
        return
    conn.execute(
        sql.SQL(
            "alter table {table} add constraint {name}"
            " check (status in ('online', 'offline', 'paused'))"
        ).format(table=qualified_name(settings), name=sql.Identifier(name))
    )


def _quote(identifier: str) -> str:
    # For a regclass literal only; the identifier was validated as plain.
    return '"' + identifier.replace('"', '""') + '"'


@dataclasses.dataclass(frozen=True, slots=True)
class Instance:
    """One row of the table, with liveness derived from the database clock."""

    instance_id: str
    hostname: str | None
    pid: str | None
    status: Status | None
    """What the instance last reported: online, paused or offline."""
    liveness: Liveness
    """alive; stale (online or paused but silent too long); offline."""
    load: int
    last_heartbeat: datetime.datetime | None
    heartbeat_age: float | None
    """Seconds since the last heartbeat, by the database clock."""
    created_at: datetime.datetime | None
    started_at: datetime.datetime | None
    pause_requested_at: datetime.datetime | None
    """Set while an operator's pause is in force (it outlives restarts)."""
    pause_acknowledged_at: datetime.datetime | None
    """When the instance applied the pause; None until it has."""
    capacity: int | None
    metadata: Mapping[str, Any]
    library_version: str | None
    clock_skew: float | None
    """Client clock minus database clock at the last heartbeat, in seconds."""

    @property
    def pause_requested(self) -> bool:
        """True while an operator's pause is in force."""
        return self.pause_requested_at is not None

    @property
    def is_alive(self) -> bool:
        return self.liveness == "alive"


_LIVENESS = sql.SQL(
    "case when status = 'offline' then 'offline'"
    " when last_heartbeat is null"
    " or last_heartbeat < now() - make_interval(secs => %(stale)s) then 'stale'"
    " else 'alive' end"
)

_SELECT_INSTANCES = sql.SQL(
    "select instance_id, hostname, pid, status, {liveness} as liveness,"
    " coalesce(load, 0) as load, last_heartbeat,"
    " extract(epoch from now() - last_heartbeat)::float8 as heartbeat_age,"
    " created_at, started_at, pause_requested_at, pause_acknowledged_at,"
    " capacity, metadata, library_version, clock_skew"
    " from {table} {where} order by instance_id"
)


def select_instances(
    conn: psycopg.Connection[Any],
    settings: Settings,
    instance_id: str | None = None,
    *,
    for_update: bool = False,
) -> list[Instance]:
    """Read all rows, or the one of *instance_id*, as `Instance` records."""
    params: dict[str, Any] = {"stale": settings.stale_timeout}
    where = sql.SQL("")
    if instance_id is not None:
        where = sql.SQL("where instance_id = %(instance_id)s")
        params["instance_id"] = instance_id
    query = _SELECT_INSTANCES.format(
        liveness=_LIVENESS, table=qualified_name(settings), where=where
    )
    if for_update:
        query = sql.Composed([query, sql.SQL(" for update")])
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(query, params).fetchall()
    return [Instance(**row) for row in rows]


# -- statements of a running instance ----------------------------------------


def upsert_instance(
    conn: psycopg.Connection[Any],
    settings: Settings,
    *,
    hostname: str,
    pid: str,
    token: str,
    library_version: str,
) -> bool:
    """Insert or take over the row; returns whether a pause is in force.

    created_at and an operator's pause survive; the status follows the pause.
    """
    row = conn.execute(
        sql.SQL(
            "insert into {table} as t (instance_id, hostname, pid, status, load,"
            " last_heartbeat, created_at, started_at, capacity, metadata,"
            " library_version, process_token)"
            " values (%(id)s, %(hostname)s, %(pid)s, 'online', 0, now(), now(),"
            " now(), %(capacity)s, %(metadata)s, %(version)s, %(token)s)"
            " on conflict (instance_id) do update set"
            " hostname = excluded.hostname, pid = excluded.pid,"
            " status = case when t.pause_requested_at is null"
            " then 'online' else 'paused' end,"
            " pause_acknowledged_at = case when t.pause_requested_at is null"
            " then null else now() end,"
            " load = 0, last_heartbeat = now(),"
            " started_at = case when t.process_token = excluded.process_token"
            " then t.started_at else now() end,"
            " capacity = excluded.capacity, metadata = excluded.metadata,"
            " library_version = excluded.library_version,"
            " process_token = excluded.process_token"
            " returning t.pause_requested_at is not null"
        ).format(table=qualified_name(settings)),
        {
            "id": settings.instance_id,
            "hostname": hostname,
            "pid": pid,
            "capacity": settings.capacity,
            "metadata": Jsonb(dict(settings.metadata)),
            "version": library_version,
            "token": token,
        },
    ).fetchone()
    assert row is not None
    return bool(row[0])


def heartbeat_statement(settings: Settings) -> sql.Composed:
    """The heartbeat: one UPDATE, one round trip.

    It writes only unindexed columns (HOT), matches the row only while this
    process holds it and it is not offline, and returns the operator's pause
    intent, the status in the row, and the clock skew: the client's clock
    when it sent the beat minus the database's when it ran it (so the skew
    includes the one-way latency, a millisecond or so).
    """
    return sql.SQL(
        "update {table} set load = %(load)s, last_heartbeat = now(),"
        " clock_skew = %(client_time)s - extract(epoch from clock_timestamp())"
        " where instance_id = %(id)s and process_token = %(token)s"
        " and status is distinct from 'offline'"
        " returning pause_requested_at is not null, status, clock_skew"
    ).format(table=qualified_name(settings))


def acknowledge_statement(settings: Settings) -> sql.Composed:
    """Record that the instance applied the pause state it was asked for.

    Matches only if the intent is still the one applied, so a pause and a
    quick resume cannot leave a stale acknowledgement behind.
    """
    return sql.SQL(
        "update {table} set"
        " status = case when %(paused)s then 'paused' else 'online' end,"
        " pause_acknowledged_at = case when %(paused)s then now() else null end"
        " where instance_id = %(id)s and process_token = %(token)s"
        " and status is distinct from 'offline'"
        " and (pause_requested_at is not null) = %(paused)s"
    ).format(table=qualified_name(settings))


def mark_offline_statement(settings: Settings) -> sql.Composed:
    """Mark this process's row offline with load 0 (not a row it lost)."""
    return sql.SQL(
        "update {table} set status = 'offline', load = 0, last_heartbeat = now()"
        " where instance_id = %(id)s and process_token = %(token)s"
    ).format(table=qualified_name(settings))


@dataclasses.dataclass(frozen=True, slots=True)
class Holder:
    """Who holds an instance id's row right now, as registration sees it."""

    hostname: str | None
    pid: str | None
    token: str | None
    alive: bool
    """online or paused, with a heartbeat within the stale timeout."""


def lock_and_read_holder(
    conn: psycopg.Connection[Any], settings: Settings
) -> Holder | None:
    """Serialise registrations of this id, then read its row (in a transaction).

    The advisory lock covers the case where the row does not exist yet, which
    a row lock alone cannot.
    """
    conn.execute(
        "select pg_advisory_xact_lock(%s, hashtext(%s))",
        (ADVISORY_LOCK_CLASS, settings.instance_id),
    )
    row = conn.execute(
        sql.SQL(
            "select hostname, pid, process_token, {liveness} = 'alive'"
            " from {table} where instance_id = %(id)s for update"
        ).format(liveness=_LIVENESS, table=qualified_name(settings)),
        {"id": settings.instance_id, "stale": settings.stale_timeout},
    ).fetchone()
    if row is None:
        return None
    return Holder(hostname=row[0], pid=row[1], token=row[2], alive=bool(row[3]))


# -- statements of the fleet's operators and sweeper ---------------------------

_STALE = sql.SQL(
    "status is distinct from 'offline' and (last_heartbeat is null"
    " or last_heartbeat < now() - make_interval(secs => %(stale)s))"
)

_OLD_OFFLINE = sql.SQL(
    "status = 'offline' and pause_requested_at is null"
    " and coalesce(last_heartbeat, created_at, '-infinity')"
    " < now() - make_interval(secs => %(retention)s)"
)


def count_instances_statement(settings: Settings) -> sql.Composed:
    """Instances per (status, liveness); parameter ``stale``."""
    return sql.SQL(
        "select coalesce(status, 'unknown'), {liveness}, count(*)"
        " from {table} group by 1, 2"
    ).format(liveness=_LIVENESS, table=qualified_name(settings))


def stale_instances_statement(settings: Settings, *, dry_run: bool) -> sql.Composed:
    """Mark stale instances offline (or only list them); returns their ids."""
    if dry_run:
        query = "select instance_id from {table} where {stale} order by 1"
    else:
        query = (
            "update {table} set status = 'offline', load = 0 where {stale}"
            " returning instance_id"
        )
    return sql.SQL(query).format(table=qualified_name(settings), stale=_STALE)


def old_offline_statement(settings: Settings, *, dry_run: bool) -> sql.Composed:
    """Delete (or list) offline rows past retention, sparing paused ones."""
    if dry_run:
        query = "select instance_id from {table} where {old} order by 1"
    else:
        query = "delete from {table} where {old} returning instance_id"
    return sql.SQL(query).format(table=qualified_name(settings), old=_OLD_OFFLINE)


def set_pause_statement(settings: Settings) -> sql.Composed:
    """Set or clear the operator's pause intent and notify the instance.

    The notification is sent on commit, with the new intent as JSON.
    """
    return sql.SQL(
        "with changed as (update {table} set pause_requested_at ="
        " case when %(paused)s then now() else null end"
        " where instance_id = %(id)s returning instance_id)"
        " select pg_notify(%(channel)s, json_build_object("
        "'instance_id', instance_id, 'paused', %(paused)s)::text) from changed"
    ).format(table=qualified_name(settings))


def delete_instance_statement(settings: Settings) -> sql.Composed:
    """Delete one row by id."""
    return sql.SQL("delete from {table} where instance_id = %(id)s").format(
        table=qualified_name(settings)
    )


def intent_statement(settings: Settings) -> sql.Composed:
    """Read this process's row: the operator's pause intent and its status."""
    return sql.SQL(
        "select pause_requested_at is not null, status from {table}"
        " where instance_id = %(id)s and process_token = %(token)s"
    ).format(table=qualified_name(settings))
