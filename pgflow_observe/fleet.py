"""Operations on the whole table: listing, and (for operators) control.

`Fleet` needs only a DSN and the table's settings; it runs from any process,
a running instance or the CLI. Each call opens a short-lived connection.
"""

from __future__ import annotations

import builtins
import logging
from typing import Any

import psycopg

from . import db, table
from .config import Settings
from .errors import ConfigurationError
from .table import Instance

__all__ = ["Fleet"]

logger = logging.getLogger(__name__)


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
