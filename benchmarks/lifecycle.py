"""Lifecycle figures: how long close() takes, and the heartbeat's HOT ratio.

    python benchmarks/lifecycle.py [--dsn DSN] [--closes 30] [--beats 500]

close() is timed mid-interval (a 30 s heartbeat interval, closed 0.1-0.5 s
after start), which is the worst case for a thread that sleeps between beats.
The HOT ratio is read from pg_stat_user_tables after many beats.
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import statistics
import time

import psycopg
from psycopg import sql

from pgflow_observe import Fleet, Registry, Settings

from _database import database


def close_times(dsn: str, table: str, rounds: int) -> list[float]:
    times = []
    for n in range(rounds):
        settings = Settings(
            dsn=dsn,
            table=table,
            instance_id=f"close-{n}",
            heartbeat_interval=30,
            stale_timeout=120,
        )
        registry = Registry(settings, metrics=False).start()
        time.sleep(random.uniform(0.1, 0.5))
        began = time.perf_counter()
        registry.close()
        times.append(time.perf_counter() - began)
    return times


def hot_ratio(dsn: str, table: str, beats: int) -> tuple[int, int]:
    settings = Settings(
        dsn=dsn,
        table=table,
        instance_id="hot",
        heartbeat_interval=0.01,
        stale_timeout=5,
        listen=False,
        sweep=False,
    )
    with Registry(settings, metrics=False) as registry:
        while registry.stats().heartbeat.beats < beats:  # type: ignore[union-attr]
            time.sleep(0.05)
    query = (
        "select n_tup_upd, n_tup_hot_upd from pg_stat_user_tables where relname = %s"
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        deadline = time.monotonic() + 20
        while True:
            conn.execute("select pg_stat_clear_snapshot()")
            row = conn.execute(query, (table,)).fetchone()
            assert row is not None
            if row[0] >= beats or time.monotonic() > deadline:
                return int(row[0]), int(row[1])
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("PGFLOW_OBSERVE_DSN"))
    parser.add_argument("--closes", type=int, default=30)
    parser.add_argument("--beats", type=int, default=500)
    arguments = parser.parse_args()

    with database(arguments.dsn) as dsn:
        table = f"bench_{secrets.token_hex(3)}"
        Fleet(Settings(dsn=dsn, table=table)).create_table()
        try:
            times = close_times(dsn, table, arguments.closes)
            updates, hot = hot_ratio(dsn, table, arguments.beats)
        finally:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("drop table {}").format(sql.Identifier(table)))

    print(
        f"close() mid-interval, n={len(times)}: median"
        f" {statistics.median(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms"
    )
    print(f"heartbeat updates: {updates}, HOT: {hot} ({hot / updates:.1%})")


if __name__ == "__main__":
    main()
