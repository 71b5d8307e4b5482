"""A worker process for tests that need a second process (crash, duplicate).

Run as ``python worker_process.py '<settings as JSON>'``: it starts a
Registry, prints ``ready`` and waits until killed or its stdin closes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from pgflow_observe import Registry, Settings


class WorkerProcess:
    """Start the script below in a child process and wait until it is ready."""

    def __init__(self, settings: Settings, **overrides: Any) -> None:
        values = {
            "dsn": settings.dsn,
            "schema": settings.schema,
            "table": settings.table,
            "instance_id": settings.instance_id,
            "heartbeat_interval": settings.heartbeat_interval,
            "stale_timeout": settings.stale_timeout,
            "sweep_interval": settings.sweep_interval,
            "sweep": False,
            **overrides,
        }
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__)), json.dumps(values)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if line != "ready":
            self.process.kill()
            raise RuntimeError(f"worker process did not start: {line!r}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        """Simulate a crash: SIGKILL, no chance to mark the row offline."""
        self.process.kill()
        self.process.wait(5)
        self._close_pipes()

    def stop(self) -> None:
        """Graceful exit: close stdin, the worker closes its registry."""
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()


def main() -> None:
    settings = Settings(**json.loads(sys.argv[1]))
    with Registry(settings, metrics=False):
        print("ready", flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
