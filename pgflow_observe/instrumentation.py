"""An OpenTelemetry instrumentor that runs a `Registry` for the process.

`opentelemetry-instrument` finds it through the ``opentelemetry_instrumentor``
entry point (install ``pgflow-observe[instrument]``) and calls
``instrument()`` with no arguments: the registry then takes its settings from
the environment (`Settings.from_env()`), so with a DSN configured the
instance also registers in the table and heartbeats. Called by hand::

    from pgflow_observe.instrumentation import PgflowObserveInstrumentor

    instrumentor = PgflowObserveInstrumentor()
    instrumentor.instrument(tracing=True)
    registry = instrumentor.registry      # load, pause state, stats
    ...
    instrumentor.uninstrument()           # closes the registry

Like every OpenTelemetry instrumentor it is a singleton, so one registry runs
per process this way.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

# The module opts out of type checking as a whole ("# type: ignore" at its
# top), so mypy sees neither the class nor its methods.
from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
    BaseInstrumentor,
)

from .config import Settings
from .errors import ConfigurationError
from .registry import Registry

__all__ = ["PgflowObserveInstrumentor"]

logger = logging.getLogger(__name__)

_OPTIONS = frozenset({"settings", "meter_provider", "tracer_provider", "tracing"})


class PgflowObserveInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Start a `Registry` on ``instrument()``, close it on ``uninstrument()``.

    ``instrument()`` accepts these keywords, all optional:

    ``settings``
        a `Settings`; by default `Settings.from_env()`.
    ``meter_provider``, ``tracer_provider``
        where metrics and spans go; the global providers by default.
    ``tracing``
        one span per task (see `pgflow_observe.tracing`); off by default.

    Other keywords are ignored, as the ``opentelemetry-instrument`` command
    may pass some meant for every instrumentor. ``instrument()`` raises what
    `Registry.start()` raises, and `ConfigurationError` for malformed
    settings in the environment; the instrumentor then stays uninstrumented.
    """

    _registry: Registry | None = None

    def instrumentation_dependencies(self) -> Collection[str]:
        """Nothing beyond pgflow_observe's own dependencies."""
        return ()

    @property
    def registry(self) -> Registry | None:
        """The running registry while instrumented, else None."""
        return self._registry

    def _instrument(self, **kwargs: Any) -> None:
        ignored = sorted(set(kwargs) - _OPTIONS)
        if ignored:
            logger.debug("instrument() ignores keyword(s): %s", ", ".join(ignored))
        settings = kwargs.get("settings")
        if settings is None:
            settings = Settings.from_env()
        elif not isinstance(settings, Settings):
            raise ConfigurationError(
                f"settings must be a pgflow_observe.Settings, got {settings!r}"
            )
        registry = Registry(
            settings,
            meter_provider=kwargs.get("meter_provider"),
            tracing=bool(kwargs.get("tracing", False)),
            tracer_provider=kwargs.get("tracer_provider"),
        )
        registry.start()
        self._registry = registry
        logger.info("instance %r instrumented", settings.instance_id)

    def _uninstrument(self, **kwargs: Any) -> None:
        registry, self._registry = self._registry, None
        if registry is not None:
            registry.close()
