"""The load count: how many tasks this process is executing right now.

`LoadTracker` subscribes to the task signals and keeps exact counts in
memory. Its receivers run on the executor's thread, so they only take a lock,
update a few dictionaries and return: no I/O, no OpenTelemetry calls, and no
exception ever reaches the sender.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from blinker import ANY

from . import signals

__all__ = ["FinishedTask", "LoadSnapshot", "LoadTracker"]

logger = logging.getLogger(__name__)

_TaskKey = tuple[str, int | str]


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


@dataclasses.dataclass(frozen=True, slots=True)
class FinishedTask:
    """One finished task, kept for the duration histogram."""

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


class LoadTracker:
    """Count the tasks an executor runs, exactly, from its signals.

    Safe to feed from many threads and from asyncio code at once. A task is
    identified by ``(queue, task_id)``; the same pair may run twice at once
    (a pgmq message redelivered after its visibility timeout) and is counted
    twice. A stop without a start is counted in ``unmatched`` and never takes
    the load below zero.

    :param sender: count only tasks from this sender (executor); by default
        every sender in the process.
    :param keep_finished: how many finished tasks to buffer for
        `drain_finished()`; 0 keeps none. Set by the metrics side.
    """

    def __init__(self, sender: Any = ANY, *, keep_finished: int = 0) -> None:
        self._sender = sender
        self._lock = threading.Lock()
        self._running: dict[_TaskKey, list[float]] = {}
        self._by_queue: dict[str, int] = {}
        self._started_by_queue: dict[str, int] = {}
        self._load = 0
        self._started = 0
        self._completed = 0
        self._failed = 0
        self._unmatched = 0
        self._invalid = 0
        self._finished: collections.deque[FinishedTask] = collections.deque()
        self._keep_finished = keep_finished
        self._dropped_finished = 0
        self._connected = False

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
        """Buffer up to *limit* finished tasks for `drain_finished()` (0: none)."""
        with self._lock:
            self._keep_finished = max(0, limit)
            while len(self._finished) > self._keep_finished:
                self._finished.popleft()

    # -- reading ----------------------------------------------------------------

    @property
    def sender(self) -> Any:
        """The sender whose signals are counted; `blinker.ANY` for every one."""
        return self._sender

    @property
    def load(self) -> int:
        """Tasks executing now."""
        return self._load

    def snapshot(self) -> LoadSnapshot:
        """Return all counts as one consistent snapshot."""
        with self._lock:
            return LoadSnapshot(
                load=self._load,
                by_queue=dict(self._by_queue),
                started=self._started,
                completed=self._completed,
                failed=self._failed,
                started_by_queue=dict(self._started_by_queue),
                unmatched=self._unmatched,
                invalid=self._invalid,
            )

    def drain_finished(self) -> tuple[list[FinishedTask], int]:
        """Take the buffered finished tasks, and how many were dropped since.

        Tasks are dropped (oldest first) only when nobody drains the buffer
        faster than the executor fills it.
        """
        with self._lock:
            finished = list(self._finished)
            self._finished.clear()
            dropped, self._dropped_finished = self._dropped_finished, 0
        return finished, dropped

    # -- receivers: executor's thread, memory only, never raise ---------------

    def _on_start(self, sender: Any, **payload: Any) -> None:
        try:
            key = self._key(payload)
            if key is None:
                return
            now = time.monotonic()
            queue = key[0]
            with self._lock:
                starts = self._running.get(key)
                if starts is None:
                    self._running[key] = [now]
                else:
                    starts.append(now)
                self._by_queue[queue] = self._by_queue.get(queue, 0) + 1
                self._started_by_queue[queue] = self._started_by_queue.get(queue, 0) + 1
                self._load += 1
                self._started += 1
        except Exception:  # pragma: no cover - defensive: never raise into the sender
            logger.exception("task start receiver failed")

    def _on_stop(self, sender: Any, **payload: Any) -> None:
        try:
            self._finish(payload, None)
        except Exception:  # pragma: no cover
            logger.exception("task stop receiver failed")

    def _on_exception(self, sender: Any, **payload: Any) -> None:
        try:
            self._finish(payload, _error_type(payload.get("exception")))
        except Exception:  # pragma: no cover
            logger.exception("task exception receiver failed")

    def _finish(self, payload: Mapping[str, Any], error_type: str | None) -> None:
        key = self._key(payload)
        if key is None:
            return
        now = time.monotonic()
        queue = key[0]
        with self._lock:
            starts = self._running.get(key)
            if not starts:
                self._unmatched += 1
                first = self._unmatched == 1
            else:
                first = False
                started_at = starts.pop(0)
                if not starts:
                    del self._running[key]
                self._by_queue[queue] -= 1
                self._load -= 1
                if error_type is None:
                    self._completed += 1
                else:
                    self._failed += 1
                if self._keep_finished:
                    if len(self._finished) >= self._keep_finished:
                        self._finished.popleft()
                        self._dropped_finished += 1
                    self._finished.append(
                        FinishedTask(queue, now - started_at, error_type)
                    )
        if first:
            logger.warning(
                "task end signal without a matching start (queue %r, task_id %r);"
                " ignored, further ones are only counted",
                key[0],
                key[1],
            )

    def _key(self, payload: Mapping[str, Any]) -> _TaskKey | None:
        task_id = payload.get("task_id")
        queue = payload.get("queue")
        if (
            isinstance(task_id, int | str)
            and not isinstance(task_id, bool)
            and isinstance(queue, str)
        ):
            return (queue, task_id)
        with self._lock:
            self._invalid += 1
            first = self._invalid == 1
        if first:
            logger.warning(
                "task signal with a malformed payload ignored (task_id %r, queue %r);"
                " expected task_id as int or str and queue as str;"
                " further ones are only counted",
                task_id,
                queue,
            )
        return None
