"""pgflow_observe: see which pgflow workers are alive, how loaded, and pause them.

Attach it to a worker process::

    from pgflow_observe import Registry

    with Registry() as registry:   # settings from the environment
        run_executor()             # which emits the task signals

See the README for the signal contract, the table and the settings.
"""

from ._version import __version__
from .config import Settings
from .errors import (
    ConfigurationError,
    DatabaseUnavailable,
    DuplicateInstance,
    InstanceIsLive,
    InstanceNotFound,
    InstanceNotLive,
    PgflowObserveError,
    TableMissing,
)
from .fleet import Fleet
from .load import LoadSnapshot, LoadTracker
from .registry import Registry, RegistryStats
from .signals import (
    instance_paused,
    instance_resumed,
    running_task,
    task_exception,
    task_start,
    task_stop,
)
from .table import Instance

__all__ = [
    "ConfigurationError",
    "DatabaseUnavailable",
    "DuplicateInstance",
    "Fleet",
    "Instance",
    "InstanceIsLive",
    "InstanceNotFound",
    "InstanceNotLive",
    "LoadSnapshot",
    "LoadTracker",
    "PgflowObserveError",
    "Registry",
    "RegistryStats",
    "Settings",
    "TableMissing",
    "__version__",
    "instance_paused",
    "instance_resumed",
    "running_task",
    "task_exception",
    "task_start",
    "task_stop",
]
