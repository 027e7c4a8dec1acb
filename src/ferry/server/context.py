"""Server-wide state shared by every session: configuration, accounts, caches, usage, the logger.

One :class:`ServerContext` per running server (no module globals), handed to each session.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import threading
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ferry.cdc import ChunkIndex
from ferry.server.accounts import Accounts, User
from ferry.server.admission import Admission
from ferry.server.auth import Authenticator
from ferry.server.folder import FolderStorage
from ferry.server.login_queue import LoginQueue
from ferry.server.openlimits import OpenTransfers
from ferry.server.pathrules import MAX_DEPTH
from ferry.server.pwcache import VerifiedPasswords
from ferry.server.revocation import Revocation
from ferry.server.throttle import Throttle
from ferry.server.usage import HomeUsage
from ferry.server.work import WorkPools
from ferry.wire.codes import ErrorCode

if TYPE_CHECKING:
    from ferry.store.objects import ObjectStorage


@dataclass
class Limits:
    """Timeouts and caps; defaults are documented in docs/server.md."""

    #: seconds from accept until a connection has finished TLS and sent Hello and its credentials
    #: (the time its password check waits in the login queue is not counted: see login_wait)
    login_timeout: float = 10.0
    idle_timeout: float = 900.0  #: seconds without any request before an idle session is closed
    stall_timeout: float = 300.0  #: seconds a peer may leave our output unread before it is dropped
    #: login messages per connection (a password, a token, a batch of keys, a key query) before it
    #: is dropped: room for a client's token, three key stages, a query and three passwords
    auth_attempts: int = 10
    auth_fail_delay: float = 0.3  #: pause after a wrong password (slows guessing)
    max_sessions: int = 1000  #: logged-in sessions at once; more logins are refused with ``busy``
    max_sessions_per_user: int = 100  #: logged-in sessions of one user at once
    max_pending_logins: int = 1024  #: connections that have not logged in yet (the pre-login pool)
    max_pending_logins_per_address: int = 32  #: of those, from one IPv4 address or IPv6 /64
    max_login_queue: int = 1024  #: password checks waiting for a thread; more are told ``busy``
    #: seconds a password check may wait for a thread; a login that would wait longer (estimated
    #: from the recent cost of a check) is told ``busy`` at once. Below the client's 15 s timeout.
    login_wait: float = 12.0
    #: seconds a password argon2 accepted is remembered (as a keyed MAC, ferry.server.pwcache) so
    #: the same account's next logins skip argon2; 0 turns the cache off
    password_cache: float = 600.0
    fd_reserve: int = 64  #: descriptors kept free: new connections are refused once fewer are left
    revocation_interval: float = 1.0  #: seconds between two checks for revoked logins
    write_high_water: int = 1 << 20  #: transport buffer above which writers wait (bounded memory)
    read_size: int = 1 << 18  #: bytes per socket read
    #: password checks at once, each in a login thread (an argon2id check takes 19 MiB and ~22 ms of
    #: a core): one per core, since a check keeps its core busy for its whole duration
    auth_concurrency: int = field(default_factory=lambda: os.cpu_count() or 2)
    #: seconds an unfinished upload may go without data (counted while the server waits for the
    #: client) before the server closes it, keeping its partial for a resume
    upload_idle_timeout: float = 300.0
    max_uploads: int = 32  #: unfinished uploads per connection (each holds an open partial file)
    #: open uploads of one user across all their sessions (each holds a partial file open);
    #: more are refused with ``busy`` for that request (ferry.server.openlimits)
    max_uploads_per_user: int = 64
    #: open downloads of one user across all their sessions (each holds the file it sends open)
    max_downloads_per_user: int = 64
    #: interrupted uploads not resumed within this many seconds are deleted (0: keep for ever)
    partial_max_age: float = 7 * 86400.0
    sweep_interval: float = 3600.0  #: seconds between two sweeps for stale partial uploads
    #: object backend: seconds a chunk nothing references any more is kept before the sweeper
    #: deletes it (downloads of a just-removed file finish; see ferry.store.objects)
    chunk_grace: float = 3600.0
    #: unfinished uploads (partial files) one user may hold, interrupted and running ones together;
    #: a new resumable upload beyond it is refused (code quota) until some are resumed or removed
    max_partials: int = 64
    #: bytes of those (running uploads at their announced size); 0: no cap but the user's quota
    max_partial_bytes: int = 64 << 30
    #: threads for bounded blocking file work (stat, open, a block read or written, a commit);
    #: separate from the login threads of password checks (ferry.server.work, ferry.server.login_queue)
    file_threads: int = 16
    file_threads_per_user: int = 8  #: of those, how many one user's jobs may hold at once
    #: threads for work that grows with a tree (listings, GetTree, PutTree batches, rm -r, usage)
    walk_threads: int = 4
    walk_threads_per_user: int = 2  #: of those, how many one user's walks may hold at once
    #: expensive operations (recursive listing, GetTree, PutTree batch, rm -r, usage count) in
    #: progress per session; more wait their turn in the session, in order
    walks_per_session: int = 2
    #: deepest folder created below a home, and deepest a listing or tree download descends below
    #: where it starts (code too-deep; ferry.server.jail.MAX_DEPTH); rm -r and usage have no limit
    max_depth: int = MAX_DEPTH


class HashCache:
    """Hashes of files, keyed by (device, inode, size, mtime_ns, ctime_ns) plus what was hashed: the
    fixed-size chunk hashes of downloads (algorithm, chunk size) and the content-defined chunk
    indexes of sync and delta transfers (:data:`ferry.cdc.SCHEME`).

    Lets a resume, a repeated download, ``sync -c`` or a delta skip re-reading unchanged files. In
    memory, LRU-bounded by entries and by bytes: a chunk index grows with its file (~36 bytes per
    64 KiB chunk: 0.6 MB for 1 GiB), so a few huge files must not take the server's memory.
    """

    def __init__(self, max_entries: int = 4096, max_bytes: int = 256 << 20) -> None:
        self._data: OrderedDict[tuple[object, ...], list[bytes] | ChunkIndex] = OrderedDict()
        self._max = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0

    def get(self, key: tuple[object, ...]) -> list[bytes] | None:
        """Cached chunk hashes for ``key`` or None."""
        val = self._data.get(key)
        if val is not None:
            self._data.move_to_end(key)
        return val if isinstance(val, list) else None

    def put(self, key: tuple[object, ...], hashes: list[bytes]) -> None:
        """Remember ``hashes`` for ``key``."""
        self._store(key, hashes)

    def get_index(self, key: tuple[object, ...]) -> ChunkIndex | None:
        """The cached chunk index for ``key`` or None."""
        val = self._data.get(key)
        if val is not None:
            self._data.move_to_end(key)
        return val if isinstance(val, ChunkIndex) else None

    def put_index(self, key: tuple[object, ...], index: ChunkIndex) -> None:
        """Remember a file's chunk index (unless it alone is larger than the cache's byte bound)."""
        self._store(key, index)

    @property
    def size(self) -> int:
        """Approximate bytes held."""
        return self._bytes

    @staticmethod
    def _cost(value: list[bytes] | ChunkIndex) -> int:
        if isinstance(value, ChunkIndex):
            return len(value.hashes) + 4 * value.count + 64
        return 64 * len(value) + 64

    def _store(self, key: tuple[object, ...], value: list[bytes] | ChunkIndex) -> None:
        cost = self._cost(value)
        if cost > self._max_bytes:
            return
        old = self._data.pop(key, None)
        if old is not None:
            self._bytes -= self._cost(old)
        self._data[key] = value
        self._bytes += cost
        while len(self._data) > self._max or self._bytes > self._max_bytes:
            _key, evicted = self._data.popitem(last=False)
            self._bytes -= self._cost(evicted)


class EntryCount:
    """The entries (files, folders, links; not partial uploads) of one user's home, against the
    user's file-count quota. Shared by all the user's sessions and changed from worker threads as
    the jail makes entries (:class:`FileLimit`): a lock makes the check and the count one step,
    so sessions running at once cannot together pass the limit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._used: int | None = None  # None: not counted yet (a walk of the home sets it)
        #: moves with every change: a walk that saw none may replace the count (see Usage.set)
        self.changes = 0

    @property
    def used(self) -> int | None:
        """The entries now, or None before the first count."""
        return self._used

    def take(self, limit: int | None, path: str) -> None:
        """One more entry at ``path``, unless the home holds ``limit`` already (code ``quota``)."""
        with self._lock:
            self._refuse_at(limit, path)
            if self._used is not None:
                self._used += 1
            self.changes += 1

    def check(self, limit: int | None, path: str) -> None:
        """Refuse as :meth:`take` would, without counting anything."""
        with self._lock:
            self._refuse_at(limit, path)

    def _refuse_at(self, limit: int | None, path: str) -> None:
        if limit is not None and self._used is not None and self._used >= limit:
            raise ErrorCode.QUOTA.error(
                f"{path}: file limit reached: your home may hold at most {limit:,} files and folders "
                f"({self._used:,} now); remove some (ferry rm) or ask an admin to raise the limit "
                "(ferry user mod --max-files)",
            )

    def change(self, n: int) -> None:
        """``n`` entries more (or fewer, if negative) than counted."""
        with self._lock:
            if self._used is not None:
                self._used = max(0, self._used + n)
            self.changes += 1

    def set(self, used: int, seen_changes: int) -> None:
        """A walk counted ``used`` entries, starting when :attr:`changes` was ``seen_changes``: taken
        if nothing changed meanwhile (the walk may have missed a change), or if nothing was known."""
        with self._lock:
            if self._used is None or self.changes == seen_changes:
                self._used = used

    def forget(self) -> None:
        """Count again at the next walk (e.g. after a remove that failed half-way)."""
        with self._lock:
            self._used = None


