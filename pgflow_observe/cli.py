"""The ``pgflow-observe`` command: operate the instances table.

Exit codes: 0 success; 1 the database could not be reached or failed;
2 bad usage or configuration; 3 no such instance; 4 refused (the instance
is not in a state that allows the operation).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import psycopg

from . import __version__
from .config import Settings
from .errors import (
    ConfigurationError,
    InstanceIsLive,
    InstanceNotFound,
    InstanceNotLive,
    PgflowObserveError,
)
from .fleet import Fleet
from .table import Instance

__all__ = ["EXIT_DATABASE", "EXIT_NOT_FOUND", "EXIT_REFUSED", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_DATABASE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_REFUSED = 4


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgflow-observe",
        description="See and control the worker instances in the table.",
        epilog=(
            "The database comes from --dsn, else PGFLOW_OBSERVE_DSN, else"
            " DATABASE_URL. Exit codes: 0 ok, 1 database error, 2 usage or"
            " configuration error, 3 no such instance, 4 refused."
        ),
    )
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument(
        "--dsn", help="connection string or URL (env PGFLOW_OBSERVE_DSN, DATABASE_URL)"
    )
    parser.add_argument(
        "--schema", help="schema of the table (env PGFLOW_OBSERVE_SCHEMA)"
    )
    parser.add_argument("--table", help="table name (env PGFLOW_OBSERVE_TABLE)")
    parser.add_argument(
        "--stale-timeout",
        type=float,
        help="seconds without heartbeat before an instance counts as stale"
        " (env PGFLOW_OBSERVE_STALE_TIMEOUT, default 300)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("migrate", help="create the table, or upgrade it (idempotent)")
    listing = commands.add_parser("list", help="list the instances and their liveness")
    listing.add_argument("--json", action="store_true", help="one JSON object a line")
    listing.add_argument(
        "--stale", action="store_true", help="only instances that are stale"
    )
    show = commands.add_parser("show", help="show one instance")
    show.add_argument("instance_id")
    show.add_argument("--json", action="store_true", help="print JSON")
    pause = commands.add_parser("pause", help="pause one live instance")
    pause.add_argument("instance_id")
    resume = commands.add_parser("resume", help="resume one paused instance")
    resume.add_argument("instance_id")
    prune = commands.add_parser(
        "prune", help="mark stale instances offline, delete old offline rows"
    )
    prune.add_argument(
        "--dry-run", action="store_true", help="only print what would change"
    )
    prune.add_argument(
        "--retention",
        type=float,
        help="seconds an offline row is kept (env PGFLOW_OBSERVE_RETENTION,"
        " default 86400)",
    )
    forget = commands.add_parser("forget", help="delete one instance that is not alive")
    forget.add_argument("instance_id")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    arguments = _parser().parse_args(argv)
    explicit: dict[str, Any] = {}
    for name in ("dsn", "schema", "table", "stale_timeout", "retention"):
        value = getattr(arguments, name, None)
        if value is not None:
            explicit[name] = value
    try:
        settings = Settings.from_env(**explicit)
        fleet = Fleet(settings)
        return _COMMANDS[arguments.command](fleet, arguments, sys.stdout)
    except ConfigurationError as exc:
        return _fail(EXIT_USAGE, str(exc))
    except InstanceNotFound as exc:
        return _fail(EXIT_NOT_FOUND, str(exc))
    except (InstanceNotLive, InstanceIsLive) as exc:
        return _fail(EXIT_REFUSED, str(exc))
    except PgflowObserveError as exc:
        return _fail(EXIT_DATABASE, str(exc))
    except psycopg.Error as exc:
        # libpq messages name host and user, never the password.
        first = str(exc).strip().splitlines()
        detail = first[0] if first else ""
        return _fail(
            EXIT_DATABASE,
            f"database error at {settings.masked_dsn}: {type(exc).__name__}: {detail}",
        )


def _fail(code: int, message: str) -> int:
    print(f"pgflow-observe: {message}", file=sys.stderr)
    return code


def _migrate(fleet: Fleet, arguments: argparse.Namespace, out: TextIO) -> int:
    fleet.create_table()
    settings = fleet.settings
    print(f"table {settings.schema}.{settings.table} is ready", file=out)
    return EXIT_OK


def _list(fleet: Fleet, arguments: argparse.Namespace, out: TextIO) -> int:
    instances = fleet.stale() if arguments.stale else fleet.list()
    if arguments.json:
        for instance in instances:
            print(json.dumps(_as_json(instance)), file=out)
        return EXIT_OK
    header = (
        "INSTANCE",
        "STATUS",
        "LIVENESS",
        "LOAD",
        "HEARTBEAT",
        "PAUSE",
        "HOST",
        "PID",
    )
    rows = [header] + [_as_row(instance) for instance in instances]
    widths = [max(len(row[n]) for row in rows) for n in range(len(header))]
    for row in rows:
        print(
            "  ".join(
                cell.ljust(width) for cell, width in zip(row, widths, strict=True)
            ).rstrip(),
            file=out,
        )
    return EXIT_OK


def _show(fleet: Fleet, arguments: argparse.Namespace, out: TextIO) -> int:
    instance = fleet.get(arguments.instance_id)
    if instance is None:
        raise InstanceNotFound(f"no instance with id {arguments.instance_id!r}")
    if arguments.json:
        print(json.dumps(_as_json(instance)), file=out)
    else:
        for key, value in _as_json(instance).items():
            print(f"{key}: {value}", file=out)
    return EXIT_OK


def _pause(fleet: Fleet, arguments: argparse.Namespace, out: TextIO) -> int:
    result = fleet.pause(arguments.instance_id)
    what = "paused" if result.changed else "already paused"
    print(f"instance {arguments.instance_id!r} {what}", file=out)
    return EXIT_OK


def _resume(fleet: Fleet, arguments: argparse.Namespace, out: TextIO) -> int:
    result = fleet.resume(arguments.instance_id)
    what = "resumed" if result.changed else "was not paused"
    print(f"instance {arguments.instance_id!r} {what}", file=out)
    return EXIT_OK


def _prune(fleet: Fleet, arguments: argparse.Namespace, out: TextIO) -> int:
    result = fleet.prune(dry_run=arguments.dry_run)
    would = "would be " if result.dry_run else ""
    print(f"{would}marked offline: {', '.join(result.marked_offline) or '-'}", file=out)
    print(f"{would}deleted: {', '.join(result.deleted) or '-'}", file=out)
    return EXIT_OK


def _forget(fleet: Fleet, arguments: argparse.Namespace, out: TextIO) -> int:
    fleet.forget(arguments.instance_id)
    print(f"instance {arguments.instance_id!r} forgotten", file=out)
    return EXIT_OK


_COMMANDS: dict[str, Callable[[Fleet, argparse.Namespace, TextIO], int]] = {
    "migrate": _migrate,
    "list": _list,
    "show": _show,
    "pause": _pause,
    "resume": _resume,
    "prune": _prune,
    "forget": _forget,
}


def _as_json(instance: Instance) -> dict[str, Any]:
    return {
        "instance_id": instance.instance_id,
        "status": instance.status,
        "liveness": instance.liveness,
        "load": instance.load,
        "capacity": instance.capacity,
        "hostname": instance.hostname,
        "pid": instance.pid,
        "heartbeat_age": instance.heartbeat_age,
        "last_heartbeat": _iso(instance.last_heartbeat),
        "created_at": _iso(instance.created_at),
        "started_at": _iso(instance.started_at),
        "pause_requested_at": _iso(instance.pause_requested_at),
        "pause_acknowledged_at": _iso(instance.pause_acknowledged_at),
        "clock_skew": instance.clock_skew,
        "library_version": instance.library_version,
        "metadata": dict(instance.metadata),
    }


def _iso(value: Any) -> str | None:
    return None if value is None else str(value.isoformat())


def _as_row(instance: Instance) -> tuple[str, ...]:
    if instance.pause_requested:
        pause = "acknowledged" if instance.pause_acknowledged_at else "requested"
    else:
        pause = "-"
    age = (
        "-" if instance.heartbeat_age is None else f"{instance.heartbeat_age:.1f}s ago"
    )
    return (
        instance.instance_id,
        instance.status or "-",
        instance.liveness,
        str(instance.load),
        age,
        pause,
        instance.hostname or "-",
        instance.pid or "-",
    )


if __name__ == "__main__":
    sys.exit(main())
