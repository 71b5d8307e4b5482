"""Pause latency: from an operator's request to the `instance paused` signal.

Measures many pause/resume rounds against a real PostgreSQL, first with
LISTEN/NOTIFY (the normal path), then with notifications off so the news
comes only with the heartbeat (the fallback), and prints p50/p99.

    python benchmarks/pause_latency.py [--rounds 200] [--dsn DSN]

Without --dsn (or PGFLOW_OBSERVE_DSN) it starts an embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import statistics
import threading
import time
from typing import Any

from pgflow_observe import Fleet, Registry, Settings, instance_paused, instance_resumed

from _database import database


def measure(
    settings: Settings, rounds: int, jitter: float = 0.0
) -> tuple[list[float], list[float]]:
    """Return pause and resume latencies in seconds.

    *jitter* spreads the requests at random over that many seconds, so they
    do not fall in step with the heartbeat.
    """
    fleet = Fleet(settings)
    arrived = threading.Event()

    def on_signal(sender: Any, **payload: Any) -> None:
        arrived.set()

    instance_paused.connect(on_signal)
    instance_resumed.connect(on_signal)
    pauses: list[float] = []
    resumes: list[float] = []
    try:
        with Registry(settings, metrics=False):
            time.sleep(0.3)  # let the control thread LISTEN
            for _ in range(rounds):
                for action, into in ((fleet.pause, pauses), (fleet.resume, resumes)):
                    time.sleep(random.uniform(0, jitter))
                    arrived.clear()
                    began = time.perf_counter()
                    action(settings.instance_id)
                    if not arrived.wait(10):
                        raise RuntimeError("no signal within 10 s")
                    into.append(time.perf_counter() - began)
    finally:
        instance_paused.disconnect(on_signal)
        instance_resumed.disconnect(on_signal)
    return pauses, resumes


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def report(name: str, values: list[float]) -> None:
    print(
        f"{name:<34} n={len(values):<4} p50={percentile(values, 0.5) * 1000:7.1f} ms"
        f"  p99={percentile(values, 0.99) * 1000:7.1f} ms"
        f"  max={max(values) * 1000:7.1f} ms"
        f"  mean={statistics.mean(values) * 1000:6.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--dsn", default=os.environ.get("PGFLOW_OBSERVE_DSN"))
    parser.add_argument(
        "--fallback-interval",
        type=float,
        default=0.2,
        help="heartbeat interval for the fallback run, seconds",
    )
    arguments = parser.parse_args()

    with database(arguments.dsn) as dsn:
        base = Settings(
            dsn=dsn, instance_id="bench", table=f"bench_{secrets.token_hex(3)}"
        )
        Fleet(base).create_table()
        try:
            notify = Settings(
                dsn=dsn,
                table=base.table,
                instance_id="bench-notify",
                heartbeat_interval=5,
                stale_timeout=60,
                sweep=False,
            )
            pauses, resumes = measure(notify, arguments.rounds)
            interval = arguments.fallback_interval
            fallback = Settings(
                dsn=dsn,
                table=base.table,
                instance_id="bench-heartbeat",
                heartbeat_interval=interval,
                stale_timeout=max(10, 3 * interval),
                listen=False,
                sweep=False,
            )
            slow_pauses, slow_resumes = measure(fallback, arguments.rounds, interval)
        finally:
            import psycopg
            from psycopg import sql

            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("drop table {}").format(sql.Identifier(base.table))
                )

    report("pause via NOTIFY", pauses)
    report("resume via NOTIFY", resumes)
    report(f"pause via heartbeat ({interval} s)", slow_pauses)
    report(f"resume via heartbeat ({interval} s)", slow_resumes)
    target = percentile(pauses, 0.99) < 0.2
    print(f"target p99 < 200 ms via NOTIFY: {'met' if target else 'NOT met'}")


if __name__ == "__main__":
    main()
