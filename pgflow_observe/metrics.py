"""OpenTelemetry metrics, and optional task spans, for one registry.

`Registry` creates a `RegistryMetrics` and drives it; an application only
passes ``meter_provider`` / ``tracer_provider`` to the registry, or leaves
them out to use the global providers. This module uses the OpenTelemetry API
alone and never sets a global provider: the application picks the SDK, the
exporters and the views (`pgflow_observe.otel` has a ready-made setup).

The instruments, on the meter ``pgflow_observe`` (units in UCUM):

``pgflow.tasks.executing``
    observable up-down counter, ``{task}``, by ``pgflow.queue``.
``pgflow.tasks.started``
    observable counter, ``{task}``, by ``pgflow.queue``.
``pgflow.task.duration``
    histogram, ``s``, by ``pgflow.queue`` and, on failures only, ``error.type``.
``pgflow.instance.heartbeats``
    observable counter, ``{heartbeat}``; failed beats carry ``error.type``.
``pgflow.instance.heartbeat.age``, ``pgflow.instance.clock.skew``
    observable gauges, ``s``.
``pgflow.instances``
    observable up-down counter, ``{instance}``, by ``pgflow.instance.status``
    and ``pgflow.instance.liveness``.
``pgflow.queue.messages``, ``pgflow.queue.visible_messages``
    observable up-down counters, ``{message}``, by ``pgflow.queue``.
``pgflow.queue.oldest_message.age``
    observable gauge, ``s``, by ``pgflow.queue``.

The heartbeat instruments observe nothing in metrics-only mode. The last four
are fleet-wide: only the instance the fleet elected to read them observes
them, so the fleet reports each figure once.

The instance's identity (``service.instance.id``) belongs on the resource,
never on a data point; task ids never appear on metrics either.

The executor's thread makes no OpenTelemetry call per task. Its receivers
(in `LoadTracker`) count in memory; the executing and started instruments are
observed from a tracker snapshot at each collection, and task durations are
buffered by the tracker and recorded into the histogram by a background
thread about once a second, at each collection, and once more at close.
The thread keeps the buffer small between exports (60 s apart by default);
the drain at collection makes every export carry each task finished before
it, so the duration count and the started count agree in every export.

NOTE: the drain at collection relies on the SDK running the observable
callbacks before it reads the histogram, as the OpenTelemetry Python SDK
does; with an SDK that reads in the other order, durations lag by one
collection. When the buffer fills between two drains (past some 50,000
tasks a second in one process, where recording cannot keep up) the oldest
durations are dropped and a warning says how many; the counts stay exact.
Registries started before the application sets its global meter provider
get proxy meters: if two such registries run at once, only the first one's
instruments reach the provider.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from opentelemetry.metrics import (
    CallbackOptions,
    Histogram,
    Meter,
    MeterProvider,
    Observation,
    get_meter,
)
from opentelemetry.trace import TracerProvider, get_tracer

from ._version import __version__
from .tracing import TaskSpans

if TYPE_CHECKING:
    from .registry import Registry

__all__ = [
    "DURATION_BUCKETS",
    "METER_NAME",
    "SCHEMA_URL",
    "RegistryMetrics",
]

logger = logging.getLogger(__name__)

#: Name of the meter and of the tracer.
METER_NAME = "pgflow_observe"
#: Semantic conventions version the attribute names follow.
SCHEMA_URL = "https://opentelemetry.io/schemas/1.27.0"
#: Histogram bucket boundaries for task durations, seconds: 5 ms to an hour.
DURATION_BUCKETS: tuple[float, ...] = (
    *(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    *(120.0, 300.0, 600.0, 1800.0, 3600.0),
)
#: Seconds between two drains of the finished-task buffer.
DRAIN_INTERVAL = 1.0
#: Finished tasks the tracker buffers between two drains; more are dropped.
FINISHED_BUFFER = 100_000
#: Seconds between reminders that finished tasks are still being dropped.
DROPPED_LOG_INTERVAL = 60.0

QUEUE = "pgflow.queue"
ERROR_TYPE = "error.type"
INSTANCE_STATUS = "pgflow.instance.status"
INSTANCE_LIVENESS = "pgflow.instance.liveness"

_Callback = Callable[[CallbackOptions], Iterable[Observation]]
_Observe = Callable[["RegistryMetrics"], Iterable[Observation]]
_Attributes = dict[str, str]
_TOTAL = "total"
_LIVE = "live"


class RegistryMetrics:
    """Report a registry's load, durations, heartbeat and fleet figures.

    Created by `Registry`, which calls `start()` when it starts and `close()`
    when it closes; an application does not normally touch it.

    After `close()` the task counters and the heartbeat count go on reporting
    their final totals (executing as 0), so an export made after the close,
    such as the meter provider's own at shutdown, still carries them; the
    heartbeat age, clock skew and fleet-wide figures stop at once. The next
    registry started on the same meter provider retires those final values.

    Registries of one process that report to the same meter provider share
    its instruments; their counts are added up per attribute set. The
    resource, and so ``service.instance.id``, belongs to the provider: give
    each registry a provider of its own when they must stay apart.

    :param registry: the registry to report on.
    :param metrics: create the instruments and the drain thread.
    :param meter_provider: where the metrics go; the global one by default.
    :param tracing: one span per task (see `pgflow_observe.tracing`). Off by
        default: unlike the metrics, it calls the tracing SDK on the
        executor's thread for every task.
    :param tracer_provider: where the spans go; the global one by default.
    """

    def __init__(
        self,
        registry: Registry,
        *,
        metrics: bool = True,
        meter_provider: MeterProvider | None = None,
        tracing: bool = False,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.registry = registry
        self._metrics = metrics
        self._meter_provider = meter_provider
        self._tracing = tracing
        self._tracer_provider = tracer_provider
        self._lock = threading.Lock()
        self._started = False
        self._closed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._instruments: _SharedInstruments | None = None
        self._attributes: dict[tuple[str, str | None], _Attributes] = {}
        self._dropped = _DroppedLog(registry.settings.instance_id)
        self._spans: TaskSpans | None = None

    @property
    def closed(self) -> bool:
        """True once `close()` was called."""
        return self._closed

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Attach to the instruments, start the drain thread, connect the spans.

        Idempotent; does nothing once closed.
        """
        with self._lock:
            if self._started or self._closed:
                return
            self._started = True
        if self._metrics:
            meter = get_meter(
                METER_NAME, __version__, self._meter_provider, schema_url=SCHEMA_URL
            )
            self._instruments = _SharedInstruments.of(meter)
            self.registry.tracker.keep_finished(FINISHED_BUFFER)
            self._instruments.attach(self)
            self._thread = threading.Thread(
                target=self._run,
                name=f"pgflow-observe-metrics {self.registry.instance_id()}"[:100],
                daemon=True,
            )
            self._thread.start()
        if self._tracing:
            tracer = get_tracer(
                METER_NAME, __version__, self._tracer_provider, schema_url=SCHEMA_URL
            )
            self._spans = TaskSpans(tracer, self.registry.tracker.sender)
            self._spans.connect()

    def close(self, timeout: float = 2.0) -> None:
        """Disconnect the span receivers, stop the thread, record what is left.

        Idempotent and safe from any thread.

        :param timeout: seconds to wait for the drain thread to stop.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._spans is not None:
            self._spans.disconnect()
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                logger.warning(
                    "instance %r: metrics thread did not stop within %.1f s",
                    self.registry.instance_id(),
                    timeout,
                )
        if self._instruments is not None:
            self.record_finished()
            self.registry.tracker.keep_finished(0)

    # -- durations ---------------------------------------------------------------

    def record_finished(self) -> int:
        """Record the tracker's buffered task durations into the histogram now.

        Called by the drain thread, at each collection and at close; safe from
        any thread. Returns how many durations were recorded.
        """
        instruments = self._instruments
        if instruments is None:
            return 0
        finished, dropped = self.registry.tracker.drain_finished()
        self._dropped.note(dropped)
        histogram = instruments.duration
        attributes = self._attributes
        for task in finished:
            key = (task.queue, task.error_type)
            found = attributes.get(key)
            if found is None:
                found = {QUEUE: task.queue}
                if task.error_type is not None:
                    found[ERROR_TYPE] = task.error_type
                attributes[key] = found
            histogram.record(task.duration, found)
        return len(finished)

    def _run(self) -> None:
        while not self._stop.wait(DRAIN_INTERVAL):
            try:
                self.record_finished()
            except Exception:
                logger.exception(
                    "instance %r: recording task durations failed; retrying",
                    self.registry.instance_id(),
                )

    # -- observations, read by the shared instruments' callbacks ----------------

    def _queue_attributes(self, queue: str) -> _Attributes:
        key = (queue, None)
        found = self._attributes.get(key)
        if found is None:
            found = self._attributes[key] = {QUEUE: queue}
        return found

    def _observe_executing(self) -> Iterable[Observation]:
        # Record the buffered durations first: every callback runs before the
        # SDK reads the histogram, so each export carries every task that
        # finished before it, consistent with the started count.
        self.record_finished()
        snapshot = self.registry.tracker.snapshot()
        closed = self._closed
        for queue, count in snapshot.by_queue.items():
            # A closed instance runs nothing, as its row says (load 0).
            yield Observation(0 if closed else count, self._queue_attributes(queue))

    def _observe_started(self) -> Iterable[Observation]:
        snapshot = self.registry.tracker.snapshot()
        for queue, count in snapshot.started_by_queue.items():
            yield Observation(count, self._queue_attributes(queue))

    def _observe_heartbeats(self) -> Iterable[Observation]:
        heartbeat = self.registry.stats().heartbeat
        if heartbeat is None:
            return
        yield Observation(heartbeat.beats)
        for error_type, count in heartbeat.failures_by_type.items():
            yield Observation(count, {ERROR_TYPE: error_type})

    def _observe_heartbeat_age(self) -> Iterable[Observation]:
        heartbeat = self.registry.stats().heartbeat
        if heartbeat is None or heartbeat.last_success is None:
            return
        yield Observation(max(0.0, time.monotonic() - heartbeat.last_success))

    def _observe_clock_skew(self) -> Iterable[Observation]:
        heartbeat = self.registry.stats().heartbeat
        if heartbeat is None or heartbeat.clock_skew is None:
            return
        yield Observation(heartbeat.clock_skew)

    def _observe_instances(self) -> Iterable[Observation]:
        fleet = self.registry.fleet_snapshot()
        if fleet is None:
            return
        for (status, liveness), count in fleet.instances.items():
            yield Observation(
                count, {INSTANCE_STATUS: status, INSTANCE_LIVENESS: liveness}
            )

    def _observe_queue_messages(self) -> Iterable[Observation]:
        fleet = self.registry.fleet_snapshot()
        if fleet is None:
            return
        for depth in fleet.queues:
            yield Observation(depth.messages, self._queue_attributes(depth.queue))

    def _observe_visible_messages(self) -> Iterable[Observation]:
        fleet = self.registry.fleet_snapshot()
        if fleet is None:
            return
        for depth in fleet.queues:
            if depth.visible is not None:
                yield Observation(depth.visible, self._queue_attributes(depth.queue))

    def _observe_oldest_age(self) -> Iterable[Observation]:
        fleet = self.registry.fleet_snapshot()
        if fleet is None:
            return
        for depth in fleet.queues:
            age = 0.0 if depth.oldest_age is None else depth.oldest_age
            yield Observation(age, self._queue_attributes(depth.queue))


class _SharedInstruments:
    """The instruments on one meter, fed by every registry attached to it.

    The SDK hands back the first instrument when one with the same name is
    created again, and drops the new callbacks; so each meter gets its
    instruments once, and their callbacks ask every attached registry.
    """

    @classmethod
    def of(cls, meter: Meter) -> _SharedInstruments:
        with _shared_lock:
            try:
                found = _shared.get(meter)
                if found is None:
                    found = _shared[meter] = cls(meter)
            except TypeError:
                # A meter that cannot be weakly referenced is never shared.
                found = cls(meter)
            return found

    def __init__(self, meter: Meter) -> None:
        self._lock = threading.Lock()
        self._sources: list[RegistryMetrics] = []
        self.duration: Histogram = meter.create_histogram(
            "pgflow.task.duration",
            unit="s",
            description="Time from a task's start to its stop or exception.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        counter = meter.create_observable_counter
        up_down = meter.create_observable_up_down_counter
        gauge = meter.create_observable_gauge
        this = RegistryMetrics
        for create, name, unit, description, observe, kind in (
            (
                up_down,
                "pgflow.tasks.executing",
                "{task}",
                "Tasks this instance is executing now.",
                this._observe_executing,
                _TOTAL,
            ),
            (
                counter,
                "pgflow.tasks.started",
                "{task}",
                "Tasks this instance started.",
                this._observe_started,
                _TOTAL,
            ),
            (
                counter,
                "pgflow.instance.heartbeats",
                "{heartbeat}",
                "Heartbeats of this instance, failed ones with error.type.",
                this._observe_heartbeats,
                _TOTAL,
            ),
            (
                gauge,
                "pgflow.instance.heartbeat.age",
                "s",
                "Time since this instance's last successful heartbeat.",
                this._observe_heartbeat_age,
                _LIVE,
            ),
            (
                gauge,
                "pgflow.instance.clock.skew",
                "s",
                "This host's clock minus the database's, at the last beat.",
                this._observe_clock_skew,
                _LIVE,
            ),
            (
                up_down,
                "pgflow.instances",
                "{instance}",
                "Instances in the table, by status and liveness.",
                this._observe_instances,
                _LIVE,
            ),
            (
                up_down,
                "pgflow.queue.messages",
                "{message}",
                "Messages in each pgmq queue, visible or not.",
                this._observe_queue_messages,
                _LIVE,
            ),
            (
                up_down,
                "pgflow.queue.visible_messages",
                "{message}",
                "Messages a reader could take now from each pgmq queue.",
                this._observe_visible_messages,
                _LIVE,
            ),
            (
                gauge,
                "pgflow.queue.oldest_message.age",
                "s",
                "Age of the oldest message in each pgmq queue; 0 if empty.",
                this._observe_oldest_age,
                _LIVE,
            ),
        ):
            callback = self._callback(name, observe, kind)
            create(name, [callback], unit=unit, description=description)

    def attach(self, source: RegistryMetrics) -> None:
        """Report *source* from now on; closed registries' final values end."""
        with self._lock:
            kept = [other for other in self._sources if not other.closed]
            self._sources = [*kept, source]

    def _callback(self, name: str, observe: _Observe, kind: str) -> _Callback:
        # Callbacks run inside the application's metric collection: they must
        # not raise. Totals are added up over registries, and closed ones still
        # report theirs; live figures (the heartbeat's, the fleet's) come from
        # open registries only, and the last one wins.
        final = kind == _TOTAL

        def callback(options: CallbackOptions) -> Iterable[Observation]:
            with self._lock:
                sources = self._sources
            observations: list[Observation] = []
            for source in sources:
                if source.closed and not final:
                    continue
                try:
                    observations.extend(observe(source))
                except Exception:
                    logger.debug(
                        "callback of %s failed for instance %r",
                        name,
                        source.registry.instance_id(),
                        exc_info=True,
                    )
            if len(sources) < 2:
                return observations
            return _combine(observations, add=final)

        return callback


