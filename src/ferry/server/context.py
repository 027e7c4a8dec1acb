"""Server-wide state shared by every session: configuration, accounts, caches, usage, the logger.

One :class:`ServerContext` per running server (no module globals), handed to each session.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.cdc import ChunkIndex
from ferry.server.accounts import Accounts, User
from ferry.server.admission import Admission
from ferry.server.auth import Authenticator
from ferry.server.jail import MAX_DEPTH
from ferry.server.login_queue import LoginQueue
from ferry.server.pwcache import VerifiedPasswords
from ferry.server.revocation import Revocation
from ferry.server.throttle import Throttle
from ferry.server.work import WorkPools


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
    max_uploads: int = 128  #: unfinished uploads per connection (each holds an open partial file)
    #: interrupted uploads not resumed within this many seconds are deleted (0: keep for ever)
    partial_max_age: float = 7 * 86400.0
    sweep_interval: float = 3600.0  #: seconds between two sweeps for stale partial uploads
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


class Usage:
    """Bytes used per user home, computed lazily once and then kept up to date by operations."""

    def __init__(self) -> None:
        self._used: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._reserved: dict[str, int] = {}

    def known(self, user: str) -> int | None:
        """The cached usage of ``user``, or None when it must be (re)computed."""
        return self._used.get(user)

    def lock(self, user: str) -> asyncio.Lock:
        """Serialises the first computation per user."""
        return self._locks.setdefault(user, asyncio.Lock())

    def set(self, user: str, used: int) -> None:
        """Store a freshly computed usage."""
        self._used[user] = used

    def add(self, user: str, delta: int) -> None:
        """Account for bytes added (or removed, negative) by an operation."""
        if user in self._used:
            self._used[user] = max(0, self._used[user] + delta)

    def invalidate(self, user: str) -> None:
        """Forget the usage (e.g. after a recursive remove) so it is recomputed next time."""
        self._used.pop(user, None)

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
    #: the thread pools for blocking file work (ferry.server.work); shut down with the server
    work: WorkPools = field(init=False)
    admission: Admission = field(init=False)
    logins: LoginQueue = field(init=False)
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

    def user_home(self, user: User) -> Path:
        """The home folder of ``user``."""
        return user.home
