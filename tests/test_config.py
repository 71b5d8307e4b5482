from __future__ import annotations

import socket
from typing import Any

import pytest

from pgflow_observe import ConfigurationError, Settings
from pgflow_observe.config import mask_dsn


def test_defaults_match_the_original_design() -> None:
    settings = Settings.from_env({})

    assert settings.heartbeat_interval == 5.0
    assert settings.stale_timeout == 300.0
    assert settings.table == "pgflow_instances"
    assert settings.schema == "public"
    assert settings.dsn is None
    assert settings.metrics_only
    hostname, pid = settings.instance_id.rsplit(":", 1)
    assert hostname == socket.gethostname()
    assert int(pid) > 0


def test_environment_is_read_and_explicit_arguments_win() -> None:
    environ = {
        "INSTANCE_ID": "from-env",
        "PGFLOW_OBSERVE_HEARTBEAT_INTERVAL": "2.5",
        "PGFLOW_OBSERVE_STALE_TIMEOUT": "60",
        "PGFLOW_OBSERVE_TABLE": "instances",
        "PGFLOW_OBSERVE_SCHEMA": "ops",
        "PGFLOW_OBSERVE_LISTEN": "off",
    }

    from_env = Settings.from_env(environ)
    explicit = Settings.from_env(environ, instance_id="explicit", stale_timeout=90)

    assert from_env.instance_id == "from-env"
    assert from_env.heartbeat_interval == 2.5
    assert from_env.stale_timeout == 60.0
    assert (from_env.schema, from_env.table) == ("ops", "instances")
    assert from_env.listen is False
    assert explicit.instance_id == "explicit"
    assert explicit.stale_timeout == 90
    assert explicit.heartbeat_interval == 2.5


def test_dsn_prefers_its_own_variable_over_database_url() -> None:
    both = {"PGFLOW_OBSERVE_DSN": "dbname=own", "DATABASE_URL": "dbname=shared"}

    assert Settings.from_env(both).dsn == "dbname=own"
    assert Settings.from_env({"DATABASE_URL": "dbname=shared"}).dsn == "dbname=shared"
    assert Settings.from_env({"DATABASE_URL": "  "}).dsn is None


def test_explicit_none_dsn_forces_metrics_only() -> None:
    settings = Settings.from_env({"DATABASE_URL": "dbname=shared"}, dsn=None)

    assert settings.metrics_only


def test_constructor_alone_does_not_read_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PGFLOW_OBSERVE_DSN", "dbname=x")

    assert Settings().dsn is None


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"heartbeat_interval": 0}, "heartbeat_interval"),
        ({"heartbeat_interval": -1.0}, "heartbeat_interval"),
        ({"heartbeat_interval": float("nan")}, "heartbeat_interval"),
        ({"stale_timeout": 0}, "stale_timeout"),
        ({"stale_timeout": -5}, "stale_timeout"),
        ({"heartbeat_interval": 5, "stale_timeout": 10}, "stale_timeout"),
        ({"heartbeat_interval": 5, "stale_timeout": 9.5}, "stale_timeout"),
        ({"statement_timeout": 0}, "statement_timeout"),
        ({"sweep_interval": 0}, "sweep_interval"),
        ({"sweep_interval": 301}, "sweep_interval"),
        ({"retention": -1}, "retention"),
        ({"instance_id": ""}, "instance_id"),
        ({"instance_id": "   "}, "instance_id"),
        ({"instance_id": "x" * 256}, "instance_id"),
        ({"instance_id": "bad\nid"}, "instance_id"),
        ({"instance_id": "tab\tid"}, "instance_id"),
        ({"table": "pgflow-instances"}, "table"),
        ({"table": "1table"}, "table"),
        ({"table": 'x"; drop table y; --'}, "table"),
        ({"table": ""}, "table"),
        ({"schema": "a.b"}, "schema"),
        ({"schema": "x" * 64}, "schema"),
        ({"capacity": 0}, "capacity"),
    ],
)
def test_invalid_values_are_refused_naming_the_setting(
    overrides: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        Settings(**overrides)

    message = str(raised.value)
    assert named in message
    shown = next(iter(overrides.values())) if named in overrides else None
    if isinstance(shown, str) and shown.strip() and len(shown) < 40:
        assert repr(shown) in message


def test_instance_id_of_255_characters_is_accepted() -> None:
    assert len(Settings(instance_id="x" * 255).instance_id) == 255


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigurationError, match="PGFLOW_OBSERVE_HEARTBEAT_INTERVAL"):
        Settings.from_env({"PGFLOW_OBSERVE_HEARTBEAT_INTERVAL": "five"})
    with pytest.raises(ConfigurationError, match="'maybe'"):
        Settings.from_env({"PGFLOW_OBSERVE_LISTEN": "maybe"})


def test_unknown_keyword_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="heartbeat"):
        Settings.from_env({}, heartbeat=3)


def test_passwords_never_show_in_repr_or_masked_dsn() -> None:
    url = Settings(dsn="postgresql://worker:s3cret@db.internal:5432/app")
    keywords = Settings(dsn="host=db user=worker password=s3cret dbname=app")

    for settings in (url, keywords):
        assert "s3cret" not in repr(settings)
        assert "s3cret" not in settings.masked_dsn
        assert "***" in settings.masked_dsn
    assert "db.internal" in url.masked_dsn
    assert mask_dsn("not a dsn ===") == "<unparseable dsn>"
