"""Content-addressed chunk objects in an S3-compatible store (through obstore, the Rust object_store
binding; why obstore: pyproject.toml and bench/store_clients.py).

Key of a chunk: ``PREFIX c/OWNER/BLAKE3HEX.ID``:

* ``OWNER`` is the numeric id of the user owning it: de-duplication is scoped per user, so identical
  chunks of two users are two objects. Shared across users, an upload that "finishes instantly"
  would tell one user that another holds the same file (a known side channel of cross-user
  de-duplication); docs/security.md says so.
* ``BLAKE3HEX`` is the hash of the chunk's bytes, checked on every read.
* ``ID`` is the chunk's record in the namespace database (:mod:`ferry.store.namespace`), never reused.
  A key therefore never comes back after the sweeper deleted it: an upload of the same content after
  a sweep gets a new record and writes a new key, so a late delete of the old key cannot remove the new
  object (the race between a delete on one server and an upload of the same content on another).

Writes are put-if-absent (``If-None-Match: *``): two servers writing the same chunk store it once and
neither fails. Reads verify size and hash before returning a byte, so a missing or damaged object is a
clear :class:`~ferry.errors.ChunkDamaged`, never bad data. Memory is bounded: at most
``concurrency`` requests run at once, each holding one chunk (4 MiB). Transient failures (connection
errors, 5xx, throttling) are retried by obstore with exponential backoff, bounded in count and time;
what still fails is :class:`~ferry.errors.StoreUnavailable` with the store's own words.
"""

from __future__ import annotations

import asyncio
import datetime
import secrets
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Final

import blake3
import obstore
from obstore.exceptions import AlreadyExistsError, PermissionDeniedError, UnauthenticatedError
from obstore.store import S3Store

from ferry.errors import RemoteError
from ferry.store.api import ChunkRef
from ferry.store.config import S3Config
from ferry.wire.codes import ErrorCode

#: Requests in flight per server (each holds at most one chunk in memory).
DEFAULT_CONCURRENCY: Final = 16


@dataclass(frozen=True, slots=True)
class StoredObject:
    """One object found by :meth:`ChunkStore.list_chunks`: its key, size and last write (UTC)."""

    key: str
    size: int
    last_modified: datetime.datetime


def open_store(config: S3Config) -> S3Store:
    """An obstore client for ``config`` (no request is made yet)."""
    retry: Any = {
        "max_retries": config.max_retries,
        "retry_timeout": datetime.timedelta(seconds=config.retry_timeout),
        "backoff": {
            "init_backoff": datetime.timedelta(milliseconds=100),
            "max_backoff": datetime.timedelta(seconds=2),
            "base": 2,
        },
    }
    options: Any = {
        "allow_http": bool(config.endpoint and config.endpoint.startswith("http://")),
        "connect_timeout": datetime.timedelta(seconds=config.connect_timeout),
        "timeout": datetime.timedelta(seconds=config.request_timeout),
    }
    return S3Store(
        config.bucket,
        endpoint=config.endpoint,
        access_key_id=config.access_key,
        secret_access_key=config.secret_key,
        region=config.region,
        # The request is still signed (who may write), but not its body's SHA-256: every chunk is
        # verified against its BLAKE3 hash on every read, so a body changed on its way is caught
        # there (and TLS to the store prevents it). Measured per GiB put (bench by otransfer): server
        # CPU 2.83 -> 1.60 s, the store's 11.1 -> 9.4 s: hashing each body twice was the cost.
        unsigned_payload=True,
        client_options=options,
        retry_config=retry,
    )


