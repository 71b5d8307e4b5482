"""The load count: how many tasks this process is executing right now.

`LoadTracker` subscribes to the task signals and keeps exact counts in
memory. Its receivers run on the executor's thread, so they only append an
event to a log and return: no I/O, no OpenTelemetry calls, no lock, and no
exception ever reaches the sender.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

from blinker import ANY

from . import signals

__all__ = ["FinishedTask", "LoadSnapshot", "LoadTracker"]

logger = logging.getLogger(__name__)

_TaskKey = tuple[str, int | str]
_monotonic = time.monotonic
# kind, queue, task_id, monotonic time, error type (exceptions only)
_Event = tuple[int, Any, Any, float, str | None]


@dataclasses.dataclass(frozen=True, slots=True)
class LoadSnapshot:
    """A consistent copy of the counts, taken under the tracker's lock."""

    load: int
    """Tasks executing now, all queues together."""
    by_queue: Mapping[str, int]
    """Tasks executing now, per queue; queues that went idle show 0."""
    started: int
    completed: int
    failed: int
    started_by_queue: Mapping[str, int]
    unmatched: int
    """Stop or exception signals that had no matching start."""
    invalid: int
    """Signals ignored because their payload was malformed."""


class FinishedTask(NamedTuple):
    """One finished task, kept for the duration histogram.

    A named tuple rather than a dataclass: one is made per task, and tuples
    are the cheapest objects Python builds.
    """

    queue: str
    duration: float
    """Seconds, on the monotonic clock."""
    error_type: str | None
    """Qualified class name of the exception, None when the task succeeded."""


def _error_type(exception: object) -> str:
    cls = type(exception) if isinstance(exception, BaseException) else None
    if cls is None:
        return "_OTHER"
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


# Event kinds in the tracker's log.
_START, _STOP, _EXCEPTION = 0, 1, 2


