"""The asyncio client: one connection, many concurrent requests.

A single reader task decodes the connection (sans-IO :class:`~ferry.wire.Connection`) and routes
every event to the queue of the request id it belongs to; requests are therefore freely pipelined
and concurrent. Queues of transfers are bounded, so a slow consumer (e.g. a slow disk) stops the
reader and TCP pushes back on the server instead of buffering without bound. ``OSError`` is
translated into :class:`~ferry.errors.ConnectionBroken` at this boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ferry import __version__
from ferry.aio import CorkedWriter
from ferry.client.auth import LoginOptions, LoginResult, NeedReconnect, log_in
from ferry.client.location import format_address
from ferry.client.receive import RawPayload
from ferry.client.stream import ClientStream, open_client_connection
from ferry.errors import ConnectionBroken, ConnectionClosed, FerryError, FerryTimeout, UsageError
from ferry.errtext import os_reason
from ferry.paths import DEFAULT_PORT
from ferry.wire import CONNECTION_ENDED, NEED_DATA, Connection, Data, ProtocolError, Role
from ferry.wire import messages as m
from ferry.wire.codes import ErrorCode, ends_connection, from_wire

Progress = Callable[[int, int], None]
"""Progress callback: ``(bytes done, bytes total)``."""

READ_SIZE = 1 << 20
#: A data frame with at least this much payload still to come is handed to a route that takes raw
#: payloads (a download) instead of going through the decoder piece by piece.
RAW_MIN = 1 << 18
_CLOSED = object()


@dataclass(frozen=True)
class Usage:
    """Disk usage of the home (bytes), the quota (None: unlimited) and the server's free space."""

    used: int
    quota: int | None
    free: int


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


class _Route:
    """Events for one request id; bounded for transfers so the reader applies backpressure."""

    def __init__(self, maxsize: int, *, raw: bool = False) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize)
        #: the consumer takes large data frames as :class:`RawPayload` events (single-file downloads)
        self.raw = raw