_shared: weakref.WeakKeyDictionary[Meter, _SharedInstruments] = (
    weakref.WeakKeyDictionary()
)
_shared_lock = threading.Lock()


def _combine(observations: list[Observation], *, add: bool) -> list[Observation]:
    combined: dict[frozenset[tuple[str, object]], Observation] = {}
    for observation in observations:
        key = frozenset((observation.attributes or {}).items())
        previous = combined.get(key)
        if previous is not None and add:
            observation = Observation(
                previous.value + observation.value, observation.attributes
            )
        combined[key] = observation
    return list(combined.values())


class _DroppedLog:
    """Log dropped durations when dropping starts, at intervals, and when it ends."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self._lock = threading.Lock()
        self._since: float | None = None
        self._count = 0
        self._last_logged = 0.0

    def note(self, dropped: int) -> None:
        now = time.monotonic()
        with self._lock:
            if dropped and self._since is None:
                self._since = self._last_logged = now
                self._count = dropped
                message = "started dropping task durations (%d so far)"
            elif dropped:
                self._count += dropped
                if now - self._last_logged < DROPPED_LOG_INTERVAL:
                    return
                self._last_logged = now
                message = "still drops task durations (%d so far)"
            elif self._since is not None:
                self._since = None
                message = "stopped dropping task durations (%d in all)"
            else:
                return
            count = self._count
        logger.warning(
            "instance %r " + message + ": more than %d tasks finished between"
            " two drains of the buffer, faster than they could be recorded",
            self.instance_id,
            count,
            FINISHED_BUFFER,
        )
