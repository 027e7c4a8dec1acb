"""Request services and what they need from the session they serve.

A session (:mod:`ferry.server.session`) owns the connection: handshake, login, the reader loop, the
ordered worker, every write. The requests themselves are served by *services* (files, transfer,
tree, sync, delta, exec), one instance of each per session, built at login. A service owns its
per-session state and declares which messages it handles in two class-level tables, as asyncssh's
packet handlers do:

- :attr:`Service.worker_handlers` -- requests queued to the session's ordered worker (their replies
  may be long, e.g. a download; pipelined requests are answered in order);
- :attr:`Service.reader_handlers` -- messages the reader handles itself, in arrival order, because
  data frames or further batches follow them (uploads, command input).

Each handler is a function ``handler(service, message)``; the session builds one dispatch table from
its services and calls it. Services reach the session only through :class:`ServiceHost` (the
output, the shared request registry, the logged-in user), defined here, *below* the session: no
service imports the session module.

A request id is the client's, one space per connection across services (an upload, a download and
a command cannot share one): :class:`Requests` is that registry, owned by the session and shared.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar, runtime_checkable

from ferry.fskit import is_partial_name
from ferry.server import work
from ferry.server.context import FileLimit
from ferry.server.folder import FolderStorage
from ferry.server.openlimits import Hold, Kind
from ferry.server.pathrules import join_path
from ferry.server.usage import HomeUsage
from ferry.store.api import Node, Parts
from ferry.wire import Connection, Data, RemoteProtocolError
from ferry.wire import messages as m

if TYPE_CHECKING:
    from ferry.server.accounts import User
    from ferry.server.context import ServerContext

#: A request handler: called with the service that declared it and the message.
Handler = Callable[[Any, Any], Awaitable[None]]
#: The storage a service stands on: :class:`~ferry.server.folder.FolderStorage` for the folder
#: backend's services, :class:`~ferry.store.objects.ObjectStorage` for the object backend's
#: (:mod:`ferry.server.objectsvc`).
S = TypeVar("S")


class Channel(Protocol):
    """A request in progress that receives data frames or further batches under its id (an upload,
    a tree or delta transfer, a command)."""

    async def on_data(self, ev: Data) -> None:
        """One data frame for this request."""
        ...

    async def abort(self) -> None:
        """Cancelled, or the session ends: stop and release what it holds."""
        ...


@runtime_checkable
class Upload(Protocol):
    """A request that receives the client's data (a file, delta or tree upload): closed by the
    session when nothing comes for ``upload_idle_timeout`` (issue 10, break 3: each holds files)."""

    #: the session's :meth:`ServiceHost.read_waited` when it last received something (or opened)
    active_at: float

    def working(self) -> bool:
        """True while the server itself works on it (a write in flight): then its silence is not
        the client's."""
        ...

    async def expire(self, timeout: float) -> m.Error:
        """It received nothing for ``timeout`` seconds and was unregistered: stop it as an abort
        would (a resumable upload keeps its partial) and return the Error that tells the client."""
        ...


@runtime_checkable
class FailsUploads(Protocol):
    """The service whose uploads receive data frames (one per backend): told when one of them could
    not take its data (the session sends the Error)."""

    def fail_upload(self, req_id: int) -> None:
        """Drop upload ``req_id`` and ignore what still comes for it (its data and FileEnd)."""
        ...


class Requests:
    """The requests of one session in progress, by the client's request id (shared by all its
    services: an id names one request at a time)."""

    def __init__(self) -> None:
        #: id -> request receiving data frames or batches (uploads, tree and delta transfers, commands)
        self.channels: dict[int, Channel] = {}
        #: ids of downloads queued or running: only those can be cancelled (bounds ``cancelled``)
        self.gets: set[int] = set()
        #: ids the client cancelled (a download stops at the next block)
        self.cancelled: set[int] = set()

    def check_id_free(self, req_id: int) -> None:
        """Raise RemoteProtocolError if a download (queued or running), an upload or a command
        still uses ``req_id``: its state is keyed by the id."""
        if req_id in self.gets or req_id in self.channels:
            raise RemoteProtocolError(f"request id {req_id} is already in use")

    def start_download(self, req_id: int) -> None:
        """A download is queued under ``req_id`` (refused if the id is in use): two downloads under
        one id would share their cancel state, and the client could not tell their replies apart."""
        self.check_id_free(req_id)
        self.gets.add(req_id)

    def download_done(self, req_id: int) -> None:
        """The download ``req_id`` ended (any outcome): forget it and its cancellation."""
        self.gets.discard(req_id)
        self.cancelled.discard(req_id)

    def cancel(self, req_id: int) -> Channel | None:
        """The client cancelled ``req_id``: unregister the request receiving data under it (returned,
        for the caller to abort) and mark a download for stopping at its next block."""
        target = self.channels.pop(req_id, None)
        if req_id in self.gets:  # remembered only for downloads that can still see it
            self.cancelled.add(req_id)
        return target