class LoadTracker:
    """Count the tasks an executor runs, exactly, from its signals.

    Safe to feed from many threads and from asyncio code at once. A task is
    identified by ``(queue, task_id)``; the same pair may run twice at once
    (a pgmq message redelivered after its visibility timeout) and is counted
    twice. A stop without a start is counted in ``unmatched`` and never takes
    the load below zero.

    The receivers run on the executor's thread for every task, so they do
    the least work possible: each appends one event to a log and returns.
    Readers (`load`, `snapshot()`, `drain_finished()`) fold the log into the
    counts under a lock first, so what they see is exact and consistent; the
    receivers fold it themselves once it holds `FOLD_AT` events, which bounds
    its memory when nobody reads.

    :param sender: count only tasks from this sender (executor); by default
        every sender in the process.
    :param keep_finished: how many finished tasks to buffer for
        `drain_finished()`; 0 keeps none. Set by the metrics side.
    """

    #: Events the log may hold before a receiver folds it.
    FOLD_AT = 16384

    def __init__(self, sender: Any = ANY, *, keep_finished: int = 0) -> None:
        self._sender = sender
        self._lock = threading.Lock()
        # Appended by the receivers without the lock (deque appends are
        # atomic); consumed only under the lock.
        self._events: collections.deque[_Event] = collections.deque()
        # Start time per running task; a list when the same task runs twice.
        self._running: dict[_TaskKey, float | list[float]] = {}
        self._by_queue: dict[str, int] = {}
        self._started_by_queue: dict[str, int] = {}
        self._completed = 0
        self._failed = 0
        self._unmatched = 0
        self._invalid = 0
        # Plain tuples (queue, duration, error type), the cheapest to build in
        # the fold; they become FinishedTask when drained, off the hot path.
        self._finished: collections.deque[tuple[str, float, str | None]] | None = None
        self._dropped_finished = 0
        self._connected = False
        self.keep_finished(keep_finished)

    # -- wiring ---------------------------------------------------------------

    def connect(self) -> LoadTracker:
        """Subscribe to the task signals. Idempotent; returns self."""
        with self._lock:
            if self._connected:
                return self
            self._connected = True
        signals.task_start.connect(self._on_start, self._sender, weak=False)
        signals.task_stop.connect(self._on_stop, self._sender, weak=False)
        signals.task_exception.connect(self._on_exception, self._sender, weak=False)
        return self

    def disconnect(self) -> None:
        """Unsubscribe every receiver `connect()` attached. Idempotent."""
        with self._lock:
            if not self._connected:
                return
            self._connected = False
        signals.task_start.disconnect(self._on_start, self._sender)
        signals.task_stop.disconnect(self._on_stop, self._sender)
        signals.task_exception.disconnect(self._on_exception, self._sender)

    def keep_finished(self, limit: int) -> None:
        """Buffer up to *limit* finished tasks for `drain_finished()` (0: none).

        When the buffer is full the oldest entry is dropped and counted.
        """
        with self._lock:
            self._fold()
            if limit <= 0:
                self._finished = None
                return
            kept = self._finished or ()
            self._finished = collections.deque(kept, maxlen=limit)

    # -- reading ----------------------------------------------------------------

    @property
    def sender(self) -> Any:
        """The sender whose signals are counted; `blinker.ANY` for every one."""
        return self._sender

    @property
    def load(self) -> int:
        """Tasks executing now."""
        with self._lock:
            self._fold()
            return sum(self._by_queue.values())

    def snapshot(self) -> LoadSnapshot:
        """Return all counts as one consistent snapshot."""
        with self._lock:
            self._fold()
            by_queue = dict(self._by_queue)
            started_by_queue = dict(self._started_by_queue)
            completed, failed = self._completed, self._failed
            unmatched, invalid = self._unmatched, self._invalid
        return LoadSnapshot(
            load=sum(by_queue.values()),
            by_queue=by_queue,
            started=sum(started_by_queue.values()),
            completed=completed,
            failed=failed,
            started_by_queue=started_by_queue,
            unmatched=unmatched,
            invalid=invalid,
        )

    def drain_finished(self) -> tuple[list[FinishedTask], int]:
        """Take the buffered finished tasks, and how many were dropped since.

        Tasks are dropped (oldest first) only when nobody drains the buffer
        faster than the executor fills it.
        """
        with self._lock:
            self._fold()
            if self._finished is None:
                buffered: list[tuple[str, float, str | None]] = []
            else:
                buffered = list(self._finished)
                self._finished.clear()
            dropped, self._dropped_finished = self._dropped_finished, 0
        return [FinishedTask._make(item) for item in buffered], dropped

    # -- receivers: executor's thread, memory only, never raise ---------------

    def _on_start(
        self, sender: Any, task_id: Any = None, queue: Any = None, **extra: Any
    ) -> None:
        try:
            events = self._events
            events.append((_START, queue, task_id, _monotonic(), None))
            if len(events) >= self.FOLD_AT:
                self._fold_from_receiver()
        except Exception:
            logger.exception("task start receiver failed")

    def _on_stop(
        self, sender: Any, task_id: Any = None, queue: Any = None, **extra: Any
    ) -> None:
        try:
            events = self._events
            events.append((_STOP, queue, task_id, _monotonic(), None))
            if len(events) >= self.FOLD_AT:
                self._fold_from_receiver()
        except Exception:
            logger.exception("task stop receiver failed")

    def _on_exception(
        self,
        sender: Any,
        task_id: Any = None,
        queue: Any = None,
        exception: Any = None,
        **extra: Any,
    ) -> None:
        try:
            events = self._events
            events.append(
                (_EXCEPTION, queue, task_id, _monotonic(), _error_type(exception))
            )
            if len(events) >= self.FOLD_AT:
                self._fold_from_receiver()
        except Exception:
            logger.exception("task exception receiver failed")

    def _fold_from_receiver(self) -> None:
        try:
            with self._lock:
                self._fold()
        except Exception:
            logger.exception("folding the task events failed")

    # -- folding: under the lock --------------------------------------------------

    def _fold(self) -> None:
        events = self._events
        if not events:
            return
        take = events.popleft
        running = self._running
        by_queue = self._by_queue
        started_by_queue = self._started_by_queue
        finished = self._finished
        while events:
            kind, queue, task_id, at, error_type = take()
            if type(queue) is not str or (
                type(task_id) is not int and type(task_id) is not str
            ):
                if not self._valid(task_id, queue):
                    continue
            key = (queue, task_id)
            if kind == _START:
                previous = running.get(key)
                if previous is None:
                    running[key] = at
                elif isinstance(previous, list):
                    previous.append(at)
                else:
                    running[key] = [previous, at]
                by_queue[queue] = by_queue.get(queue, 0) + 1
                started_by_queue[queue] = started_by_queue.get(queue, 0) + 1
                continue
            entry = running.pop(key, None)
            if entry is None:
                self._unmatched += 1
                if self._unmatched == 1:
                    logger.warning(
                        "task end signal without a matching start (queue %r,"
                        " task_id %r); ignored, further ones are only counted",
                        queue,
                        task_id,
                    )
                continue
            if isinstance(entry, list):
                # The same task running twice: the earliest run ends.
                started_at = entry[0]
                rest = entry[1:]
                running[key] = rest if len(rest) > 1 else rest[0]
            else:
                started_at = entry
            by_queue[queue] -= 1
            if kind == _STOP:
                self._completed += 1
            else:
                self._failed += 1
            if finished is not None:
                if len(finished) == finished.maxlen:
                    self._dropped_finished += 1
                finished.append((queue, at - started_at, error_type))

    def _valid(self, task_id: Any, queue: Any) -> bool:
        # The slow path: subclasses of int and str are fine, bool is not.
        if (
            isinstance(task_id, (int, str))
            and not isinstance(task_id, bool)
            and isinstance(queue, str)
        ):
            return True
        self._invalid += 1
        if self._invalid == 1:
            logger.warning(
                "task signal with a malformed payload ignored (task_id %r, queue %r);"
                " expected task_id as int or str and queue as str;"
                " further ones are only counted",
                task_id,
                queue,
            )
        return False
