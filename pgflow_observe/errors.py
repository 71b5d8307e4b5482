"""Exceptions raised by pgflow_observe.

Everything the library raises on purpose derives from `PgflowObserveError`,
so callers can catch the whole family in one clause.
"""

from __future__ import annotations


class PgflowObserveError(Exception):
    """Base class of every error pgflow_observe raises on purpose."""


class ConfigurationError(PgflowObserveError, ValueError):
    """A setting has a value the library cannot work with.

    The message names the setting, the value it got and what was expected.
    """


class DatabaseUnavailable(PgflowObserveError):
    """The database could not be reached (raised only where asked for)."""


class InstanceNotFound(PgflowObserveError, LookupError):
    """No row exists for the given instance id."""


class InstanceNotLive(PgflowObserveError):
    """The operation needs a live instance, and this one is offline or stale."""


class InstanceIsLive(PgflowObserveError):
    """The operation needs an offline instance, and this one is alive."""


class DuplicateInstance(PgflowObserveError):
    """Another live process already holds this instance id."""


class TableMissing(PgflowObserveError):
    """The instances table does not exist; create it first."""