class ServiceHost(Protocol):
    """The session as its services see it."""

    #: the server-wide state (limits, usage, caches, the log)
    ctx: ServerContext
    #: the logged-in user; replaced when the account changes (ferry.server.revocation)
    user: User | None
    #: the client's address and port, for log lines
    peer: str
    #: True without TLS
    plain: bool
    #: the connection's protocol state (encodes frames)
    conn: Connection
    #: the requests in progress, shared by the session's services
    requests: Requests

    async def send(self, msg: m.Message) -> None:
        """Send one message (waits for the transport buffer to drain below its high-water mark)."""
        ...

    def read_waited(self) -> float:
        """Seconds the session's reader has spent waiting for the client to send something, since
        the session began (a clock that stands still while the server itself holds the reader up:
        an upload is idle only by the client's doing)."""
        ...

    async def write_frames(self, frames: list[bytes]) -> None:
        """Write several already-encoded frames at once."""
        ...

    async def send_data(self, channel: int, stream: int, data: bytes | memoryview) -> None:
        """Send one data frame."""
        ...

    @property
    def zero_copy(self) -> bool:
        """True when downloads may use :meth:`sendfile`: plain TCP on a loop that has it."""
        ...

    async def sendfile(self, channel: int, fileobj: Any, offset: int, count: int) -> int:
        """Send ``count`` bytes of ``fileobj`` from ``offset`` as one data frame (where :attr:`zero_copy`)."""
        ...


class Service(Generic[S]):
    """The base of a request service: one instance per session, built at login, with the storage the
    session opened for its account (the only way a service reaches files). What does not depend on
    the backend is here; :class:`FolderService` adds the folder backend's usage bookkeeping."""

    #: requests this service answers through the session's ordered worker
    worker_handlers: ClassVar[Mapping[type[m.Message], Handler]] = {}
    #: messages this service handles in the session's reader, in arrival order
    reader_handlers: ClassVar[Mapping[type[m.Message], Handler]] = {}

    def __init__(self, host: ServiceHost, storage: S) -> None:
        self.host = host
        self.storage = storage
        self.ctx = host.ctx
        self.requests = host.requests

    @property
    def user(self) -> User:
        """The logged-in user (as of now: an account change replaces it)."""
        user = self.host.user
        assert user is not None  # services exist only once logged in
        return user

    @property
    def peer(self) -> str:
        """The client's address, for log lines."""
        return self.host.peer

    @property
    def channels(self) -> dict[int, Channel]:
        """The session's requests receiving data, by id (see :class:`Requests`)."""
        return self.requests.channels

    async def send(self, msg: m.Message) -> None:
        """Send one message to the client."""
        await self.host.send(msg)

    def hold(self, kind: Kind) -> Hold:
        """A place for one more open transfer of the user (per-user caps on open uploads and
        downloads, :mod:`ferry.server.openlimits`), or ``busy`` for this request."""
        return self.ctx.transfers.take(self.user.name, kind)

    async def send_data(self, channel: int, stream: int, data: bytes | memoryview) -> None:
        """Send one data frame to the client."""
        await self.host.send_data(channel, stream, data)

    def log_op(self, op: str, path: str, started: float, result: str = "ok", nbytes: int = 0) -> None:
        """One log line per operation: user, peer, operation, path, bytes, seconds, result."""
        user = self.host.user
        self.ctx.log.info(
            "op user=%s peer=%s op=%s path=%s bytes=%d seconds=%.3f result=%s",
            user.name if user else "-",
            self.peer,
            op,
            path,
            nbytes,
            time.monotonic() - started,
            result,
        )

    async def close(self) -> None:
        """The session ends (after its requests were aborted): release what the service holds."""


class FolderService(Service[FolderStorage]):
    """A service of the folder backend: the home's usage is counted by a walk once, then tracked in
    the server's :class:`~ferry.server.context.Usage` (the object backend keeps usage in its database)."""

    async def current_usage(self) -> int:
        """Bytes counted against the user's quota: complete files and idle partial uploads
        (computed once by a walk, then tracked; see :class:`~ferry.server.context.Usage`)."""
        usage = self.ctx.usage
        name = self.user.name
        known = usage.known(name)
        if known is not None:
            return known
        async with usage.lock(name):
            known = usage.known(name)
            if known is None:
                usage.begin_walk(name)
                async with work.current.get().walk_slot():
                    tally = await work.run_steps(self.storage.usage_walk()) or HomeUsage()
                # The partials uploads are writing now are theirs (their reservations count them).
                writing = self.ctx.uploads_in(self.storage.home).keys()
                usage.set(name, tally, writing)
                # (if a rm -r invalidated it meanwhile, this count still answers this one request)
                known = tally.bytes + sum(n for p, n in tally.partials.items() if p not in writing)
            return known

    def account_removed(self, path: Parts, node: Node, entries: int) -> None:
        """Usage after ``path`` (``node`` before) was removed with ``entries`` entries (see
        :meth:`~ferry.server.folder.FolderStorage.remove_counted`): a file's bytes are freed, a
        partial leaves the idle ones, a folder's bytes are recounted when next needed."""
        usage, name = self.ctx.usage, self.user.name
        rel = join_path(path)
        if node.kind == "file" and is_partial_name(rel.rpartition("/")[2]):
            usage.claim(name, rel)
        elif node.kind == "file":
            usage.add(name, -node.size, entries=-entries)
        else:
            usage.add(name, 0, entries=-entries)
            usage.invalidate(name)
            if node.kind == "dir":
                usage.removed_tree(name, rel)

    async def creations(self) -> FileLimit | None:
        """What the jail must call for each file or folder this session's next operation makes: the
        user's file-count quota (the home counted first, when the user has one). None when nothing
        needs the count (no limit, and the count is not known: a walk makes it when needed)."""
        count = self.ctx.usage.entry_count(self.user.name)
        limit = self.user.max_files
        if limit is not None and count.used is None:
            await self.current_usage()
        if limit is None and count.used is None:
            return None
        return FileLimit(count, limit)
