"""The default accounts engine: SQLite in ``<root>/users.db`` (see :mod:`ferry.server.accountdb`).

One connection (WAL mode, so ``ferry user ...`` can change accounts while a server is running and
the server sees the change on the next login: nothing is cached), shared between threads behind a
lock because the server runs account checks in threads. Writers take the database lock up front
(``BEGIN IMMEDIATE``) instead of failing on a lock upgrade mid-transaction. The file is 0600.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ferry import paths
from ferry.errors import FerryError
from ferry.errtext import os_reason
from ferry.server.accounts_schema import SCHEMA_VERSION, SQLITE

__all__ = ["SqliteAccounts"]


class SqliteAccounts:
    """The accounts in the SQLite file ``path`` (created, with its schema, when missing)."""

    integrity_error = sqlite3.IntegrityError

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)
        self._lock = threading.Lock()
        try:
            paths.ensure_private_dir(path.parent)
            self._create_private_file(path)
            conn = sqlite3.connect(
                path,
                # Shared across the executor's threads; every use is serialised by self._lock.
                check_same_thread=False,
                # Autocommit: we issue BEGIN IMMEDIATE ourselves so writers take the lock up front
                # instead of failing on lock upgrade mid-transaction.
                isolation_level=None,
                timeout=10.0,
            )
        except (OSError, sqlite3.Error) as exc:
            why = os_reason(exc) if isinstance(exc, OSError) else exc
            raise FerryError(f"cannot open the accounts database {path}: {why}") from exc
        self._conn: sqlite3.Connection | None = conn
        try:
            self._setup(conn)
        except BaseException:
            conn.close()
            self._conn = None
            raise

    @staticmethod
    def _create_private_file(path: Path) -> None:
        """Create the database file 0600 *before* SQLite does, so it is never briefly world-readable.

        SQLite gives its -wal and -shm files the same mode as the database file. An existing file
        is never opened here: closing *any* descriptor of a file drops all of this process's POSIX
        locks on it, including those of an SQLite connection already open in the process (a
        server, when tests or tools open the accounts beside it). Without its shared lock, another
        process closing its connection takes the database for unused and deletes the WAL under the
        server's feet, which then reads a stale snapshot for ever.
        """
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, paths.PRIVATE_FILE_MODE)
        except FileExistsError:
            try:
                os.chmod(path, paths.PRIVATE_FILE_MODE)  # by name: no descriptor, no lost locks
            except PermissionError:
                pass  # not our file (e.g. root inspecting another user's root); leave its mode alone
            return
        try:
            # O_CREAT's mode is filtered by the umask: enforce it.
            os.fchmod(fd, paths.PRIVATE_FILE_MODE)
        finally:
            os.close(fd)

    def _setup(self, conn: sqlite3.Connection) -> None:
        with self._db_errors():
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable against application crashes in WAL mode and much faster than FULL.
            conn.execute("PRAGMA synchronous=NORMAL")
            with self._lock:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    version = conn.execute("PRAGMA user_version").fetchone()[0]
                    if version > SCHEMA_VERSION:
                        raise FerryError(
                            f"{self.path} was written by a newer ferry (schema {version}); upgrade ferry"
                        )
                    for step in range(version + 1, SCHEMA_VERSION + 1):
                        # One statement per execute(): executescript() would COMMIT our transaction.
                        for statement in SQLITE[step]:
                            conn.execute(statement)
                    if version < SCHEMA_VERSION:
                        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")

    @contextmanager
    def _db_errors(self) -> Iterator[None]:
        """Translate SQLite failures (locked, corrupt, disk full) into a FerryError at the boundary."""
        try:
            yield
        except sqlite3.Error as exc:
            raise FerryError(f"accounts database {self.path}: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise FerryError("the accounts database is closed")
        return self._conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._db_errors(), self._lock:
            yield self._connection()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._db_errors(), self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def reading(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """See :meth:`ferry.server.accountdb.AccountsDB.reading`."""
        return self._read()

    def writing(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """See :meth:`ferry.server.accountdb.AccountsDB.writing` (``BEGIN IMMEDIATE``)."""
        return self._write()

    def changes(self) -> int:
        """SQLite's ``PRAGMA data_version``: moves whenever *another* connection (``ferry user`` in
        another process) committed a change. A read of shared memory, no query."""
        with self._read() as conn:
            return int(conn.execute("PRAGMA data_version").fetchone()[0])

    def close(self) -> None:
        """Close the connection. Closing twice is harmless."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
