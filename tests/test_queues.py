"""pgmq queue depths, read by the elected instance for the fleet metrics."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import psycopg

from pgflow_observe import Fleet, Registry, Settings
from pgflow_observe.queues import read_queue_depths


def send(dsn: str, queue: str, count: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for n in range(count):
            conn.execute(
                "select pgmq.send(%s, %s::jsonb)", (queue, json.dumps({"n": n}))
            )


def test_depth_counts_all_and_visible_messages(pgmq_dsn: str, pgmq_queue: str) -> None:
    send(pgmq_dsn, pgmq_queue, 5)
    time.sleep(1.1)  # pgmq reports ages in whole seconds
    with psycopg.connect(pgmq_dsn, autocommit=True) as conn:
        # A worker takes two messages: hidden for 30 s, still in the queue.
        conn.execute("select * from pgmq.read(%s, 30, 2)", (pgmq_queue,))
        depths = {d.queue: d for d in read_queue_depths(conn)}

    depth = depths[pgmq_queue]
    assert depth.messages == 5
    assert depth.visible == 3
    assert depth.oldest_age is not None and depth.oldest_age >= 1


def test_empty_queue_has_no_oldest_age(pgmq_dsn: str, pgmq_queue: str) -> None:
    with psycopg.connect(pgmq_dsn) as conn:
        depth = {d.queue: d for d in read_queue_depths(conn)}[pgmq_queue]

    assert (depth.messages, depth.visible, depth.oldest_age) == (0, 0, None)


def test_elected_instance_reports_queue_depths(
    pgmq_dsn: str,
    pgmq_queue: str,
    fleet: Fleet,
    make_settings: Callable[..., Settings],
) -> None:
    send(pgmq_dsn, pgmq_queue, 4)
    settings = make_settings(fleet_metrics_interval=0.2)

    with Registry(settings, metrics=False) as registry:

        def depths() -> dict[str, Any] | None:
            snapshot = registry.fleet_snapshot()
            if snapshot is None:
                return None
            return {d.queue: d for d in snapshot.queues}

        deadline = time.monotonic() + 5
        while not (found := depths()) or pgmq_queue not in found:
            assert time.monotonic() < deadline, "no queue depths reported"
            time.sleep(0.05)

    assert found[pgmq_queue].messages == 4
