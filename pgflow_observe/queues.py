"""Depth of the pgmq queues, read from pgmq's own metrics function.

Only the fleet's elected instance reads these, so the database sees one
``pgmq.metrics_all()`` per interval, not one per worker.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import psycopg
from psycopg.rows import dict_row

__all__ = ["QueueDepth", "pgmq_installed", "read_queue_depths"]


@dataclasses.dataclass(frozen=True, slots=True)
class QueueDepth:
    """One pgmq queue's backlog."""

    queue: str
    messages: int
    """Messages in the queue, visible or not."""
    visible: int | None
    """Messages a reader could take now; None on pgmq versions before 1.5."""
    oldest_age: float | None
    """Seconds since the oldest message was enqueued; None when empty."""


def pgmq_installed(conn: psycopg.Connection[Any]) -> bool:
    """True when the pgmq schema (extension or SQL-only) is in this database."""
    row = conn.execute("select to_regprocedure('pgmq.metrics_all()')").fetchone()
    return row is not None and row[0] is not None


def read_queue_depths(conn: psycopg.Connection[Any]) -> list[QueueDepth]:
    """Read every queue's depth with ``pgmq.metrics_all()``.

    NOTE: pgmq counts each queue's rows, a scan whose cost grows with the
    backlog; it runs once per fleet metrics interval, on one instance.
    """
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute("select * from pgmq.metrics_all()").fetchall()
    return [
        QueueDepth(
            queue=row["queue_name"],
            messages=int(row["queue_length"] or 0),
            visible=(
                None
                if row.get("queue_visible_length") is None
                else int(row["queue_visible_length"])
            ),
            oldest_age=(
                None
                if row["oldest_msg_age_sec"] is None
                else float(row["oldest_msg_age_sec"])
            ),
        )
        for row in rows
    ]
