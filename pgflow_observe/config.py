"""Settings: one object, resolved from arguments, then environment, then defaults.

The keys carried over from the original registry design are the instance id,
the heartbeat interval and the stale timeout; the rest say where the table
lives and how the background threads behave.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Callable, Mapping
from typing import Any

from psycopg import conninfo

from .errors import ConfigurationError

__all__ = ["ENVIRONMENT_VARIABLES", "Settings", "default_instance_id", "mask_dsn"]

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}\Z")
_MAX_INSTANCE_ID = 255

#: Which environment variable feeds which setting (the DSN has a fallback).
ENVIRONMENT_VARIABLES: Mapping[str, tuple[str, ...]] = {
    "dsn": ("PGFLOW_OBSERVE_DSN", "DATABASE_URL"),
    "instance_id": ("INSTANCE_ID",),
    "heartbeat_interval": ("PGFLOW_OBSERVE_HEARTBEAT_INTERVAL",),
    "stale_timeout": ("PGFLOW_OBSERVE_STALE_TIMEOUT",),
    "table": ("PGFLOW_OBSERVE_TABLE",),
    "schema": ("PGFLOW_OBSERVE_SCHEMA",),
    "statement_timeout": ("PGFLOW_OBSERVE_STATEMENT_TIMEOUT",),
    "sweep_interval": ("PGFLOW_OBSERVE_SWEEP_INTERVAL",),
    "retention": ("PGFLOW_OBSERVE_RETENTION",),
    "listen": ("PGFLOW_OBSERVE_LISTEN",),
    "sweep": ("PGFLOW_OBSERVE_SWEEP",),
    "fleet_metrics_interval": ("PGFLOW_OBSERVE_FLEET_METRICS_INTERVAL",),
}


def default_instance_id() -> str:
    """Return ``hostname:pid``, the id used when none is configured."""
    return f"{socket.gethostname()}:{os.getpid()}"


def mask_dsn(dsn: str | None) -> str:
    """Return *dsn* in a form safe to log: any password is replaced by ``***``."""
    if dsn is None:
        return "<none>"
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except Exception:
        return "<unparseable dsn>"
    if "password" in params:
        params["password"] = "***"
    return conninfo.make_conninfo("", **params)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Configuration of one pgflow_observe instance.

    Build it with `Settings.from_env()` to read the environment, or call the
    constructor with every value you want (unnamed ones take the defaults and
    the environment is not read). All durations are in seconds.

    :param dsn: libpq connection string or URL; None runs metrics-only.
    :param instance_id: the row's primary key; ``hostname:pid`` by default.
    :param heartbeat_interval: seconds between heartbeats.
    :param stale_timeout: a live instance whose last heartbeat is older than
        this is stale; must be more than twice the heartbeat interval.
    :param table: table name, a plain identifier.
    :param schema: schema of the table, a plain identifier.
    :param statement_timeout: statement and lock timeout of every query the
        library runs, so a locked row or hung server cannot hold a thread.
    :param connect_timeout: seconds to wait for a new connection.
    :param sweep_interval: seconds between sweeps of stale and old rows; at
        most the stale timeout. Defaults to a fifth of the stale timeout.
    :param retention: offline rows older than this are deleted by the sweeper.
    :param listen: LISTEN for pause/resume notifications (else the heartbeat
        alone carries them, within one interval).
    :param sweep: take part in the election of the fleet's sweeper, the one
        instance that also reports the fleet-wide metrics.
    :param fleet_metrics_interval: seconds between two reads of the
        fleet-wide figures (instances by status, pgmq queue depths) by the
        elected instance.
    :param capacity: how many tasks the executor runs at once, if it knows;
        stored in the row for dashboards.
    :param metadata: small JSON-serialisable mapping stored in the row.
    :param create_table: create or upgrade the table at start (needs DDL
        privilege); otherwise call `Registry.create_table()` once yourself.
    :param strict: raise from `Registry.start()` when the database cannot be
        reached, instead of logging and retrying in the background.
    :param takeover: take over the row of a live duplicate instead of
        refusing to start.
    :raise ConfigurationError: a value is out of range or malformed.
    """

    dsn: str | None = dataclasses.field(default=None, repr=False)
    instance_id: str = dataclasses.field(default_factory=default_instance_id)
    heartbeat_interval: float = 5.0
    stale_timeout: float = 300.0
    table: str = "pgflow_instances"
    schema: str = "public"
    statement_timeout: float = 5.0
    connect_timeout: float = 5.0
    sweep_interval: float | None = None
    retention: float = 86400.0
    listen: bool = True
    sweep: bool = True
    fleet_metrics_interval: float = 15.0
    capacity: int | None = None
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    create_table: bool = False
    strict: bool = False
    takeover: bool = False

    def __post_init__(self) -> None:
        _check_positive("heartbeat_interval", self.heartbeat_interval)
        _check_positive("stale_timeout", self.stale_timeout)
        _check_positive("statement_timeout", self.statement_timeout)
        _check_positive("connect_timeout", self.connect_timeout)
        _check_positive("retention", self.retention)
        _check_positive("fleet_metrics_interval", self.fleet_metrics_interval)
        if self.stale_timeout <= 2 * self.heartbeat_interval:
            raise ConfigurationError(
                f"stale_timeout must be more than twice heartbeat_interval"
                f" ({self.heartbeat_interval!r} s), got {self.stale_timeout!r}"
            )
        if self.sweep_interval is None:
            object.__setattr__(self, "sweep_interval", self.stale_timeout / 5)
        else:
            _check_positive("sweep_interval", self.sweep_interval)
            if self.sweep_interval > self.stale_timeout:
                raise ConfigurationError(
                    f"sweep_interval must be at most stale_timeout"
                    f" ({self.stale_timeout!r} s), got {self.sweep_interval!r}"
                )
        _check_instance_id(self.instance_id)
        _check_identifier("table", self.table)
        _check_identifier("schema", self.schema)
        if self.dsn is not None and not isinstance(self.dsn, str):
            raise ConfigurationError(f"dsn must be a string or None, got {self.dsn!r}")
        if self.capacity is not None and (
            not isinstance(self.capacity, int) or self.capacity < 1
        ):
            raise ConfigurationError(
                f"capacity must be a positive integer or None, got {self.capacity!r}"
            )
        if not isinstance(self.metadata, Mapping):
            raise ConfigurationError(
                f"metadata must be a mapping, got {type(self.metadata).__name__}"
            )

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **explicit: Any
    ) -> Settings:
        """Resolve settings: explicit keywords, then environment, then defaults.

        A keyword given explicitly wins even when its value is None, so
        ``Settings.from_env(dsn=None)`` runs metrics-only whatever the
        environment says. Empty environment variables count as unset.

        :param environ: where to read variables; `os.environ` by default.
        :param explicit: any field of `Settings`.
        :raise ConfigurationError: a value is malformed, or a keyword is not a
            setting.
        """
        environ = os.environ if environ is None else environ
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(explicit) - set(fields))
        if unknown:
            raise ConfigurationError(f"unknown setting(s): {', '.join(unknown)}")

        values: dict[str, Any] = {}
        for name, variables in ENVIRONMENT_VARIABLES.items():
            if name in explicit:
                continue
            for variable in variables:
                raw = environ.get(variable, "").strip()
                if raw:
                    values[name] = _parse(variable, raw, _PARSERS.get(name, str))
                    break
        values.update(explicit)
        return cls(**values)

    @property
    def metrics_only(self) -> bool:
        """True when no database is configured."""
        return self.dsn is None

    @property
    def masked_dsn(self) -> str:
        """The DSN with its password hidden, for logs and output."""
        return mask_dsn(self.dsn)


