"""What to serve and how: :class:`ServeConfig`, validated once, before any socket exists."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Final

from ferry.errors import UsageError
from ferry.net.serve.handlers import KINDS

PROTOS: Final = ("tcp", "udp", "unix")
MODELS: Final = ("iterative", "thread", "fork", "prefork", "select", "asyncio")
DEFAULT_MODEL: Final = "asyncio"
DEFAULT_HOST: Final = "127.0.0.1"
#: A fixed, documented default so ``ferry net serve greet`` and a client agree without flags.
DEFAULT_PORT: Final = 9000
DEFAULT_IDLE_TIMEOUT: Final = 300.0
#: Datagram sockets have no connections, so per-connection models make no sense for UDP.
UDP_MODELS: Final = ("iterative", "prefork", "select", "asyncio")
MAX_WORKERS: Final = 256
#: sun_path is 108 bytes on Linux including the NUL; longer paths fail with an obscure error.
MAX_UNIX_PATH: Final = 107


def default_workers() -> int:
    """Prefork worker count when not given: one per CPU this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _choice(what: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise UsageError(f"unknown {what} {value!r} (choose from {', '.join(choices)})")
    return value


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """A validated server configuration; constructing one with bad values raises UsageError."""

    kind: str
    proto: str = "tcp"
    model: str = DEFAULT_MODEL
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    path: str | None = None
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    workers: int = 1
    backlog: int = 1024

    def __post_init__(self) -> None:
        _choice("kind", self.kind, KINDS)
        _choice("protocol", self.proto, PROTOS)
        _choice("model", self.model, MODELS)
        if self.proto == "udp" and self.model not in UDP_MODELS:
            raise UsageError(
                f"model {self.model!r} needs connections; for udp use one of {', '.join(UDP_MODELS)}"
            )
        if self.proto == "unix":
            if not self.path:
                raise UsageError("--proto unix needs --path SOCKET")
            if len(os.fsencode(self.path)) > MAX_UNIX_PATH:
                raise UsageError(
                    f"socket path too long ({len(self.path)} > {MAX_UNIX_PATH} bytes): {self.path}"
                )
            parent = os.path.dirname(os.path.abspath(self.path))
            if not os.path.isdir(parent):
                raise UsageError(f"socket directory does not exist: {parent}")
        elif self.path is not None:
            raise UsageError(f"--path is for --proto unix, not {self.proto}")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"port {self.port} is out of range (0-65535)")
        if not self.host:
            raise UsageError("empty host")
        if not (self.idle_timeout > 0 and math.isfinite(self.idle_timeout)):
            raise UsageError(f"idle timeout must be a positive number of seconds, not {self.idle_timeout}")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise UsageError(f"workers must be between 1 and {MAX_WORKERS}, not {self.workers}")

    @classmethod
    def from_options(
        cls,
        kind: str,
        *,
        proto: str | None = None,
        model: str | None = None,
        host: str | None = None,
        port: int | None = None,
        path: str | None = None,
        idle_timeout: float | None = None,
        workers: int | None = None,
    ) -> ServeConfig:
        """Build from command-line style options, where None means "not given".

        ``--path`` alone implies ``--proto unix``; host/port with a unix socket and ``--workers``
        with a model other than prefork are refused rather than silently ignored.
        """
        if proto is None:
            proto = "unix" if path is not None else "tcp"
        model = model or DEFAULT_MODEL
        if proto == "unix" and (host is not None or port is not None):
            raise UsageError("--host/--port do not apply to --proto unix (use --path)")
        if workers is not None and model != "prefork":
            raise UsageError("--workers applies only to --model prefork")
        return cls(
            kind=kind,
            proto=proto,
            model=model,
            host=DEFAULT_HOST if host is None else host,
            port=DEFAULT_PORT if port is None else port,
            path=path,
            idle_timeout=DEFAULT_IDLE_TIMEOUT if idle_timeout is None else idle_timeout,
            workers=(default_workers() if workers is None else workers) if model == "prefork" else 1,
        )
