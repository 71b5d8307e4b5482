"""Operations on the whole table: listing, and (for operators) control.

`Fleet` needs only a DSN and the table's settings; it runs from any process,
a running instance or the CLI. Each call opens a short-lived connection.
"""

from __future__ import annotations

import builtins
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg

from . import db, table
from .config import Settings
from .errors import (
    ConfigurationError,
    InstanceIsLive,
    InstanceNotFound,
    InstanceNotLive,
)
from .queues import QueueDepth
from .table import Instance

__all__ = [
    "ControlResult",
    "Fleet",
    "FleetSnapshot",
    "SweepResult",
    "count_instances",
    "sweep",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class FleetSnapshot:
    """Fleet-wide figures, read by the elected instance for the metrics."""

    instances: Mapping[tuple[str, str], int]
    """Number of instances per (status, liveness); status 'unknown' if null."""
    queues: Sequence[QueueDepth]
    """pgmq queue depths; empty when the pgmq schema is absent."""
    taken_at: float
    """`time.monotonic()` when it was read."""


@dataclasses.dataclass(frozen=True, slots=True)
class SweepResult:
    """What a sweep or prune changed (or, in a dry run, would change)."""

    marked_offline: Sequence[str]
    """Ids of stale instances marked offline."""
    deleted: Sequence[str]
    """Ids of offline rows deleted after the retention period."""
    dry_run: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class ControlResult:
    """The outcome of a pause or resume."""

    instance: Instance
    """The row after the operation."""
    changed: bool
    """False when the instance already was in the asked-for state."""


def count_instances(
    conn: psycopg.Connection[Any], settings: Settings
) -> dict[tuple[str, str], int]:
    """Count the instances per (status, liveness)."""
    rows = conn.execute(
        table.count_instances_statement(settings), {"stale": settings.stale_timeout}
    ).fetchall()
    return {(status, liveness): int(count) for status, liveness, count in rows}


def sweep(
    conn: psycopg.Connection[Any], settings: Settings, *, dry_run: bool = False
) -> SweepResult:
    """Mark stale instances offline and delete offline rows past retention.

    Rows with an operator's pause in force are never deleted: the pause must
    outlive the instance's absence.
    """
    params = {"stale": settings.stale_timeout, "retention": settings.retention}
    with conn.transaction():
        stale = conn.execute(
            table.stale_instances_statement(settings, dry_run=dry_run), params
        ).fetchall()
        old = conn.execute(
            table.old_offline_statement(settings, dry_run=dry_run), params
        ).fetchall()
    return SweepResult(
        marked_offline=sorted(row[0] for row in stale),
        deleted=sorted(row[0] for row in old),
        dry_run=dry_run,
    )


class Fleet:
    """Read and manage the rows of the instances table.

    :param settings: must name a DSN; the stale timeout decides liveness.
    :raise ConfigurationError: *settings* has no DSN.
    """

    def __init__(self, settings: Settings) -> None:
        if settings.dsn is None:
            raise ConfigurationError(
                "no database configured (dsn is None): set PGFLOW_OBSERVE_DSN"
                " or DATABASE_URL, or pass dsn="
            )
        self.settings = settings

    def _connect(self) -> psycopg.Connection[Any]:
        return db.connect(self.settings, purpose="operator")

    def create_table(self) -> None:
        """Create the table, or bring an existing one up to date (idempotent).

        Needs CREATE privilege on the schema; running instances do not.
        """
        with self._connect() as conn:
            table.apply_schema(conn, self.settings)

    def list(self) -> builtins.list[Instance]:
        """Return every instance, ordered by id, liveness from the DB clock."""
        with self._connect() as conn:
            return table.select_instances(conn, self.settings)

    def get(self, instance_id: str) -> Instance | None:
        """Return one instance, or None when no row has this id."""
        with self._connect() as conn:
            rows = table.select_instances(conn, self.settings, instance_id)
        return rows[0] if rows else None

    def stale(self) -> builtins.list[Instance]:
        """Return the instances that are online or paused but silent too long."""
        return [item for item in self.list() if item.liveness == "stale"]

    def pause(self, instance_id: str) -> ControlResult:
        """Pause one live instance: it stops taking new work until resumed.

        The pause is recorded in the table and announced with NOTIFY; the
        instance applies it within milliseconds (or its next heartbeat) and
        acknowledges it in its row. It stays in force across restarts of the
        instance until `resume()`. Pausing a paused instance changes nothing.

        :raise InstanceNotFound: no row has this id.
        :raise InstanceNotLive: the instance is offline or stale.
        """
        return self._set_pause(instance_id, paused=True)

    def resume(self, instance_id: str) -> ControlResult:
        """Lift the pause of one live instance. Idempotent.

        :raise InstanceNotFound: no row has this id.
        :raise InstanceNotLive: the instance is offline or stale.
        """
        return self._set_pause(instance_id, paused=False)

    def _set_pause(self, instance_id: str, *, paused: bool) -> ControlResult:
        verb = "pause" if paused else "resume"
        with self._connect() as conn, conn.transaction():
            found = table.select_instances(
                conn, self.settings, instance_id, for_update=True
            )
            if not found:
                raise InstanceNotFound(f"no instance with id {instance_id!r}")
            before = found[0]
            if before.liveness != "alive":
                raise InstanceNotLive(_not_live_message(before, verb))
            if before.pause_requested == paused:
                return ControlResult(before, changed=False)
            conn.execute(
                table.set_pause_statement(self.settings),
                {
                    "paused": paused,
                    "id": instance_id,
                    "channel": table.notification_channel(self.settings),
                },
            )
            after = table.select_instances(conn, self.settings, instance_id)[0]
        logger.info("instance %r: %s requested", instance_id, verb)
        return ControlResult(after, changed=True)

    def prune(self, *, dry_run: bool = False) -> SweepResult:
        """Sweep now: mark stale instances offline, delete old offline rows.

        :param dry_run: only report what would change.
        """
        with self._connect() as conn:
            return sweep(conn, self.settings, dry_run=dry_run)

    def forget(self, instance_id: str) -> Instance:
        """Delete the row of one instance that is not alive; returns it.

        This also drops an operator's pause recorded for it.

        :raise InstanceNotFound: no row has this id.
        :raise InstanceIsLive: the instance is alive; stop it first.
        """
        with self._connect() as conn, conn.transaction():
            found = table.select_instances(
                conn, self.settings, instance_id, for_update=True
            )
            if not found:
                raise InstanceNotFound(f"no instance with id {instance_id!r}")
            if found[0].liveness == "alive":
                raise InstanceIsLive(
                    f"instance {instance_id!r} is alive (last heartbeat"
                    f" {_age(found[0])} ago); stop it before forgetting it"
                )
            conn.execute(
                table.delete_instance_statement(self.settings), {"id": instance_id}
            )
        logger.info("instance %r forgotten", instance_id)
        return found[0]


def _age(instance: Instance) -> str:
    if instance.heartbeat_age is None:
        return "never"
    return f"{instance.heartbeat_age:.0f} s"


def _not_live_message(instance: Instance, verb: str) -> str:
    if instance.liveness == "offline":
        state = "offline"
    else:
        state = f"stale (no heartbeat for {_age(instance)})"
    message = f"instance {instance.instance_id!r} is {state}: cannot {verb} it."
    if instance.pause_requested:
        message += (
            " Its pause stays recorded and applies when it comes back;"
            " resume it then, or forget the row to drop the pause."
        )
    return message
