"""The README's first command: the demo runs to the end and shows the pause."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).parent.parent / "examples" / "demo.py"


def test_demo_pauses_one_worker_and_drains_the_queue(database_dsn: str) -> None:
    environment = {**os.environ, "PGFLOW_OBSERVE_DSN": database_dsn}

    done = subprocess.run(
        [sys.executable, str(DEMO)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    paused = next(i for i, line in enumerate(lines) if "paused: its load" in line)
    worker_2 = next(line for line in lines[paused:] if line.startswith("demo-worker-2"))
    assert worker_2.split()[1:3] == ["paused", "alive"]
    assert "acknowledged" in worker_2
    closed = lines[lines.index("-- workers closed") + 2 :][:3]
    assert [line.split()[1] for line in closed] == ["offline"] * 3
    assert any(line.startswith("pgflow.tasks.started") for line in lines)
    started = sum(
        int(line.split("started ")[1].split(",")[0])
        for line in lines
        if line.startswith("demo-worker-") and "started" in line
    )
    assert started == 400