def _parse_bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


_PARSERS: dict[str, Callable[[str], Any]] = {
    "heartbeat_interval": float,
    "stale_timeout": float,
    "statement_timeout": float,
    "sweep_interval": float,
    "retention": float,
    "listen": _parse_bool,
    "sweep": _parse_bool,
    "fleet_metrics_interval": float,
}


def _parse(variable: str, raw: str, parser: Callable[[str], Any]) -> Any:
    try:
        return parser(raw)
    except ValueError as exc:
        raise ConfigurationError(
            f"environment variable {variable} has an invalid value {raw!r}: {exc}"
        ) from None


def _check_positive(name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not value > 0
        or value == float("inf")
    ):
        raise ConfigurationError(
            f"{name} must be a positive finite number of seconds, got {value!r}"
        )


def _check_instance_id(value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(
            f"instance_id must be a non-empty string, got {value!r}"
        )
    if len(value) > _MAX_INSTANCE_ID:
        raise ConfigurationError(
            f"instance_id must be at most {_MAX_INSTANCE_ID} characters,"
            f" got {len(value)}: {value[:40]!r}..."
        )
    if not value.isprintable():
        raise ConfigurationError(
            f"instance_id must contain only printable characters, got {value!r}"
        )


def _check_identifier(name: str, value: object) -> None:
    if not isinstance(value, str) or not _IDENTIFIER.match(value):
        raise ConfigurationError(
            f"{name} must be a plain SQL identifier (letters, digits and"
            f" underscores, not starting with a digit, at most 63), got {value!r}"
        )
