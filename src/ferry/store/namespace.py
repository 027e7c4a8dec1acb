"""The namespace of the object backend in PostgreSQL (asyncpg): folders, files and their chunk lists,
partial uploads, usage and quotas, and the database half of the chunk sweeper. Schema:
:mod:`ferry.store.schema`.

Every operation is one transaction on a pooled connection, so N servers sharing the database see one
namespace. How each guarantee is kept:

* **Exactly one creator wins.** ``(parent_id, name)`` is unique: of two servers creating the same name,
  one insert fails and becomes ``exists``.
* **Atomic rename.** A rename updates one row's parent and name; data never moves.
* **Exact usage, quotas across servers.** Every transaction that changes a user's usage (commit, small
  store, remove, rename over a file) first locks the user's ``owners`` row (``FOR UPDATE``), so such
  transactions of one user run one after the other on all servers, and each checks the quota against
  the committed usage. Uploads reserve their announced size when they start (same lock), so parallel
  uploads through different servers fail early rather than at commit; the commit checks again.
* **Resume anywhere.** The chunks stored for a partial upload are rows (``upload_chunks``), committed
  before the chunk is acknowledged; any server finds them by (folder, name, token).
* **No referenced chunk is ever swept.** References to ``chunks`` rows are foreign keys: a transaction
  adding one holds a lock that makes the sweeper's ``DELETE`` wait and then fail, and a ``DELETE`` that
  went first makes the adding transaction create a fresh chunk row (a new object key, see
  :mod:`ferry.store.chunks`). ``last_ref`` (bumped on every claim and when files are removed) adds a
  grace period so that reads of a just-removed file can finish.

Database failures become :class:`~ferry.errors.StoreUnavailable`; deadlocks and serialisation
failures are retried (a bounded number of times).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

import asyncpg

from ferry.errors import (
    RemoteError,
)
from ferry.hashing import tree_digest
from ferry.store.api import (
    ChunkRef,
    FileChunks,
    Node,
    Parts,
    SmallBatch,
    SmallFile,
    Upload,
    Usage,
    check_parts,
    show,
)
from ferry.store.schema import migrate
from ferry.wire.codes import ErrorCode

if TYPE_CHECKING:
    from ferry.store.schema import Conn

T = TypeVar("T")

#: Attempts of one transaction that hit a deadlock or a serialisation failure.
_ATTEMPTS: Final = 4
#: Seconds an upload's reservation holds its whole announced size after its last chunk; after that
#: (an abandoned upload) it counts only the bytes it stored, as a partial file does on the folder backend.
DEFAULT_UPLOAD_LEASE: Final = 900.0

# The chain of nodes from the home down along $2 (as far as it exists), one row per level.
_WALK: Final = """
WITH RECURSIVE walk AS (
    SELECT n.id, n.kind, n.name, n.size, n.mtime_ns, n.mode, n.digest, 0 AS depth
    FROM nodes n WHERE n.owner_id = $1 AND n.parent_id IS NULL
  UNION ALL
    SELECT n.id, n.kind, n.name, n.size, n.mtime_ns, n.mode, n.digest, w.depth + 1
    FROM walk w JOIN nodes n ON n.parent_id = w.id AND n.name = ($2::text[])[w.depth + 1]
    WHERE w.kind = 'd' AND w.depth < cardinality($2::text[])
)
SELECT * FROM walk ORDER BY depth
"""

# Bytes reserved by the uploads of owner $1 other than upload $3: the announced size while an upload is
# live (touched within $2 seconds), else what it has stored.
_RESERVED: Final = """
SELECT coalesce(sum(CASE WHEN u.touched_at > now() - make_interval(secs => $2) THEN u.size
    ELSE (SELECT coalesce(sum(c.size), 0) FROM upload_chunks uc JOIN chunks c ON c.id = uc.chunk_id
          WHERE uc.upload_id = u.id) END), 0)::bigint
FROM uploads u WHERE u.owner_id = $1 AND u.id <> $3
"""

# The ids of the node $1 and every node below it.
_SUBTREE: Final = """
WITH RECURSIVE sub AS (
    SELECT id FROM nodes WHERE id = $1
  UNION ALL
    SELECT n.id FROM nodes n JOIN sub ON n.parent_id = sub.id
)
"""


# What a claim does to a chunk row that exists already (de-duplication): it is touched and keeps what
# it has, except that an inline claim fills a row whose object is not written yet (an upload of the
# same bytes in progress elsewhere): the row then reads from its bytes, and the object written later
# is one the row does not need, which the sweeper's orphan pass removes once the row is gone.
_ON_CLAIMED: Final = """
ON CONFLICT (owner_id, hash) DO UPDATE SET last_ref = now(),
    data = CASE WHEN chunks.stored THEN chunks.data ELSE EXCLUDED.data END,
    stored = chunks.stored OR EXCLUDED.stored
"""


def _claim(data: str) -> str:
    """The statement that creates or touches the chunk row of owner $1, hash $2, size $3; ``data``
    names the parameter holding the bytes of an inline chunk (NULL: the bytes go to the store). An
    inline chunk's row is stored from its first insert."""
    return (
        "INSERT INTO chunks (owner_id, hash, size, stored, data) "
        f"VALUES ($1, $2, $3, {data}::bytea IS NOT NULL, {data}::bytea)" + _ON_CLAIMED
    )


# The same for many chunks of owner $1 at once: hashes $2, sizes $3, bytes $4 (NULL where the bytes
# go to the store). The hashes must be distinct (one statement may not update a row twice).
_CLAIM_MANY: Final = (
    "INSERT INTO chunks (owner_id, hash, size, stored, data) "
    "SELECT $1, h, s, d IS NOT NULL, d FROM unnest($2::bytea[], $3::int[], $4::bytea[]) AS t(h, s, d)"
    + _ON_CLAIMED
    + " RETURNING id, hash, stored"
)

# For each path $2[i] ('/'-joined components; '' is the home) of owner $1: the deepest node of the
# chain from the home down along it (with its folder, ``parent_id``) (``depth`` components matched; the whole path if depth equals
# ``plen``), with the chunk of a file of at most $3 bytes (one chunk: $3 <= CHUNK_SIZE) when the whole
# path matched. One query for a whole batch: names never hold a '/' (check_parts). The chunk is
# looked up per path (LATERAL, kept a subquery by its LIMIT: an index probe each); a plain LEFT JOIN
# was planned as a hash join over the whole file_chunks table (10 ms at 6,000 files, growing with
# them).
_WALK_MANY: Final = """
WITH RECURSIVE p AS (
    SELECT t.i, string_to_array(t.path, '/') AS parts FROM unnest($2::text[]) WITH ORDINALITY AS t(path, i)
), walk AS (
    SELECT p.i, p.parts, n.id, n.parent_id, n.kind, n.name, n.size, n.mtime_ns, n.mode, n.digest, 0 AS depth
    FROM p JOIN nodes n ON n.owner_id = $1 AND n.parent_id IS NULL
  UNION ALL
    SELECT w.i, w.parts, n.id, n.parent_id, n.kind, n.name, n.size, n.mtime_ns, n.mode, n.digest, w.depth + 1
    FROM walk w JOIN nodes n ON n.parent_id = w.id AND n.name = w.parts[w.depth + 1]
    WHERE w.kind = 'd' AND w.depth < cardinality(w.parts)
), deepest AS (
    SELECT DISTINCT ON (i) i, id, parent_id, kind, name, size, mtime_ns, mode, digest, depth,
        cardinality(parts) AS plen
    FROM walk ORDER BY i, depth DESC
)
SELECT d.*, c.id AS chunk_id, c.hash, c.size AS chunk_size, c.data
FROM deepest d
LEFT JOIN LATERAL (
    SELECT c.id, c.hash, c.size, c.data FROM file_chunks fc JOIN chunks c ON c.id = fc.chunk_id
    WHERE fc.node_id = d.id AND fc.idx = 0 AND d.kind = 'f' AND d.depth = d.plen AND d.size <= $3
    LIMIT 1
) c ON true
ORDER BY d.i
"""

