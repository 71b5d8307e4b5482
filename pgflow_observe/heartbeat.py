"""The heartbeat thread: keeps this instance's row registered and fresh.

One named daemon thread per instance owns one connection. Each beat is one
UPDATE in one round trip. When the database goes away the thread closes the
connection, backs off with jitter, reconnects and registers again; the
executor never waits for it and never sees its errors. The outage is logged
when it starts, every `OUTAGE_LOG_INTERVAL` seconds while it lasts, and once
when it ends.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import psycopg

from . import db, table
from ._context import (
    instrumentation_suppressed,
    suppress_instrumentation_in_this_thread,
)
from ._version import __version__
from .config import Settings
from .errors import DuplicateInstance, PgflowObserveError, TableMissing
from .load import LoadTracker

__all__ = ["Heartbeat", "HeartbeatStats"]

logger = logging.getLogger(__name__)

#: Seconds between reminders that an outage goes on.
OUTAGE_LOG_INTERVAL = 60.0
#: First retry delay after a failure, in seconds (doubles, with jitter).
BACKOFF_INITIAL = 0.5
#: Clock skew beyond this many seconds is logged (once).
CLOCK_SKEW_WARNING = 2.0

# The client's wall clock, compared with the database's at each heartbeat.
_wall_clock = time.time

#: Called with (pause requested, status in the row, connection) after a beat.
IntentCallback = Callable[[bool, "str | None", "psycopg.Connection[Any]"], None]


@dataclasses.dataclass(frozen=True, slots=True)
class HeartbeatStats:
    """Counters of the heartbeat thread, for metrics and debugging."""

    registered: bool
    beats: int
    """Successful heartbeats (registrations included)."""
    failures: int
    """Failed attempts, all reasons."""
    last_failure: str | None
    """Class name of the last failure's exception."""
    failures_by_type: Mapping[str, int]
    """Failed attempts per exception class name."""
    last_success: float | None
    """`time.monotonic()` of the last success, None before the first."""
    clock_skew: float | None
    """Client clock minus database clock, seconds, at the last beat."""
    outage_since: float | None
    """`time.monotonic()` when the current outage began, None when healthy."""
    reregistrations: int
    """Times the row was found gone or offline while running and restored."""
    displaced: bool
    """True once another process took the row over; the heartbeat stopped."""


