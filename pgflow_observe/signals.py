"""The signals an executor emits, and the ones pgflow_observe emits back.

Task signals mirror the ``[:pgflow, :task, :start | :stop | :exception]``
telemetry events of the Elixir pgflow world: for every task an executor sends
`task_start` once, then exactly one of `task_stop` or `task_exception`.

The sender is the executor object. Keyword payload:

``task_id``
    required, an ``int`` or ``str``: for pgmq, the message id.
``queue``
    required, a ``str``: the queue or flow slug.
``run_id``, ``step_slug``, ``task_index``
    optional, passed through untouched.
``exception``
    only on `task_exception`: the exception the task raised.

The `running_task` context manager sends the pair for you, also when the task
raises, so an executor cannot get the pairing wrong.

`instance_paused` and `instance_resumed` go the other way: pgflow_observe
sends them, with the `Registry` as sender, when an operator pauses or resumes
this instance; the executor subscribes and stops or resumes taking new work.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from blinker import Namespace

__all__ = [
    "instance_paused",
    "instance_resumed",
    "namespace",
    "running_task",
    "task_exception",
    "task_start",
    "task_stop",
]

#: The blinker namespace holding every pgflow_observe signal.
namespace = Namespace()

task_start = namespace.signal(
    "task start", doc="An executor began a task. Payload: task_id, queue, ..."
)
task_stop = namespace.signal(
    "task stop", doc="A task finished normally. Same payload as task start."
)
task_exception = namespace.signal(
    "task exception",
    doc="A task raised. Same payload as task start, plus exception.",
)
instance_paused = namespace.signal(
    "instance paused", doc="An operator paused this instance: stop taking new work."
)
instance_resumed = namespace.signal(
    "instance resumed", doc="An operator resumed this instance: take work again."
)


class running_task:  # used like a function: ``with running_task(...)``
    """Send `task_start` on entry and `task_stop` or `task_exception` on exit.

    Works with ``with`` and ``async with``. The exception, if any, is sent
    with `task_exception` and then propagates unchanged; cancellation
    (`asyncio.CancelledError`, `KeyboardInterrupt`) counts as an exception.

    :param executor: the sender, usually the executor object.
    :param task_id: the task's id; for pgmq, the message id.
    :param queue: the queue or flow slug.
    :param extra: optional ``run_id``, ``step_slug``, ``task_index``.
    """

    __slots__ = ("_executor", "_payload")

    def __init__(
        self, executor: Any, *, task_id: int | str, queue: str, **extra: Any
    ) -> None:
        self._executor = executor
        self._payload = {"task_id": task_id, "queue": queue, **extra}

    def __enter__(self) -> running_task:
        task_start.send(self._executor, **self._payload)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None:
            task_stop.send(self._executor, **self._payload)
        else:
            task_exception.send(self._executor, exception=exc, **self._payload)

    async def __aenter__(self) -> running_task:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, traceback)
