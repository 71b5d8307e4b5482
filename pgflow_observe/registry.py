"""The registry: one running instance's presence in the table.

`Registry` ties the parts together: the load tracker fed by the executor's
signals, the heartbeat thread that keeps the row fresh, the control thread
that hears pause and resume, and this instance's pause state.
"""

from __future__ import annotations

import atexit
import builtins
import dataclasses
import logging
import secrets
import threading
import time
from types import TracebackType
from typing import Any

import psycopg
from blinker import ANY
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from . import signals, table
from .config import Settings
from .control import Control
from .errors import DatabaseUnavailable, DuplicateInstance, PgflowObserveError
from .fleet import Fleet, FleetSnapshot
from .heartbeat import Heartbeat, HeartbeatStats
from .load import LoadSnapshot, LoadTracker
from .metrics import RegistryMetrics
from .table import Instance

__all__ = ["Registry", "RegistryStats"]

logger = logging.getLogger(__name__)

# Instance ids held by registries of this process, per table and database, so
# two registries in one process cannot share a row (they would look like one
# process restarting, not like duplicates, to the row check).
_claimed: set[tuple[str, str, str, str]] = set()
_claimed_lock = threading.Lock()


@dataclasses.dataclass(frozen=True, slots=True)
class RegistryStats:
    """Everything the registry knows about itself, for metrics and debugging."""

    instance_id: str
    load: LoadSnapshot
    heartbeat: HeartbeatStats | None
    """None in metrics-only mode."""
    paused: bool
    leader: bool
    """True while this instance is the fleet's elected sweeper."""