# The files of a batch in one statement: claim the inline chunks of owner $1 (hashes $2, bytes $3;
# distinct), insert the file nodes (folder $4, name $5, size $6, mtime $7, mode $8, digest $9, chunk
# hash $10, and $11 the id of a chunk claimed and stored beforehand, NULL for an inline one), link
# each new node to its chunk, and add to the owner's usage what was made plus $12 bytes and $13
# files (what a replacement freed). Names taken meanwhile (by another server's mkdir) are skipped:
# the rows returned are the files made. The rows of one statement see each other's inserts at its
# end, when the foreign keys are checked.
_COMMIT_MANY: Final = (
    "WITH c AS (INSERT INTO chunks (owner_id, hash, size, stored, data) "
    "SELECT $1, h, octet_length(d), true, d FROM unnest($2::bytea[], $3::bytea[]) AS t(h, d)"
    + _ON_CLAIMED
    + """ RETURNING id, hash),
x AS (SELECT * FROM unnest($4::bigint[], $5::text[], $6::bigint[], $7::bigint[], $8::int[], $9::bytea[],
                           $10::bytea[], $11::bigint[]) AS x(parent, name, size, mtime, mode, digest, hash, chunk)),
n AS (INSERT INTO nodes (owner_id, parent_id, name, kind, size, mtime_ns, mode, digest)
      SELECT $1, parent, name, 'f', size, mtime, mode, digest FROM x
      ON CONFLICT (parent_id, name) DO NOTHING RETURNING id, parent_id, name, size),
f AS (INSERT INTO file_chunks (node_id, idx, chunk_id)
      SELECT n.id, 0, coalesce(x.chunk, c.id) FROM n JOIN x ON x.parent = n.parent_id AND x.name = n.name
      LEFT JOIN c ON x.chunk IS NULL AND c.hash = x.hash),
o AS (UPDATE owners SET used = used + $12::bigint + (SELECT coalesce(sum(size), 0) FROM n),
      files = files + $13::bigint + (SELECT count(*) FROM n) WHERE id = $1)
SELECT parent_id, name FROM n
"""
)

_CONNECTION_ERRORS: Final = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
)
_RETRY_ERRORS: Final = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)