class ChunkStore:
    """Chunk objects under ``prefix`` in one bucket (see the module docstring for the key layout)."""

    def __init__(self, store: S3Store, prefix: str = "", *, concurrency: int = DEFAULT_CONCURRENCY) -> None:
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self._store = store
        self.prefix = prefix
        self._slots = asyncio.Semaphore(concurrency)

    @classmethod
    def from_config(cls, config: S3Config, *, concurrency: int = DEFAULT_CONCURRENCY) -> ChunkStore:
        """A chunk store for ``config``."""
        return cls(open_store(config), config.prefix, concurrency=concurrency)

    def key(self, ref: ChunkRef) -> str:
        """The object key of ``ref``."""
        return f"{self.prefix}c/{ref.owner}/{ref.hash.hex()}.{ref.id}"

    def parse_key(self, key: str) -> int | None:
        """The chunk record id in a key made by :meth:`key`, or None for a key that is not a chunk's."""
        if not key.startswith(self.prefix + "c/"):
            return None
        _, _, tail = key.rpartition(".")
        return int(tail) if tail.isdigit() else None

    async def put(self, ref: ChunkRef, data: bytes | memoryview) -> None:
        """Store the chunk unless its object exists already (put-if-absent: a racing writer of the same
        chunk wrote the same bytes, which every read verifies)."""
        key = self.key(ref)
        async with self._slots:
            try:
                await obstore.put_async(self._store, key, data, mode="create")
            except AlreadyExistsError:
                return
            except Exception as exc:
                raise _unavailable("write", key, exc) from exc

    async def get(self, ref: ChunkRef) -> bytes:
        """The chunk's bytes, after checking their size and BLAKE3 hash."""
        key = self.key(ref)
        async with self._slots:
            try:
                result = await obstore.get_async(self._store, key)
                data = bytes(await result.bytes_async())
            except FileNotFoundError as exc:  # obstore raises the built-in for a missing object
                raise ErrorCode.CORRUPT.error(
                    f"chunk {ref.hash.hex()[:16]} is missing from the object store; the file cannot be "
                    "read (nothing was sent); restore it from a copy"
                ) from exc
            except Exception as exc:
                raise _unavailable("read", key, exc) from exc
        return verified(ref, data, "the object store")

    async def check(self) -> None:
        """Write and delete one small object under the prefix: proves that the endpoint answers, the
        bucket exists and the credentials may write (a server checks this before it starts)."""
        key = f"{self.prefix}probe/{secrets.token_hex(8)}"
        async with self._slots:
            try:
                await obstore.put_async(self._store, key, b"ferry")
                await obstore.delete_async(self._store, key)
            except Exception as exc:
                raise ErrorCode.UNAVAILABLE.error(f"a test write of {key} failed: {_why(exc)}") from exc

    async def delete(self, key: str) -> None:
        """Delete one object (already gone is fine)."""
        async with self._slots:
            try:
                await obstore.delete_async(self._store, key)
            except FileNotFoundError:
                return
            except Exception as exc:
                raise _unavailable("delete", key, exc) from exc

    async def list_chunks(self, owner: int | None = None) -> AsyncGenerator[list[StoredObject], None]:
        """Every chunk object (of one ``owner``, or all), page by page (bounded memory)."""
        prefix = f"{self.prefix}c/" if owner is None else f"{self.prefix}c/{owner}/"
        try:
            async for page in obstore.list(self._store, prefix, chunk_size=1000):
                yield [StoredObject(o["path"], o["size"], o["last_modified"]) for o in page]
        except Exception as exc:
            raise _unavailable("list", prefix, exc) from exc


def verified(ref: ChunkRef, data: bytes, where: str) -> bytes:
    """``data`` if its size and BLAKE3 hash are ``ref``'s, else ``corrupt`` (read from ``where``: the
    object store, or the database for an inline chunk)."""
    if len(data) != ref.size or blake3.blake3(data).digest() != ref.hash:
        raise ErrorCode.CORRUPT.error(
            f"chunk {ref.hash.hex()[:16]} in {where} does not match its hash (damaged there); the file "
            "cannot be read (nothing was sent); restore it from a copy"
        )
    return data


def _why(exc: BaseException) -> str:
    """What went wrong with a store request, in a few words."""
    if isinstance(exc, PermissionDeniedError | UnauthenticatedError):
        return "the object store refused our credentials (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"the object store is unavailable ({first[:300]})"


def _unavailable(what: str, key: str, exc: BaseException) -> RemoteError:
    """The error for a store request that failed after obstore's retries."""
    return ErrorCode.UNAVAILABLE.error(f"could not {what} {key}: {_why(exc)}; nothing was lost, try again later")
