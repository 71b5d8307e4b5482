"""The control thread: hears pause and resume, and runs the fleet's chores.

Each instance keeps one more connection, in session mode, for two things:

* LISTEN on the table's channel, so a pause or resume reaches the instance
  within milliseconds (the heartbeat carries the same news within one interval
  if a notification is lost or LISTEN is off);
* a session advisory lock that elects one instance of the fleet as the
  sweeper: it marks stale instances offline, deletes old offline rows, and
  reads the fleet-wide figures for the metrics. When its connection drops,
  the lock goes with it and another instance takes over at its next try.
"""

from __future__ import annotations

import json
import logging
import random
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from . import db, table
from ._context import suppress_instrumentation_in_this_thread
from .config import Settings
from .fleet import FleetSnapshot, count_instances, sweep
from .queues import pgmq_installed, read_queue_depths

__all__ = ["Control"]

logger = logging.getLogger(__name__)

#: First delay before reconnecting the control connection, in seconds; it
#: doubles up to `RECONNECT_DELAY_MAX` or the heartbeat interval if longer.
RECONNECT_DELAY = 0.5
RECONNECT_DELAY_MAX = 5.0

IntentCallback = Callable[[bool, "str | None", "psycopg.Connection[Any]"], None]


class Control:
    """Run the control thread of one instance.

    :param settings: must name a DSN.
    :param token: the registry's process token (marks its row).
    :param on_intent: called with (paused, None, connection) when a
        notification for this instance arrives; must not raise.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        token: str,
        on_intent: IntentCallback,
    ) -> None:
        self.settings = settings
        self._token = token
        self._on_intent = on_intent
        self._channel = table.notification_channel(settings)
        self._leader_key = table.lock_key(settings, "leader")
        self._stop = threading.Event()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._leader = False
        self._snapshot: FleetSnapshot | None = None
        self._has_pgmq: bool | None = None
        self._next_sweep = 0.0
        self._next_snapshot = 0.0
        self._failing_since: float | None = None

    def start(self) -> None:
        """Start the control thread."""
        self._thread = threading.Thread(
            target=self._run,
            name=f"pgflow-observe-control {self.settings.instance_id}"[:100],
            daemon=True,
        )
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Stop the thread (promptly, even mid-wait); True if it ended in time."""
        self._stop.set()
        try:
            self._wake_writer.send(b"x")
        except OSError:
            pass
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        stopped = thread is None or not thread.is_alive()
        if stopped:
            self._wake_reader.close()
            self._wake_writer.close()
        return stopped

    @property
    def leader(self) -> bool:
        """True while this instance holds the sweeper's lock."""
        return self._leader

    @property
    def snapshot(self) -> FleetSnapshot | None:
        """The latest fleet-wide figures while leader, else None."""
        return self._snapshot

    def _run(self) -> None:
        suppress_instrumentation_in_this_thread()
        failures = 0
        while not self._stop.is_set():
            try:
                conn = self._connection()
                self._tick(conn)
                self._wait(conn)
                failures = 0
            except Exception as exc:
                self._lost(exc)
                # Back off with jitter, so a fleet does not reconnect in step.
                cap = max(RECONNECT_DELAY_MAX, self.settings.heartbeat_interval)
                delay = min(cap, RECONNECT_DELAY * 2**failures)
                failures += 1
                self._stop.wait(delay * random.uniform(0.5, 1.0))
        self._lost(None)

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        conn = db.connect(self.settings, purpose="control")
        try:
            if self.settings.listen:
                conn.execute(sql.SQL("listen {}").format(sql.Identifier(self._channel)))
                # What was sent before LISTEN took effect is not heard: read it.
                row = conn.execute(
                    table.intent_statement(self.settings),
                    {"id": self.settings.instance_id, "token": self._token},
                ).fetchone()
                if row is not None:
                    paused, status = row
                    self._on_intent(bool(paused), str(status), conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        if self._failing_since is not None:
            logger.info(
                "instance %r: control connection restored after %.1f s",
                self.settings.instance_id,
                time.monotonic() - self._failing_since,
            )
            self._failing_since = None
        return conn

    def _lost(self, exc: BaseException | None) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                logger.debug("closing the control connection failed", exc_info=True)
        if self._leader:
            self._set_leader(False)
        if exc is not None and self._failing_since is None:
            # The heartbeat logs the outage; this notes the control side once.
            self._failing_since = time.monotonic()
            logger.info(
                "instance %r: control connection lost (%s); pause notifications"
                " now come with the heartbeat until it is back",
                self.settings.instance_id,
                type(exc).__name__,
            )

    def _set_leader(self, leader: bool) -> None:
        self._leader = leader
        logger.info(
            "instance %r %s the fleet's sweeper",
            self.settings.instance_id,
            "is now" if leader else "is no longer",
        )
        if not leader:
            self._snapshot = None

    def _tick(self, conn: psycopg.Connection[Any]) -> None:
        if self.settings.sweep and not self._leader:
            row = conn.execute(
                "select pg_try_advisory_lock(%s, %s)",
                (table.ADVISORY_LOCK_CLASS, self._leader_key),
            ).fetchone()
            if row is not None and row[0]:
                self._next_sweep = self._next_snapshot = 0.0
                self._set_leader(True)
        if not self._leader:
            return
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + self._sweep_interval()
            result = sweep(conn, self.settings)
            if result.marked_offline or result.deleted:
                logger.info(
                    "sweep: marked offline %s, deleted %s",
                    result.marked_offline,
                    result.deleted,
                )
        if now >= self._next_snapshot:
            self._next_snapshot = now + self.settings.fleet_metrics_interval
            self._snapshot = self._read_snapshot(conn)

    def _sweep_interval(self) -> float:
        assert self.settings.sweep_interval is not None
        return self.settings.sweep_interval

    def _read_snapshot(self, conn: psycopg.Connection[Any]) -> FleetSnapshot:
        if self._has_pgmq is None:
            self._has_pgmq = pgmq_installed(conn)
        queues = read_queue_depths(conn) if self._has_pgmq else []
        return FleetSnapshot(
            instances=count_instances(conn, self.settings),
            queues=queues,
            taken_at=time.monotonic(),
        )

    def _wait(self, conn: psycopg.Connection[Any]) -> None:
        # Notifications that arrived while a query ran are already buffered.
        self._handle(conn)
        timeout = self.settings.heartbeat_interval
        if self._leader:
            soonest = min(self._next_sweep, self._next_snapshot)
            timeout = max(0.0, min(timeout, soonest - time.monotonic()))
        wake = self._wake_reader.fileno()
        readable, _, _ = select.select([conn.fileno(), wake], [], [], timeout)
        if wake in readable:
            return
        if readable:
            self._handle(conn)

    def _handle(self, conn: psycopg.Connection[Any]) -> None:
        # Drain first: the generator holds the connection's lock, and handling
        # a notification runs a statement on the same connection.
        for notify in list(conn.notifies(timeout=0)):
            try:
                message = json.loads(notify.payload)
                instance_id = message["instance_id"]
                paused = bool(message["paused"])
            except (ValueError, KeyError, TypeError):
                logger.debug("ignored a malformed notification %r", notify.payload)
                continue
            if instance_id == self.settings.instance_id:
                self._on_intent(paused, None, conn)
