"""Removes stale partial uploads: hidden ``.NAME.ferry-part-TOKEN`` files nobody came back to resume.

An interrupted upload keeps its verified partial so that the same ``ferry put`` can continue later
(see ferry.server.transfer). A client that never returns would leave it for ever, holding disk space
and quota. The server sweeps every home periodically and deletes partials whose last write is older
than ``Limits.partial_max_age``, except those an upload is writing right now.

The walk never follows a symlink and deletes through directory descriptors
(:meth:`~ferry.server.jail.Jail.folder_walk` + ``unlink(dir_fd=...)``), so a folder swapped for a
symlink while the sweep runs cannot make it delete anything outside the home; it is iterative, with
a bounded number of open descriptors, so no tree is too deep for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections.abc import Collection
from dataclasses import dataclass

from ferry.errors import FerryError
from ferry.fskit import is_partial_name
from ferry.server.context import ServerContext
from ferry.server.jail import Jail


@dataclass(frozen=True)
class SweepResult:
    """What one sweep of one home removed."""

    files: int = 0
    bytes: int = 0
    paths: tuple[str, ...] = ()  #: the home-relative paths of the partials removed


def sweep_home(home: str, max_age: float, active: Collection[str], now: float | None = None) -> SweepResult:
    """Delete partial uploads under ``home`` last written more than ``max_age`` seconds ago.

    ``active`` holds the home-relative paths (``a/b/.f.ferry-part-T``) of partials an upload is
    writing now; they are kept whatever their age. Errors on single entries (a file that vanished, a
    folder we may not read) are skipped: the next sweep tries again.
    """
    cutoff = (time.time() if now is None else now) - max_age
    files = nbytes = 0
    paths: list[str] = []
    try:
        # The jail's walk, not os.fwalk: that one recurses (a tree ~1,000 levels deep raised
        # RecursionError and stopped the sweep of every later home) and keeps a descriptor per level.
        with Jail(home) as jail, contextlib.closing(jail.folder_walk()) as walk:
            for rel_dir, dirfd, names in walk:
                for name in names:
                    if not is_partial_name(name):
                        continue
                    rel = f"{rel_dir}/{name}" if rel_dir else name
                    if rel in active:
                        continue
                    with contextlib.suppress(OSError):
                        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                        # Only regular files: a symlink or fifo named like a partial is not ours.
                        if not stat.S_ISREG(st.st_mode) or st.st_mtime >= cutoff:
                            continue
                        os.unlink(name, dir_fd=dirfd)
                        files += 1
                        nbytes += st.st_size
                        paths.append(rel)
    except (OSError, FerryError):
        pass  # the home itself vanished or is unreadable: nothing to sweep
    return SweepResult(files, nbytes, tuple(paths))


async def sweep_once(ctx: ServerContext) -> SweepResult:
    """Sweep every user's home once (in a worker thread); log and account what was removed."""
    max_age = ctx.limits.partial_max_age
    if max_age <= 0:
        return SweepResult()
    total_files = total_bytes = 0
    for user in ctx.accounts.list():
        home = os.fspath(user.home)
        # Snapshot the partials being written now (on the loop thread, where uploads register).
        active = set(ctx.uploads_in(home))
        result = await asyncio.to_thread(sweep_home, home, max_age, active)
        for path in result.paths:
            ctx.usage.claim(user.name, path)  # no longer held: the quota has that room again
        if result.files:
            ctx.log.info(
                "sweep user=%s removed=%d stale partial uploads bytes=%d older_than_days=%g",
                user.name,
                result.files,
                result.bytes,
                max_age / 86400,
            )
        total_files += result.files
        total_bytes += result.bytes
    return SweepResult(total_files, total_bytes)


async def sweep_forever(ctx: ServerContext, first_delay: float = 1.0) -> None:
    """Sweep soon after start, then every ``Limits.sweep_interval`` seconds, until cancelled."""
    delay = first_delay
    while True:
        await asyncio.sleep(delay)
        delay = ctx.limits.sweep_interval
        try:
            await sweep_once(ctx)
        except Exception as exc:  # a sweep must never take the server down; say why and go on
            ctx.log.warning("sweep of stale partial uploads failed: %r", exc)
