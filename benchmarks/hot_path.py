"""What pgflow_observe costs an executor per task, and in all.

Two figures, each printed with its target:

(a) executor-thread cost of a task_start + task_stop pair with a metrics-only
    Registry attached (SDK meter provider and an in-memory reader), as a
    ratio to the same pair with one no-op receiver per signal. Both run in
    one process, in interleaved rounds, each with its own sender, and the
    medians are compared. The executor thread's CPU time is measured
    (time.thread_time), and the duration buffer is emptied between rounds,
    outside the timing, so the background drain does not compete with the
    measured thread: its cost is part of (b). Target: at most 1.5.

(b) the whole process's CPU per task (time.process_time), including the
    background drain and a final collection, as a ratio to a naive
    implementation whose receivers call synchronous SDK instruments on every
    task (UpDownCounter add +1 and -1, Counter add, Histogram record).
    Target: at most 1/3.

Run it with ``.venv/bin/python benchmarks/hot_path.py``; it takes well under
a minute. It prints figures, it is not a test: machines differ.
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from pgflow_observe import Registry, Settings, signals
from pgflow_observe.metrics import DURATION_BUCKETS

QUEUES = ("emails", "reports", "exports", "thumbnails")
TARGET_EXECUTOR_RATIO = 1.5
TARGET_TOTAL_RATIO = 1 / 3


class Executor:
    """A sender; each setup has its own, so they can stay connected together."""

    def __init__(self, name: str) -> None:
        self.name = name


def send_pairs(executor: Executor, count: int, offset: int = 0) -> None:
    start, stop = signals.task_start.send, signals.task_stop.send
    for number in range(offset, offset + count):
        queue = QUEUES[number & 3]
        start(executor, task_id=number, queue=queue)
        stop(executor, task_id=number, queue=queue)


def timed(clock: Callable[[], float], run: Callable[[], None], count: int) -> float:
    """Microseconds per task of *run* by *clock*, with the collector off."""
    gc.collect()
    gc.disable()
    try:
        began = clock()
        run()
        return (clock() - began) / count * 1e6
    finally:
        gc.enable()


# -- (a) executor-thread cost ---------------------------------------------------------


def executor_thread_cost(rounds: int, pairs: int) -> tuple[float, float]:
    """Median µs per pair: (with pgflow_observe, with one no-op receiver)."""
    observed, baseline = Executor("observed"), Executor("baseline")

    def no_op(sender: Any, **payload: Any) -> None:
        pass

    signals.task_start.connect(no_op, baseline, weak=False)
    signals.task_stop.connect(no_op, baseline, weak=False)
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    registry = Registry(
        Settings(dsn=None, instance_id="benchmark-a"),
        executor=observed,
        meter_provider=provider,
    ).start()
    with_observe: list[float] = []
    with_no_op: list[float] = []
    try:
        send_pairs(observed, pairs)  # warm up both paths
        send_pairs(baseline, pairs)
        registry.tracker.drain_finished()
        for round_number in range(rounds):
            offset = (round_number + 1) * pairs
            run = functools.partial(send_pairs, observed, pairs, offset)
            with_observe.append(timed(time.thread_time, run, pairs))
            registry.tracker.drain_finished()
            run = functools.partial(send_pairs, baseline, pairs, offset)
            with_no_op.append(timed(time.thread_time, run, pairs))
    finally:
        registry.close()
        provider.shutdown()
        signals.task_start.disconnect(no_op, baseline)
        signals.task_stop.disconnect(no_op, baseline)
    return statistics.median(with_observe), statistics.median(with_no_op)


# -- (b) total CPU per task ---------------------------------------------------------


class NaiveMetrics:
    """Synchronous SDK instruments called on every task, from the receivers."""

    def __init__(self, provider: MeterProvider, executor: Executor) -> None:
        meter = provider.get_meter("naive")
        self.executing = meter.create_up_down_counter("executing", "{task}")
        self.started = meter.create_counter("started", "{task}")
        self.duration = meter.create_histogram(
            "duration", "s", explicit_bucket_boundaries_advisory=DURATION_BUCKETS
        )
        self.starts: dict[tuple[str, object], float] = {}
        self.executor = executor

    def connect(self) -> None:
        signals.task_start.connect(self.on_start, self.executor, weak=False)
        signals.task_stop.connect(self.on_stop, self.executor, weak=False)

    def disconnect(self) -> None:
        signals.task_start.disconnect(self.on_start, self.executor)
        signals.task_stop.disconnect(self.on_stop, self.executor)

    def on_start(self, sender: Any, *, task_id: object, queue: str, **_: Any) -> None:
        attributes = {"pgflow.queue": queue}
        self.executing.add(1, attributes)
        self.started.add(1, attributes)
        self.starts[(queue, task_id)] = time.monotonic()

    def on_stop(self, sender: Any, *, task_id: object, queue: str, **_: Any) -> None:
        attributes = {"pgflow.queue": queue}
        self.executing.add(-1, attributes)
        began = self.starts.pop((queue, task_id))
        self.duration.record(time.monotonic() - began, attributes)


def observed_run(tasks: int) -> float:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    executor = Executor("observed")
    registry = Registry(
        Settings(dsn=None, instance_id="benchmark-b"),
        executor=executor,
        meter_provider=provider,
    ).start()

    def run() -> None:
        send_pairs(executor, tasks)
        reader.get_metrics_data()  # drains the buffer into the histogram

    try:
        return timed(time.process_time, run, tasks)
    finally:
        registry.close()
        provider.shutdown()


def naive_run(tasks: int) -> float:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    executor = Executor("naive")
    naive = NaiveMetrics(provider, executor)
    naive.connect()

    def run() -> None:
        send_pairs(executor, tasks)
        reader.get_metrics_data()

    try:
        return timed(time.process_time, run, tasks)
    finally:
        naive.disconnect()
        provider.shutdown()


def total_cost(rounds: int, tasks: int) -> tuple[float, float]:
    """Median µs of process CPU per task: (pgflow_observe, naive)."""
    observed_run(tasks // 10)  # warm up
    naive_run(tasks // 10)
    observed: list[float] = []
    naive: list[float] = []
    for _ in range(rounds):
        observed.append(observed_run(tasks))
        naive.append(naive_run(tasks))
    return statistics.median(observed), statistics.median(naive)


def verdict(ratio: float, target: float) -> str:
    return "met" if ratio <= target else "NOT met"


def main() -> None:
    """Print both figures and whether their targets are met."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25, help="rounds for (a)")
    parser.add_argument("--pairs", type=int, default=10_000, help="pairs per round")
    parser.add_argument("--runs", type=int, default=5, help="runs for (b)")
    parser.add_argument("--tasks", type=int, default=50_000, help="tasks per run")
    options = parser.parse_args()
    # Warnings (durations dropped when the drain cannot keep up) are shown.
    logging.basicConfig(level=logging.WARNING, format="  log: %(message)s")
    began = time.monotonic()

    observed, no_op = executor_thread_cost(options.rounds, options.pairs)
    ratio_a = observed / no_op
    print(
        f"(a) executor thread, per start+stop pair ({options.rounds} interleaved"
        f" rounds of {options.pairs}, medians):"
    )
    print(f"    one no-op receiver       {no_op:7.2f} µs")
    print(f"    pgflow_observe attached  {observed:7.2f} µs")
    print(f"    added by pgflow_observe  {observed - no_op:7.2f} µs")
    print(
        f"    ratio {ratio_a:.2f}, target <= {TARGET_EXECUTOR_RATIO}:"
        f" {verdict(ratio_a, TARGET_EXECUTOR_RATIO)}"
    )

    observed_total, naive_total = total_cost(options.runs, options.tasks)
    ratio_b = observed_total / naive_total
    print(
        f"(b) process CPU per task, drain and final collection included"
        f" ({options.runs} runs of {options.tasks}, medians):"
    )
    print(f"    naive synchronous SDK    {naive_total:7.2f} µs")
    print(f"    pgflow_observe           {observed_total:7.2f} µs")
    print(
        f"    ratio {ratio_b:.2f}, target <= 1/3 ({TARGET_TOTAL_RATIO:.2f}):"
        f" {verdict(ratio_b, TARGET_TOTAL_RATIO)}"
    )
    print(f"ran in {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
