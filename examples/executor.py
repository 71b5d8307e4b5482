"""A small pgflow-style executor: worker threads taking tasks from a pgmq queue.

It is an example of what pgflow_observe expects from an executor, not a
production worker: it reads one message at a time with a visibility timeout,
announces each task with `running_task`, deletes the message when the task
succeeds and archives it when it fails, and stops taking new work while an
operator has paused its instance.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg

from pgflow_observe import Registry, running_task

logger = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], None]


class PgmqExecutor:
    """Run *handler* on each message of *queue* with *concurrency* threads.

    :param dsn: the database holding the pgmq schema.
    :param registry: its pause state is honoured before each read; it may be
        set after construction (a registry counting only this executor's
        tasks needs the executor first).
    :param visibility_timeout: seconds a read message stays hidden from other
        workers; if this worker dies, the message reappears after it.
    """

    def __init__(
        self,
        dsn: str,
        queue: str,
        handler: Handler,
        *,
        registry: Registry | None = None,
        concurrency: int = 4,
        visibility_timeout: int = 30,
        poll_interval: float = 0.05,
    ) -> None:
        self.dsn = dsn
        self.queue = queue
        self.handler = handler
        self.registry = registry
        self.concurrency = concurrency
        self.visibility_timeout = visibility_timeout
        self.poll_interval = poll_interval
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for n in range(self.concurrency):
            thread = threading.Thread(
                target=self._work, name=f"executor {self.queue} {n}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop reading; tasks in flight finish first."""
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _work(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self._stop.is_set():
                registry = self.registry
                if registry is not None and not registry.accepting_work:
                    # Paused by an operator: take nothing new until resumed.
                    registry.wait_until_resumed(timeout=0.2)
                    continue
                row = conn.execute(
                    "select msg_id, message from pgmq.read(%s, %s, 1)",
                    (self.queue, self.visibility_timeout),
                ).fetchone()
                if row is None:
                    self._stop.wait(self.poll_interval)
                    continue
                message_id, message = row
                try:
                    with running_task(self, task_id=message_id, queue=self.queue):
                        self.handler(message)
                except Exception as exc:
                    logger.debug("task %s failed: %s", message_id, exc)
                    conn.execute(
                        "select pgmq.archive(%s, %s)", (self.queue, message_id)
                    )
                else:
                    conn.execute("select pgmq.delete(%s, %s)", (self.queue, message_id))
