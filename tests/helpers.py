"""Small helpers shared by the tests."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import pytest


def wait_for(
    condition: Callable[[], Any],
    timeout: float = 10.0,
    what: str = "condition",
    interval: float = 0.02,
) -> Any:
    """Poll *condition* until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} not met within {timeout} s")


#: Set to 1 (CI does) to make tests that need Prometheus fail, not skip.
REQUIRE_PROMETHEUS = "PGFLOW_OBSERVE_REQUIRE_PROMETHEUS"

#: The Prometheus series of every instrument, as the README documents them.
DOCUMENTED_SERIES = frozenset(
    {
        "pgflow_tasks_executing",
        "pgflow_tasks_started_total",
        "pgflow_task_duration_seconds_bucket",
        "pgflow_task_duration_seconds_sum",
        "pgflow_task_duration_seconds_count",
        "pgflow_instance_heartbeats_total",
        "pgflow_instance_heartbeat_age_seconds",
        "pgflow_instance_clock_skew_seconds",
        "pgflow_instances",
        "pgflow_queue_messages",
        "pgflow_queue_visible_messages",
        "pgflow_queue_oldest_message_age_seconds",
    }
)


def prometheus_binary(name: str) -> str:
    """The path of *name* (prometheus, promtool), else skip or, if required, fail."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"the {name} binary is not on PATH (Debian: apt-get install prometheus)"
    if os.environ.get(REQUIRE_PROMETHEUS) == "1":
        pytest.fail(f"{message}; {REQUIRE_PROMETHEUS}=1 requires it")
    pytest.skip(f"{message}; set {REQUIRE_PROMETHEUS}=1 to fail instead")
