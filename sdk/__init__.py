"""The mrq SDK: write services that talk to each other through RabbitMQ.

The names in `__all__` are the public API; every other module is
implementation. The SDK logs through loguru under the name "sdk" and leaves
it disabled until the application calls `logger.enable("sdk")` (`run()` and
the worker do).
"""

from loguru import logger

from sdk._version import __version__
from sdk.client import Client
from sdk.context import Context
from sdk.errors import (
    BadMessage,
    BrokerUnavailable,
    DefinitionError,
    MrqError,
    NoRoute,
    Reject,
    RemoteError,
    Retry,
    RpcTimeout,
    SettingsError,
    TopologyError,
)
from sdk.runner import run
from sdk.service import Service, microservice, on_event, route
from sdk.settings import settings

logger.disable("sdk")

__all__ = [
    "BadMessage",
    "BrokerUnavailable",
    "Client",
    "Context",
    "DefinitionError",
    "MrqError",
    "NoRoute",
    "Reject",
    "RemoteError",
    "Retry",
    "RpcTimeout",
    "Service",
    "SettingsError",
    "TopologyError",
    "__version__",
    "microservice",
    "on_event",
    "route",
    "run",
    "settings",
]
