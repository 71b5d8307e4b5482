"""Connections: every one the library opens has timeouts on all sides.

A heartbeat must never wait forever on a locked row or a server that stopped
answering, so each connection gets a connect timeout, TCP keepalives and a
user timeout (a dead peer is noticed in seconds), and session-level statement,
lock and idle-in-transaction timeouts.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from ._version import __version__
from .config import Settings

__all__ = ["connect"]


def connect(
    settings: Settings,
    *,
    connect_timeout: float | None = None,
    purpose: str = "heartbeat",
) -> psycopg.Connection[tuple[object, ...]]:
    """Open an autocommit connection for the library's own use.

    :param settings: must name a DSN.
    :param connect_timeout: overrides `Settings.connect_timeout`.
    :param purpose: shown in ``application_name`` (pg_stat_activity).
    :raise psycopg.OperationalError: the server cannot be reached.
    """
    assert settings.dsn is not None, "connect() needs a DSN"
    timeout = settings.connect_timeout if connect_timeout is None else connect_timeout
    statement_ms = max(1, int(settings.statement_timeout * 1000))
    conn = psycopg.connect(
        settings.dsn,
        autocommit=True,
        connect_timeout=max(1, round(timeout)),
        application_name=f"pgflow_observe {__version__} {purpose}"[:63],
        keepalives=1,
        keepalives_idle=5,
        keepalives_interval=2,
        keepalives_count=3,
        tcp_user_timeout=statement_ms + 5000,
    )
    try:
        conn.execute(
            sql.SQL(
                "select set_config('statement_timeout', %(ms)s, false),"
                " set_config('lock_timeout', %(ms)s, false),"
                " set_config('idle_in_transaction_session_timeout', %(idle)s, false)"
            ),
            {"ms": str(statement_ms), "idle": str(statement_ms * 4)},
        )
    except BaseException:
        conn.close()
        raise
    return conn