class AsyncClient:
    """An authenticated connection to a ferry server. Create with :meth:`connect`.

    Example::

        async with await AsyncClient.connect("127.0.0.1", user="ann", password=pw) as c:
            await c.put("report.pdf", "inbox/report.pdf")
            print(await c.listdir("inbox"))
    """

    def __init__(self, reader: ClientStream, writer: asyncio.StreamWriter, conn: Connection) -> None:
        self._reader = reader
        self._writer = writer
        self._conn = conn
        self._ids = itertools.count(1)
        self._routes: dict[int, _Route] = {}
        self._out = CorkedWriter(writer)  # pipelined requests share TLS records and syscalls
        self._error: FerryError | None = None
        self._closed = False
        self._pings: dict[int, asyncio.Future[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self.info: HostInfo | None = None
        self.plain = writer.get_extra_info("sslcontext") is None
        # Below the low-water mark the transport is not paused: drain() cannot block.
        self._low_water = writer.transport.get_write_buffer_limits()[0]
        #: seconds without any byte from the server while waiting for one (or without the server
        #: reading what we send, when its buffers are full) before giving up
        self.read_timeout = 60.0
        self._handshake_timeout = 15.0
        self._handshake_where = "the server"

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
        try:
            if ssl_ctx is not None:
                from ferry.client.tls import check_peer

                sslobj = writer.get_extra_info("ssl_object")
                status, fp = check_peer(sslobj, host, port, known_hosts)
            client = cls(reader, writer, Connection(Role.CLIENT))
            client._handshake_timeout = timeout
            client._handshake_where = where
            welcome, result = await client._handshake(user, login, fp, typed_password)
        except BaseException:
            writer.close()
            raise
        client.info = HostInfo(
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
        )
        return client

    async def _handshake(
        self, user: str, login: LoginOptions, fingerprint: str | None, typed_password: str | None
    ) -> tuple[m.Welcome, LoginResult]:
        await self._write(
            self._conn.send(
                m.Hello(min_version=1, max_version=m.PROTOCOL_VERSION, software=f"ferry/{__version__}")
            )
        )
        welcome = await self.receive()
        if isinstance(welcome, m.Error):
            raise from_wire(welcome)
        assert isinstance(welcome, m.Welcome)
        # fingerprint: the certificate just checked against the pin (None on --plain); key logins sign it.
        result = await log_in(self, welcome, user, login, fingerprint=fingerprint, typed_password=typed_password)
        self._task = asyncio.create_task(self._read_loop())
        return welcome, result

    async def receive(self) -> m.Message:
        """The next message during the handshake (the :class:`~ferry.client.auth.Exchange` side);
        bounded by the connect timeout for each answer, not counting prompts for passwords."""
        try:
            async with asyncio.timeout(self._handshake_timeout):
                while True:
                    msg = await self._next_message()
                    if isinstance(msg, m.Ping):
                        await self._write(self._conn.send(m.Pong(nonce=msg.nonce)))
                    elif not isinstance(msg, m.Pong):
                        return msg
        except TimeoutError as exc:  # a builtin TimeoutError is an OSError: the CLI called it local
            raise FerryTimeout(
                f"{self._handshake_where} accepted the connection but did not answer the login "
                f"within {self._handshake_timeout:g} s"
            ) from exc

    async def _next_message(self) -> m.Message:
        """Handshake-time read (before the reader task runs)."""
        while True:
            ev = self._conn.next_event()
            if ev is CONNECTION_ENDED:
                # A TLS server drops a plain Hello it cannot parse as a ClientHello: say what to try.
                hint = "; if the server uses TLS (the default), drop --plain" if self.plain else ""
                raise ConnectionBroken(f"the server closed the connection during the handshake{hint}")
            if isinstance(ev, m.Message):
                return ev
            if ev is NEED_DATA:
                self._conn.receive_data(await self._read())

    async def _read(self) -> bytes:
        try:
            return await self._reader.read(READ_SIZE)
        except (OSError, ssl.SSLError) as exc:
            raise ConnectionBroken(f"connection to the server lost: {os_reason(exc)}") from exc

    async def _write(self, data: bytes | memoryview) -> None:
        if self._error is not None:
            raise self._error
        try:
            self._out.write(data)
            if self._writer.transport.get_write_buffer_size() <= self._low_water:
                await self._out.drain()  # not paused: returns at once, no timer needed on this hot path
            else:
                # A server that stopped reading (stopped process, dead host) would block here for
                # ever, and the Cancel sent when the caller gives up would block again: bound it.
                async with asyncio.timeout(self.read_timeout):
                    await self._out.drain()
        except TimeoutError as exc:
            err = FerryTimeout(f"the server has not read anything for {self.read_timeout:g} s")
            self._fail(err)
            self._writer.transport.abort()  # the buffered data would otherwise hold the socket open
            raise err from exc
        except (OSError, ssl.SSLError) as exc:
            raise ConnectionBroken(f"connection to the server lost: {os_reason(exc)}") from exc

    # --- the reader task -------------------------------------------------------------------

    async def _read_loop(self) -> None:
        err: FerryError
        raw_ok = True  # whether a raw hand-over may be tried (see _hand_over)
        try:
            while True:
                ev = self._conn.next_event()
                if ev is NEED_DATA:
                    if self._conn.data_remaining >= RAW_MIN and not self._reader.has_chunks and raw_ok:
                        # In the middle of a large data frame with nothing read ahead: a download
                        # takes the rest straight off the transport (ferry.client.receive).
                        channel = self._conn.data_channel
                        route = self._routes.get(channel) if channel is not None else None
                        if route is not None and route.raw and channel is not None:
                            # Nothing taken: the connection ended or the consumer gave up. The
                            # next bytes (or the EOF) must then come the normal way.
                            raw_ok = await self._hand_over(route, channel) > 0
                            continue
                    self._conn.receive_data(await self._read())
                    raw_ok = True
                    continue
                if ev is CONNECTION_ENDED:
                    err = ConnectionBroken("the server closed the connection")
                    break
                if isinstance(ev, Data):
                    route = self._routes.get(ev.channel)
                    if route is not None:
                        await route.queue.put(ev)
                    continue
                if isinstance(ev, m.Pong):
                    fut = self._pings.pop(ev.nonce, None)
                    if fut is not None and not fut.done():
                        fut.set_result(None)
                    continue
                if isinstance(ev, m.Ping):
                    await self._write(self._conn.send(m.Pong(nonce=ev.nonce)))
                    continue
                if isinstance(ev, m.Goodbye):
                    if ev.code == ErrorCode.REVOKED:  # the login was revoked: retrying would not help
                        err = ErrorCode.REVOKED.error(f"the server ended the session: {ev.reason or 'login revoked'}")
                    else:
                        err = ConnectionBroken(f"the server closed the connection: {ev.reason or 'goodbye'}")
                    break
                if isinstance(ev, m.Error) and ends_connection(ev):  # else it fails one request
                    err = from_wire(ev)
                    break
                req_id = getattr(ev, "id", 0)
                route = self._routes.get(req_id)
                if route is not None:
                    await route.queue.put(ev)
        except asyncio.CancelledError:
            err = ConnectionClosed("the client was closed")
            self._fail(err)
            raise
        except ProtocolError as exc:
            err = ConnectionBroken(f"the server broke the protocol: {exc}")
        except FerryError as exc:
            err = exc
        except Exception as exc:  # keep waiters from hanging whatever happens
            err = ConnectionBroken(f"client reader failed: {exc!r}")
        self._fail(err)

    async def _hand_over(self, route: _Route, channel: int) -> int:
        """Let the route's consumer take the rest of this data frame off the transport itself
        (see :mod:`ferry.client.stream`), and wait until it has; returns how many bytes it took."""
        stream = self._reader
        stream.start_raw(self._conn.data_remaining)
        ev = RawPayload(channel, stream.raw_left, stream, asyncio.get_running_loop().create_future())
        try:
            await route.queue.put(ev)
            if self._routes.get(channel) is route:  # else closed meanwhile: nobody will take it
                await ev.done
        finally:
            taken = stream.end_raw()  # also ends a readinto() in progress (when cancelled)
            self._conn.skip_data(taken)
        return taken

    def _fail(self, err: FerryError) -> None:
        if self._error is None:
            self._error = err
        for route in self._routes.values():
            with contextlib.suppress(asyncio.QueueFull):
                route.queue.put_nowait(_CLOSED)
        for fut in self._pings.values():
            if not fut.done():
                fut.set_exception(err)

    # --- request plumbing -----------------------------------------------------------------

    def _open(self, maxsize: int = 0, *, raw: bool = False) -> tuple[int, _Route]:
        if self._closed:
            raise ConnectionClosed("this client is closed; connect again")
        if self._error is not None:
            raise self._error
        req_id = next(self._ids)
        route = _Route(maxsize, raw=raw)
        self._routes[req_id] = route
        return req_id, route

    def _open_shared(self, route: _Route) -> int:
        """A new request id whose events go to an existing ``route`` (batched small transfers)."""
        if self._closed:
            raise ConnectionClosed("this client is closed; connect again")
        if self._error is not None:
            raise self._error
        req_id = next(self._ids)
        self._routes[req_id] = route
        return req_id

    def _forget(self, req_id: int) -> None:
        """Stop routing ``req_id`` without touching its (shared) queue; late events are dropped."""
        self._routes.pop(req_id, None)

    def _close_route(self, req_id: int) -> None:
        route = self._routes.pop(req_id, None)
        if route is not None:
            # The reader may be blocked putting into this (full, bounded) queue: empty it so that put
            # completes; later events for the id find no route and are dropped.
            while not route.queue.empty():
                ev = route.queue.get_nowait()
                if isinstance(ev, RawPayload):
                    ev.release()  # the reader waits for it; the rest of the frame is dropped

    async def _recv(self, route: _Route, timeout: float | None = None) -> Any:
        """Next event for a request; raises the connection's error if it broke."""
        if self._error is not None and route.queue.empty():
            # The reader has ended; its end marker may not have fitted into this full queue.
            raise self._error
        try:
            async with asyncio.timeout(timeout if timeout is not None else self.read_timeout):
                ev = await route.queue.get()
        except TimeoutError as exc:
            raise FerryTimeout(f"no answer from the server for {self.read_timeout:g} s") from exc
        if ev is _CLOSED:
            assert self._error is not None
            raise self._error
        return ev

    async def send(self, msg: m.Message) -> None:
        """Send one message (advanced use: custom requests)."""
        if self._closed:
            raise ConnectionClosed("this client is closed; connect again")
        if self._error is not None:  # e.g. the server said goodbye: the state table would refuse
            raise self._error
        await self._write(self._conn.send(msg))

    async def send_data(self, channel: int, stream: int, data: bytes | memoryview) -> None:
        """Send one data frame."""
        if self._error is not None:
            raise self._error
        # Header and payload separately: no 1 MiB concatenation copy per frame.
        self._out.write(self._conn.data_header(channel, stream, len(data)))
        await self._write(data)

    async def _call(self, build: Callable[[int], m.Message]) -> Any:
        """Send a request built for a fresh id and return its single reply (raising on Error)."""
        req_id, route = self._open()
        try:
            await self.send(build(req_id))
            reply = await self._recv(route)
            if isinstance(reply, m.Error):
                raise from_wire(reply)
            return reply
        finally:
            self._close_route(req_id)

    # --- file-system API -------------------------------------------------------------------

    async def stat(self, path: str) -> m.Entry:
        """Metadata of a remote path (links are not followed)."""
        reply = await self._call(lambda i: m.Stat(id=i, path=path))
        return reply.entry  # type: ignore[no-any-return]

    async def listdir(self, path: str = "", *, recursive: bool = False) -> list[m.Entry]:
        """Entries of a remote folder (a file lists as itself); ``recursive`` walks the tree."""
        out: list[m.Entry] = []
        async for page in self._list_pages(path, recursive):
            out.extend(page)
        return out

    async def glob(self, pattern: str) -> list[m.Entry]:
        """The paths matching ``pattern`` (``logs/*.log``), expanded by the server inside the home;
        each entry is named by its path. No match: an empty list. Rules: :mod:`ferry.server.glob`."""
        out: list[m.Entry] = []
        async for page in self._list_pages(pattern, False, glob=True):
            out.extend(page)
        return out

    async def _list_pages(self, path: str, recursive: bool, *, glob: bool = False) -> AsyncIterator[list[m.Entry]]:
        req_id, route = self._open()
        try:
            await self.send(m.ListDir(id=req_id, path=path, recursive=recursive, glob=glob))
            while True:
                reply = await self._recv(route)
                if isinstance(reply, m.Error):
                    raise from_wire(reply)
                assert isinstance(reply, m.ListReply)
                yield reply.entries
                if not reply.more:
                    return
        finally:
            self._close_route(req_id)

    async def mkdir(self, path: str, *, parents: bool = False) -> None:
        """Create a remote folder (``parents``: like ``mkdir -p``)."""
        await self._call(lambda i: m.Mkdir(id=i, path=path, parents=parents))

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a remote file or link, or (``recursive``) a folder tree."""
        await self._call(lambda i: m.Remove(id=i, path=path, recursive=recursive))

    async def rename(self, src: str, dst: str) -> None:
        """Rename/move inside the home."""
        await self._call(lambda i: m.Rename(id=i, src=src, dst=dst))

    async def df(self) -> Usage:
        """Usage, quota and free space."""
        r = await self._call(lambda i: m.Df(id=i))
        return Usage(r.used, r.quota, r.free)

    async def ping(self) -> float:
        """Round-trip time to the server in seconds (also a keepalive)."""
        nonce = next(self._ids)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pings[nonce] = fut
        t0 = time.perf_counter()
        await self.send(m.Ping(nonce=nonce))
        try:
            async with asyncio.timeout(self.read_timeout):
                await fut
        except TimeoutError as exc:  # the builtin one is an OSError: callers would take it for a local error
            raise FerryTimeout(f"no answer to a ping from the server for {self.read_timeout:g} s") from exc
        finally:
            self._pings.pop(nonce, None)
        return time.perf_counter() - t0

    # --- transfers (implemented in ferry.client.transfer) ----------------------------------

    async def get(self, remote: str, local: str | os.PathLike[str], **kw: Any) -> Any:
        """Download a file; see :func:`ferry.client.transfer.get_file` for options."""
        from ferry.client.transfer import get_file

        return await get_file(self, remote, local, **kw)

    async def put(self, local: str | os.PathLike[str], remote: str, **kw: Any) -> Any:
        """Upload a file; see :func:`ferry.client.transfer.put_file` for options."""
        from ferry.client.transfer import put_file

        return await put_file(self, local, remote, **kw)

    async def get_tree(self, remote: str, local: str | os.PathLike[str], **kw: Any) -> Any:
        """Download a folder tree; see :func:`ferry.client.transfer.get_tree`."""
        from ferry.client.transfer import get_tree

        return await get_tree(self, remote, local, **kw)

    async def put_tree(self, local: str | os.PathLike[str], remote: str, **kw: Any) -> Any:
        """Upload a folder tree; see :func:`ferry.client.transfer.put_tree`."""
        from ferry.client.transfer import put_tree

        return await put_tree(self, local, remote, **kw)

    # --- lifecycle -------------------------------------------------------------------------

    async def close(self) -> None:
        """Say goodbye and close the connection (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._error is None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await self._write(self._conn.send(m.Goodbye(reason="client done")))
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        self._writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1):
                await self._writer.wait_closed()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- remote commands (implemented in ferry.client.exec) --------------------------------

    async def run(self, cmd: str | Sequence[str], **kw: Any) -> Any:
        """Run a command to completion -> Result; see :func:`ferry.client.exec.run`."""
        from ferry.client.exec import run

        return await run(self, cmd, **kw)

    def stream(self, cmd: str | Sequence[str], **kw: Any) -> Any:
        """``async for kind, data in client.stream(cmd)``; see :class:`ferry.client.exec.CommandStream`."""
        from ferry.client.exec import CommandStream

        return CommandStream(self, cmd, kw)

    async def start(self, cmd: str | Sequence[str] | None, **kw: Any) -> Any:
        """Start a command -> RemoteProcess; see :meth:`ferry.client.exec.RemoteProcess.start`."""
        from ferry.client.exec import RemoteProcess

        return await RemoteProcess.start(self, cmd, **kw)