async def _keep_session(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """The pool's reset hook: nothing to reset (see :meth:`Namespace.connect`)."""


#: The range of a ``bigint`` column of nanoseconds (years 1677 to 2262).
_NS_MIN: Final = -(1 << 63)
_NS_MAX: Final = (1 << 63) - 1


def _ns(mtime: float) -> int:
    # Clamped as a file system clamps what it cannot hold: the wire carries times up to the year
    # 9999, and one such time must not fail a whole batch with an integer overflow.
    return min(max(round(mtime * 1e9), _NS_MIN), _NS_MAX)


def _node(row: asyncpg.Record) -> Node:
    return Node(
        name=row["name"],
        kind="dir" if row["kind"] == "d" else "file",
        size=row["size"],
        mtime=row["mtime_ns"] / 1e9,
        mode=row["mode"],
        digest=row["digest"] or b"",
    )


def _quota_error(path: Parts, size: int, used: int, quota: int) -> RemoteError:
    return ErrorCode.QUOTA.error(
        f"quota exceeded: {show(path)} needs {size} bytes, {max(quota - used, 0)} of {quota} left; "
        "remove files (ferry rm) or ask an admin to raise the quota",
    )


class Namespace:
    """The namespace in one PostgreSQL database, shared by every server that connects to it."""

    def __init__(
        self, pool: asyncpg.Pool[asyncpg.Record], *, upload_lease: float = DEFAULT_UPLOAD_LEASE
    ) -> None:
        self._pool = pool
        self.upload_lease = upload_lease
        self._owners: dict[str, int] = {}

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        command_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        upload_lease: float = DEFAULT_UPLOAD_LEASE,
        setup: Callable[[asyncpg.Connection[asyncpg.Record]], Coroutine[Any, Any, None]] | None = None,
    ) -> Namespace:
        """Connect a pool to ``dsn`` (a ``postgresql://`` URL) and migrate the schema if needed.

        ``setup`` runs once on each new connection of the pool (benchmarks and tests count
        statements with it: ``conn.add_query_logger``).
        """
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                command_timeout=command_timeout,
                timeout=connect_timeout,
                init=setup,
                # asyncpg's default reset sends one more statement each time a connection goes back
                # to the pool (RESET ALL, UNLISTEN, advisory unlock...): a round trip per operation,
                # measured at 13 statements per small-file commit instead of 10 (bench/scale.py).
                # Nothing here leaves session state behind (the advisory lock is transaction-scoped,
                # no SET, LISTEN or cursor outside a transaction); an open transaction is still rolled
                # back by asyncpg itself before this hook runs.
                reset=_keep_session,
            )
        except _CONNECTION_ERRORS as exc:
            raise _db_down(exc) from exc
        except asyncpg.PostgresError as exc:  # wrong database, role or password
            raise ErrorCode.UNAVAILABLE.error(f"the database refused the connection: {exc}") from exc
        ns = cls(pool, upload_lease=upload_lease)
        try:
            await ns._run(migrate, tx=False)
        except BaseException:
            await pool.close()
            raise
        return ns

    async def close(self) -> None:
        """Close the pool's connections."""
        await self._pool.close()

    # -- plumbing -----------------------------------------------------------------------------------

    async def _run(self, op: Callable[[Conn], Awaitable[T]], *, tx: bool = True, readonly: bool = False) -> T:
        """Run ``op`` on a pooled connection, in a transaction unless ``tx`` is False; retry it after a
        deadlock or serialisation failure; turn connection failures into StoreUnavailable."""
        for attempt in range(_ATTEMPTS):
            try:
                async with self._pool.acquire() as conn:
                    if not tx:
                        return await op(conn)
                    # A read-only operation of several statements reads one snapshot.
                    isolation: Literal["repeatable_read", "read_committed"] = (
                        "repeatable_read" if readonly else "read_committed"
                    )
                    async with conn.transaction(isolation=isolation, readonly=readonly):
                        return await op(conn)
            except _RETRY_ERRORS:
                if attempt == _ATTEMPTS - 1:
                    raise ErrorCode.UNAVAILABLE.error(
                        "the database kept aborting this change (contention); try again"
                    ) from None
                await asyncio.sleep(0.01 * 2**attempt)
            except _CONNECTION_ERRORS as exc:
                raise _db_down(exc) from exc
        raise AssertionError("unreachable")

    async def owner_id(self, user: str) -> int:
        """The owner record of ``user``, created (with an empty home) on first use."""
        known = self._owners.get(user)
        if known is not None:
            return known

        async def op(conn: Conn) -> int:
            oid = await conn.fetchval("SELECT id FROM owners WHERE name = $1", user)
            if oid is None:
                oid = await conn.fetchval(
                    "INSERT INTO owners (name) VALUES ($1) ON CONFLICT (name) DO NOTHING RETURNING id", user
                )
                if oid is None:  # another server created it at this moment
                    oid = await conn.fetchval("SELECT id FROM owners WHERE name = $1", user)
                else:
                    await conn.execute(
                        "INSERT INTO nodes (owner_id, parent_id, name, kind, mtime_ns, mode) "
                        "VALUES ($1, NULL, '', 'd', $2, $3)",
                        oid,
                        time.time_ns(),
                        0o700,
                    )
            return int(oid)

        oid = await self._run(op)
        self._owners[user] = oid
        return oid

    async def empty_home(self, user: str) -> tuple[int, int]:
        """Delete every file, folder and unfinished upload of ``user`` in one transaction (``ferry user
        del --remove-home`` with shared accounts); returns (files, bytes) removed. The owner row and
        the empty home stay, so servers that cached its id stay right; the chunks go to the sweeper
        after its grace period, as a removal's do."""
        oid = await self._run(lambda conn: conn.fetchval("SELECT id FROM owners WHERE name = $1", user))
        if oid is None:
            return 0, 0  # never logged in on the object backend: nothing stored

        async def op(conn: Conn) -> tuple[int, int]:
            await self._lock_owner(conn, oid)
            files = int(await conn.fetchval("SELECT files FROM owners WHERE id = $1", oid))
            freed = 0
            children = await conn.fetch(
                "SELECT n.id FROM nodes n JOIN nodes h ON n.parent_id = h.id WHERE h.owner_id = $1 AND h.parent_id IS NULL",
                oid,
            )
            for row in children:
                freed += await self._delete_node(conn, oid, row["id"])
            # What is left: the uploads into the home itself (those into folders went with them).
            await conn.execute(
                "UPDATE chunks SET last_ref = now() WHERE id IN (SELECT uc.chunk_id FROM upload_chunks uc "
                "JOIN uploads u ON u.id = uc.upload_id WHERE u.owner_id = $1)",
                oid,
            )
            await conn.execute("DELETE FROM uploads WHERE owner_id = $1", oid)
            return files, freed

        return await self._run(op)

    @staticmethod
    async def _walk(conn: Conn, owner: int, path: Parts) -> list[asyncpg.Record]:
        return list(await conn.fetch(_WALK, owner, list(path)))

    async def _lookup(self, conn: Conn, owner: int, path: Parts) -> asyncpg.Record:
        """The node at ``path``, or not-found / not-a-directory naming the first missing part."""
        rows = await self._walk(conn, owner, path)
        if len(rows) == len(path) + 1:
            return rows[-1]
        raise _missing(rows, path)

    async def _folder(self, conn: Conn, owner: int, path: Parts) -> asyncpg.Record:
        """The folder at ``path`` (not-a-directory if it is a file)."""
        row = await self._lookup(conn, owner, path)
        if row["kind"] != "d":
            raise ErrorCode.NOT_A_DIRECTORY.error(f"{show(path)} is not a folder")
        return row

    @staticmethod
    async def _lock_owner(conn: Conn, owner: int) -> int:
        """Lock the owner's row (serialising usage changes across servers); returns its ``used``."""
        return int(await conn.fetchval("SELECT used FROM owners WHERE id = $1 FOR UPDATE", owner))

    async def _reserved(self, conn: Conn, owner: int, excluding: int = 0) -> int:
        return int(await conn.fetchval(_RESERVED, owner, self.upload_lease, excluding))

    # -- namespace ----------------------------------------------------------------------------------

    async def stat(self, user: str, path: Parts) -> Node:
        """The node at ``path``."""
        owner, path = await self.owner_id(user), check_parts(path)

        async def op(conn: Conn) -> Node:
            return _node(await self._lookup(conn, owner, path))

        return await self._run(op, tx=False)

    async def list_dir(self, user: str, path: Parts, *, after: str = "", limit: int = 1000) -> list[Node]:
        """One page of folder ``path``: up to ``limit`` entries named after ``after``, in name order."""
        owner, path = await self.owner_id(user), check_parts(path)

        async def op(conn: Conn) -> list[Node]:
            folder = await self._folder(conn, owner, path)
            rows = await conn.fetch(
                "SELECT name, kind, size, mtime_ns, mode, digest FROM nodes "
                "WHERE parent_id = $1 AND name > $2 ORDER BY name LIMIT $3",
                folder["id"],
                after,
                limit,
            )
            return [_node(r) for r in rows]

        return await self._run(op, readonly=True)

    async def mkdir(
        self, user: str, path: Parts, *, parents: bool = False, exist_ok: bool = False, mode: int = 0o755
    ) -> None:
        """Create a folder (see :meth:`ferry.store.api.Storage.mkdir`)."""
        owner, path = await self.owner_id(user), check_parts(path)
        if not path:
            if exist_ok:
                return
            raise ErrorCode.EXISTS.error("your home folder already exists")

        async def op(conn: Conn) -> None:
            rows = await self._walk(conn, owner, path)
            if len(rows) == len(path) + 1:
                if rows[-1]["kind"] == "d" and exist_ok:
                    return
                raise _exists(path, rows[-1]["kind"])
            if rows[-1]["kind"] != "d":
                raise _missing(rows, path)
            missing = path[len(rows) - 1 :]
            if len(missing) > 1 and not parents:
                raise _missing(rows, path)
            parent = rows[-1]["id"]
            for depth, name in enumerate(missing, start=len(rows)):
                last = depth == len(path)
                made = await conn.fetchval(
                    "INSERT INTO nodes (owner_id, parent_id, name, kind, mtime_ns, mode) "
                    "VALUES ($1, $2, $3, 'd', $4, $5) ON CONFLICT (parent_id, name) DO NOTHING RETURNING id",
                    owner,
                    parent,
                    name,
                    time.time_ns(),
                    mode & 0o777,
                )
                if made is None:  # created meanwhile (by another server): the constraint decided
                    other = await conn.fetchrow(
                        "SELECT id, kind FROM nodes WHERE parent_id = $1 AND name = $2", parent, name
                    )
                    if other is None or other["kind"] != "d" or (last and not exist_ok):
                        raise _exists(path[:depth], other["kind"] if other else "d")
                    made = other["id"]
                parent = made

        await self._run(op)

    async def remove(self, user: str, path: Parts, *, recursive: bool = False) -> None:
        """Remove a file or folder (see :meth:`ferry.store.api.Storage.remove`)."""
        owner, path = await self.owner_id(user), check_parts(path)
        if not path:
            raise ErrorCode.BAD_PATH.error("your home folder itself cannot be removed")

        async def op(conn: Conn) -> None:
            await self._lock_owner(conn, owner)
            row = await self._lookup(conn, owner, path)
            if row["kind"] == "d" and not recursive:
                await self._require_empty(conn, row["id"], path)
            await self._delete_node(conn, owner, row["id"])

        await self._run(op)

    @staticmethod
    async def _require_empty(conn: Conn, folder: int, path: Parts) -> None:
        if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM nodes WHERE parent_id = $1)", folder):
            hidden = ""
        elif await conn.fetchval("SELECT EXISTS (SELECT 1 FROM uploads WHERE parent_id = $1)", folder):
            hidden = " (it holds unfinished uploads)"
        else:
            return
        raise ErrorCode.NOT_EMPTY.error(
            f"{show(path)} is a folder that is not empty{hidden}; remove it recursively to delete it and "
            "everything in it",
        )

    @staticmethod
    async def _delete_node(conn: Conn, owner: int, node: int) -> int:
        """Delete ``node`` and everything below it (the owner row is locked); returns the bytes freed.
        The chunks it referenced are marked as just dropped, so reads in flight keep them for the
        sweeper's grace period."""
        row = await conn.fetchrow(
            _SUBTREE + "SELECT coalesce(sum(size) FILTER (WHERE kind = 'f'), 0)::bigint, "
            "count(*) FILTER (WHERE kind = 'f') FROM nodes WHERE id IN (SELECT id FROM sub)",
            node,
        )
        assert row is not None
        freed, files = row[0], row[1]
        await conn.execute(
            _SUBTREE + "UPDATE chunks SET last_ref = now() WHERE id IN ("
            "SELECT chunk_id FROM file_chunks WHERE node_id IN (SELECT id FROM sub) UNION "
            "SELECT uc.chunk_id FROM upload_chunks uc JOIN uploads u ON u.id = uc.upload_id "
            "WHERE u.parent_id IN (SELECT id FROM sub))",
            node,
        )
        await conn.execute("DELETE FROM nodes WHERE id = $1", node)
        if files:
            await conn.execute(
                "UPDATE owners SET used = used - $2, files = files - $3 WHERE id = $1", owner, freed, files
            )
        return int(freed)

    async def rename(self, user: str, src: Parts, dst: Parts, *, overwrite: bool = True) -> None:
        """Move ``src`` to ``dst`` in one transaction (see :meth:`ferry.store.api.Storage.rename`)."""
        owner, src, dst = await self.owner_id(user), check_parts(src), check_parts(dst)
        if not src:
            raise ErrorCode.BAD_PATH.error("your home folder itself cannot be renamed")
        if not dst:
            raise ErrorCode.BAD_PATH.error("your home folder itself cannot be replaced")

        async def op(conn: Conn) -> None:
            # The owner lock also keeps two folder moves from building a cycle between their checks.
            await self._lock_owner(conn, owner)
            node = await self._lookup(conn, owner, src)
            chain = await self._walk(conn, owner, dst)
            if len(chain) < len(dst):
                raise _missing(chain, dst)
            parent = chain[len(dst) - 1]
            if parent["kind"] != "d":
                raise ErrorCode.NOT_A_DIRECTORY.error(f"{show(dst[:-1])} is not a folder")
            if node["kind"] == "d" and any(r["id"] == node["id"] for r in chain[: len(dst)]):
                raise ErrorCode.INVALID.error(f"cannot move {show(src)} into itself ({show(dst)})")
            if len(chain) == len(dst) + 1:
                target = chain[-1]
                if target["id"] == node["id"]:
                    return
                if not overwrite:
                    raise ErrorCode.EXISTS.error(f"{show(dst)} already exists")
                if node["kind"] == "f" and target["kind"] == "d":
                    raise ErrorCode.IS_A_DIRECTORY.error(f"{show(dst)} is a folder; a file cannot replace it")
                if node["kind"] == "d" and target["kind"] == "f":
                    raise ErrorCode.NOT_A_DIRECTORY.error(
                        f"{show(dst)} is not a folder; a folder cannot replace it"
                    )
                if target["kind"] == "d":
                    await self._require_empty(conn, target["id"], dst)
                await self._delete_node(conn, owner, target["id"])
            await conn.execute(
                "UPDATE nodes SET parent_id = $2, name = $3 WHERE id = $1", node["id"], parent["id"], dst[-1]
            )

        await self._run(op)

    async def set_attrs(
        self, user: str, path: Parts, *, mtime: float | None = None, mode: int | None = None
    ) -> None:
        """Set the modification time and/or permission bits of ``path``."""
        owner, path = await self.owner_id(user), check_parts(path)
        if not path:
            raise ErrorCode.BAD_PATH.error("the times and permissions of your home folder cannot be changed")

        async def op(conn: Conn) -> None:
            row = await self._lookup(conn, owner, path)
            await conn.execute(
                "UPDATE nodes SET mtime_ns = coalesce($2, mtime_ns), mode = coalesce($3, mode) WHERE id = $1",
                row["id"],
                None if mtime is None else _ns(mtime),
                None if mode is None else mode & 0o777,
            )

        await self._run(op)

    async def usage(self, user: str) -> Usage:
        """Committed bytes and files of ``user`` and what uploads in progress reserve."""
        owner = await self.owner_id(user)

        async def op(conn: Conn) -> Usage:
            row = await conn.fetchrow("SELECT used, files FROM owners WHERE id = $1", owner)
            assert row is not None
            return Usage(int(row["used"]), int(row["files"]), await self._reserved(conn, owner))

        return await self._run(op, readonly=True)

    # -- uploads ------------------------------------------------------------------------------------

    async def open_upload(
        self,
        user: str,
        path: Parts,
        *,
        token: str,
        size: int,
        mode: int,
        mtime: float,
        overwrite: bool,
        quota: int | None,
    ) -> Upload:
        """Start or resume an upload (see :meth:`ferry.store.api.Storage.open_upload`)."""
        owner, path = await self.owner_id(user), check_parts(path)
        if not path:
            raise ErrorCode.BAD_PATH.error("an upload needs a file name, not your home folder")

        async def op(conn: Conn) -> Upload:
            used = await self._lock_owner(conn, owner)
            parent = await self._folder(conn, owner, path[:-1])
            replaced = await self._target(conn, parent["id"], path, overwrite=overwrite)
            upload_id = await conn.fetchval(
                "INSERT INTO uploads (owner_id, parent_id, name, token, size, mode, mtime_ns) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (parent_id, name, token) DO UPDATE "
                "SET size = EXCLUDED.size, mode = EXCLUDED.mode, mtime_ns = EXCLUDED.mtime_ns, touched_at = now() "
                "RETURNING id",
                owner,
                parent["id"],
                path[-1],
                token,
                size,
                mode & 0o777,
                _ns(mtime),
            )
            if quota is not None:
                counted = used - replaced + await self._reserved(conn, owner, upload_id)
                if counted + size > quota:
                    raise _quota_error(path, size, counted, quota)
            rows = await conn.fetch(
                "SELECT uc.idx, c.id, c.hash, c.size, c.stored FROM upload_chunks uc "
                "JOIN chunks c ON c.id = uc.chunk_id WHERE uc.upload_id = $1 ORDER BY uc.idx",
                upload_id,
            )
            held: list[ChunkRef] = []
            for r in rows:  # the stored prefix: a chunk whose object was never written does not count
                if r["idx"] != len(held) or not r["stored"]:
                    break
                held.append(ChunkRef(r["id"], owner, r["hash"], r["size"]))
            return Upload(upload_id, owner, user, path, token, size, mode & 0o777, mtime, held)

        return await self._run(op)

    @staticmethod
    async def _target(conn: Conn, parent: int, path: Parts, *, overwrite: bool) -> int:
        """Check that a file may be written at ``path`` in folder ``parent``; the size it replaces."""
        row = await conn.fetchrow(
            "SELECT kind, size FROM nodes WHERE parent_id = $1 AND name = $2", parent, path[-1]
        )
        if row is None:
            return 0
        if row["kind"] == "d":
            raise ErrorCode.IS_A_DIRECTORY.error(f"{show(path)} is a folder")
        if not overwrite:
            raise ErrorCode.EXISTS.error(f"{show(path)} already exists")
        return int(row["size"])

    async def claim_chunk(
        self, upload: Upload, index: int, digest: bytes, size: int, data: bytes | None = None
    ) -> ChunkRef:
        """Record chunk ``index`` of ``upload`` (hash ``digest``): one statement that creates or touches
        the user's chunk row and links it to the upload. ``stored`` in the result says whether its
        object exists already (de-duplication: then it is not written again). With ``data`` (an
        inline chunk) the row holds the bytes and is stored at once."""

        async def op(conn: Conn) -> ChunkRef:
            row = await conn.fetchrow(
                f"""
                WITH c AS ({_claim("$6")} RETURNING id, stored),
                u AS (UPDATE uploads SET touched_at = now() WHERE id = $4 RETURNING id),
                l AS (INSERT INTO upload_chunks (upload_id, idx, chunk_id) SELECT u.id, $5, c.id FROM u, c
                      ON CONFLICT (upload_id, idx) DO UPDATE SET chunk_id = EXCLUDED.chunk_id RETURNING 1)
                SELECT c.id, c.stored, (SELECT count(*) FROM l) AS linked FROM c
                """,
                upload.owner,
                digest,
                size,
                upload.id,
                index,
                data,
            )
            assert row is not None
            if not row["linked"]:
                raise ErrorCode.UPLOAD_GONE.error(f"the upload to {show(upload.path)} was removed meanwhile; start it again")
            return ChunkRef(row["id"], upload.owner, digest, size, row["stored"])

        return await self._run(op, tx=False)

    async def claim_loose_chunk(
        self, owner: int, digest: bytes, size: int, data: bytes | None = None
    ) -> ChunkRef:
        """Create or touch a chunk row not (yet) linked to anything (a small file, committed next by
        :meth:`commit_small`; the grace period keeps the sweeper away until then). ``data``: an
        inline chunk (see :meth:`claim_chunk`)."""

        async def op(conn: Conn) -> ChunkRef:
            row = await conn.fetchrow(
                _claim("$4") + " RETURNING id, stored", owner, digest, size, data
            )
            assert row is not None
            return ChunkRef(row["id"], owner, digest, size, row["stored"])

        return await self._run(op, tx=False)

    async def mark_stored(self, ref: ChunkRef) -> None:
        """The chunk's object has been written."""

        async def op(conn: Conn) -> None:
            await conn.execute("UPDATE chunks SET stored = true WHERE id = $1 AND NOT stored", ref.id)

        await self._run(op, tx=False)

    async def commit_upload(
        self, upload: Upload, *, digest: bytes, overwrite: bool, quota: int | None
    ) -> int:
        """Turn a complete upload into the file at its path (see :meth:`ferry.store.api.Storage.commit_upload`)."""

        async def op(conn: Conn) -> int:
            used = await self._lock_owner(conn, upload.owner)
            up = await conn.fetchrow(
                "SELECT parent_id, name, size, mode, mtime_ns FROM uploads WHERE id = $1 FOR UPDATE",
                upload.id,
            )
            if up is None:
                raise ErrorCode.UPLOAD_GONE.error(f"the upload to {show(upload.path)} was removed meanwhile; start it again")
            chunks = await conn.fetch(
                "SELECT uc.idx, c.size, c.stored FROM upload_chunks uc JOIN chunks c ON c.id = uc.chunk_id "
                "WHERE uc.upload_id = $1 ORDER BY uc.idx",
                upload.id,
            )
            complete = (
                chunks
                and all(r["idx"] == i and r["stored"] for i, r in enumerate(chunks))
                and sum(r["size"] for r in chunks) == up["size"]
            )
            if not complete:
                raise ErrorCode.INCOMPLETE.error(f"{show(upload.path)}: not every chunk of the upload is stored")
            return await self._place_file(
                conn, upload.owner, up["parent_id"], upload.path, used,
                size=up["size"], mtime_ns=up["mtime_ns"], mode=up["mode"], digest=digest,
                overwrite=overwrite, quota=quota, from_upload=upload.id, chunk=None,
            )  # fmt: skip

        return await self._run(op)

    async def commit_small(
        self,
        user: str,
        path: Parts,
        ref: ChunkRef,
        *,
        digest: bytes,
        mode: int,
        mtime: float,
        overwrite: bool,
        quota: int | None,
    ) -> int:
        """Make a file of the one stored chunk ``ref``; returns the size it replaced. Raises
        :class:`ChunkGone` if the chunk row was swept in between (the caller claims it again)."""
        owner, path = await self.owner_id(user), check_parts(path)
        if not path:
            raise ErrorCode.BAD_PATH.error("an upload needs a file name, not your home folder")

        async def op(conn: Conn) -> int:
            used = await self._lock_owner(conn, owner)
            parent = await self._folder(conn, owner, path[:-1])
            return await self._place_file(
                conn, owner, parent["id"], path, used,
                size=ref.size, mtime_ns=_ns(mtime), mode=mode & 0o777, digest=digest,
                overwrite=overwrite, quota=quota, from_upload=None, chunk=ref.id,
            )  # fmt: skip

        try:
            return await self._run(op)
        except asyncpg.exceptions.ForeignKeyViolationError as exc:
            raise ChunkGone(ref) from exc

    async def _place_file(
        self,
        conn: Conn,
        owner: int,
        parent: int,
        path: Parts,
        used: int,
        *,
        size: int,
        mtime_ns: int,
        mode: int,
        digest: bytes,
        overwrite: bool,
        quota: int | None,
        from_upload: int | None,
        chunk: int | None,
    ) -> int:
        """Create the file row at ``path`` (replacing a file there) with the chunks of ``from_upload``
        (then deleted) or the one chunk ``chunk``; the owner row is locked. Returns the size replaced."""
        old = await conn.fetchrow(
            "SELECT id, kind, size FROM nodes WHERE parent_id = $1 AND name = $2", parent, path[-1]
        )
        replaced = 0
        if old is not None:
            if old["kind"] == "d":
                raise ErrorCode.IS_A_DIRECTORY.error(f"{show(path)} is a folder")
            if not overwrite:
                raise ErrorCode.EXISTS.error(f"{show(path)} already exists")
            replaced = int(old["size"])
        if quota is not None and used - replaced + size > quota:
            raise _quota_error(path, size, used - replaced, quota)
        if old is not None:
            await self._delete_node(conn, owner, old["id"])
        try:
            node = await conn.fetchval(
                "INSERT INTO nodes (owner_id, parent_id, name, kind, size, mtime_ns, mode, digest) "
                "VALUES ($1, $2, $3, 'f', $4, $5, $6, $7) RETURNING id",
                owner, parent, path[-1], size, mtime_ns, mode, digest,
            )  # fmt: skip
        except asyncpg.exceptions.UniqueViolationError as exc:  # a folder made meanwhile by mkdir
            raise ErrorCode.EXISTS.error(f"{show(path)} already exists") from exc
        if from_upload is not None:
            await conn.execute(
                "INSERT INTO file_chunks (node_id, idx, chunk_id) "
                "SELECT $1, idx, chunk_id FROM upload_chunks WHERE upload_id = $2",
                node,
                from_upload,
            )
            await conn.execute("DELETE FROM uploads WHERE id = $1", from_upload)
        else:
            await conn.execute(
                "INSERT INTO file_chunks (node_id, idx, chunk_id) VALUES ($1, 0, $2)", node, chunk
            )
        await conn.execute(
            "UPDATE owners SET used = used + $2, files = files + $3 WHERE id = $1",
            owner,
            size,
            1,
        )
        return replaced

    async def discard_upload(self, upload: Upload) -> None:
        """Forget a partial upload; its chunks are left to the sweeper."""

        async def op(conn: Conn) -> None:
            await conn.execute("DELETE FROM uploads WHERE id = $1", upload.id)

        await self._run(op, tx=False)

    # -- reads --------------------------------------------------------------------------------------

    async def open_file(self, user: str, path: Parts) -> FileChunks:
        """The file at ``path`` and its chunk list, read in one snapshot."""
        owner, path = await self.owner_id(user), check_parts(path)

        async def op(conn: Conn) -> FileChunks:
            row = await self._lookup(conn, owner, path)
            if row["kind"] == "d":
                raise ErrorCode.IS_A_DIRECTORY.error(f"{show(path)} is a folder, not a file")
            chunks = await conn.fetch(
                "SELECT c.id, c.hash, c.size, c.data FROM file_chunks fc JOIN chunks c ON c.id = fc.chunk_id "
                "WHERE fc.node_id = $1 ORDER BY fc.idx",
                row["id"],
            )
            refs = tuple(ChunkRef(c["id"], owner, c["hash"], c["size"], data=c["data"]) for c in chunks)
            return FileChunks(_node(row), refs)

        return await self._run(op, readonly=True)

    # -- many small files at once ---------------------------------------------------------------------

    async def _folders(
        self, conn: Conn, owner: int, paths: Sequence[Parts], *, create: bool, mode: int, exact_file: str
    ) -> dict[Parts, int | RemoteError]:
        """The folder node of each of ``paths`` (one query for all), or its error: ``not-a-directory``
        if a file is on the way, ``not-found`` if it is missing and not ``create``. With ``create``,
        missing folders are made level by level (one statement per level for all paths). A file at
        the path itself is ``exact_file``: ``"exists"`` (mkdir: it is the thing being made) or
        ``"not-a-directory"`` (the folder of a file to store)."""
        wanted = list(dict.fromkeys(paths))
        out: dict[Parts, int | RemoteError] = {}
        if not wanted:
            return out
        rows = await conn.fetch(_WALK_MANY, owner, ["/".join(p) for p in wanted], 0)
        known: dict[Parts, int] = {}  # folders that exist, by path
        missing: set[Parts] = set()  # folders to make
        for path, row in zip(wanted, rows, strict=True):
            depth = row["depth"]
            if row["kind"] != "d":
                if depth == len(path) and exact_file == "exists":
                    out[path] = _exists(path, "f")
                else:
                    out[path] = ErrorCode.NOT_A_DIRECTORY.error(f"{show(path[:depth])} is not a folder")
                continue
            known[path[:depth]] = row["id"]
            if depth == len(path):
                out[path] = row["id"]
            elif not create:
                out[path] = ErrorCode.NOT_FOUND.error(f"{show(path)}: no such file or folder")
            else:
                missing.update(path[:n] for n in range(depth + 1, len(path) + 1))
        failed: dict[Parts, RemoteError] = {}
        now = time.time_ns()
        for level in sorted({len(p) for p in missing}):
            todo = [p for p in missing if len(p) == level and p[:-1] in known]
            for p in missing:
                if len(p) == level and p[:-1] in failed:
                    failed[p] = failed[p[:-1]]
            if not todo:
                continue
            parents = [known[p[:-1]] for p in todo]
            names = [p[-1] for p in todo]
            made = await conn.fetch(
                "INSERT INTO nodes (owner_id, parent_id, name, kind, mtime_ns, mode) "
                "SELECT $1, p, n, 'd', $4, $5 FROM unnest($2::bigint[], $3::text[]) AS t(p, n) "
                "ON CONFLICT (parent_id, name) DO NOTHING RETURNING id, parent_id, name",
                owner, parents, names, now, mode & 0o777,
            )  # fmt: skip
            ids = {(r["parent_id"], r["name"]): r["id"] for r in made}
            if len(ids) < len(todo):  # made meanwhile by another server: the constraint decided
                others = await conn.fetch(
                    "SELECT n.id, n.parent_id, n.name, n.kind FROM nodes n "
                    "JOIN unnest($1::bigint[], $2::text[]) AS t(p, nm) ON n.parent_id = t.p AND n.name = t.nm",
                    parents,
                    names,
                )
                for r in others:
                    key = (r["parent_id"], r["name"])
                    if key not in ids:
                        ids[key] = r["id"] if r["kind"] == "d" else -1
            for p, parent, name in zip(todo, parents, names, strict=True):
                node = ids.get((parent, name), -1)
                if node < 0:
                    failed[p] = _exists(p, "f")
                else:
                    known[p] = node
        for path in wanted:
            if path in out:
                continue
            if path in known:
                out[path] = known[path]
                continue
            # The first folder on the way that could not be made: a file took its name meanwhile.
            for n in range(1, len(path) + 1):
                if path[:n] in failed:
                    error = failed[path[:n]]
                    if n < len(path) or exact_file != "exists":
                        error = ErrorCode.NOT_A_DIRECTORY.error(f"{show(path[:n])} is not a folder")
                    out[path] = error
                    break
            else:  # pragma: no cover - every missing path is made or failed above
                raise AssertionError(f"folder {path} neither made nor failed")
        return out

    async def mkdir_many(
        self, user: str, paths: Sequence[Parts], *, mode: int = 0o755
    ) -> list[RemoteError | None]:
        """Make sure each folder exists, with its parents (see
        :meth:`ferry.store.api.ChunkStorage.mkdir_many`)."""
        owner = await self.owner_id(user)
        checked: list[Parts | RemoteError] = []
        for path in paths:
            try:
                checked.append(check_parts(path))
            except RemoteError as exc:
                checked.append(exc)

        async def op(conn: Conn) -> list[RemoteError | None]:
            found = await self._folders(
                conn, owner, [p for p in checked if isinstance(p, tuple)], create=True, mode=mode,
                exact_file="exists",
            )  # fmt: skip
            out: list[RemoteError | None] = []
            for p in checked:
                got = found[p] if isinstance(p, tuple) else p
                out.append(got if isinstance(got, RemoteError) else None)
            return out

        return await self._run(op)

    async def claim_chunks(
        self, owner: int, chunks: Sequence[tuple[bytes, int, bytes | None]]
    ) -> dict[bytes, ChunkRef]:
        """Create or touch the chunk rows of ``(hash, size, inline bytes or None)``, not linked to
        anything yet (small files committed next by :meth:`commit_small_many`; the grace period keeps
        the sweeper away until then), in one statement; the refs by hash."""
        unique = {h: (h, size, data) for h, size, data in chunks}

        async def op(conn: Conn) -> dict[bytes, ChunkRef]:
            return await self._claim_many(conn, owner, list(unique.values()))

        return await self._run(op, tx=False)

    @staticmethod
    async def _claim_many(
        conn: Conn, owner: int, chunks: Sequence[tuple[bytes, int, bytes | None]]
    ) -> dict[bytes, ChunkRef]:
        rows = await conn.fetch(
            _CLAIM_MANY, owner, [c[0] for c in chunks], [c[1] for c in chunks], [c[2] for c in chunks]
        )
        sizes = {c[0]: c[1] for c in chunks}
        return {r["hash"]: ChunkRef(r["id"], owner, r["hash"], sizes[r["hash"]], r["stored"]) for r in rows}

    async def mark_stored_many(self, refs: Sequence[ChunkRef]) -> None:
        """The objects of ``refs`` have been written (one statement)."""

        async def op(conn: Conn) -> None:
            await conn.execute(
                "UPDATE chunks SET stored = true WHERE id = ANY($1::bigint[]) AND NOT stored", [r.id for r in refs]
            )

        await self._run(op, tx=False)

    async def commit_small_many(
        self,
        user: str,
        items: Sequence[SmallFile],
        hashes: Sequence[bytes],
        refs: dict[bytes, ChunkRef],
        *,
        inline_max: int,
        overwrite: bool,
        quota: int | None,
        parents: bool,
        dir_mode: int,
    ) -> SmallBatch:
        """Make the files of ``items`` in one transaction (see
        :meth:`ferry.store.api.ChunkStorage.store_small_many`); ``hashes[i]`` is the BLAKE3 hash of
        ``items[i].data``. The chunks of files over ``inline_max`` bytes must be stored already, their
        refs in ``refs`` by hash; the smaller ones are claimed inline here. Raises
        :class:`ChunkGone` if one of ``refs`` was swept meanwhile (claim them again)."""
        owner = await self.owner_id(user)
        checked: list[Parts | RemoteError] = []
        for it in items:
            try:
                path = check_parts(it.path)
                checked.append(
                    path if path else ErrorCode.BAD_PATH.error("an upload needs a file name, not your home folder")
                )
            except RemoteError as exc:
                checked.append(exc)

        async def op(conn: Conn) -> SmallBatch:
            used = await self._lock_owner(conn, owner)
            # One walk along every item's whole path finds what is at it and the folder it goes in.
            full = list(dict.fromkeys(p for p in checked if isinstance(p, tuple)))
            found = await conn.fetch(_WALK_MANY, owner, ["/".join(p) for p in full], 0)
            folder_of: dict[Parts, int | RemoteError] = {}
            # What is at each name as the items are taken in order: ("node", id, size) as found,
            # ("dir",) a folder, ("item", index) a file of this batch.
            state: dict[tuple[int, str], tuple[Any, ...]] = {}
            found_ids: dict[tuple[int, str], int] = {}
            absent: list[Parts] = []  # folders that are missing
            for whole, row in zip(full, found, strict=True):
                depth, kind = row["depth"], row["kind"]
                if depth == len(whole):
                    at = (row["parent_id"], whole[-1])
                    folder_of[whole[:-1]] = row["parent_id"]
                    state[at] = ("dir",) if kind == "d" else ("node", row["id"], row["size"])
                    found_ids[at] = row["id"]
                elif kind != "d":
                    folder_of.setdefault(
                        whole[:-1], ErrorCode.NOT_A_DIRECTORY.error(f"{show(whole[:depth])} is not a folder")
                    )
                elif depth == len(whole) - 1:
                    folder_of[whole[:-1]] = row["id"]
                else:
                    absent.append(whole[:-1])
            if absent:  # made here with ``parents`` (the files in them are new), else not-found
                folder_of.update(
                    await self._folders(
                        conn, owner, absent, create=parents, mode=dir_mode, exact_file="not-a-directory"
                    )
                )
            results: list[int | RemoteError] = []
            keys: list[tuple[int, str] | None] = []  # (folder node, name) of each item still in play
            for p in checked:
                where = p if isinstance(p, RemoteError) else folder_of[p[:-1]]
                if isinstance(where, RemoteError):
                    results.append(where)
                    keys.append(None)
                else:
                    assert isinstance(p, tuple)
                    results.append(0)
                    keys.append((where, p[-1]))
            batch = SmallBatch(results)
            delta = 0
            for i, key in enumerate(keys):
                if key is None:
                    continue
                path = checked[i]
                assert isinstance(path, tuple)
                cur = state.get(key)
                if cur is not None and cur[0] == "dir":
                    results[i] = ErrorCode.IS_A_DIRECTORY.error(f"{show(path)} is a folder")
                    continue
                if cur is not None and not overwrite:
                    results[i] = ErrorCode.EXISTS.error(f"{show(path)} already exists")
                    continue
                if cur is None:
                    replaced = 0
                elif cur[0] == "node":
                    replaced = int(cur[2])
                else:
                    replaced = len(items[cur[1]].data)
                size = len(items[i].data)
                if quota is not None and used + delta - replaced + size > quota:
                    batch.fatal = _quota_error(path, size, used + delta - replaced, quota)
                    for j in range(i, len(results)):
                        results[j] = batch.fatal
                    break
                delta += size - replaced
                results[i] = replaced
                state[key] = ("item", i)
            # The final state: the files found that are replaced, the items that become files.
            doomed = [node for key, node in found_ids.items() if state[key][0] == "item"]
            placed = [v[1] for v in state.values() if v[0] == "item"]
            freed = files_gone = 0
            if doomed:
                # Apart from the insert below: a row deleted and a row inserted under the same name
                # in one statement would race inside it.
                gone = await conn.fetchrow(
                    "WITH d AS (DELETE FROM nodes WHERE id = ANY($1::bigint[]) RETURNING id, size), "
                    "t AS (UPDATE chunks SET last_ref = now() WHERE id IN ("
                    "SELECT chunk_id FROM file_chunks WHERE node_id = ANY($1::bigint[])) RETURNING 1) "
                    "SELECT coalesce(sum(size), 0)::bigint AS freed, count(*) AS files FROM d",
                    doomed,
                )
                assert gone is not None
                freed, files_gone = int(gone["freed"]), int(gone["files"])
            inline = {hashes[i]: items[i].data for i in placed if len(items[i].data) <= inline_max}
            place = [k for k in (keys[i] for i in placed) if k is not None]
            if not placed:  # nothing to make (and so nothing replaced)
                batch.stored = batch.bytes = batch.delta = 0
                return batch
            made = await conn.fetch(
                _COMMIT_MANY,
                owner,
                list(inline),
                list(inline.values()),
                [k[0] for k in place],
                [k[1] for k in place],
                [len(items[i].data) for i in placed],
                [_ns(items[i].mtime) for i in placed],
                [items[i].mode & 0o777 for i in placed],
                [tree_digest("blake3", len(items[i].data), [hashes[i]]) for i in placed],
                [hashes[i] for i in placed],
                [refs[hashes[i]].id if hashes[i] in refs else None for i in placed],
                -freed,
                -files_gone,
            )
            made_keys = {(r["parent_id"], r["name"]) for r in made}
            added = 0
            for i in placed:
                key, path = keys[i], checked[i]
                assert key is not None and isinstance(path, tuple)
                if key not in made_keys:  # a folder or file made meanwhile by another server (mkdir)
                    results[i] = ErrorCode.EXISTS.error(f"{show(path)} already exists")
                    continue
                added += len(items[i].data)
            batch.stored = sum(isinstance(r, int) for r in results)
            batch.bytes = sum(len(items[i].data) for i, r in enumerate(results) if isinstance(r, int))
            batch.delta = added - freed
            return batch

        try:
            return await self._run(op)
        except asyncpg.exceptions.ForeignKeyViolationError as exc:
            if not refs:  # inline claims are made in the same transaction: they cannot be swept
                raise
            raise ChunkGone(next(iter(refs.values()))) from exc

    async def read_small_many(
        self, user: str, paths: Sequence[Parts], *, max_size: int
    ) -> list[tuple[Node, ChunkRef | None] | RemoteError]:
        """Per path the file's node and, if it is at most ``max_size`` bytes, its one chunk (with the
        bytes if inline); or the path's error. One query, one snapshot."""
        owner = await self.owner_id(user)
        checked: list[Parts | RemoteError] = []
        for path in paths:
            try:
                checked.append(check_parts(path))
            except RemoteError as exc:
                checked.append(exc)
        wanted = [p for p in checked if isinstance(p, tuple)]

        async def op(conn: Conn) -> list[asyncpg.Record]:
            return list(await conn.fetch(_WALK_MANY, owner, ["/".join(p) for p in wanted], max_size))

        rows = iter(await self._run(op, tx=False) if wanted else [])
        out: list[tuple[Node, ChunkRef | None] | RemoteError] = []
        for item in checked:
            if isinstance(item, RemoteError):
                out.append(item)
                continue
            path, row = item, next(rows)
            depth = row["depth"]
            if depth < len(path):
                out.append(
                    ErrorCode.NOT_A_DIRECTORY.error(f"{show(path[:depth])} is not a folder")
                    if row["kind"] != "d"
                    else ErrorCode.NOT_FOUND.error(f"{show(path)}: no such file or folder")
                )
            elif row["kind"] == "d":
                out.append(ErrorCode.IS_A_DIRECTORY.error(f"{show(path)} is a folder, not a file"))
            else:
                ref = None
                if row["chunk_id"] is not None:
                    ref = ChunkRef(row["chunk_id"], owner, row["hash"], row["chunk_size"], data=row["data"])
                elif row["size"] <= max_size:
                    out.append(ErrorCode.CORRUPT.error(f"{show(path)}: the file's chunk list is missing"))
                    continue
                out.append((_node(row), ref))
        return out

    # -- the sweeper's database half ----------------------------------------------------------------

    async def expire_uploads(self, max_age: float) -> int:
        """Delete partial uploads untouched for ``max_age`` seconds; returns how many."""

        async def op(conn: Conn) -> int:
            rows = await conn.fetch(
                "DELETE FROM uploads WHERE touched_at < now() - make_interval(secs => $1) RETURNING id",
                max_age,
            )
            return len(rows)

        return await self._run(op, tx=False)

    async def unreferenced_chunks(self, grace: float, limit: int = 500) -> list[ChunkRef]:
        """Up to ``limit`` chunks that no file and no upload references, untouched for ``grace`` seconds."""

        async def op(conn: Conn) -> list[ChunkRef]:
            rows = await conn.fetch(
                "SELECT id, owner_id, hash, size, stored FROM chunks c "
                "WHERE last_ref < now() - make_interval(secs => $1) "
                "AND NOT EXISTS (SELECT 1 FROM file_chunks WHERE chunk_id = c.id) "
                "AND NOT EXISTS (SELECT 1 FROM upload_chunks WHERE chunk_id = c.id) "
                "ORDER BY id LIMIT $2",
                grace,
                limit,
            )
            return [ChunkRef(r["id"], r["owner_id"], r["hash"], r["size"], r["stored"]) for r in rows]

        return await self._run(op, tx=False)

    async def forget_chunk(self, ref: ChunkRef, grace: float) -> Forgotten:
        """Delete the chunk's row if it is still unreferenced and untouched for ``grace`` seconds.
        ``"object"``: deleted, and its object may now be deleted (then, and only then);
        ``"inline"``: deleted, its bytes were in the row (no object to delete); ``"kept"``: not
        deleted. A reference taken meanwhile, even one not yet committed, makes the foreign key
        refuse the delete."""

        async def op(conn: Conn) -> Forgotten:
            try:
                inline = await conn.fetchval(
                    "DELETE FROM chunks WHERE id = $1 AND last_ref < now() - make_interval(secs => $2) "
                    "RETURNING data IS NOT NULL",
                    ref.id,
                    grace,
                )
            except asyncpg.exceptions.ForeignKeyViolationError:
                return "kept"
            if inline is None:
                return "kept"
            return "inline" if inline else "object"

        return await self._run(op, tx=False)

    async def known_chunk_ids(self, ids: Sequence[int]) -> set[int]:
        """Which of ``ids`` have a chunk row (the sweeper's check for orphaned objects)."""

        async def op(conn: Conn) -> set[int]:
            rows = await conn.fetch("SELECT id FROM chunks WHERE id = ANY($1::bigint[])", list(ids))
            return {int(r["id"]) for r in rows}

        return await self._run(op, tx=False)


