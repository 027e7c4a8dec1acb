"""``ferry serve``: set up the data root, accounts, certificate and logging; accept sessions; shut down.

Zero configuration: the first start creates the root (``ferry.paths.default_root()``), a self-signed
certificate, and a first user whose password is printed once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry import __version__, paths
from ferry.aio import ChunkStream, cancel_and_wait
from ferry.errors import UsageError
from ferry.server.accounts import Accounts
from ferry.server.admission import Refused, Ticket, address_key
from ferry.server.context import Limits, ServerContext
from ferry.server.listener import DescriptorBudget, Listener, bind_sockets, raise_descriptor_limit
from ferry.server.log import setup_logging
from ferry.server.objectsvc.upkeep import open_objects, sweep_objects_forever
from ferry.server.session import Session
from ferry.store.config import S3Config
from ferry.wire import Connection, Role
from ferry.wire.codes import ErrorCode

#: Kernel queue of connections not yet accepted (a burst waits there, not refused).
_BACKLOG = 1024
#: Descriptors held back so that a connection can still be accepted and told "refused" when none is free.
_SPARE_DESCRIPTORS = 4
#: Refusals (a TLS handshake and one Error) in progress at once, and per address group; beyond
#: that a refused connection is closed without a word (a flood must not make us work for it).
_REFUSALS = 64
_REFUSALS_PER_ADDRESS = 4
#: Seconds a refusal may take (TLS handshake and the Error).
_REFUSAL_TIMEOUT = 2.0
#: Seconds between two summary lines about refused connections.
_REFUSAL_LOG_PERIOD = 10.0


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
    #: the accounts in this PostgreSQL database (shared by every server given it); None: users.db
    db: str | None = None
    #: the TLS certificate and key to present (every server behind one address the same); None:
    #: the certificate generated under the root
    cert: Path | None = None
    key: Path | None = None
    #: the object store of ``--store``: files as chunks there, their namespace in ``db`` (the object
    #: backend); None: the folder backend under ``root``
    store: S3Config | None = None


@dataclass
class Banner:
    """What the server tells its operator at start-up."""

    address: str
    root: Path
    tls: bool
    fingerprint: str | None
    first_user: tuple[str, str] | None  # (name, password) when just created
    #: the shared accounts database (its URL without the password), None with users.db
    accounts: str | None = None


class Server:
    """A running ferry server (one asyncio process, many sessions).

    Each accepted connection is decided on at once (:meth:`_on_accept`): admitted to the pre-login
    pool and served by its own task (TLS handshake, then a :class:`Session`), or refused with a
    ``busy`` error by a short refusal task. Both kinds of task are tracked so that shutdown ends them.
    """

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.ctx: ServerContext | None = None
        self.listener: Listener | None = None
        self.descriptors: tuple[int, int] | None = None  #: soft RLIMIT_NOFILE before and after start
        self._tasks: set[asyncio.Task[None]] = set()
        self._refusals: Counter[str] = Counter()  # refusal tasks running, by address group
        self._refusal_log: _RefusalLog | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False
        self._revoker: asyncio.Task[None] | None = None
        self.banner: Banner | None = None

    async def start(self) -> Banner:
        """Prepare the root and start listening; returns what to tell the operator."""
        cfg = self.config
        root = paths.ensure_private_dir(cfg.root)
        log = setup_logging(root, cfg.log_to_console)
        self.descriptors = raise_descriptor_limit()
        accounts = Accounts(root, hasher=cfg.hasher, db=cfg.db)  # an unreachable database fails here
        objects = None
        try:
            if cfg.store is not None:
                assert cfg.db is not None  # (the command line requires --db with --store)
                objects = await open_objects(cfg.db, cfg.store)
            first = accounts.ensure_first_user()
        except BaseException:
            if objects is not None:
                await objects.close()
            accounts.close()
            raise
        ssl_ctx = None
        fp = None
        if not cfg.plain:
            from ferry.server.tls import ensure_certificate, fingerprint_file, server_ssl_context

            cert, key = (cfg.cert, cfg.key) if cfg.cert and cfg.key else ensure_certificate(root)
            ssl_ctx = server_ssl_context(cert, key)
            fp = fingerprint_file(cert)
        self.ctx = ServerContext(
            root=root,
            accounts=accounts,
            ssl_context=ssl_ctx,
            log=log,
            limits=cfg.limits,
            software=f"ferry/{__version__}",
            fingerprint=fp,
            objects=objects,
        )
        try:
            sockets = bind_sockets(cfg.host, cfg.port, backlog=_BACKLOG)
        except OSError as exc:
            raise UsageError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}") from exc
        budget = DescriptorBudget(reserve=cfg.limits.fd_reserve, spares=_SPARE_DESCRIPTORS)
        self.listener = Listener(sockets, budget, self._on_accept)
        self._refusal_log = _RefusalLog(log)
        self.listener.start()
        sock = sockets[0].getsockname()
        host = f"[{sock[0]}]" if ":" in sock[0] else sock[0]
        address = f"{host}:{sock[1]}"
        log.info("listening on %s tls=%s root=%s", address, not cfg.plain, root)
        before, after = self.descriptors
        log.info(
            "descriptors: limit %d%s, %d kept in reserve",
            after,
            f" (raised from {before})" if after != before else "",
            budget.reserve,
        )
        lim = cfg.limits
        log.info(
            "limits: sessions=%d per-user=%d pending-logins=%d per-address=%d login-threads=%d login-timeout=%gs",
            lim.max_sessions,
            lim.max_sessions_per_user,
            lim.max_pending_logins,
            lim.max_pending_logins_per_address,
            lim.auth_concurrency,
            lim.login_timeout,
        )
        log.info(
            "unfinished uploads: per-user=%d bytes=%d kept=%gs sweep-every=%gs",
            lim.max_partials,
            lim.max_partial_bytes,
            lim.partial_max_age,
            lim.sweep_interval,
        )
        if objects is not None:
            log.info("files in the object store %s, namespace in the database %s", cfg.store.url if cfg.store else "", accounts.where)
            self._sweeper = asyncio.create_task(sweep_objects_forever(objects, lim, log))
        elif cfg.limits.partial_max_age > 0:
            from ferry.server.sweeper import sweep_forever

            self._sweeper = asyncio.create_task(sweep_forever(self.ctx))
        self._revoker = asyncio.create_task(self.ctx.revocation.run())
        shared = accounts.where if cfg.db is not None else None
        self.banner = Banner(
            address, root, not cfg.plain, fp, (first[0].name, first[1]) if first else None, shared
        )
        return self.banner

    # --- admission -------------------------------------------------------------------------

    def _on_accept(self, sock: socket.socket, peer: object, spare: bool) -> None:
        """Decide on a just-accepted connection (synchronously: the listener owns nothing after)."""
        assert self.ctx is not None and self.listener is not None
        admission = self.ctx.admission
        key = address_key(peer)
        ticket: Ticket | None = None
        try:
            if self._closing:
                raise admission.refuse("shutdown", "the server is shutting down")
            if spare or self.listener.budget.tight(sock.fileno()):
                raise admission.refuse("descriptors", "the server is out of connection capacity; try again later")
            ticket = admission.enter(key)
        except Refused as exc:
            self._refuse(sock, peer, key, exc, spare)
            return
        _keepalive(sock)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ctx.limits.login_timeout
        self._track(loop.create_task(self._serve(sock, ticket, deadline)))

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, sock: socket.socket, ticket: Ticket, deadline: float) -> None:
        """Finish the TLS handshake (within the login deadline), then run the session."""
        assert self.ctx is not None
        loop = asyncio.get_running_loop()
        try:
            stream = ChunkStream(limit=1 << 20)  # reading pauses above 1 MiB buffered per session
            try:
                writer = await _connect(loop, sock, stream, self.ctx.ssl_context, deadline)
            except (OSError, ssl.SSLError, TimeoutError, ValueError):
                # A failed or too slow TLS handshake (a scanner, a plain client on a TLS port, a
                # connection that sends nothing): nobody to tell, nothing worth a log line each.
                self.ctx.admission.counts.refused["tls-handshake"] += 1
                sock.close()
                return
            await Session(self.ctx, stream, writer, ticket=ticket, deadline=deadline).run()
        except asyncio.CancelledError:
            # Shutdown cancelled this connection's task; the session already said goodbye. This
            # task is the top of its own stack, and letting the cancellation out only makes
            # asyncio log a spurious "Exception in callback".
            pass
        except Exception:  # a bug: say where, and keep serving everyone else
            self.ctx.log.exception("internal error serving a connection")
        finally:
            ticket.release()

    def _refuse(self, sock: socket.socket, peer: object, key: str, exc: Refused, spare: bool) -> None:
        """Tell a connection ``busy`` and close it, in a short task of its own; when too many
        refusals are running (for this address, or at all), close it without a word."""
        assert self._refusal_log is not None
        self._refusal_log.note(exc.reason, key, peer)
        if self._refusals[key] >= _REFUSALS_PER_ADDRESS or self._refusals.total() >= _REFUSALS:
            sock.close()
            if spare:
                self._return_spare()
            return
        self._refusals[key] += 1
        self._track(asyncio.get_running_loop().create_task(self._say_busy(sock, key, str(exc), spare)))

    async def _say_busy(self, sock: socket.socket, key: str, message: str, spare: bool) -> None:
        assert self.ctx is not None
        loop = asyncio.get_running_loop()
        try:
            stream = ChunkStream(limit=1 << 16)
            writer = await _connect(loop, sock, stream, self.ctx.ssl_context, loop.time() + _REFUSAL_TIMEOUT)
            # An Error is allowed before Hello: the client shows the message instead of a bare reset.
            writer.write(Connection(Role.SERVER).send(ErrorCode.REFUSED.reply(0, message)))
            async with asyncio.timeout(_REFUSAL_TIMEOUT):
                await writer.drain()
                writer.close()
                # Closed for real (the descriptor freed) before a spare may take its place.
                await writer.wait_closed()
        except asyncio.CancelledError:
            sock.close()
        except Exception:  # the refused client vanished or never finished TLS: nothing to do
            sock.close()
        finally:
            self._refusals[key] -= 1
            if self._refusals[key] <= 0:
                del self._refusals[key]
            if spare:
                self._return_spare()

    def _return_spare(self) -> None:
        assert self.listener is not None
        self.listener.budget.return_spare()

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting, end every session (they say goodbye), wait up to ``grace`` seconds."""
        self._closing = True
        if self.listener is not None:
            self.listener.close()
        await cancel_and_wait(self._sweeper, self._revoker)
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        if self._refusal_log is not None:
            self._refusal_log.flush()
        if self.listener is not None:
            self.listener.budget.close()
        if self.ctx is not None:
            self.ctx.work.shutdown()
            self.ctx.logins.close()
            if self.ctx.objects is not None:
                with contextlib.suppress(Exception):  # (a database already gone has nothing to close)
                    await self.ctx.objects.close()
            self.ctx.accounts.close()
            for h in list(self.ctx.log.handlers):
                self.ctx.log.removeHandler(h)
                h.close()


