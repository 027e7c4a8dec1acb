"""The shared server core: bind once, then hand the socket to the chosen concurrency model."""

from __future__ import annotations

import importlib
import socket
from collections.abc import Callable
from types import TracebackType
from typing import Final

from ferry.net.serve.config import ServeConfig
from ferry.net.serve.listen import Listener, open_listener
from ferry.net.serve.stop import StopSignal

#: A model: serve on a bound socket until the stop signal is set, then close its clients.
Model = Callable[[socket.socket, ServeConfig, StopSignal], None]

# model -> "module:function", imported on use so a server only loads the machinery it runs
# (asyncio alone is a noticeable part of start-up time).
STREAM_MODELS: Final[dict[str, str]] = {
    "iterative": "blocking:serve_iterative",
    "thread": "blocking:serve_threaded",
    "fork": "procs:serve_forking",
    "prefork": "procs:serve_prefork",
    "select": "selector:serve_select",
    "asyncio": "aio:serve_asyncio",
}
#: For UDP the stateless loop *is* the iterative and the select model (there are no connections
#: to multiplex); prefork runs that loop in N workers on one socket.
DATAGRAM_MODELS: Final[dict[str, str]] = {
    "iterative": "blocking:serve_datagrams",
    "select": "blocking:serve_datagrams",
    "prefork": "procs:serve_prefork",
    "asyncio": "aio:serve_asyncio",
}


def load_model(proto: str, model: str) -> Model:
    """The serving function for ``model`` on ``proto`` (config validation guarantees it exists)."""
    table = DATAGRAM_MODELS if proto == "udp" else STREAM_MODELS
    module, func = table[model].split(":")
    fn: Model = getattr(importlib.import_module(f"ferry.net.serve.{module}"), func)
    return fn


class Server:
    """One server: ``bind()`` (may raise UsageError/FerryError), ``serve_forever()``, ``close()``.

    ``request_stop()`` may be called from any thread or a signal handler; ``serve_forever`` then
    closes all clients (terminating and reaping child processes for fork/prefork) and returns.
    """

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self._stop = StopSignal()
        self._listener: Listener | None = None

    @property
    def address(self) -> str:
        """The bound address: ``host:port``, ``[v6]:port`` or the socket path."""
        if self._listener is None:
            raise RuntimeError("server is not bound yet")
        return self._listener.address

    @property
    def banner(self) -> str:
        """The readiness line printed on start; tests and scripts parse the address from it."""
        c = self.config
        return f"ferry net: {c.kind} ({c.proto}, {c.model}) listening on {self.address}"

    def bind(self) -> str:
        """Create the listening socket; returns its address."""
        if self._listener is None:
            self._listener = open_listener(self.config)
        return self._listener.address

    def serve_forever(self) -> None:
        """Serve until :meth:`request_stop`; binds first if needed."""
        self.bind()
        assert self._listener is not None
        load_model(self.config.proto, self.config.model)(self._listener.sock, self.config, self._stop)

    def request_stop(self) -> None:
        """Ask :meth:`serve_forever` to shut down (thread- and signal-safe, idempotent)."""
        self._stop.set()

    def close(self) -> None:
        """Release the socket (removing a unix socket file we created) and the stop pipe."""
        if self._listener is not None:
            self._listener.close()
        self._stop.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
