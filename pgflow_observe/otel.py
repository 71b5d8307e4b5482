"""An opt-in OpenTelemetry SDK setup for worker processes and the demo.

The library itself uses the OpenTelemetry API alone, so an application that
already configures the SDK needs nothing from this module. One that does not
can call `configure_opentelemetry()` once at startup::

    from pgflow_observe import Registry, Settings
    from pgflow_observe.otel import configure_opentelemetry

    settings = Settings.from_env()
    telemetry = configure_opentelemetry(settings.instance_id)
    try:
        with Registry(settings, meter_provider=telemetry.meter_provider):
            run_executor()
    finally:
        telemetry.shutdown()

Everything else comes from the standard OpenTelemetry environment variables:

``OTEL_METRICS_EXPORTER``
    ``otlp`` (the default), ``prometheus``, ``console`` or ``none``; several
    may be given, separated by commas.
``OTEL_TRACES_EXPORTER``
    ``otlp`` (the default), ``console`` or ``none``; read only with
    ``tracing=True``.
``OTEL_EXPORTER_OTLP_PROTOCOL``
    ``http/protobuf`` (the default) or ``grpc``; the per-signal variables
    ``OTEL_EXPORTER_OTLP_METRICS_PROTOCOL`` and
    ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` win over it.
``OTEL_EXPORTER_OTLP_ENDPOINT`` and the other ``OTEL_EXPORTER_OTLP_*``
    endpoint, headers, timeout, compression, temporality: read by the OTLP
    exporters themselves, including their ``_METRICS_`` / ``_TRACES_`` forms.
``OTEL_EXPORTER_PROMETHEUS_HOST``, ``OTEL_EXPORTER_PROMETHEUS_PORT``
    where the Prometheus exporter serves ``/metrics``; ``localhost:9464`` by
    default. Port 0 picks a free port, see `Telemetry.prometheus_address`.
``OTEL_METRIC_EXPORT_INTERVAL``, ``OTEL_METRIC_EXPORT_TIMEOUT``
    milliseconds, for the push exporters (60000 and 30000 by default).
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``
    merged into the resource.

The exporters are optional dependencies: ``pgflow-observe[otlp-http]``,
``pgflow-observe[otlp-grpc]`` and ``pgflow-observe[prometheus]``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)

from .errors import ConfigurationError

__all__ = ["Telemetry", "build_resource", "configure_opentelemetry"]

logger = logging.getLogger(__name__)

DEFAULT_PROMETHEUS_HOST = "localhost"
DEFAULT_PROMETHEUS_PORT = 9464
DEFAULT_OTLP_PROTOCOL = "http/protobuf"

_METRIC_EXPORTERS = ("otlp", "prometheus", "console", "none")
_SPAN_EXPORTERS = ("otlp", "console", "none")
_PROTOCOLS = ("http/protobuf", "grpc")


@dataclasses.dataclass
class Telemetry:
    """The SDK objects `configure_opentelemetry()` built, and their shutdown."""

    meter_provider: MeterProvider
    tracer_provider: TracerProvider | None
    """None unless tracing was asked for."""
    resource: Resource
    metric_readers: tuple[MetricReader, ...] = ()
    """The meter provider's readers; none with ``OTEL_METRICS_EXPORTER=none``."""
    prometheus_address: tuple[str, int] | None = None
    """Host and port the Prometheus exporter listens on, if it was chosen."""
    _servers: _Servers = dataclasses.field(
        default_factory=lambda: _Servers(), repr=False
    )
    _shut_down: bool = dataclasses.field(default=False, repr=False)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Export what is left, then stop the exporters and the /metrics server.

        Close the registry first, so its last task durations are in the final
        export. Idempotent.

        :param timeout: seconds each provider may take to flush.
        """
        if self._shut_down:
            return
        self._shut_down = True
        millis = max(1, int(timeout * 1000))
        try:
            self.meter_provider.shutdown(timeout_millis=millis)
        finally:
            if self.tracer_provider is not None:
                self.tracer_provider.shutdown()
            self._servers.stop()


def build_resource(instance_id: str, *, service_name: str | None = None) -> Resource:
    """Return the resource of a worker: its identity for every signal.

    ``service.instance.id`` is *instance_id* whatever the environment says, so
    the metrics name the same instance as the table. ``host.name`` and
    ``process.pid`` are set too, and ``OTEL_RESOURCE_ATTRIBUTES`` may override
    them. ``OTEL_SERVICE_NAME`` (or ``service.name`` in
    ``OTEL_RESOURCE_ATTRIBUTES``) wins over *service_name*.

    :param instance_id: the registry's instance id.
    :param service_name: used when the environment names no service.
    :raise ConfigurationError: *instance_id* is empty.
    """
    if not isinstance(instance_id, str) or not instance_id:
        raise ConfigurationError(
            f"instance_id must be a non-empty string, got {instance_id!r}"
        )
    from_environment = Resource.create()
    defaults: dict[str, str | int] = {
        "host.name": socket.gethostname(),
        "process.pid": os.getpid(),
    }
    named = str(from_environment.attributes.get("service.name", ""))
    if service_name and named.startswith("unknown_service"):
        defaults["service.name"] = service_name
        from_environment = from_environment.merge(
            Resource({"service.name": service_name})
        )
    return (
        Resource(defaults)
        .merge(from_environment)
        .merge(Resource({"service.instance.id": instance_id}))
    )


def configure_opentelemetry(
    instance_id: str,
    *,
    service_name: str | None = None,
    tracing: bool = False,
    set_global: bool = True,
    readers: Sequence[MetricReader] = (),
) -> Telemetry:
    """Build an SDK meter provider (and tracer provider) from the environment.

    With *set_global* (the default) the providers become the process's global
    ones, which `Registry` and every other instrumented library then use.
    This is the only place in pgflow_observe that sets a global provider, and
    only when an application calls it. OpenTelemetry lets a global provider
    be set once per process: if one is already set, it stays, a warning is
    logged, and the returned providers must be passed explicitly.

    :param instance_id: the registry's instance id, the resource's
        ``service.instance.id``.
    :param service_name: ``service.name`` unless the environment sets one.
    :param tracing: also build a tracer provider with a batching processor.
    :param set_global: install the providers as the global ones.
    :param readers: more metric readers for the meter provider, next to the
        ones the environment asks for (an in-memory reader in tests, say).
    :raise ConfigurationError: an environment variable names an unknown
        exporter or protocol, or the exporter's package is not installed (the
        message names the extra to install).
    """
    resource = build_resource(instance_id, service_name=service_name)
    servers = _Servers()
    try:
        all_readers = [*_metric_readers(servers), *readers]
        span_exporters = _span_exporters() if tracing else []
    except BaseException:
        servers.stop()
        raise
    telemetry = Telemetry(
        meter_provider=MeterProvider(metric_readers=all_readers, resource=resource),
        metric_readers=tuple(all_readers),
        tracer_provider=None,
        resource=resource,
        prometheus_address=servers.prometheus_address,
        _servers=servers,
    )
    if tracing:
        telemetry.tracer_provider = TracerProvider(resource=resource)
        for exporter in span_exporters:
            telemetry.tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
    if set_global:
        _set_global(telemetry)
    return telemetry


def _set_global(telemetry: Telemetry) -> None:
    metrics.set_meter_provider(telemetry.meter_provider)
    if metrics.get_meter_provider() is not telemetry.meter_provider:
        logger.warning(
            "a global meter provider was already set; pass"
            " telemetry.meter_provider to Registry explicitly"
        )
    if telemetry.tracer_provider is not None:
        trace.set_tracer_provider(telemetry.tracer_provider)
        if trace.get_tracer_provider() is not telemetry.tracer_provider:
            logger.warning(
                "a global tracer provider was already set; pass"
                " telemetry.tracer_provider to Registry explicitly"
            )


# -- exporters, chosen by the environment ------------------------------------------


class _Servers:
    """The HTTP servers the exporters started, to stop at shutdown."""

    def __init__(self) -> None:
        self.prometheus_address: tuple[str, int] | None = None
        self._stops: list[Callable[[], None]] = []

    def add(self, stop: Callable[[], None]) -> None:
        self._stops.append(stop)

    def stop(self) -> None:
        stops, self._stops = self._stops, []
        for stop in stops:
            stop()


def _names(variable: str, known: Sequence[str]) -> list[str]:
    raw = os.environ.get(variable, "").strip() or "otlp"
    names = [name.strip().lower() for name in raw.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigurationError(
            f"environment variable {variable} has an invalid value {raw!r}:"
            f" expected one or more of {', '.join(known)}, separated by commas"
        )
    if "none" in names:
        if len(names) > 1:
            raise ConfigurationError(
                f"environment variable {variable} has an invalid value {raw!r}:"
                " 'none' cannot be combined with other exporters"
            )
        return []
    return list(dict.fromkeys(names))


def _protocol(signal_variable: str) -> str:
    for variable in (signal_variable, "OTEL_EXPORTER_OTLP_PROTOCOL"):
        raw = os.environ.get(variable, "").strip()
        if raw:
            if raw not in _PROTOCOLS:
                raise ConfigurationError(
                    f"environment variable {variable} has an invalid value"
                    f" {raw!r}: expected one of {', '.join(_PROTOCOLS)}"
                )
            return raw
    return DEFAULT_OTLP_PROTOCOL


def _missing(exporter: str, extra: str, exc: ImportError) -> ConfigurationError:
    return ConfigurationError(
        f"the {exporter} exporter is not installed ({exc.name or exc}):"
        f" pip install 'pgflow-observe[{extra}]'"
    )


def _metric_readers(servers: _Servers) -> list[MetricReader]:
    readers: list[MetricReader] = []
    for name in _names("OTEL_METRICS_EXPORTER", _METRIC_EXPORTERS):
        if name == "prometheus":
            readers.append(_prometheus_reader(servers))
        elif name == "console":
            readers.append(
                PeriodicExportingMetricReader(ConsoleMetricExporter(out=sys.stdout))
            )
        else:
            readers.append(PeriodicExportingMetricReader(_otlp_metric_exporter()))
    return readers


def _otlp_metric_exporter() -> MetricExporter:
    protocol = _protocol("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL")
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter as GrpcMetricExporter,
            )
        except ImportError as exc:
            raise _missing("OTLP gRPC", "otlp-grpc", exc) from exc
        return GrpcMetricExporter()
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HttpMetricExporter,
        )
    except ImportError as exc:
        raise _missing("OTLP HTTP", "otlp-http", exc) from exc
    return HttpMetricExporter()


def _prometheus_reader(servers: _Servers) -> MetricReader:
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server
    except ImportError as exc:
        raise _missing("Prometheus", "prometheus", exc) from exc
    host = (
        os.environ.get("OTEL_EXPORTER_PROMETHEUS_HOST", "").strip()
        or DEFAULT_PROMETHEUS_HOST
    )
    raw_port = os.environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", "").strip()
    try:
        port = int(raw_port) if raw_port else DEFAULT_PROMETHEUS_PORT
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigurationError(
            "environment variable OTEL_EXPORTER_PROMETHEUS_PORT has an invalid"
            f" value {raw_port!r}: expected a port number from 0 to 65535"
        ) from None

    reader = PrometheusMetricReader()
    try:
        server, thread = start_http_server(port, addr=host)
    except OSError as exc:
        reader.shutdown()
        raise ConfigurationError(
            f"the Prometheus exporter cannot listen on {host}:{port}: {exc}"
        ) from exc
    bound: Any = server.server_address
    servers.prometheus_address = (host, int(bound[1]))

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5.0)

    servers.add(stop)
    logger.info("prometheus metrics served on http://%s:%d/metrics", host, bound[1])
    return reader


def _span_exporters() -> list[SpanExporter]:
    exporters: list[SpanExporter] = []
    for name in _names("OTEL_TRACES_EXPORTER", _SPAN_EXPORTERS):
        if name == "console":
            exporters.append(ConsoleSpanExporter(out=sys.stdout))
        else:
            exporters.append(_otlp_span_exporter())
    return exporters


def _otlp_span_exporter() -> SpanExporter:
    protocol = _protocol("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcSpanExporter,
            )
        except ImportError as exc:
            raise _missing("OTLP gRPC", "otlp-grpc", exc) from exc
        return GrpcSpanExporter()
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpSpanExporter,
        )
    except ImportError as exc:
        raise _missing("OTLP HTTP", "otlp-http", exc) from exc
    return HttpSpanExporter()