async def _connect(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    stream: ChunkStream,
    ssl_ctx: ssl.SSLContext | None,
    deadline: float,
) -> asyncio.StreamWriter:
    """Wrap an accepted socket in a transport feeding ``stream`` (after the TLS handshake, which
    must end by ``deadline``, loop time); returns the writer."""
    left = max(0.001, deadline - loop.time())
    async with asyncio.timeout_at(deadline):
        transport, _ = await loop.connect_accepted_socket(
            lambda: stream, sock, ssl=ssl_ctx, ssl_handshake_timeout=left if ssl_ctx is not None else None
        )
    # Not the returned protocol: uvloop returns its TLS layer there, not ours.
    return asyncio.StreamWriter(transport, stream, None, loop)


class _RefusalLog:
    """Logs refused connections without letting a flood flood the log: the first refusal of a
    quiet period is logged at once, the rest as one summary line per ``_REFUSAL_LOG_PERIOD``."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._counts: Counter[str] = Counter()
        self._by_key: Counter[str] = Counter()
        self._timer: asyncio.TimerHandle | None = None

    def note(self, reason: str, key: str, peer: object) -> None:
        """Record one refusal."""
        if self._timer is None:
            where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
            self._log.warning("refused a connection from %s: %s", where, reason)
            self._timer = asyncio.get_running_loop().call_later(_REFUSAL_LOG_PERIOD, self.flush)
            return
        self._counts[reason] += 1
        self._by_key[key] += 1

    def flush(self) -> None:
        """Log the summary of the refusals since the last line (if any)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._counts:
            return
        reasons = " ".join(f"{r}={n}" for r, n in self._counts.most_common())
        top, top_n = self._by_key.most_common(1)[0]
        self._log.warning(
            "refused %d more connections in %g s: %s (most from %s: %d)",
            self._counts.total(),
            _REFUSAL_LOG_PERIOD,
            reasons,
            top,
            top_n,
        )
        self._counts.clear()
        self._by_key.clear()
        # Keep summarising while refusals go on; the next quiet period starts with a fresh line.
        self._timer = asyncio.get_running_loop().call_later(_REFUSAL_LOG_PERIOD, self.flush)


def _keepalive(sock: socket.socket) -> None:
    """TCP keepalives so a vanished peer is noticed even when nothing is being sent."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 15)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)


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
