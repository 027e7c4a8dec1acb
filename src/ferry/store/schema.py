"""The object backend's PostgreSQL schema and its migrations.

The version lives in ``ferry_meta`` (key ``schema_version``). :func:`migrate` brings a database to
:data:`SCHEMA_VERSION` in one transaction, under an advisory lock so N servers starting together
migrate once; a database written by a newer ferry is refused (an older server must not half-understand
it). A new version appends a step to :data:`MIGRATIONS`: steps are additive and never edited.

Tables (version 1):

``owners``        one row per user: ``used`` bytes and ``files`` in committed files. Every change of
                  usage locks this row first, so usage and quota checks are exact across servers.
``nodes``         the tree: folders and files, ``parent_id`` + ``name`` unique (the constraint decides
                  races between servers), the home is the node with no parent. Names sort in code-point
                  order (``COLLATE "C"``), for paging.
``chunks``        one row per stored chunk per owner (``owner_id`` + ``hash`` unique: de-duplication
                  within a user). ``stored`` turns true once its object is written; ``last_ref`` is
                  bumped whenever a reference is taken or dropped; the sweeper deletes rows that nothing
                  references and that were not touched for a grace period.
``file_chunks``   the chunk list of each file (``idx`` order).
``uploads``       partial uploads, one per (folder, name, token), with their announced size (reserved
                  against the quota while ``touched_at`` is recent).
``upload_chunks`` chunks stored so far for each partial upload (resume through any server).

Version 2: ``chunks.data`` holds the bytes of a chunk of at most :data:`ferry.store.api.INLINE_MAX`
bytes (an *inline* chunk: no object in the store; the row is ``stored`` from its first insert). The
same id, hash, owner and reference rules apply to both kinds, so de-duplication, usage, quotas and
the sweeper do not tell them apart; only reading (the bytes come with the row) and the sweeper's
object delete (none to delete) do.

References from ``file_chunks`` and ``upload_chunks`` to ``chunks`` are foreign keys without cascade:
PostgreSQL itself refuses to delete a chunk row that a committed or in-flight transaction references,
which is what makes the sweeper safe against a concurrent upload of the same content.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from ferry.wire.codes import ErrorCode

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    #: A pooled connection (what the store's operations receive; generic only in asyncpg's stubs).
    Conn = PoolConnectionProxy[asyncpg.Record]

#: The schema this code reads and writes.
SCHEMA_VERSION: Final = 2

_V1: Final = """
CREATE TABLE owners (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL UNIQUE,
    used bigint NOT NULL DEFAULT 0 CHECK (used >= 0),
    files bigint NOT NULL DEFAULT 0 CHECK (files >= 0),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE nodes (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner_id bigint NOT NULL REFERENCES owners (id) ON DELETE CASCADE,
    parent_id bigint REFERENCES nodes (id) ON DELETE CASCADE,
    name text COLLATE "C" NOT NULL,
    kind text NOT NULL CHECK (kind IN ('d', 'f')),
    size bigint NOT NULL DEFAULT 0 CHECK (size >= 0),
    mtime_ns bigint NOT NULL,
    mode integer NOT NULL,
    digest bytea,
    CONSTRAINT nodes_name_unique UNIQUE (parent_id, name),
    CONSTRAINT nodes_home_unnamed CHECK ((parent_id IS NULL) = (name = ''))
);
CREATE UNIQUE INDEX nodes_one_home ON nodes (owner_id) WHERE parent_id IS NULL;
CREATE TABLE chunks (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner_id bigint NOT NULL REFERENCES owners (id),
    hash bytea NOT NULL,
    size integer NOT NULL CHECK (size >= 0),
    stored boolean NOT NULL DEFAULT false,
    last_ref timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT chunks_content_unique UNIQUE (owner_id, hash)
);
CREATE INDEX chunks_last_ref ON chunks (last_ref);
CREATE TABLE file_chunks (
    node_id bigint NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    idx integer NOT NULL,
    chunk_id bigint NOT NULL REFERENCES chunks (id),
    PRIMARY KEY (node_id, idx)
);
CREATE INDEX file_chunks_chunk ON file_chunks (chunk_id);
CREATE TABLE uploads (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner_id bigint NOT NULL REFERENCES owners (id) ON DELETE CASCADE,
    parent_id bigint NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    name text COLLATE "C" NOT NULL,
    token text NOT NULL,
    size bigint NOT NULL CHECK (size >= 0),
    mode integer NOT NULL,
    mtime_ns bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    touched_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT uploads_token_unique UNIQUE (parent_id, name, token)
);
CREATE INDEX uploads_owner ON uploads (owner_id);
CREATE INDEX uploads_touched ON uploads (touched_at);
CREATE TABLE upload_chunks (
    upload_id bigint NOT NULL REFERENCES uploads (id) ON DELETE CASCADE,
    idx integer NOT NULL,
    chunk_id bigint NOT NULL REFERENCES chunks (id),
    PRIMARY KEY (upload_id, idx)
);
CREATE INDEX upload_chunks_chunk ON upload_chunks (chunk_id);
"""

# Inline chunks. Existing rows keep data NULL (their objects stay in the store). A row with data is
# always stored; its size is its bytes' (what a read checks, with the hash).
_V2: Final = """
ALTER TABLE chunks ADD COLUMN data bytea;
ALTER TABLE chunks ADD CONSTRAINT chunks_inline_stored
    CHECK (data IS NULL OR (stored AND octet_length(data) = size));
"""

#: ``MIGRATIONS[n]`` takes a database from version ``n`` to ``n + 1``.
MIGRATIONS: Final[tuple[str, ...]] = (_V1, _V2)

# An arbitrary constant: the advisory lock that serialises migrations of one database.
_LOCK_KEY: Final = 0x66657272  # "ferr"


async def schema_version(conn: Conn) -> int:
    """The version of the schema in the database (0: none yet)."""
    exists = await conn.fetchval("SELECT to_regclass('ferry_meta') IS NOT NULL")
    if not exists:
        return 0
    value = await conn.fetchval("SELECT value FROM ferry_meta WHERE key = 'schema_version'")
    return int(value) if value is not None else 0


async def migrate(conn: Conn, target: int = SCHEMA_VERSION) -> int:
    """Bring the database to version ``target`` (default: this code's); returns the version found."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS ferry_meta (key text PRIMARY KEY, value text NOT NULL)"
        )
        found = await schema_version(conn)
        if found > len(MIGRATIONS):
            raise ErrorCode.UNAVAILABLE.error(
                f"the database holds ferry schema version {found}, newer than this ferry understands "
                f"({SCHEMA_VERSION}); upgrade this server"
            )
        for step in range(found, target):
            await conn.execute(MIGRATIONS[step])
        if target > found:
            await conn.execute(
                "INSERT INTO ferry_meta (key, value) VALUES ('schema_version', $1) "
                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                str(target),
            )
    return found
