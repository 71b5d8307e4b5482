"""Run the library's own background work with OpenTelemetry instrumentation off."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from opentelemetry import context


def suppress_instrumentation_in_this_thread() -> None:
    """Mark the current thread's context so instrumentations record nothing.

    Called first thing in each background thread (a new thread starts with an
    empty context), so that a psycopg instrumentation in the host application
    does not turn every heartbeat into a span.
    """
    context.attach(context.set_value(context._SUPPRESS_INSTRUMENTATION_KEY, True))


@contextlib.contextmanager
def instrumentation_suppressed() -> Iterator[None]:
    """Suppress instrumentation for the duration of a block on any thread."""
    token = context.attach(
        context.set_value(context._SUPPRESS_INSTRUMENTATION_KEY, True)
    )
    try:
        yield
    finally:
        context.detach(token)
