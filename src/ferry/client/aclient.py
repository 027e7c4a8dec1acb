"""The asyncio client: connecting (TLS, pinning, login) and a typed facade over the features.

:meth:`AsyncClient.connect` opens the connection, checks the server's certificate against the
pin, logs in (:mod:`ferry.client.auth`) and starts the connection's request multiplexer
(:class:`~ferry.client.mux.Mux`: one reader task, requests pipelined and concurrent). The methods
of :class:`AsyncClient` are the public API, typed: the small requests (stat, listdir, mkdir, ...)
are here; transfers and commands are the feature modules' (:mod:`ferry.client.transfer`,
:mod:`ferry.client.tree`, :mod:`ferry.client.exec`), which depend on the mux and never on this
module.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ferry import __version__
from ferry.client.auth import LoginOptions, LoginResult, NeedReconnect, log_in
from ferry.client.location import format_address
from ferry.client.mux import Mux
from ferry.client.stream import open_client_connection
from ferry.errors import ConnectionBroken, FerryTimeout, UsageError
from ferry.errtext import os_reason
from ferry.hashing import DEFAULT_CHUNK, HashName
from ferry.paths import DEFAULT_PORT
from ferry.wire import Connection, Role
from ferry.wire import messages as m
from ferry.wire.codes import from_wire

if TYPE_CHECKING:
    from ferry.client.exec import Command, CommandStream, RemoteProcess, Result
    from ferry.client.sync import SyncItem, SyncResult
    from ferry.client.synclocal import LocalListing
    from ferry.client.transfer import TransferResult
    from ferry.client.tree import TreeResult

Progress = Callable[[int, int], None]
"""Progress callback: ``(bytes done, bytes total)``."""



@dataclass(frozen=True)
class Usage:
    """Disk usage of the home (bytes), the quota (None: unlimited) and the server's free space;
    ``partial`` is the part of ``used`` held by ``partials`` unfinished uploads (0 from a server
    too old to say)."""

    used: int
    quota: int | None
    free: int
    partial: int = 0
    partials: int = 0
    #: files and folders in the home, and the most it may hold (None: no limit)
    files: int = 0
    max_files: int | None = None


@dataclass(frozen=True)
class HostInfo:
    """What the client learned about the server during the handshake."""

    address: str
    tls: bool
    fingerprint: str | None
    pin_status: str | None  # "known", "new" (just pinned) or None (plain)
    software: str
    exec_allowed: bool
    #: what the server announced it supports (e.g. "tree": GetTree / PutTree)
    features: tuple[str, ...] = ()
    #: how the login succeeded: "password", "key" or "token"
    login_method: str = ""
    #: the same for people: "password", "key SHA256:... (ssh-agent)", "token ID"
    login_detail: str = ""
    #: the login is a read-only token: writes and commands are refused
    read_only: bool = False


class _Handshake:
    """The login's side of a connection (:class:`ferry.client.auth.Exchange`): before the mux's
    reader task runs, each answer is read here, bounded by the connect timeout (not counting
    prompts for passwords); pings are answered."""

    def __init__(self, mux: Mux, timeout: float, where: str) -> None:
        self.mux, self.timeout, self.where = mux, timeout, where

    async def send(self, msg: m.Message) -> None:
        """Send ``msg``."""
        await self.mux.send(msg)

    async def receive(self) -> m.Message:
        """The next message from the server other than a ping or pong."""
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    msg = await self.mux.next_message()
                    if isinstance(msg, m.Ping):
                        await self.mux.send(m.Pong(nonce=msg.nonce))
                    elif not isinstance(msg, m.Pong):
                        return msg
        except TimeoutError as exc:  # a builtin TimeoutError is an OSError: the CLI called it local
            raise FerryTimeout(
                f"{self.where} accepted the connection but did not answer the login within {self.timeout:g} s"
            ) from exc


class AsyncClient:
    """An authenticated connection to a ferry server. Create with :meth:`connect`.

    A typed facade: the requests go through the connection's :class:`~ferry.client.mux.Mux`
    (:attr:`mux`), the transfers and commands are the feature modules' (:mod:`ferry.client.transfer`,
    :mod:`ferry.client.tree`, :mod:`ferry.client.exec`).

    Example::

        async with await AsyncClient.connect("127.0.0.1", user="ann", password=pw) as c:
            await c.put("report.pdf", "inbox/report.pdf")
            print(await c.listdir("inbox"))
    """

    def __init__(self, mux: Mux, info: HostInfo) -> None:
        #: the connection's request multiplexer (for feature modules and custom requests)
        self.mux = mux
        #: what the handshake told about the server
        self.info = info

    @property
    def plain(self) -> bool:
        """True without TLS (``--plain``)."""
        return self.mux.plain

    @property
    def read_timeout(self) -> float:
        """Seconds without any byte from the server while waiting for one before giving up."""
        return self.mux.read_timeout

    @read_timeout.setter
    def read_timeout(self, seconds: float) -> None:
        self.mux.read_timeout = seconds

    # --- connecting ------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        user: str,
        password: str | None = None,
        token: str | None = None,
        key: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
        agent: bool | str = False,
        passphrase: str | None = None,
        login: LoginOptions | None = None,
        plain: bool = False,
        known_hosts: Any = None,
        timeout: float = 15.0,
    ) -> AsyncClient:
        """Connect, verify (pin) the server certificate, and authenticate.

        Credentials, tried in this order: ``token``; ``key`` (a private key file or a list of them;
        ``passphrase`` opens a protected one); the keys of ssh-agent when ``agent`` is True (or the
        agent's socket path); ``password``. ``login`` gives all of it at once
        (:class:`ferry.client.auth.LoginOptions`, also prompts and default key files) instead.
        ``known_hosts`` is a :class:`ferry.client.known_hosts.KnownHosts` (default: the per-user file).
        Raises :class:`~ferry.errors.AuthError`, :class:`~ferry.errors.HostKeyMismatch`,
        :class:`~ferry.errors.ConnectionBroken` / :class:`~ferry.errors.FerryTimeout`.
        """
        if not 0 < port < 65536:
            raise UsageError(f"port {port} out of range (1-65535)")
        if login is None:
            keys = [] if key is None else [key] if isinstance(key, str | os.PathLike) else list(key)
            login = LoginOptions(
                password=password, token=token, identities=keys, agent=agent, passphrase=passphrase
            )
        try:
            return await cls._connect_once(host, port, user, login, plain, known_hosts, timeout, None)
        except NeedReconnect as again:
            # The server gave up waiting while the user typed a password: send it on a new connection.
            return await cls._connect_once(host, port, user, login, plain, known_hosts, timeout, again.password)

    @classmethod
    async def _connect_once(
        cls,
        host: str,
        port: int,
        user: str,
        login: LoginOptions,
        plain: bool,
        known_hosts: Any,
        timeout: float,
        typed_password: str | None,
    ) -> AsyncClient:
        where = format_address(host, port)
        ssl_ctx: ssl.SSLContext | None = None
        if not plain:
            from ferry.client.tls import client_ssl_context

            ssl_ctx = client_ssl_context()
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await open_client_connection(
                    host, port, ssl=ssl_ctx, server_hostname=host if ssl_ctx else None
                )
        except TimeoutError as exc:
            raise FerryTimeout(f"connecting to {where} timed out after {timeout:g} s") from exc
        except ssl.SSLError as exc:
            raise ConnectionBroken(
                f"TLS handshake with {where} failed ({exc.reason}); if the server runs with --plain, use --plain too"
            ) from exc
        except OSError as exc:
            # In words: asyncio's own text is "Connect call failed ('::1', 7373, 0, 0)".
            reason = os_reason(exc)
            if ssl_ctx is not None and isinstance(exc, ConnectionResetError | BrokenPipeError):
                # A --plain server drops the TLS ClientHello as a malformed frame and resets.
                reason += " during the TLS handshake; if the server runs with --plain, use --plain too"
            raise ConnectionBroken(f"cannot connect to {where}: {reason}") from exc
        fp = status = None
        mux = Mux(reader, writer, Connection(Role.CLIENT))
        try:
            if ssl_ctx is not None:
                from ferry.client.tls import check_peer

                sslobj = writer.get_extra_info("ssl_object")
                status, fp = check_peer(sslobj, host, port, known_hosts)
            welcome, result = await _handshake(mux, user, login, fp, typed_password, timeout, where)
        except BaseException:
            mux.abort()
            raise
        mux.start()
        return cls(
            mux,
            HostInfo(
                where,
                ssl_ctx is not None,
                fp,
                status,
                welcome.software,
                result.ok.exec_allowed,
                tuple(welcome.features),
                login_method=result.method,
                login_detail=result.detail,
                read_only=result.ok.read_only,
            ),
        )

    # --- file-system API -------------------------------------------------------------------

    async def stat(self, path: str) -> m.Entry:
        """Metadata of a remote path (links are not followed)."""
        reply = await self.mux.call(lambda i: m.Stat(id=i, path=path), m.StatReply)
        return reply.entry

    async def listdir(self, path: str = "", *, recursive: bool = False) -> list[m.Entry]:
        """Entries of a remote folder (a file lists as itself); ``recursive`` walks the tree."""
        out: list[m.Entry] = []
        async for page in self.list_pages(path, recursive=recursive):
            out.extend(page)
        return out

    async def glob(self, pattern: str) -> list[m.Entry]:
        """The paths matching ``pattern`` (``logs/*.log``), expanded by the server inside the home;
        each entry is named by its path. No match: an empty list. Rules: :mod:`ferry.server.glob`."""
        out: list[m.Entry] = []
        async for page in self.list_pages(pattern, glob=True):
            out.extend(page)
        return out

    async def list_pages(
        self, path: str = "", *, recursive: bool = False, glob: bool = False
    ) -> AsyncIterator[list[m.Entry]]:
        """The entries of a remote folder page by page, as the server streams them (a huge
        folder never has to fit in memory); ``glob``: ``path`` is a pattern (see :meth:`glob`)."""
        mux = self.mux
        req_id, route = mux.open()
        try:
            await mux.send(m.ListDir(id=req_id, path=path, recursive=recursive, glob=glob))
            while True:
                reply = await mux.expect(route, m.ListReply)
                yield reply.entries
                if not reply.more:
                    return
        finally:
            mux.close_route(req_id)

    async def mkdir(self, path: str, *, parents: bool = False) -> None:
        """Create a remote folder (``parents``: like ``mkdir -p``)."""
        await self.mux.call(lambda i: m.Mkdir(id=i, path=path, parents=parents), m.Ok)

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a remote file or link, or (``recursive``) a folder tree."""
        await self.mux.call(lambda i: m.Remove(id=i, path=path, recursive=recursive), m.Ok)

    async def rename(self, src: str, dst: str) -> None:
        """Rename/move inside the home."""
        await self.mux.call(lambda i: m.Rename(id=i, src=src, dst=dst), m.Ok)

    async def df(self) -> Usage:
        """Usage, quota and free space."""
        r = await self.mux.call(lambda i: m.Df(id=i), m.DfReply)
        return Usage(r.used, r.quota, r.free, r.partial, r.partials, r.files, r.max_files)

    async def ping(self) -> float:
        """Round-trip time to the server in seconds (also a keepalive)."""
        return await self.mux.ping()

    async def send(self, msg: m.Message) -> None:
        """Send one message (advanced use: custom requests; see :attr:`mux` for their replies)."""
        await self.mux.send(msg)

    # --- transfers (ferry.client.transfer, ferry.client.tree) --------------------------------
    # The feature modules are imported on first use: a short command (ferry ls) does not load them.

    async def get(
        self,
        remote: str,
        local: str | os.PathLike[str],
        *,
        resume: bool = True,
        hash: HashName = "blake3",
        chunk_size: int = DEFAULT_CHUNK,
        progress: Progress | None = None,
        checksum: bool = False,
    ) -> TransferResult:
        """Download the file ``remote`` to ``local`` (a file path, or an existing folder to put it in),
        verified, resumable; ``checksum`` also computes the standard whole-file hash."""
        from ferry.client.transfer import get_file

        return await get_file(
            self.mux,
            remote,
            local,
            resume=resume,
            hash=hash,
            chunk_size=chunk_size,
            progress=progress,
            checksum=checksum,
        )

    async def put(
        self,
        local: str | os.PathLike[str],
        remote: str,
        *,
        resume: bool = True,
        hash: HashName = "blake3",
        chunk_size: int = DEFAULT_CHUNK,
        overwrite: bool = True,
        progress: Progress | None = None,
        checksum: bool = False,
    ) -> TransferResult:
        """Upload the file ``local`` to ``remote`` (verified, atomic on the server, resumable);
        ``overwrite=False`` refuses an existing ``remote`` (AlreadyExists) before sending anything."""
        from ferry.client.transfer import put_file

        return await put_file(
            self.mux,
            local,
            remote,
            resume=resume,
            hash=hash,
            chunk_size=chunk_size,
            overwrite=overwrite,
            progress=progress,
            checksum=checksum,
        )

    async def get_tree(
        self,
        remote: str,
        local: str | os.PathLike[str],
        *,
        hash: HashName = "blake3",
        progress: Progress | None = None,
    ) -> TreeResult:
        """Download the folder ``remote`` into ``local`` (created) in one stream."""
        from ferry.client.tree import get_tree

        return await get_tree(self.mux, remote, local, hash=hash, progress=progress)

    async def put_tree(
        self,
        local: str | os.PathLike[str],
        remote: str,
        *,
        hash: HashName = "blake3",
        progress: Progress | None = None,
    ) -> TreeResult:
        """Upload the folder ``local`` as ``remote`` (created like ``mkdir -p``) in one stream."""
        from ferry.client.tree import put_tree

        return await put_tree(self.mux, local, remote, hash=hash, progress=progress)

    async def sync(
        self,
        src: str | os.PathLike[str],
        dest: str | os.PathLike[str],
        *,
        delete: bool = False,
        dry_run: bool = False,
        checksum: bool = False,
        exclude: Sequence[str] = (),
        include: Sequence[str] = (),
        rules: Sequence[str] = (),
        delta: bool = True,
        compress: bool = False,
        force: bool = False,
        progress: Progress | None = None,
        on_item: Callable[[SyncItem], None] | None = None,
        on_file: Callable[[str], None] | None = None,
        nest: str = "always",
        local_listing: LocalListing | None = None,
    ) -> SyncResult:
        """Make ``dest`` like ``src``, sending only what changed; exactly one side is remote, written
        ``":PATH"``. See :func:`ferry.client.sync.sync` and docs/sync.md. ``local_listing``: the
        local side, listed ahead (:func:`ferry.client.sync.local_listing_for`)."""
        from ferry.client.sync import sync

        return await sync(
            self,
            src,
            dest,
            delete=delete,
            dry_run=dry_run,
            checksum=checksum,
            exclude=exclude,
            include=include,
            rules=rules,
            delta=delta,
            compress=compress,
            force=force,
            progress=progress,
            on_item=on_item,
            on_file=on_file,
            nest=nest,
            local_listing=local_listing,
        )

    def set_bwlimit(self, rate: int | None) -> None:
        """Limit this connection to ``rate`` bytes a second in each direction (None: no limit)."""
        self.mux.set_bwlimit(rate)

    # --- remote commands (ferry.client.exec) ---------------------------------------------------

    async def run(
        self,
        cmd: Command,
        *,
        input: bytes | None = None,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        cwd: str = "",
    ) -> Result:
        """Run ``cmd`` to completion: its output collected, ``input`` fed to its stdin (see
        :func:`ferry.client.exec.run`)."""
        from ferry.client.exec import run

        return await run(self.mux, cmd, input=input, timeout=timeout, env=env, cwd=cwd)

    def stream(
        self,
        cmd: Command,
        *,
        env: dict[str, str] | None = None,
        cwd: str = "",
        timeout: float | None = None,
        window: int | None = None,
    ) -> CommandStream:
        """``async for kind, data in client.stream(cmd)``: output as the command writes it (see
        :class:`ferry.client.exec.CommandStream`; ``window``: bytes per output stream the server
        may send ahead, None: :data:`ferry.client.exec.DEFAULT_WINDOW`)."""
        from ferry.client.exec import CommandStream

        return CommandStream(self.mux, cmd, env=env, cwd=cwd, timeout=timeout, window=window)

    async def start(
        self,
        cmd: Command | None,
        *,
        env: dict[str, str] | None = None,
        cwd: str = "",
        pty: m.PtySpec | None = None,
        timeout: float | None = None,
        window: int | None = None,
    ) -> RemoteProcess:
        """Start ``cmd`` and return its handle (see :meth:`ferry.client.exec.RemoteProcess.start`)."""
        from ferry.client.exec import RemoteProcess

        return await RemoteProcess.start(self.mux, cmd, env=env, cwd=cwd, pty=pty, timeout=timeout, window=window)

    # --- lifecycle -------------------------------------------------------------------------

    async def close(self) -> None:
        """Say goodbye and close the connection (idempotent)."""
        await self.mux.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _handshake(
    mux: Mux,
    user: str,
    login: LoginOptions,
    fingerprint: str | None,
    typed_password: str | None,
    timeout: float,
    where: str,
) -> tuple[m.Welcome, LoginResult]:
    exchange = _Handshake(mux, timeout, where)
    await mux.send(m.Hello(min_version=1, max_version=m.PROTOCOL_VERSION, software=f"ferry/{__version__}"))
    welcome = await exchange.receive()
    if isinstance(welcome, m.Error):
        raise from_wire(welcome)
    assert isinstance(welcome, m.Welcome)
    # fingerprint: the certificate just checked against the pin (None on --plain); key logins sign it.
    result = await log_in(exchange, welcome, user, login, fingerprint=fingerprint, typed_password=typed_password)
    return welcome, result