@dataclass
class FileLimit:
    """The user's file-count quota as one operation's jail calls see it
    (:class:`ferry.server.jail.Creations`)."""

    count: EntryCount
    limit: int | None  #: None: no limit (entries are still counted)

    def take(self, path: str) -> None:
        """One more entry at ``path`` (refused with code ``quota`` at the limit)."""
        self.count.take(self.limit, path)

    def give_back(self) -> None:
        """The entry :meth:`take` allowed was not made."""
        self.count.change(-1)

    def check(self, path: str) -> None:
        """Refuse (code ``quota``) as :meth:`take` would at ``path`` now, counting nothing."""
        self.count.check(self.limit, path)


class Usage:
    """What each user's home holds, for quotas and ``df``: computed once by a walk of the home
    (:meth:`~ferry.server.jail.Jail.usage_walk`), then kept up to date by the operations.

    Per user: the bytes and entries of complete files; the *idle* partial uploads (interrupted,
    kept for a resume; by home-relative path, so recording one twice counts it once); bytes
    reserved by operations still running; the resumable uploads running (each may leave a partial).
    A partial being written belongs to its upload (its reservation counts it), not to the idle ones.
    """

    def __init__(self) -> None:
        self._used: dict[str, int] = {}
        self._counts: dict[str, EntryCount] = {}
        self._walk_changes: dict[str, int] = {}
        self._partials: dict[str, dict[str, int]] = {}
        #: changes to the idle partials made while a walk of the home runs (path -> size, None:
        #: gone), applied over its result: the walk may or may not have seen them
        self._walking: dict[str, dict[str, int | None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._reserved: dict[str, int] = {}
        self._running: dict[str, tuple[int, int]] = {}

    def known(self, user: str) -> int | None:
        """Bytes counted against ``user``'s quota (complete files and idle partials), or None
        when they must be (re)computed."""
        used = self._used.get(user)
        if used is None or self.entry_count(user).used is None:
            return None
        return used + self.partial_bytes(user)

    def partial_bytes(self, user: str) -> int:
        """Bytes of the idle partials of ``user`` as far as known."""
        return sum(self._partials.get(user, {}).values())

    def entries(self, user: str) -> int | None:
        """Entries (files, folders, links) of ``user``'s home, or None when unknown."""
        return self.entry_count(user).used

    def entry_count(self, user: str) -> EntryCount:
        """The entry count of ``user``'s home (see :class:`EntryCount`)."""
        count = self._counts.get(user)
        if count is None:
            count = self._counts[user] = EntryCount()
        return count

    def partials(self, user: str) -> dict[str, int]:
        """The idle partial uploads of ``user`` (path -> bytes) as far as known (do not change it)."""
        return self._partials.get(user, {})

    def lock(self, user: str) -> asyncio.Lock:
        """Serialises the first computation per user."""
        return self._locks.setdefault(user, asyncio.Lock())

    def begin_walk(self, user: str) -> None:
        """A walk of ``user``'s home starts: remember what happens to partials meanwhile."""
        self._walking[user] = {}
        self._walk_changes[user] = self.entry_count(user).changes

    def set(self, user: str, tally: HomeUsage, writing: Collection[str] = ()) -> bool:
        """Store a walk's result (see :meth:`begin_walk`), without the partials being written now
        (``writing``: their uploads count them). Returns False, storing nothing, if the usage was
        invalidated while the walk ran (it may have missed that change: the next check walks again)."""
        changes = self._walking.pop(user, None)
        if changes is None:
            return False
        partials = {p: n for p, n in tally.partials.items() if p not in writing}
        for path, size in changes.items():
            if size is None:
                partials.pop(path, None)
            else:
                partials[path] = size
        self._used[user] = tally.bytes
        self.entry_count(user).set(tally.entries, self._walk_changes.pop(user, -1))
        self._partials[user] = partials
        return True

    def add(self, user: str, delta: int, entries: int = 0) -> None:
        """Account for bytes (and entries) added, or removed if negative, by an operation."""
        if user in self._used:
            self._used[user] = max(0, self._used[user] + delta)
        if entries:
            self.entry_count(user).change(entries)

    def invalidate(self, user: str) -> None:
        """Forget the bytes (e.g. after a recursive remove) so they are recomputed next time; the
        idle partials stay known (see :meth:`removed_tree`, :meth:`moved_tree`), and so does the
        entry count (kept exact by the operations: see :class:`EntryCount`)."""
        self._used.pop(user, None)
        self._walking.pop(user, None)

    def invalidate_all(self, user: str) -> None:
        """Forget everything about ``user``'s home (the partials too: e.g. a remove that failed
        half-way)."""
        self.invalidate(user)
        self._partials.pop(user, None)
        self.entry_count(user).forget()

    def partials_known(self, user: str) -> bool:
        """Whether the idle partials of ``user`` are known (else a walk must find them)."""
        return user in self._partials

    def removed_tree(self, user: str, path: str) -> None:
        """Folder ``path`` (home-relative) was removed with everything in it, partials included."""
        prefix = f"{path}/"
        for p in [p for p in self._partials.get(user, {}) if p.startswith(prefix)]:
            self._partial_changed(user, p, None)

    def moved_tree(self, user: str, src: str, dst: str) -> None:
        """Folder ``src`` was renamed to ``dst``: the partials in it moved with it."""
        prefix = f"{src}/"
        for p, n in [(p, n) for p, n in self._partials.get(user, {}).items() if p.startswith(prefix)]:
            self._partial_changed(user, p, None)
            self._partial_changed(user, f"{dst}/{p[len(prefix):]}", n)

    def _partial_changed(self, user: str, path: str, size: int | None) -> None:
        walking = self._walking.get(user)
        if walking is not None:
            walking[path] = size
        partials = self._partials.get(user)
        if partials is None:
            return
        if size is None:
            partials.pop(path, None)
        else:
            partials.pop(path, None)  # re-inserted last: the dict's order is the order of parking
            partials[path] = size

    def park(self, user: str, path: str, size: int) -> None:
        """An upload stopped and kept its partial ``path`` (``size`` bytes) for a resume: it is
        idle from now on, and counts against the quota as such."""
        self._partial_changed(user, path, size)

    def claim(self, user: str, path: str) -> None:
        """An upload took partial ``path`` over (or removed it): it is no longer idle."""
        self._partial_changed(user, path, None)

    def running(self, user: str) -> tuple[int, int]:
        """Resumable uploads of ``user`` running now: (count, announced bytes)."""
        return self._running.get(user, (0, 0))

    def start_upload(self, user: str, nbytes: int) -> None:
        """A resumable upload of ``nbytes`` starts (it may leave a partial): see :meth:`running`."""
        count, total = self._running.get(user, (0, 0))
        self._running[user] = (count + 1, total + nbytes)

    def end_upload(self, user: str, nbytes: int) -> None:
        """The upload :meth:`start_upload` announced has ended."""
        count, total = self._running.get(user, (1, nbytes))
        if count > 1:
            self._running[user] = (count - 1, max(total - nbytes, 0))
        else:
            self._running.pop(user, None)

    def reserved(self, user: str) -> int:
        """Bytes set aside for uploads of ``user`` that are still running."""
        return self._reserved.get(user, 0)

    def reserve(self, user: str, nbytes: int) -> None:
        """Set ``nbytes`` aside for an upload that passed the quota check, so uploads running in
        parallel cannot all count on the same free space; :meth:`release` them when it ends."""
        self._reserved[user] = self._reserved.get(user, 0) + nbytes

    def release(self, user: str, nbytes: int) -> None:
        """Give back what :meth:`reserve` set aside."""
        left = self._reserved.get(user, 0) - nbytes
        if left > 0:
            self._reserved[user] = left
        else:
            self._reserved.pop(user, None)


@dataclass
class ServerContext:
    """Everything a session needs from the server."""

    root: Path
    accounts: Accounts
    ssl_context: ssl.SSLContext | None
    log: logging.Logger
    limits: Limits = field(default_factory=Limits)
    hash_cache: HashCache = field(default_factory=HashCache)
    usage: Usage = field(default_factory=Usage)
    sessions: set[object] = field(default_factory=set)
    #: uploads in progress by (home, partial path): one writer per partial file (ferry.server.transfer)
    uploads: dict[tuple[str, str], Any] = field(default_factory=dict)
    software: str = "ferry"
    #: the object backend (``ferry serve --store``): one storage for every session of this server;
    #: None: the folder backend (each session opens its home)
    objects: ObjectStorage | None = None
    #: the thread pools for blocking file work (ferry.server.work); shut down with the server
    work: WorkPools = field(init=False)
    admission: Admission = field(init=False)
    logins: LoginQueue = field(init=False)
    #: per-user counts of open uploads and downloads (ferry.server.openlimits)
    transfers: OpenTransfers = field(init=False)
    #: the ``SHA256:...`` fingerprint of the TLS certificate (None with --plain): key logins sign it
    fingerprint: str | None = None
    #: the failed-login slowdown (a test may pass one with another policy or clock)
    throttle: Throttle = field(default_factory=Throttle)
    auth: Authenticator = field(init=False)
    revocation: Revocation = field(init=False)

    def __post_init__(self) -> None:
        lim = self.limits
        self.work = WorkPools(
            file_threads=lim.file_threads,
            file_threads_per_user=lim.file_threads_per_user,
            walk_threads=lim.walk_threads,
            walk_threads_per_user=lim.walk_threads_per_user,
        )
        self.admission = Admission(
            per_address=lim.max_pending_logins_per_address,
            pre_login=lim.max_pending_logins,
            sessions=lim.max_sessions,
            per_user=lim.max_sessions_per_user,
        )
        self.transfers = OpenTransfers(uploads=lim.max_uploads_per_user, downloads=lim.max_downloads_per_user)
        self.logins = LoginQueue(workers=lim.auth_concurrency, max_waiting=lim.max_login_queue, max_wait=lim.login_wait)
        self.auth = Authenticator(
            self.accounts,
            log=self.log,
            fingerprint=self.fingerprint,
            password_check=self.logins.check,
            fail_delay=self.limits.auth_fail_delay,
            throttle=self.throttle,
            verified=VerifiedPasswords(self.limits.password_cache),
        )
        self.revocation = Revocation(self.accounts, interval=self.limits.revocation_interval)

    def uploads_in(self, home: str) -> dict[str, Any]:
        """The uploads writing in ``home`` now, by their partial's home-relative path (a snapshot:
        the loop thread registers and unregisters them)."""
        return {rel: up for (h, rel), up in self.uploads.items() if h == home}

    def user_home(self, user: User) -> Path:
        """The home folder of ``user``."""
        return user.home

    def open_storage(self, user: User) -> FolderStorage | ObjectStorage:
        """The storage a session of ``user`` reaches files through, opened at its login: the server's
        object storage, or the folder backend on the account's home (created if missing). The one
        place that picks the backend."""
        if self.objects is not None:
            return self.objects
        return FolderStorage(user.home, user.name, max_depth=self.limits.max_depth)
