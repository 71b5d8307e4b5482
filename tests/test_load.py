from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from pgflow_observe import LoadTracker, running_task, signals


class Executor:
    """Stands in for a pgflow executor: it only needs to be a sender."""


class Boom(Exception):
    pass


@pytest.fixture
def tracker() -> Iterator[LoadTracker]:
    tracker = LoadTracker().connect()
    yield tracker
    tracker.disconnect()


def _watch_minimum(tracker: LoadTracker) -> tuple[threading.Event, list[int]]:
    """Sample the load in a loop until told to stop; returns the minimum seen."""
    stop = threading.Event()
    minimum = [0]

    def watch() -> None:
        while not stop.is_set():
            snapshot = tracker.snapshot()
            lowest = min([snapshot.load, *snapshot.by_queue.values()])
            minimum[0] = min(minimum[0], lowest)

    threading.Thread(target=watch, daemon=True).start()
    return stop, minimum


def test_threads_and_asyncio_tasks_keep_the_count_exact(tracker: LoadTracker) -> None:
    executor = Executor()
    per_worker = 2000
    stop_watching, minimum = _watch_minimum(tracker)

    def run(worker: int) -> None:
        for n in range(per_worker):
            try:
                with running_task(
                    executor, task_id=f"t{worker}-{n}", queue=f"q{worker % 3}"
                ):
                    if n % 7 == 0:
                        raise Boom
            except Boom:
                pass

    async def run_async(worker: int) -> None:
        for n in range(per_worker // 2):
            try:
                async with running_task(
                    executor, task_id=worker * 1_000_000 + n, queue="async"
                ):
                    await asyncio.sleep(0)
                    if n % 5 == 0:
                        raise Boom
            except Boom:
                pass

    async def run_all_async() -> None:
        await asyncio.gather(*(run_async(w) for w in range(200)))

    threads = [threading.Thread(target=run, args=(w,)) for w in range(8)]
    threads.append(threading.Thread(target=asyncio.run, args=(run_all_async(),)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop_watching.set()

    snapshot = tracker.snapshot()
    thread_tasks = 8 * per_worker
    thread_failures = 8 * len(range(0, per_worker, 7))
    async_tasks = 200 * (per_worker // 2)
    async_failures = 200 * len(range(0, per_worker // 2, 5))
    assert snapshot.load == 0
    assert set(snapshot.by_queue.values()) == {0}
    assert snapshot.started == thread_tasks + async_tasks
    assert snapshot.failed == thread_failures + async_failures
    assert snapshot.completed == snapshot.started - snapshot.failed
    assert snapshot.started_by_queue["async"] == async_tasks
    assert snapshot.unmatched == 0
    assert minimum[0] == 0


def test_load_counts_tasks_in_flight_per_queue(tracker: LoadTracker) -> None:
    executor = Executor()

    with running_task(executor, task_id=1, queue="emails"):
        with running_task(executor, task_id=2, queue="emails"):
            with running_task(executor, task_id=1, queue="reports"):
                inside = tracker.snapshot()

    assert inside.load == 3
    assert inside.by_queue == {"emails": 2, "reports": 1}
    assert tracker.load == 0


def test_redelivered_task_running_twice_counts_twice(tracker: LoadTracker) -> None:
    executor = Executor()

    signals.task_start.send(executor, task_id=7, queue="q")
    signals.task_start.send(executor, task_id=7, queue="q")
    assert tracker.load == 2
    signals.task_stop.send(executor, task_id=7, queue="q")
    assert tracker.load == 1
    signals.task_stop.send(executor, task_id=7, queue="q")

    assert tracker.snapshot().load == 0
    assert tracker.snapshot().unmatched == 0


def test_unmatched_stop_never_goes_below_zero_and_is_logged_once(
    tracker: LoadTracker, caplog: pytest.LogCaptureFixture
) -> None:
    executor = Executor()

    for n in range(5):
        signals.task_stop.send(executor, task_id=n, queue="q")
        signals.task_exception.send(
            executor, task_id=n, queue="q", exception=RuntimeError()
        )

    snapshot = tracker.snapshot()
    assert snapshot.load == 0
    assert snapshot.by_queue.get("q", 0) == 0
    assert snapshot.unmatched == 10
    assert snapshot.completed == snapshot.failed == 0
    warnings = [r for r in caplog.records if "without a matching start" in r.message]
    assert len(warnings) == 1


@pytest.mark.parametrize(
    "payload",
    [
        {"queue": "q"},
        {"task_id": None, "queue": "q"},
        {"task_id": 1.5, "queue": "q"},
        {"task_id": True, "queue": "q"},
        {"task_id": ["x"], "queue": "q"},
        {"task_id": 1},
        {"task_id": 1, "queue": 42},
        {},
    ],
)
def test_malformed_payloads_never_raise_into_the_sender(
    tracker: LoadTracker, payload: dict[str, Any]
) -> None:
    executor = Executor()

    signals.task_start.send(executor, **payload)
    signals.task_stop.send(executor, **payload)
    signals.task_exception.send(executor, **payload)

    snapshot = tracker.snapshot()
    assert snapshot.load == 0
    assert snapshot.invalid == 3
    assert snapshot.started == 0


def test_exception_payload_need_not_be_an_exception(tracker: LoadTracker) -> None:
    executor = Executor()
    tracker.keep_finished(10)

    signals.task_start.send(executor, task_id=1, queue="q")
    signals.task_exception.send(executor, task_id=1, queue="q", exception="text")

    finished, dropped = tracker.drain_finished()
    assert [task.error_type for task in finished] == ["_OTHER"]
    assert dropped == 0


def test_finished_tasks_carry_monotonic_durations_and_error_types(
    tracker: LoadTracker,
) -> None:
    executor = Executor()
    tracker.keep_finished(10)

    with running_task(executor, task_id=1, queue="fast"):
        pass
    with pytest.raises(KeyError), running_task(executor, task_id=2, queue="slow"):
        threading.Event().wait(0.05)
        raise KeyError("x")

    finished, _ = tracker.drain_finished()
    by_queue = {task.queue: task for task in finished}
    assert by_queue["fast"].error_type is None
    assert by_queue["slow"].error_type == "KeyError"
    assert by_queue["slow"].duration >= 0.05
    assert 0 <= by_queue["fast"].duration < by_queue["slow"].duration
    assert tracker.drain_finished() == ([], 0)


def test_finished_buffer_is_bounded_and_counts_drops(tracker: LoadTracker) -> None:
    executor = Executor()
    tracker.keep_finished(3)

    for n in range(10):
        with running_task(executor, task_id=n, queue="q"):
            pass

    finished, dropped = tracker.drain_finished()
    assert len(finished) == 3
    assert dropped == 7


def test_nothing_is_buffered_unless_asked(tracker: LoadTracker) -> None:
    with running_task(Executor(), task_id=1, queue="q"):
        pass

    assert tracker.drain_finished() == ([], 0)


def test_tracker_for_one_executor_ignores_others() -> None:
    mine, other = Executor(), Executor()
    tracker = LoadTracker(mine).connect()
    try:
        signals.task_start.send(other, task_id=1, queue="q")
        signals.task_start.send(mine, task_id=1, queue="q")

        assert tracker.load == 1
    finally:
        tracker.disconnect()
        signals.task_stop.send(other, task_id=1, queue="q")


def test_disconnect_removes_every_receiver(tracker: LoadTracker) -> None:
    receivers_before = {
        name: len(signal.receivers)
        for name, signal in signals.namespace.items()
        if name.startswith("task")
    }

    tracker.disconnect()

    for name, count in receivers_before.items():
        assert len(signals.namespace[name].receivers) == count - 1
    signals.task_start.send(Executor(), task_id=1, queue="q")
    assert tracker.load == 0


def test_running_task_reports_cancellation_as_an_exception(
    tracker: LoadTracker,
) -> None:
    tracker.keep_finished(10)

    async def task() -> None:
        async with running_task(Executor(), task_id=1, queue="q"):
            await asyncio.sleep(10)

    async def main() -> None:
        pending = asyncio.ensure_future(task())
        await asyncio.sleep(0.01)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending

    asyncio.run(main())

    finished, _ = tracker.drain_finished()
    assert finished[0].error_type == "asyncio.exceptions.CancelledError"
    assert tracker.load == 0


def test_running_task_sends_the_payload_it_was_given() -> None:
    seen: list[tuple[str, dict[str, Any]]] = []
    executor = Executor()

    def record(name: str) -> Any:
        def receiver(sender: Any, **payload: Any) -> None:
            assert sender is executor
            seen.append((name, payload))

        return receiver

    receivers = {
        signal: record(signal.name)
        for signal in (signals.task_start, signals.task_stop, signals.task_exception)
    }
    for signal, receiver in receivers.items():
        signal.connect(receiver)
    try:
        with running_task(
            executor, task_id=5, queue="flow", run_id="r", step_slug="s", task_index=0
        ):
            pass
        error = ValueError("no")
        with pytest.raises(ValueError), running_task(executor, task_id=6, queue="flow"):
            raise error
    finally:
        for signal, receiver in receivers.items():
            signal.disconnect(receiver)

    full = {"task_id": 5, "queue": "flow", "run_id": "r", "step_slug": "s"}
    assert seen[0] == ("task start", {**full, "task_index": 0})
    assert seen[1] == ("task stop", {**full, "task_index": 0})
    assert seen[2] == ("task start", {"task_id": 6, "queue": "flow"})
    assert seen[3] == (
        "task exception",
        {"task_id": 6, "queue": "flow", "exception": error},
    )


def test_receiver_errors_are_logged_not_raised(
    tracker: LoadTracker,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("broken clock")

    monkeypatch.setattr("pgflow_observe.load._monotonic", broken)

    signals.task_start.send(Executor(), task_id=1, queue="q")

    assert any(r.levelno == logging.ERROR for r in caplog.records)
