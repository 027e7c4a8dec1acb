"""One client connection on the server: handshake, authentication, request dispatch, cleanup.

Structure (asyncssh-style): at login the session builds its request *services* (files, transfer,
tree, sync, delta, exec: :data:`SERVICES`), each owning its per-session state and declaring the
messages it handles in a table (:mod:`ferry.server.service`). A *reader* loop turns bytes into wire
events and dispatches them by message type through the tables merged from those services; requests
that produce replies are queued to a single *worker* task that runs them in order (so replies to
pipelined requests flow while the reader keeps accepting uploads, pings and command input). Every
write goes through one lock so a ``sendfile`` block is never interleaved with another frame. Writers
wait on ``drain()``: a client that stops reading stalls its own session, never the server's memory.

Services see the session only as a :class:`~ferry.server.service.ServiceHost`: the dependency
points from the session down to the services, never back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from ferry.aio import ChunkStream, CorkedWriter, cancel_and_wait, uninterrupted
from ferry.errors import AuthError, FerryError
from ferry.server.accounts import User
from ferry.server.admission import Refused, Ticket
from ferry.server.auth import Login, LoginThrottled
from ferry.server.delta import DeltaService
from ferry.server.files import FilesService
from ferry.server.folder import FolderStorage
from ferry.server.objectsvc import OBJECT_MESSAGES, OBJECT_SERVICES
from ferry.server.oserrors import translate_oserror
from ferry.server.service import FailsUploads, Requests, Service
from ferry.server.service import Upload as ServiceUpload
from ferry.server.sync import SyncService
from ferry.server.transfer import TransferService
from ferry.server.tree import TreeService
from ferry.server.work import SessionWork
from ferry.server.work import current as current_work
from ferry.wire import (
    CONNECTION_ENDED,
    NEED_DATA,
    Connection,
    Data,
    ProtocolError,
    RemoteProtocolError,
    Role,
    choose_version,
)
from ferry.wire import messages as m
from ferry.wire.auth import NONCE_SIZE
from ferry.wire.codes import ErrorCode, reply_for

if TYPE_CHECKING:
    from ferry.server.context import ServerContext
    from ferry.store.objects import ObjectStorage

#: A handler bound to the service (or session) that serves it: called with the message.
Bound = Callable[[Any], Awaitable[None]]
M = TypeVar("M", bound=m.Message)

_session_ids = itertools.count(1)
_PAD_PIECE = 1 << 20  # zeros written per step when a file shrank under sendfile

#: The services every logged-in session has (exec is added for users who may run programs).
SERVICES: tuple[type[Service[Any]], ...] = (FilesService, TransferService, TreeService, SyncService, DeltaService)

#: The messages of remote commands: served by ferry.server.exec.ExecService, or refused.
EXEC_MESSAGES: tuple[type[m.Message], ...] = (m.Exec, m.Window, m.Eof, m.Signal, m.Resize)

#: The messages a client may log in with (one per attempt).
_AUTH_MESSAGES: tuple[type[m.Message], ...] = (m.Auth, m.AuthKey, m.AuthToken)

#: Requests that change the home or run programs: a read-only token login gets ``read-only-token``.
_WRITES: tuple[type[m.Message], ...] = (m.Mkdir, m.Remove, m.Rename, m.PutFile, m.PutFrom, m.FileEnd)
_WRITES += (m.PutTree, m.TreeItems, m.Exec, m.DeltaPut, m.DeltaData, m.RemoveMany, m.SetAttrs)
WRITE_REQUESTS: frozenset[type[m.Message]] = frozenset(_WRITES)


class Session:
    """Serves one connection until it ends; never lets an error escape into the server."""

    def __init__(
        self,
        ctx: ServerContext,
        reader: ChunkStream,
        writer: asyncio.StreamWriter,
        *,
        ticket: Ticket,
        deadline: float,
    ) -> None:
        self.ctx = ctx
        #: this connection's place in the admission counts (pre-login until the login succeeds)
        self.ticket = ticket
        #: loop time by which the client must have sent Hello and its credentials (set at accept)
        self.deadline = deadline
        self.reader = reader
        self.writer = writer
        self.sid = next(_session_ids)
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "local")
        #: the client's address without the port: what the failed-login slowdown counts by
        self.address = str(peer[0]) if isinstance(peer, tuple) else self.peer
        self.conn = Connection(Role.SERVER)
        self.user: User | None = None
        #: how the session logged in (None before); its credential is watched for revocation
        self.login: Login | None = None
        #: the account revision this session was last checked against (ferry.server.revocation)
        self.checked_rev = 0
        self._end_reason: str | None = None
        self._task: asyncio.Task[Any] | None = None
        #: the storage of the account, opened at login (ServerContext.open_storage)
        self.storage: FolderStorage | ObjectStorage | None = None
        self.plain = writer.get_extra_info("sslcontext") is None
        self.software = ""  #: what the client's Hello says it is (client-controlled text)
        self._wlock = asyncio.Lock()  # held for a whole sendfile block: no frame may interleave
        #: set with the session's last message (an Error or Goodbye before it closes): the worker,
        #: still running until it is stopped, must not send a frame after it (the client would see
        #: a frame cut short by the close instead of the reason)
        self._said_last = False
        self._out = CorkedWriter(writer)
        self._queue: asyncio.Queue[m.Message | None] = asyncio.Queue(maxsize=256)
        self._last_rx = time.monotonic()
        #: seconds spent waiting in reads, and when the read now waiting began (None: not waiting)
        self._waited = 0.0
        self._wait_start: float | None = None
        self._worker_task: asyncio.Task[None] | None = None
        #: thread jobs of this session: pools, fair share, per-session slots, cancellation
        self.work = SessionWork(ctx.work, ctx.limits.walks_per_session)
        self.busy = 0  # requests in progress; an idle timeout only applies when zero
        #: the requests in progress by id, shared by the services
        self.requests = Requests()
        #: the services, built at login (ferry.server.service)
        self.services: list[Service[Any]] = []
        #: the service whose uploads receive data frames (told when one of them fails to take data)
        self._transfer: FailsUploads | None = None
        #: whether the user may run programs (an exec service exists)
        self._may_exec = False
        #: message type -> handler, merged from the services' tables at login
        self._worker_table: dict[type[m.Message], Bound] = {}
        self._reader_table: dict[type[m.Message], Bound] = {}
        transport = writer.transport
        transport.set_write_buffer_limits(high=ctx.limits.write_high_water)

    # --- output ----------------------------------------------------------------------------

    async def send(self, msg: m.Message, *, last: bool = False) -> None:
        """Send one message and wait until the transport buffer is below its high-water mark.
        ``last``: the session's last message; nothing may be sent after it."""
        async with self._wlock:  # only contended while a sendfile block is going out
            self._check_open()
            self._out.write(self.conn.send(msg))
            self._said_last = last
        await self._out.drain()

    def _check_open(self) -> None:
        """Raise if the session's last message has been sent (call with the write lock held)."""
        if self._said_last:
            raise ConnectionResetError("the session is ending")

    async def write_frames(self, frames: list[bytes]) -> None:
        """Write several already-encoded frames at once (one drain)."""
        async with self._wlock:
            self._check_open()
            for f in frames:
                self._out.write(f)
        await self._out.drain()

    async def send_data(self, channel: int, stream: int, data: bytes | memoryview) -> None:
        """Send one data frame (header and payload in one write)."""
        async with self._wlock:
            self._check_open()
            self._out.write(self.conn.data_header(channel, stream, len(data)))
            self._out.write(data)
        await self._out.drain()

    @property
    def zero_copy(self) -> bool:
        """True when downloads may use :meth:`sendfile`: plain TCP on a loop that implements it.
        uvloop's does not (it keeps AbstractEventLoop's NotImplementedError): there plain downloads
        take the read-and-write path of TLS."""
        loop_type = type(asyncio.get_running_loop())
        return self.plain and loop_type.sendfile is not asyncio.AbstractEventLoop.sendfile

    async def sendfile(self, channel: int, fileobj: Any, offset: int, count: int) -> int:
        """Send ``count`` bytes of ``fileobj`` from ``offset`` as one data frame using the kernel's
        sendfile (only where :attr:`zero_copy`). Returns the bytes sent; pads with zeros if the file shrank so the
        framing stays intact (the caller then reports the change instead of a digest)."""
        loop = asyncio.get_running_loop()
        async with self._wlock:
            self._check_open()
            self._out.write(self.conn.data_header(channel, m.STDOUT, count))
            self._out.flush()  # sendfile waits for the transport buffer to empty, then takes over
            try:
                sent = await loop.sendfile(self.writer.transport, fileobj, offset, count, fallback=True)
            except BaseException:
                # The header promised ``count`` bytes that will not follow: the stream cannot be
                # framed any more. End the connection rather than leave the client waiting for them.
                self.writer.transport.abort()
                raise
            # Pad in bounded pieces under backpressure: one write of the rest of a 64 MiB block
            # would sit in the transport's buffer (memory) as long as the peer reads slowly.
            pad = count - sent
            zeros = memoryview(bytes(min(pad, _PAD_PIECE)))
            while pad:
                n = min(pad, len(zeros))
                self.writer.write(zeros[:n])
                pad -= n
                await self.writer.drain()
            await self.writer.drain()
        return sent

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection; always closes it and releases every resource."""
        started = time.monotonic()
        worker: asyncio.Task[None] | None = None
        watchdog: asyncio.Task[None] | None = None
        reason = "closed"
        current_work.set(self.work)  # before any task is started: they inherit it
        self._task = asyncio.current_task()
        try:
            async with asyncio.timeout_at(self.deadline) as login_clock:
                await self._handshake(login_clock)
            assert self.user is not None
            self.work.owner = self.user.name  # the pools share their threads per user
            worker = self._worker_task = asyncio.create_task(self._worker())
            watchdog = asyncio.create_task(self._watchdog())
            await self._read_loop()
        except TimeoutError:
            reason = "timeout"
            await self._try_send(m.Goodbye(reason="timed out"))
        except Refused as exc:
            reason = f"refused: {exc.reason}"
            await self._try_send(ErrorCode.REFUSED.reply(0, str(exc)))
        except AuthError as exc:
            reason = f"auth failed: {exc}"
        except ProtocolError as exc:
            reason = f"protocol error: {exc}"
            await self._try_send(ErrorCode.PROTOCOL.reply(0, str(exc)))
        except (ConnectionError, OSError) as exc:
            reason = f"connection lost: {exc.__class__.__name__}"
        except FerryError as exc:  # e.g. the home cannot be opened (out of descriptors): say why
            reason = f"failed: {exc}"
            await self._try_send(ErrorCode.REFUSED.reply(0, str(exc)))
        except asyncio.CancelledError:
            if self._end_reason is not None:  # revoked (see end()), not a shutdown
                reason = f"revoked: {self._end_reason}"
                await self._try_send(m.Goodbye(reason=f"session ended: {self._end_reason}", code=ErrorCode.REVOKED.value))
            else:
                reason = "server shutdown"
                await self._try_send(m.Goodbye(reason="server shutting down"))
            raise
        finally:
            # All of it, even if a shutdown cancels this task meanwhile: the uploads' aborts record
            # what their partials hold, and the home's descriptor is released.
            await uninterrupted(self._end(worker, watchdog, started, reason))

    async def _end(
        self, worker: asyncio.Task[None] | None, watchdog: asyncio.Task[None] | None, started: float, reason: str
    ) -> None:
        """Stop the worker and the watchdog, abort what is open, close, log the session's end."""
        self.work.close()  # threads stop walking before their next entry; queued walks are dropped
        await cancel_and_wait(worker, watchdog)
        self.ctx.revocation.discard(self)
        await self._cleanup()
        self.ctx.log.info(
            "session %d end user=%s peer=%s seconds=%.3f result=%s",
            self.sid,
            self.user.name if self.user else "-",
            self.peer,
            time.monotonic() - started,
            reason,
        )

    async def _try_send(self, msg: m.Message) -> None:
        """Send the session's last message (why it ends), if that can be done within a second:
        after the frame going out, and with nothing after it."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1):
                await self.send(msg, last=True)

    async def _cleanup(self) -> None:
        channels = self.requests.channels
        for channel in list(channels.values()):
            with contextlib.suppress(Exception):
                await channel.abort()
        channels.clear()
        for service in self.services:
            with contextlib.suppress(Exception):
                await service.close()
        self._out.flush()  # a last Error or Goodbye may still be corked: close() would drop it
        self.writer.close()
        if self.storage is not None:
            # A handler cancelled while its thread runs leaves that thread using the home's
            # descriptor: closing it now could let the number be reused for another file under the
            # thread's feet. If this wait is cancelled too (shutdown), the last job closes it.
            try:
                await self.work.wait()
            finally:
                if isinstance(self.storage, FolderStorage):  # (the object backend's is the server's)
                    self.work.after_jobs(self.storage.release)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await self.writer.wait_closed()

    # --- input -----------------------------------------------------------------------------

    async def next_event(self) -> m.Message | Data | None:
        """The next wire event; None when the peer closed the connection cleanly."""
        while True:
            ev = self.conn.next_event()
            if ev is CONNECTION_ENDED:
                return None
            if ev is not NEED_DATA:
                return ev  # type: ignore[return-value]
            self._wait_start = time.monotonic()
            try:
                data = await self.reader.read(self.ctx.limits.read_size)
            finally:
                self._last_rx = time.monotonic()
                self._waited += self._last_rx - self._wait_start
                self._wait_start = None
            self.conn.receive_data(data)

    def read_waited(self) -> float:
        """Seconds the reader has waited for the client so far (see ServiceHost.read_waited)."""
        waiting = self._wait_start
        return self._waited + (time.monotonic() - waiting if waiting is not None else 0.0)

    async def _handshake_message(self, expected: type[M] | tuple[type[M], ...], during: str) -> M:
        """The next handshake message: pings are answered and pongs ignored here (the protocol allows
        both in every state, and they are no authentication attempts); a Goodbye ends the session."""
        while True:
            ev = await self.next_event()
            if ev is None or isinstance(ev, m.Goodbye):
                raise ConnectionResetError(f"closed {during}")
            if isinstance(ev, m.Ping):
                await self.send(m.Pong(nonce=ev.nonce))
            elif isinstance(ev, expected):
                return ev
            elif not isinstance(ev, m.Pong):  # the state table admits nothing else; never assert
                raise RemoteProtocolError(f"unexpected {type(ev).__name__} {during}")

    async def _handshake(self, login_clock: asyncio.Timeout) -> None:
        hello = await self._handshake_message(m.Hello, "before hello")
        self.software = hello.software
        try:
            version = choose_version(hello)
        except ProtocolError as exc:
            await self.send(ErrorCode.VERSION.reply(0, str(exc)))
            raise
        # A fresh nonce per connection: a key login signs it, so a signature is good only here.
        nonce = secrets.token_bytes(NONCE_SIZE) if version >= m.KEY_LOGIN_VERSION else b""
        features = ["exec", "tree", "sync", "packed", "prefetch"]
        if nonce:
            features += ["key", "token"]
        await self.send(m.Welcome(version=version, software=self.ctx.software, features=features, nonce=nonce))
        limits = self.ctx.limits
        for _attempt in range(1, limits.auth_attempts + 1):
            msg = await self._handshake_message(_AUTH_MESSAGES, "during authentication")
            assert isinstance(msg, m.Auth | m.AuthKey | m.AuthToken)  # what _AUTH_MESSAGES admits
            if self.ctx.admission.sessions_full():  # say so before spending a check
                raise self.ctx.admission.full_refusal()
            try:
                async with self._server_time(login_clock):
                    result = await self.ctx.auth.attempt(
                        msg,
                        address=self.address,
                        peer=self.peer,
                        version=version,
                        server_nonce=nonce,
                        gone=self.reader.lost,
                    )
            except LoginThrottled as exc:
                await self.send(ErrorCode.AUTH.reply(0, str(exc)))
                raise
            except AuthError as exc:
                await self.send(ErrorCode.AUTH.reply(0, str(exc)))
                continue
            if isinstance(result, m.AuthKeyOk):
                await self.send(result)
                continue
            self.ticket.login(result.user.name)  # Refused: the server or this user is at the session limit
            await self._logged_in(result)
            return
        raise AuthError("too many failed attempts")

    @contextlib.asynccontextmanager
    async def _server_time(self, login_clock: asyncio.Timeout) -> AsyncIterator[None]:
        """Stop the client's login clock while the server itself works on an attempt (a queued
        password check, a failed-login slowdown): the login deadline bounds how long a client may
        take, not how busy the server is. The login queue (``Limits.login_wait``) and the
        slowdown's own bound limit the server's part."""
        loop = asyncio.get_running_loop()
        when = login_clock.when()
        left = (when - loop.time()) if when is not None else None
        login_clock.reschedule(None)
        try:
            yield
        finally:
            if left is not None:
                login_clock.reschedule(loop.time() + max(0.0, left))

    async def _logged_in(self, login: Login) -> None:
        """Open the session for ``login``: home, rights, the reply, and the revocation watch."""
        user = login.user
        self.login = login
        self.user = user
        self.storage = self.ctx.open_storage(user)
        # No commands next to files kept in an object store: there is no folder to run them in.
        may_exec = user.exec_allowed and not login.read_only and self.storage.exec_supported
        await self.send(
            m.AuthOk(
                user=user.name,
                exec_allowed=may_exec,
                quota=user.quota,
                method=login.method,
                key_id=login.credential,
                read_only=login.read_only,
            )
        )
        self._open_services(self.storage, may_exec)
        self.ctx.revocation.add(self)
        self.ctx.log.info(
            "session %d login user=%s peer=%s plain=%s software=%s method=%s%s%s",
            self.sid,
            user.name,
            self.peer,
            self.plain,
            self.software,
            login.method,
            f" key={login.credential}" if login.credential else "",
            " read_only=True" if login.read_only else "",
        )

    def _open_services(self, storage: FolderStorage | ObjectStorage, may_exec: bool) -> None:
        """Build the services of the storage's backend and merge their handler tables (a message
        type has one owner)."""
        classes = list(SERVICES if isinstance(storage, FolderStorage) else OBJECT_SERVICES)
        if not isinstance(storage, FolderStorage):
            # Requests the object backend does not serve yet get a clear error, not silence.
            for kind in OBJECT_MESSAGES:
                self._reader_table[kind] = self._unsupported
        if may_exec:
            from ferry.server.exec import ExecService  # imported only for exec users (pty, termios)

            classes.append(ExecService)
        self._may_exec = may_exec
        self.services = [cls(self, storage) for cls in classes]
        self._reader_table[m.Cancel] = self._cancel
        if not may_exec:
            for kind in EXEC_MESSAGES:
                self._reader_table[kind] = self._exec_denied
        for service in self.services:
            if isinstance(service, FailsUploads):
                self._transfer = service
            for table, handlers in ((self._worker_table, service.worker_handlers), (self._reader_table, service.reader_handlers)):
                for kind, handler in handlers.items():
                    assert kind not in self._worker_table, kind
                    self._reader_table.pop(kind, None)  # (served after all: not unsupported)
                    table[kind] = partial(handler, service)

    async def _cancel(self, msg: m.Cancel) -> None:
        """Stop an upload (keeping its partial for resume), a tree or delta transfer or a command;
        downloads stop at their next block."""
        target = self.requests.cancel(msg.id)
        if target is not None:
            await target.abort()
        await self.send(m.Ok(id=msg.id))

    async def _unsupported(self, msg: m.Message) -> None:
        req_id = getattr(msg, "id", 0)
        await self.send(
            ErrorCode.INVALID.reply(
                req_id,
                f"{type(msg).__name__} is not supported by this server: it keeps files in an object store",
            )
        )

    async def _exec_denied(self, msg: m.Exec | m.Window | m.Eof | m.Signal | m.Resize) -> None:
        assert self.storage is not None
        if not self.storage.exec_supported:
            await self.send(
                ErrorCode.EXEC_DENIED.reply(
                    msg.id,
                    "remote commands are not available on this server: it keeps files in an object "
                    "store, so there is no folder to run them in",
                )
            )
            return
        await self.send(
            ErrorCode.EXEC_DENIED.reply(
                msg.id,
                "remote commands are disabled for this user; an admin can enable "
                "them with 'ferry user mod NAME --exec'",
            )
        )

    # --- revocation (ferry.server.revocation) ---------------------------------------------------

    @property
    def read_only(self) -> bool:
        """Whether the session logged in with a read-only token."""
        return self.login is not None and self.login.read_only

    def may_run_programs(self) -> bool:
        """Whether this session can start commands."""
        return self._may_exec

    def end(self, reason: str) -> None:
        """End the session now (its login was revoked): the client is told ``reason``."""
        if self._end_reason is not None or self._task is None:
            return
        self._end_reason = reason
        self._task.cancel()

    async def _refuse_read_only(self, ev: m.Message) -> bool:
        """Answer a request a read-only login may not make; whether it was refused."""
        if type(ev) not in WRITE_REQUESTS:
            return False
        if isinstance(ev, m.PutFrom | m.FileEnd | m.TreeItems | m.DeltaData):
            return True  # the rest of an upload that was refused already: dropped without a reply
        await self.send(
            ErrorCode.READ_ONLY_TOKEN.reply(
                getattr(ev, "id", 0),
                "this login uses a read-only token: it may list and download, "
                "not write, delete, rename or run programs",
            )
        )
        return True  # data frames that follow find no channel and are dropped

    async def _read_loop(self) -> None:
        while True:
            ev = await self.next_event()
            if ev is None:
                return
            if isinstance(ev, Data):
                target = self.requests.channels.get(ev.channel)
                if target is not None:
                    try:
                        await target.on_data(ev)
                    except (ProtocolError, ConnectionError):
                        raise
                    except Exception as exc:  # e.g. disk full: fail this transfer, keep the session
                        assert self._transfer is not None
                        self._transfer.fail_upload(ev.channel)
                        await self.send(reply_for(ev.channel, self._translated(exc, target)))
                continue  # data for a cancelled/failed channel is dropped
            if isinstance(ev, m.Ping):
                await self.send(m.Pong(nonce=ev.nonce))
            elif isinstance(ev, m.Goodbye):
                return
            elif self.read_only and await self._refuse_read_only(ev):
                continue
            elif type(ev) in self._worker_table:
                if isinstance(ev, m.GetFile | m.GetTree | m.GetFiles):
                    self.requests.start_download(ev.id)
                await self._queue.put(ev)  # bounded: a flood of requests waits here
            else:
                handler = self._reader_table.get(type(ev))
                if handler is not None:
                    await self._guarded(handler, ev)

    async def _guarded(self, handler: Bound, msg: Any) -> None:
        """Run ``handler``; turn its failure into an Error reply for that request id."""
        self.busy += 1
        try:
            await handler(msg)
        except (ProtocolError, ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:
            req_id = getattr(msg, "id", 0)
            exc = self._translated(exc, msg)
            if not isinstance(exc, FerryError):
                self.ctx.log.exception("internal error in %s", type(msg).__name__)
            await self.send(reply_for(req_id, exc))
        finally:
            self.busy -= 1
            self._last_rx = time.monotonic()

    @staticmethod
    def _translated(exc: Exception, about: Any) -> Exception:
        """``exc`` as the client should see it: an ``OSError`` a handler let through becomes the
        error the jail gives for it (one translation for every handler), naming the request's path."""
        if not isinstance(exc, OSError):
            return exc
        path = getattr(about, "path", None) or getattr(getattr(about, "msg", None), "path", "")
        return translate_oserror(exc, path if isinstance(path, str) else "")

    async def _worker(self) -> None:
        while True:
            msg = await self._queue.get()
            if msg is None:
                return
            await self._guarded(self._worker_table[type(msg)], msg)

    async def _expire_uploads(self, timeout: float) -> None:
        """Close the uploads that received nothing for ``timeout`` seconds of the reader waiting
        for the client (:meth:`read_waited`: a clock that stands still while the server holds the
        reader up), so a silent client gives back the files it holds; the client is told why."""
        waited = self.read_waited()
        channels = self.requests.channels
        for req_id, up in list(channels.items()):
            if channels.get(req_id) is not up or not isinstance(up, ServiceUpload):
                continue  # (ended meanwhile, or a command: commands are not uploads)
            if waited - up.active_at <= timeout or up.working():
                continue
            del channels[req_id]
            reply = await up.expire(timeout)
            # Bounded: this is the watchdog, which must go on watching a client that has stopped
            # reading as well (the Error is then lost with the connection).
            with contextlib.suppress(TimeoutError, ConnectionError, OSError):
                async with asyncio.timeout(5):
                    await self.send(reply)

    async def _watchdog(self) -> None:
        idle = self.ctx.limits.idle_timeout
        stall = self.ctx.limits.stall_timeout
        upload_idle = self.ctx.limits.upload_idle_timeout
        transport = self.writer.transport
        last_size, last_change = 0, time.monotonic()
        while True:
            await asyncio.sleep(min(idle / 4, stall / 4, upload_idle / 4, 10.0))
            now = time.monotonic()
            await self._expire_uploads(upload_idle)
            # A peer that stops reading leaves our output buffer full and unchanging: the session
            # is only waiting on drain(). Drop it after stall_timeout, or it would live forever.
            size = transport.get_write_buffer_size() + _unsent(transport)
            if size == 0 or size != last_size:
                last_size, last_change = size, now
            elif now - last_change > stall:
                self.ctx.log.info(
                    "session %d: peer stopped reading for %.0f s: dropping", self.sid, now - last_change
                )
                # Cancel the worker first: aborting a transport under a running loop.sendfile
                # trips an asyncio InvalidStateError; a cancelled sendfile hands the socket back.
                await cancel_and_wait(self._worker_task)
                transport.abort()
                return
            quiet = now - self._last_rx
            if quiet > idle and not self.busy and self._queue.empty() and not self.requests.channels:
                self.ctx.log.info("session %d idle for %.0f s: closing", self.sid, quiet)
                await self._try_send(m.Goodbye(reason=f"idle for {idle:.0f} s"))
                # Not abort(): that would discard the corked Goodbye, and the client would not learn why.
                self._out.flush()
                self.writer.close()
                return


def _unsent(transport: asyncio.BaseTransport) -> int:
    """Bytes queued in the kernel's send buffer (Linux SIOCOUTQ); sendfile bypasses the transport's
    own buffer, so a stalled download is only visible here."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        import fcntl
        import termios

        buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return int.from_bytes(buf, "little", signed=True)
