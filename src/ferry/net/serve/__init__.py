"""``ferry net serve``: the classic seed servers (hello, greet, upper, echo) over TCP, UDP and
unix sockets, with six interchangeable concurrency models driving one set of sans-IO handlers.

Typical use::

    config = ServeConfig.from_options("greet", model="select", port=0)
    with Server(config) as server:
        print(server.banner)          # after bind(); serve_forever() binds if needed
        server.serve_forever()        # until server.request_stop() (thread/signal-safe)
"""

from __future__ import annotations

from ferry.net.serve.config import (
    DEFAULT_HOST,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MODEL,
    DEFAULT_PORT,
    MODELS,
    PROTOS,
    UDP_MODELS,
    ServeConfig,
)
from ferry.net.serve.core import Server
from ferry.net.serve.handlers import KINDS

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MODEL",
    "DEFAULT_PORT",
    "KINDS",
    "MODELS",
    "PROTOS",
    "UDP_MODELS",
    "ServeConfig",
    "Server",
]