async def holds_namespace(dsn: str) -> bool:
    """Whether the database at ``dsn`` holds an object-backend namespace (else: accounts only)."""
    try:
        probe = await asyncpg.connect(dsn, timeout=10.0)
    except _CONNECTION_ERRORS as exc:
        raise _db_down(exc) from exc
    try:
        return bool(await probe.fetchval("SELECT to_regclass('owners') IS NOT NULL"))
    finally:
        await probe.close()


async def empty_home_in(dsn: str, user: str) -> tuple[int, int]:
    """:meth:`Namespace.empty_home` in the database at ``dsn`` (``ferry user del --remove-home --db``)."""
    ns = await Namespace.connect(dsn, min_size=1, max_size=1)
    try:
        return await ns.empty_home(user)
    finally:
        await ns.close()


#: What :meth:`Namespace.forget_chunk` did.
Forgotten = Literal["kept", "object", "inline"]


class ChunkGone(Exception):
    """A chunk row was swept between its claim and the commit that references it (claim it again)."""

    def __init__(self, ref: ChunkRef) -> None:
        super().__init__(f"chunk {ref.id} was swept before it was referenced")
        self.ref = ref


def _missing(rows: Sequence[asyncpg.Record], path: Parts) -> RemoteError:
    """The error for a walk that stopped at ``rows[-1]`` short of ``path``."""
    depth = len(rows) - 1
    if rows and rows[-1]["kind"] != "d":
        return ErrorCode.NOT_A_DIRECTORY.error(f"{show(path[:depth])} is not a folder")
    return ErrorCode.NOT_FOUND.error(f"{show(path)}: no such file or folder")


def _exists(path: Parts, kind: Any) -> RemoteError:
    if kind == "d":
        return ErrorCode.EXISTS.error(f"{show(path)} already exists")
    return ErrorCode.EXISTS.error(f"{show(path)} already exists and is not a folder")


def _db_down(exc: BaseException) -> RemoteError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ErrorCode.UNAVAILABLE.error(
        f"the database is unavailable ({first[:300]}); nothing acknowledged was lost, try again later"
    )
