"""Opening the object backend at server start, and its sweeper.

The sweeper of the object backend runs in every server sharing the store (each sweep is a series of
short transactions that are safe to run concurrently, see :mod:`ferry.store.objects`): stale partial
uploads first, then chunks nothing has referenced for ``Limits.chunk_grace`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from ferry.errors import FerryError

if TYPE_CHECKING:
    from ferry.server.context import Limits
    from ferry.store.config import S3Config
    from ferry.store.objects import ObjectStorage


async def open_objects(db: str, store: S3Config) -> ObjectStorage:
    """Connect the namespace (PostgreSQL at ``db``, its schema migrated) and the chunk store, and check
    that the store can be written: an operator hears at start what is wrong, not at the first put."""
    try:
        # Optional dependencies (asyncpg, obstore: the 'scale' extra): imported only for --store, so
        # the folder backend's start pays nothing for them.
        from ferry.store.chunks import ChunkStore
        from ferry.store.namespace import Namespace
        from ferry.store.objects import ObjectStorage
    except ImportError as exc:
        raise FerryError(
            "--store needs the object store clients: pip install 'ferry-transfer[scale]'"
        ) from exc
    # Few retries for the check: an unreachable store should be reported in seconds, not retried for
    # long; the store then serves with the configured retries.
    quick = replace(store, max_retries=1, retry_timeout=5.0, connect_timeout=3.0, request_timeout=10.0)
    where = f"{store.url} at {store.endpoint or 'AWS'}"
    try:
        await ChunkStore.from_config(quick).check()
    except FerryError as exc:
        raise FerryError(f"cannot use the object store {where}: {exc}") from exc
    try:
        # No connection floor: asyncpg restores a floor in the background and logs each failed
        # attempt with a traceback while the database is away; without one, the pool connects on
        # the next request, which then fails with a clear `unavailable` instead.
        namespace = await Namespace.connect(db, min_size=0)
    except FerryError as exc:
        raise FerryError(f"cannot keep the namespace in the database: {exc}") from exc
    return ObjectStorage(namespace, ChunkStore.from_config(store))


async def sweep_objects_forever(
    objects: ObjectStorage, limits: Limits, log: logging.Logger, first_delay: float = 1.0
) -> None:
    """Sweep soon after start, then every ``limits.sweep_interval`` seconds, until cancelled; a failed
    sweep (the database or the store away) is logged and tried again at the next interval."""
    delay = first_delay
    while True:
        await asyncio.sleep(delay)
        delay = limits.sweep_interval
        try:
            report = await objects.sweep(partial_max_age=limits.partial_max_age, grace=limits.chunk_grace)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a sweep must never end the sweeping silently:
            # the store's client reports a Rust panic as a BaseException (pyo3's PanicException)
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            log.warning("object sweep failed (tried again in %gs): %r", limits.sweep_interval, exc)
            continue
        if report.uploads or report.chunks or report.objects:
            log.info(
                "object sweep: %d stale uploads, %d chunk records, %d objects (%d bytes) removed",
                report.uploads,
                report.chunks,
                report.objects,
                report.bytes,
            )
