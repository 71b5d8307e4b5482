from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import pytest

from pgflow_observe import Fleet, Registry, Settings
from pgflow_observe.cli import main


def run(settings: Settings, *arguments: str) -> list[str]:
    return [
        "--dsn",
        settings.dsn or "",
        "--schema",
        settings.schema,
        *arguments,
    ]


def test_migrate_creates_the_table_and_can_run_again(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(run(settings, "migrate")) == 0
    assert main(run(settings, "migrate")) == 0

    assert Fleet(settings).list() == []
    assert (
        f"table {settings.schema}.pgflow_instances is ready" in capsys.readouterr().out
    )


def test_list_shows_instances_as_table_and_json(
    fleet: Fleet, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    with Registry(settings, metrics=False):
        assert main(run(settings, "list")) == 0
        table = capsys.readouterr().out
        assert main(run(settings, "list", "--json")) == 0
        lines = capsys.readouterr().out.splitlines()

    assert table.splitlines()[0].split()[:4] == [
        "INSTANCE",
        "STATUS",
        "LIVENESS",
        "LOAD",
    ]
    assert settings.instance_id in table
    record = json.loads(lines[0])
    assert record["instance_id"] == settings.instance_id
    assert record["liveness"] == "alive"
    assert record["status"] == "online"


def test_pause_resume_and_their_exit_codes(
    fleet: Fleet, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    with Registry(settings, metrics=False):
        assert main(run(settings, "pause", settings.instance_id)) == 0
        assert main(run(settings, "pause", settings.instance_id)) == 0
        assert main(run(settings, "resume", settings.instance_id)) == 0
        out = capsys.readouterr().out
    assert main(run(settings, "pause", settings.instance_id)) == 4
    refused = capsys.readouterr().err
    assert main(run(settings, "pause", "nobody")) == 3
    missing = capsys.readouterr().err

    assert "paused" in out and "already paused" in out and "resumed" in out
    assert "offline" in refused
    assert "'nobody'" in missing


def test_forget_and_prune(
    fleet: Fleet,
    make_settings: Callable[..., Settings],
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = make_settings()
    with Registry(settings, metrics=False):
        assert main(run(settings, "forget", settings.instance_id)) == 4
    assert main(run(settings, "prune", "--dry-run")) == 0
    assert "would be marked offline: -" in capsys.readouterr().out
    assert main(run(settings, "forget", settings.instance_id)) == 0
    assert main(run(settings, "show", settings.instance_id)) == 3


def test_unreachable_database_exits_1_without_the_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    dsn = "host=127.0.0.1 port=1 user=ops password=hunter2 connect_timeout=1"

    code = main(["--dsn", dsn, "list"])

    err = capsys.readouterr().err
    assert code == 1
    assert "hunter2" not in err
    assert "password=***" in err


def test_bad_configuration_exits_2_naming_the_value(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--dsn", "dbname=x", "--table", "no-dashes", "list"]) == 2
    assert "'no-dashes'" in capsys.readouterr().err
    assert main(["--dsn", "dbname=x", "--stale-timeout", "4", "list"]) == 2
    assert "stale_timeout" in capsys.readouterr().err


def test_missing_database_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PGFLOW_OBSERVE_DSN", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)

    assert main(["list"]) == 2
    assert "PGFLOW_OBSERVE_DSN" in capsys.readouterr().err


def test_installed_command_runs(settings: Settings) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pgflow_observe.cli", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )

    assert done.returncode == 0
    for command in ("migrate", "list", "pause", "resume", "prune", "forget"):
        assert command in done.stdout
