"""OpenTelemetry metrics and optional task spans (being written)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .registry import Registry


class RegistryMetrics:
    def __init__(self, registry: Registry, **options: Any) -> None:
        self.registry = registry

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass
