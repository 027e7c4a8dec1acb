"""Accounts shared by N servers: the PostgreSQL engine (see :mod:`ferry.server.accountdb`).

``ferry serve --db postgresql://...`` and ``ferry user ... --db postgresql://...`` store the accounts
here, so every server behind one address knows the same users, keys and tokens, and a change made
with ``ferry user`` anywhere reaches every server within a second (ferry.server.revocation polls
:meth:`PostgresAccounts.changes`).

**Why a blocking driver (psycopg 3) and not asyncpg**, which the object backend's namespace uses:
the account code is blocking and runs in the server's threads (argon2 in the login threads, key and
token checks in the default executor), and asyncpg has no blocking API. Measured with
``bench/accounts_db.py`` (docs/scale-out.md): a token login's two reads cost ~0.1-0.15 ms through
psycopg's blocking connections against ~0.35-0.6 ms through asyncpg on an event loop in a dedicated
thread (each statement handed over with ``run_coroutine_threadsafe``), and a password login is
~23 ms of argon2 either way. The price is a second PostgreSQL driver in the ``scale`` extra and
~150 ms of import time, paid only with ``--db``.

Connections: a small pool (LIFO, so the connection the revocation poll keeps warm is the one reused).
Before a pooled connection is used, its socket is polled (no round trip): a connection the database
closed (a restart, ``pg_terminate_backend``) has something to read and is replaced, so a database
that went away and came back costs no failed login. One that sat idle for a while is also checked
with a round trip (a path that vanished without a word).
Writers are serialised across every server by the lock on the one row of ``account_changes``, which
each write transaction bumps first: the same one-writer-at-a-time rule as SQLite's ``BEGIN
IMMEDIATE``, and the counter servers poll. Failures become :class:`~ferry.errors.FerryError` naming
the database (its URL without the password).
"""

from __future__ import annotations

import contextlib
import functools
import select
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final

from ferry.errors import FerryError, UsageError
from ferry.server.accountdb import Cursor, NoAccounts
from ferry.server.accounts_schema import POSTGRES, POSTGRES_FIRST, SCHEMA_VERSION

if TYPE_CHECKING:
    import psycopg

__all__ = ["PostgresAccounts", "check_url", "redact_url"]

#: Serialises schema migrations of one database (any constant distinct from the namespace's).
_MIGRATION_LOCK: Final = 0x66657261  # "fera"
#: Seconds a pooled connection may sit idle before it is checked with a round trip before use.
_IDLE_CHECK: Final = 5.0
#: Seconds a thread waits for a free connection before giving up.
_POOL_WAIT: Final = 30.0
_VERSION_KEY: Final = "accounts_schema_version"
#: How the accounts' connections show in ``pg_stat_activity``.
APPLICATION: Final = "ferry accounts"
_SCHEMES: Final = ("postgresql", "postgres")


def check_url(url: str) -> str:
    """``url`` if it is a ``postgresql://`` URL, else :class:`UsageError` saying what is expected."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        raise UsageError(f"invalid database URL {redact_url(url)!r}: {exc}") from None
    if parts.scheme not in _SCHEMES:
        raise UsageError(
            f"invalid database URL {redact_url(url)!r}: expected postgresql://USER@HOST[:PORT]/DATABASE"
        )
    return url


def redact_url(url: str) -> str:
    """``url`` without a password (in the user part or as ``?password=``), for messages and logs."""
    try:
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, host = netloc.rpartition("@")
            netloc = f"{userinfo.partition(':')[0]}@{host}"
        query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k.lower() != "password"]
        query_text = urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query_text, ""))
    except ValueError:
        return "(an unparsable database URL)"


@functools.lru_cache(maxsize=256)
def _dialect(sql: str) -> str:
    """A statement with ``?`` placeholders in psycopg's style (``%s``; a literal ``%`` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


class _Conn:
    """A psycopg connection that takes the account code's ``?`` placeholders."""

    __slots__ = ("_conn",)

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Cursor:
        return self._conn.execute(_dialect(sql), params)


class PostgresAccounts:
    """The accounts in the PostgreSQL database at ``url``.

    ``create``: create the schema if the database has none (``ferry serve --db``, ``ferry user add
    --db``); otherwise such a database raises :class:`~ferry.server.accountdb.NoAccounts`, so a
    mistyped URL is not answered with "no such user".
    """

    def __init__(
        self, url: str, *, create: bool = True, max_connections: int = 8, connect_timeout: int = 5
    ) -> None:
        try:
            import psycopg
        except ImportError as exc:
            raise FerryError(
                "accounts in PostgreSQL (--db) need the psycopg package: pip install 'ferry-transfer[scale]'"
            ) from exc
        self._psycopg = psycopg
        self.url = check_url(url)
        self.where = redact_url(url)
        self.integrity_error = psycopg.errors.IntegrityError
        self._connect_timeout = connect_timeout
        self._idle: list[tuple[psycopg.Connection[Any], float]] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._closed = False
        try:
            with self._errors(), self._connection() as conn:
                self._migrate(conn, create)
        except BaseException:
            self.close()
            raise

    # --- connections -------------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        return self._psycopg.connect(
            self.url, autocommit=True, connect_timeout=self._connect_timeout, application_name=APPLICATION
        )

    def _take(self) -> psycopg.Connection[Any]:
        """An idle connection that works (one idle for a while is checked first), else a new one."""
        while True:
            with self._lock:
                if self._closed:
                    raise FerryError("the accounts database is closed")
                conn, since = self._idle.pop() if self._idle else (None, 0.0)
            if conn is None:
                return self._connect()
            if _closed_by_server(conn):
                conn.close()
                continue
            if time.monotonic() - since < _IDLE_CHECK:
                return conn
            try:
                conn.execute("SELECT 1")
                return conn
            except self._psycopg.Error:
                conn.close()  # the database restarted, or a proxy dropped it: try the next one

    def _give(self, conn: psycopg.Connection[Any]) -> None:
        if not conn.closed and not conn.broken:
            if conn.info.transaction_status != self._psycopg.pq.TransactionStatus.IDLE:
                with contextlib.suppress(self._psycopg.Error):
                    conn.rollback()
            if conn.info.transaction_status == self._psycopg.pq.TransactionStatus.IDLE:
                with self._lock:
                    if not self._closed:
                        self._idle.append((conn, time.monotonic()))
                        return
        conn.close()

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        if not self._slots.acquire(timeout=_POOL_WAIT):
            raise FerryError(f"accounts database {self.where}: no free connection within {_POOL_WAIT:g} s")
        try:
            conn = self._take()
            try:
                yield conn
            finally:
                self._give(conn)
        finally:
            self._slots.release()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Translate driver failures into a FerryError naming the database (at the boundary)."""
        psycopg = self._psycopg
        try:
            yield
        except (psycopg.OperationalError, psycopg.InterfaceError, OSError) as exc:
            raise FerryError(f"the accounts database {self.where} is unreachable: {_first_line(exc)}") from exc
        except psycopg.Error as exc:
            raise FerryError(f"accounts database {self.where}: {_first_line(exc)}") from exc

    def _migrate(self, conn: psycopg.Connection[Any], create: bool) -> None:
        """Bring the schema to :data:`SCHEMA_VERSION` (under an advisory lock: N servers starting
        together migrate once); refuse a newer one; without ``create``, refuse a database without it."""
        version_sql = f"SELECT value FROM ferry_meta WHERE key = '{_VERSION_KEY}'"
        if not create:
            found = conn.execute("SELECT to_regclass('ferry_meta') IS NOT NULL").fetchone()
            row = conn.execute(version_sql).fetchone() if found and found[0] else None
            if row is None:
                raise NoAccounts(self.where)
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            # The table the object backend's namespace keeps its version in too (ferry.store.schema).
            conn.execute("CREATE TABLE IF NOT EXISTS ferry_meta (key text PRIMARY KEY, value text NOT NULL)")
            row = conn.execute(version_sql).fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise FerryError(
                    f"the accounts in {self.where} were written by a newer ferry (schema {version}); upgrade ferry"
                )
            for step in range(max(version + 1, POSTGRES_FIRST), SCHEMA_VERSION + 1):
                for statement in POSTGRES[step]:
                    conn.execute(statement)
            if version < SCHEMA_VERSION:
                conn.execute(
                    "INSERT INTO ferry_meta (key, value) VALUES (%s, %s) "
                    "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                    (_VERSION_KEY, str(SCHEMA_VERSION)),
                )

    # --- the engine ---------------------------------------------------------------------------------

    @contextmanager
    def reading(self) -> Iterator[_Conn]:
        """See :meth:`ferry.server.accountdb.AccountsDB.reading` (autocommit: each statement alone)."""
        with self._errors(), self._connection() as conn:
            yield _Conn(conn)

    @contextmanager
    def writing(self) -> Iterator[_Conn]:
        """See :meth:`ferry.server.accountdb.AccountsDB.writing`: bumping the change counter first
        locks its row until the commit, which makes writers take turns across every server."""
        with self._errors(), self._connection() as conn, conn.transaction():
            conn.execute("UPDATE account_changes SET n = n + 1 WHERE id = 1")
            yield _Conn(conn)

    def changes(self) -> int:
        """The change counter (one row read: a round trip, polled once a second per server)."""
        with self.reading() as conn:
            row = conn.execute("SELECT n FROM account_changes WHERE id = 1").fetchone()
        return int(row[0])

    def close(self) -> None:
        """Close every idle connection; connections in use close when they come back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.close()


def _closed_by_server(conn: psycopg.Connection[Any]) -> bool:
    """Whether an idle connection has something to read: between our statements the server only
    speaks to say it is closing it (or the socket hit end of file)."""
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