class Registry:
    """Track this worker instance: load in memory, presence in Postgres.

    Create one per worker process, call `start()` (or use it as a context
    manager) and `close()` at shutdown; it also closes at interpreter exit.
    With no DSN in the settings it runs metrics-only: nothing touches a
    database, the load count and signals work as usual.

    :param settings: defaults to `Settings.from_env()`.
    :param executor: count only the signals of this sender; by default all.
    :param tracker: an existing `LoadTracker` to use instead of a new one.
    :param metrics: report OpenTelemetry metrics (see `RegistryMetrics`).
    :param meter_provider: where the metrics go; the global one by default.
    :param tracing: one span per task, from start to stop or exception.
    :param tracer_provider: where the spans go; the global one by default.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        executor: Any = ANY,
        tracker: LoadTracker | None = None,
        metrics: bool = True,
        meter_provider: MeterProvider | None = None,
        tracing: bool = False,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.settings = Settings.from_env() if settings is None else settings
        self.tracker = LoadTracker(executor) if tracker is None else tracker
        self._token = secrets.token_hex(16)
        self._lock = threading.Lock()
        self._intent_lock = threading.RLock()
        self._started = False
        self._closed = False
        self._claim: tuple[str, str, str, str] | None = None
        self._heartbeat: Heartbeat | None = None
        self._control: Control | None = None
        # The pause state lives here alone: set while accepting work.
        self._accepting = threading.Event()
        self._accepting.set()
        self._metrics: RegistryMetrics | None = None
        if metrics or tracing:
            self._metrics = RegistryMetrics(
                self,
                metrics=metrics,
                meter_provider=meter_provider,
                tracing=tracing,
                tracer_provider=tracer_provider,
            )

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> Registry:
        """Start counting load and, with a database, register and heartbeat.

        If the database cannot be reached, the registry logs it and keeps
        trying in the background (unless ``settings.strict``). With
        ``settings.create_table`` the table is created or upgraded first.
        Idempotent; returns self.

        :raise DuplicateInstance: a live process elsewhere holds this id.
        :raise TableMissing: the table does not exist and create_table is off.
        :raise DatabaseUnavailable: strict mode, and the database is down.
        """
        with self._lock:
            if self._closed:
                raise PgflowObserveError(
                    f"registry of instance {self.settings.instance_id!r} is closed;"
                    " create a new one"
                )
            if self._started:
                return self
            self._started = True
        try:
            self._start()
        except BaseException:
            self._abort_start()
            raise
        atexit.register(self.close)
        return self

    def _start(self) -> None:
        if not self.settings.metrics_only:
            self._claim_id()
        self.tracker.connect()
        if self._metrics is not None:
            self._metrics.start()
        if self.settings.metrics_only:
            logger.info(
                "instance %r runs metrics-only (no database configured)",
                self.settings.instance_id,
            )
            return

        heartbeat = Heartbeat(
            self.settings, self.tracker, token=self._token, on_intent=self._on_intent
        )
        try:
            heartbeat.register(create_table=self.settings.create_table)
        except psycopg.Error as exc:
            if self.settings.strict:
                raise DatabaseUnavailable(
                    f"instance {self.settings.instance_id!r} cannot register at"
                    f" {self.settings.masked_dsn}: {type(exc).__name__}"
                ) from exc
            # Not strict: the heartbeat thread keeps trying in the background.
        self._heartbeat = heartbeat
        heartbeat.start()
        if self.settings.listen or self.settings.sweep:
            self._control = Control(
                self.settings,
                token=self._token,
                on_intent=self._on_intent,
            )
            self._control.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the background threads and mark the row offline with load 0.

        Idempotent and safe from any thread. Waits at most *timeout* seconds
        for the final write; past that the row turns stale on its own.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.close)
        deadline = time.monotonic() + timeout
        control = self._control
        if control is not None and not control.stop(timeout):
            logger.warning(
                "instance %r: control thread did not stop within %.1f s",
                self.settings.instance_id,
                timeout,
            )
        heartbeat = self._heartbeat
        remaining = max(0.1, deadline - time.monotonic())
        if heartbeat is not None and not heartbeat.stop(remaining):
            logger.warning(
                "instance %r: heartbeat thread did not stop within %.1f s",
                self.settings.instance_id,
                timeout,
            )
        if self._metrics is not None:
            self._metrics.close()
        self.tracker.disconnect()
        self._release_id()

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _claim_id(self) -> None:
        key = (
            self.settings.dsn or "",
            self.settings.schema,
            self.settings.table,
            self.settings.instance_id,
        )
        with _claimed_lock:
            if key in _claimed:
                raise DuplicateInstance(
                    f"instance id {self.settings.instance_id!r} is already used by"
                    " another registry in this process"
                )
            _claimed.add(key)
        self._claim = key

    def _release_id(self) -> None:
        with _claimed_lock:
            if self._claim is not None:
                _claimed.discard(self._claim)
                self._claim = None

    def _abort_start(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        self.tracker.disconnect()
        self._release_id()
        with self._lock:
            self._closed = True

    # -- this instance -----------------------------------------------------------

    def instance_id(self) -> str:
        """Return this instance's id (the row's primary key)."""
        return self.settings.instance_id

    @property
    def load(self) -> int:
        """Tasks executing now in this process."""
        return self.tracker.load

    @property
    def paused(self) -> bool:
        """True while an operator's pause is in force for this instance."""
        return not self._accepting.is_set()

    @property
    def accepting_work(self) -> bool:
        """False while paused: an executor that polls checks this first."""
        return self._accepting.is_set()

    def wait_until_resumed(self, timeout: float | None = None) -> bool:
        """Block until the instance is not paused; False if *timeout* ran out."""
        return self._accepting.wait(timeout)

    def stats(self) -> RegistryStats:
        """Return counters of the load, the heartbeat and the pause state."""
        heartbeat = self._heartbeat
        return RegistryStats(
            instance_id=self.settings.instance_id,
            load=self.tracker.snapshot(),
            heartbeat=None if heartbeat is None else heartbeat.stats(),
            paused=self.paused,
            leader=self.leader,
        )

    def fleet_snapshot(self) -> FleetSnapshot | None:
        """Fleet-wide figures if this instance is the elected one, else None.

        Refreshed in the background by the control thread; reading it does
        no I/O.
        """
        control = self._control
        return None if control is None else control.snapshot

    @property
    def leader(self) -> bool:
        """True while this instance is the fleet's elected sweeper."""
        control = self._control
        return control is not None and control.leader

    def mark_offline(self) -> None:
        """Alias of `close()`, under the original registry's name."""
        self.close()

    def _on_intent(
        self, paused: bool, status: str | None, conn: psycopg.Connection[Any]
    ) -> None:
        # Called from the heartbeat and control threads; the lock keeps the
        # paused/resumed signals in the order the changes were applied.
        with self._intent_lock:
            changed = paused != self.paused
            if changed:
                if paused:
                    self._accepting.clear()
                else:
                    self._accepting.set()
                logger.info(
                    "instance %r %s by an operator",
                    self.settings.instance_id,
                    "paused" if paused else "resumed",
                )
                signal = signals.instance_paused if paused else signals.instance_resumed
                try:
                    signal.send(self)
                except Exception:
                    logger.exception(
                        "a receiver of %r raised; the pause state holds anyway",
                        signal.name,
                    )
            if status != ("paused" if paused else "online"):
                conn.execute(
                    table.acknowledge_statement(self.settings),
                    {
                        "paused": paused,
                        "id": self.settings.instance_id,
                        "token": self._token,
                    },
                )

    # -- the table, from this instance ---------------------------------------------

    def fleet(self) -> Fleet:
        """Return a `Fleet` on the same table (raises in metrics-only mode)."""
        return Fleet(self.settings)

    def create_table(self) -> None:
        """Create or upgrade the table (needs DDL privilege). Idempotent."""
        self.fleet().create_table()

    def list(self) -> builtins.list[Instance]:
        """Return every instance in the table (see `Fleet.list`)."""
        return self.fleet().list()

    def get(self, instance_id: str | None = None) -> Instance | None:
        """Return one instance (this one by default), or None if absent."""
        return self.fleet().get(instance_id or self.settings.instance_id)