class _OutageLog:
    """Log a repeating failure at its start, at intervals, and at its end."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.since: float | None = None
        self.attempts = 0
        self._last_logged = 0.0

    def failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self.attempts += 1
        if self.since is None:
            self.since = self._last_logged = now
            logger.warning(
                "instance %r cannot reach the database: %s; retrying in the background",
                self.instance_id,
                _describe(exc),
            )
        elif now - self._last_logged >= OUTAGE_LOG_INTERVAL:
            self._last_logged = now
            logger.warning(
                "instance %r still cannot reach the database after %.0f s"
                " (%d attempts): %s",
                self.instance_id,
                now - self.since,
                self.attempts,
                _describe(exc),
            )

    def recovered(self) -> None:
        if self.since is None:
            return
        logger.warning(
            "instance %r reached the database again after %.1f s (%d failed attempts)",
            self.instance_id,
            time.monotonic() - self.since,
            self.attempts,
        )
        self.since = None
        self.attempts = 0


def _describe(exc: BaseException) -> str:
    # The first line only: libpq messages can run on, but never hold a password.
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class Heartbeat:
    """Register this instance's row and keep it fresh from a daemon thread.

    :param settings: must name a DSN.
    :param tracker: where the load comes from.
    :param token: random per process start; marks the row as this process's.
    :param on_intent: called on the heartbeat thread after every registration
        and beat with the operator's pause intent; must not raise.
    """

    def __init__(
        self,
        settings: Settings,
        tracker: LoadTracker,
        *,
        token: str,
        on_intent: IntentCallback,
    ) -> None:
        self.settings = settings
        self._tracker = tracker
        self._token = token
        self._on_intent = on_intent
        self._hostname = socket.gethostname()
        self._pid = str(os.getpid())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._outage = _OutageLog(settings.instance_id)
        self._lock = threading.Lock()
        self._registered = False
        self._displaced = False
        self._beats = 0
        self._failures = 0
        self._last_failure: str | None = None
        self._failures_by_type: dict[str, int] = {}
        self._last_success: float | None = None
        self._clock_skew: float | None = None
        self._skew_logged = False
        self._reregistrations = 0

    # -- public ------------------------------------------------------------------

    def register(self, *, create_table: bool = False) -> None:
        """Register now, on the calling thread (`Registry.start()` does).

        :raise DuplicateInstance: another live process holds the id.
        :raise TableMissing: the table does not exist.
        :raise psycopg.Error: the database could not be reached or refused.
        """
        try:
            with instrumentation_suppressed():
                conn = self._connection()
                if create_table:
                    table.apply_schema(conn, self.settings)
                self._register(conn)
        except PgflowObserveError:
            self._drop_connection()
            raise
        except Exception as exc:
            self._drop_connection()
            self._note_failure(exc)
            self._outage.failed(exc)
            raise

    def start(self) -> None:
        """Start the heartbeat thread (it registers first if needed)."""
        self._thread = threading.Thread(
            target=self._run,
            name=f"pgflow-observe-heartbeat {self.settings.instance_id}"[:100],
            daemon=True,
        )
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Stop the thread and mark the row offline; True if done in time."""
        self._stop.set()
        thread = self._thread
        if thread is None:
            self._mark_offline()
            return True
        if thread is not threading.current_thread():
            thread.join(timeout)
        return not thread.is_alive()

    def stats(self) -> HeartbeatStats:
        """Return the thread's counters."""
        with self._lock:
            return HeartbeatStats(
                registered=self._registered,
                beats=self._beats,
                failures=self._failures,
                last_failure=self._last_failure,
                failures_by_type=dict(self._failures_by_type),
                last_success=self._last_success,
                clock_skew=self._clock_skew,
                outage_since=self._outage.since,
                reregistrations=self._reregistrations,
                displaced=self._displaced,
            )

    # -- the thread ----------------------------------------------------------------

    def _run(self) -> None:
        suppress_instrumentation_in_this_thread()
        interval = self.settings.heartbeat_interval
        backoff_cap = min(60.0, 4 * interval)
        failures_in_row = 0
        delay = 0.0 if not self._registered else interval
        while not self._stop.wait(delay):
            began = time.monotonic()
            try:
                conn = self._connection()
                if self._registered:
                    self._beat(conn)
                else:
                    self._register(conn)
            except DuplicateInstance as exc:
                self._displaced = True
                logger.error(
                    "instance %r stops its heartbeat: %s",
                    self.settings.instance_id,
                    exc,
                )
                break
            except TableMissing as exc:
                self._note_failure(exc)
                self._outage.failed(exc)
                failures_in_row += 1
            except Exception as exc:
                self._drop_connection()
                self._note_failure(exc)
                self._outage.failed(exc)
                failures_in_row += 1
            else:
                self._outage.recovered()
                failures_in_row = 0
            if failures_in_row:
                base = min(backoff_cap, BACKOFF_INITIAL * 2 ** (failures_in_row - 1))
                delay = base * random.uniform(0.5, 1.0)
            else:
                delay = max(0.0, interval - (time.monotonic() - began))
        self._mark_offline()

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = db.connect(self.settings, purpose="heartbeat")
        return self._conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                logger.debug("closing a broken connection failed", exc_info=True)

    def _note_failure(self, exc: BaseException) -> None:
        with self._lock:
            self._failures += 1
            name = self._last_failure = type(exc).__name__
            self._failures_by_type[name] = self._failures_by_type.get(name, 0) + 1

    def _note_success(self, skew: float | None) -> None:
        with self._lock:
            self._beats += 1
            self._last_success = time.monotonic()
            if skew is not None:
                self._clock_skew = skew
        if (
            skew is not None
            and abs(skew) > CLOCK_SKEW_WARNING
            and not self._skew_logged
        ):
            self._skew_logged = True
            logger.warning(
                "instance %r: this host's clock differs from the database's by"
                " %.1f s; liveness uses the database clock, but check NTP",
                self.settings.instance_id,
                skew,
            )

    def _register(self, conn: psycopg.Connection[Any]) -> None:
        again = self._registered
        try:
            with conn.transaction():
                holder = table.lock_and_read_holder(conn, self.settings)
                self._check_holder(holder)
                paused = table.upsert_instance(
                    conn,
                    self.settings,
                    hostname=self._hostname,
                    pid=self._pid,
                    token=self._token,
                    library_version=__version__,
                )
        except psycopg.errors.UndefinedTable:
            raise TableMissing(
                f"table {self.settings.schema}.{self.settings.table} does not"
                " exist: create it with Registry.create_table(), `pgflow-observe"
                " migrate`, or Settings(create_table=True)"
            ) from None
        with self._lock:
            self._registered = True
            if again:
                self._reregistrations += 1
        if holder is not None and not holder.alive and holder.token == self._token:
            logger.warning(
                "instance %r found its row marked offline while running;"
                " registered again",
                self.settings.instance_id,
            )
        elif again and holder is None:
            logger.warning(
                "instance %r found its row deleted while running; registered again",
                self.settings.instance_id,
            )
        else:
            logger.info(
                "instance %r registered (host %r, pid %s%s)",
                self.settings.instance_id,
                self._hostname,
                self._pid,
                ", paused by an operator" if paused else "",
            )
        self._note_success(None)
        self._on_intent(paused, "paused" if paused else "online", conn)

    def _check_holder(self, holder: table.Holder | None) -> None:
        if holder is None or not holder.alive or holder.token == self._token:
            return
        if self.settings.takeover:
            logger.warning(
                "instance %r takes its row over from host %r pid %s (takeover on)",
                self.settings.instance_id,
                holder.hostname,
                holder.pid,
            )
            return
        if holder.hostname == self._hostname:
            if holder.pid == self._pid or not _pid_running(holder.pid):
                # The same host, and the old pid is ours or gone: a restart.
                return
        raise DuplicateInstance(
            f"instance id {self.settings.instance_id!r} is held by a live process"
            f" (host {holder.hostname!r}, pid {holder.pid}); pick another"
            " INSTANCE_ID, stop that process, or pass takeover=True"
        )

    def _beat(self, conn: psycopg.Connection[Any]) -> None:
        row = conn.execute(
            table.heartbeat_statement(self.settings),
            {
                "load": self._tracker.load,
                "client_time": _wall_clock(),
                "id": self.settings.instance_id,
                "token": self._token,
            },
        ).fetchone()
        if row is None:
            # The row is gone, offline, or held by another process.
            self._register(conn)
            return
        paused, status, skew = row
        self._note_success(skew)
        self._on_intent(bool(paused), status, conn)

    def _mark_offline(self) -> None:
        if not self._registered or self._displaced:
            self._drop_connection()
            return
        try:
            conn = self._conn
            if conn is None or conn.closed:
                conn = self._conn = db.connect(
                    self.settings,
                    connect_timeout=min(2.0, self.settings.connect_timeout),
                    purpose="heartbeat",
                )
            conn.execute(
                table.mark_offline_statement(self.settings),
                {"id": self.settings.instance_id, "token": self._token},
            )
            logger.info("instance %r marked offline", self.settings.instance_id)
        except Exception as exc:
            logger.warning(
                "instance %r could not mark its row offline: %s; it will turn"
                " stale after %s s",
                self.settings.instance_id,
                _describe(exc),
                self.settings.stale_timeout,
            )
        finally:
            self._registered = False
            self._drop_connection()


def _pid_running(pid: str | None) -> bool:
    try:
        number = int(pid or "")
    except ValueError:
        return False
    if number <= 0:
        return False
    try:
        os.kill(number, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
