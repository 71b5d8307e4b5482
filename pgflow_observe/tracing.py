"""Optional task spans: one span per task, from its start to its stop or exception.

`RegistryMetrics` connects a `TaskSpans` when the registry is created with
``tracing=True``. The span has kind CONSUMER and is named ``process <queue>``;
its attributes are ``pgflow.queue``, ``pgflow.task.id`` and, when the signal
carries them, ``pgflow.run.id``, ``pgflow.step.slug`` and
``pgflow.task.index``. A task that raises gets ``error.type``, the exception
as an event and the status ERROR.

NOTE: the span is not made the current span while the task runs, so spans
the task's own code creates are not its children. An executor may end tasks
in any order on one thread, which attaching and detaching a context cannot
follow without leaving a wrong span current.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.util.types import AttributeValue

from . import signals
from .load import _error_type

__all__ = ["TaskSpans"]

logger = logging.getLogger(__name__)

QUEUE = "pgflow.queue"
TASK_ID = "pgflow.task.id"
ERROR_TYPE = "error.type"
UNFINISHED = "pgflow.task.unfinished"

# Optional payload keys of the task signals, and their span attributes.
_PAYLOAD_ATTRIBUTES = {
    "run_id": "pgflow.run.id",
    "step_slug": "pgflow.step.slug",
    "task_index": "pgflow.task.index",
}

_TaskKey = tuple[str, int | str]


class TaskSpans:
    """Turn the task signals into spans.

    The receivers run on the executor's thread. They start and end spans in
    memory and never raise; exporting is the span processor's business, so
    use a batching one (a simple processor exports on the executor's thread).

    :param tracer: where the spans are started.
    :param sender: only tasks from this sender; `blinker.ANY` for every one.
    """

    def __init__(self, tracer: Tracer, sender: Any) -> None:
        self._tracer = tracer
        self._sender = sender
        self._lock = threading.Lock()
        self._open: dict[_TaskKey, list[Span]] = {}
        self._connected = False

    def connect(self) -> None:
        """Connect the receivers to the task signals. Idempotent."""
        with self._lock:
            if self._connected:
                return
            self._connected = True
        signals.task_start.connect(self._on_start, self._sender, weak=False)
        signals.task_stop.connect(self._on_stop, self._sender, weak=False)
        signals.task_exception.connect(self._on_exception, self._sender, weak=False)

    def disconnect(self) -> None:
        """Disconnect every receiver; end open spans, marked unfinished.

        Idempotent.
        """
        with self._lock:
            if not self._connected:
                return
            self._connected = False
        signals.task_start.disconnect(self._on_start, self._sender)
        signals.task_stop.disconnect(self._on_stop, self._sender)
        signals.task_exception.disconnect(self._on_exception, self._sender)
        with self._lock:
            unfinished = [span for spans in self._open.values() for span in spans]
            self._open.clear()
        for span in unfinished:
            span.set_attribute(UNFINISHED, True)
            span.end()

    @property
    def open_spans(self) -> int:
        """Spans started and not yet ended."""
        with self._lock:
            return sum(len(spans) for spans in self._open.values())

    # -- receivers: executor's thread, memory only, never raise ---------------

    def _on_start(self, sender: Any, **payload: Any) -> None:
        try:
            key = _task_key(payload)
            if key is None:
                return
            attributes: dict[str, AttributeValue] = {QUEUE: key[0], TASK_ID: key[1]}
            for name, attribute in _PAYLOAD_ATTRIBUTES.items():
                value = payload.get(name)
                if value is not None:
                    attributes[attribute] = _attribute_value(value)
            span = self._tracer.start_span(
                f"process {key[0]}", kind=SpanKind.CONSUMER, attributes=attributes
            )
            with self._lock:
                self._open.setdefault(key, []).append(span)
        except Exception:
            logger.debug("task start span receiver failed", exc_info=True)

    def _on_stop(self, sender: Any, **payload: Any) -> None:
        try:
            span = self._take(payload)
            if span is not None:
                span.end()
        except Exception:
            logger.debug("task stop span receiver failed", exc_info=True)

    def _on_exception(self, sender: Any, **payload: Any) -> None:
        try:
            span = self._take(payload)
            if span is None:
                return
            exception = payload.get("exception")
            error_type = _error_type(exception)
            span.set_attribute(ERROR_TYPE, error_type)
            if isinstance(exception, BaseException):
                span.record_exception(exception)
            span.set_status(Status(StatusCode.ERROR, error_type))
            span.end()
        except Exception:
            logger.debug("task exception span receiver failed", exc_info=True)

    def _take(self, payload: Mapping[str, Any]) -> Span | None:
        # The oldest open span of the task: a redelivered message may run
        # twice at once, and the load tracker pairs them the same way.
        key = _task_key(payload)
        if key is None:
            return None
        with self._lock:
            spans = self._open.get(key)
            if not spans:
                return None
            span = spans.pop(0)
            if not spans:
                del self._open[key]
        return span


def _task_key(payload: Mapping[str, Any]) -> _TaskKey | None:
    task_id = payload.get("task_id")
    queue = payload.get("queue")
    if not isinstance(queue, str) or isinstance(task_id, bool):
        return None
    if isinstance(task_id, int | str):
        return (queue, task_id)
    return None


def _attribute_value(value: object) -> AttributeValue:
    if isinstance(value, str | bool | int | float):
        return value
    return str(value)
