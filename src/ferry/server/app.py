"""``ferry serve``: set up the data root, accounts, certificate and logging; accept sessions; shut down.

Zero configuration: the first start creates the root (``ferry.paths.default_root()``), a self-signed
certificate, and a first user whose password is printed once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry import __version__, paths
from ferry.aio import ChunkStream
from ferry.server.accounts import Accounts
from ferry.server.context import Limits, ServerContext
from ferry.server.log import setup_logging
from ferry.server.session import Session


@dataclass
class ServeConfig:
    """What ``ferry serve`` was asked to do."""

    root: Path
    host: str = "127.0.0.1"
    port: int = paths.DEFAULT_PORT
    plain: bool = False
    limits: Limits = field(default_factory=Limits)
    log_to_console: bool = True
    #: argon2 PasswordHasher override (tests use a cheap one); None = production parameters
    hasher: Any = None


@dataclass
class Banner:
    """What the server tells its operator at start-up."""

    address: str
    root: Path
    tls: bool
    fingerprint: str | None
    first_user: tuple[str, str] | None  # (name, password) when just created


class _SessionStream(ChunkStream):
    """The receive side of one accepted connection; starts its session when connected.

    Used instead of ``asyncio.start_server``'s StreamReader, which copies every received byte
    twice (an upload's data would pay that). Reading pauses above 1 MiB buffered per session.
    """

    def __init__(self, on_client: Callable[[ChunkStream, asyncio.StreamWriter], Coroutine[Any, Any, None]]) -> None:
        super().__init__(limit=1 << 20)
        self._on_client = on_client
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        loop = asyncio.get_running_loop()
        writer = asyncio.StreamWriter(transport, self, None, loop)  # type: ignore[arg-type]
        self._task = loop.create_task(self._on_client(self, writer))


class Server:
    """A running ferry server (one asyncio process, many sessions)."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.ctx: ServerContext | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.banner: Banner | None = None

    async def start(self) -> Banner:
        """Prepare the root and start listening; returns what to tell the operator."""
        cfg = self.config
        root = paths.ensure_private_dir(cfg.root)
        log = setup_logging(root, cfg.log_to_console)
        accounts = Accounts(root, hasher=cfg.hasher)
        first = accounts.ensure_first_user()
        ssl_ctx = None
        fp = None
        if not cfg.plain:
            from ferry.server.tls import ensure_certificate, fingerprint_file, server_ssl_context

            cert, key = ensure_certificate(root)
            ssl_ctx = server_ssl_context(cert, key)
            fp = fingerprint_file(cert)
        self.ctx = ServerContext(
            root=root,
            accounts=accounts,
            ssl_context=ssl_ctx,
            log=log,
            limits=cfg.limits,
            software=f"ferry/{__version__}",
        )
        try:
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(
                lambda: _SessionStream(self._on_client),
                cfg.host,
                cfg.port,
                ssl=ssl_ctx,
                reuse_address=True,
                backlog=1024,
            )
        except OSError as exc:
            from ferry.errors import UsageError

            raise UsageError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}") from exc
        sock = self._server.sockets[0].getsockname()
        host = f"[{sock[0]}]" if ":" in sock[0] else sock[0]
        address = f"{host}:{sock[1]}"
        log.info("listening on %s tls=%s root=%s", address, not cfg.plain, root)
        if cfg.limits.partial_max_age > 0:
            from ferry.server.sweeper import sweep_forever

            self._sweeper = asyncio.create_task(sweep_forever(self.ctx))
        self.banner = Banner(address, root, not cfg.plain, fp, (first[0].name, first[1]) if first else None)
        return self.banner

    async def _on_client(self, reader: ChunkStream, writer: asyncio.StreamWriter) -> None:
        assert self.ctx is not None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            _keepalive(sock)
        if len(self._tasks) >= self.ctx.limits.max_sessions:
            # Tell the client why instead of a bare reset (an Error is allowed before Hello).
            from ferry.wire import Connection, Role
            from ferry.wire import messages as m

            busy = m.Error(id=0, code="busy", message="the server is at its session limit; try again later")
            with contextlib.suppress(Exception):
                writer.write(Connection(Role.SERVER).send(busy))
                async with asyncio.timeout(1):
                    await writer.drain()
            writer.close()
            self.ctx.log.warning("session limit (%d) reached: refused a connection", self.ctx.limits.max_sessions)
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await Session(self.ctx, reader, writer).run()
        except asyncio.CancelledError:
            # Shutdown cancelled this connection's task; the session already said goodbye. This
            # task is the top of its own stack (started by _SessionStream), and letting the
            # cancellation out only makes asyncio log a spurious "Exception in callback".
            pass
        finally:
            self._tasks.discard(task)

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting, end every session (they say goodbye), wait up to ``grace`` seconds."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        if self.ctx is not None:
            self.ctx.work.shutdown()
            self.ctx.accounts.close()
            for h in list(self.ctx.log.handlers):
                self.ctx.log.removeHandler(h)
                h.close()


def _keepalive(sock: object) -> None:
    """TCP keepalives so a vanished peer is noticed even when nothing is being sent."""
    import socket

    with contextlib.suppress(OSError, AttributeError):
        s = sock  # asyncio TransportSocket
        s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # type: ignore[attr-defined]
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)  # type: ignore[attr-defined]
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 15)  # type: ignore[attr-defined]
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)  # type: ignore[attr-defined]


async def serve_forever(config: ServeConfig, on_ready: Callable[[Banner], None]) -> None:
    """Run until SIGINT/SIGTERM, then shut down cleanly."""
    server = Server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Handlers first: whoever reads the banner may signal at once, and must get a clean stop,
    # not the default action (death by SIGTERM, or a KeyboardInterrupt traceback).
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    banner = await server.start()
    on_ready(banner)
    try:
        await stop.wait()
    finally:
        await server.close()


def run(config: ServeConfig, on_ready: Callable[[Banner], None]) -> None:
    """Blocking entry point used by the CLI; uses uvloop when installed (faster TLS)."""
    if os.environ.get("FERRY_NO_UVLOOP") != "1":
        try:
            import uvloop

        except ImportError:
            pass
        else:
            # uvloop's TLS is about twice as fast, but it has no sendfile: plain mode keeps asyncio's
            # loop so downloads go through the kernel's sendfile.
            if not config.plain:
                uvloop.run(serve_forever(config, on_ready))
                return
    asyncio.run(serve_forever(config, on_ready))
