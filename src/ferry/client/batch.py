"""Pipelined transfers of many small files: one shared event queue, no task per file.

A 10,000-file tree is dominated by per-file overhead. Here the requests of a window of files are in
flight at once and their replies (which the server sends in order) are consumed by one loop: no
task, semaphore, timeout or queue per file. Each file is still verified (size, chunk hashes,
digest) and written atomically (a hidden temp file renamed into place).
"""

from __future__ import annotations

import os
import secrets
import stat as statmod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ferry.errors import IntegrityError, TransferError
from ferry.hashing import DEFAULT_CHUNK, ChunkHasher, HashName
from ferry.wire import Data
from ferry.wire import messages as m
from ferry.wire.codes import from_wire

if TYPE_CHECKING:
    from ferry.client.aclient import AsyncClient

#: Files larger than this (at reply time) are cancelled here and fetched by the streaming path:
#: the batch keeps whole small files in memory (window x this, at most).
BATCH_MAX = 1 << 18
WINDOW = 128


@dataclass
class _Get:
    remote: str
    dest: Path
    info: m.FileInfo | None = None
    chunks: list[bytes] = field(default_factory=list)


def write_atomically(dest: Path, data: bytes, mode: int, mtime: float) -> None:
    """Write ``data`` to a hidden temp file next to ``dest`` and rename it into place."""
    tmp = dest.with_name(f".{dest.name}.ferry-part-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, mode & 0o777 or 0o644)
        os.utime(fd, (mtime, mtime))
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, dest)


async def get_small_files(
    client: AsyncClient,
    items: list[tuple[str, Path]],
    *,
    hash: HashName = "blake3",
    window: int = WINDOW,
    on_file: Callable[[int], None] | None = None,
) -> list[tuple[str, Path]]:
    """Download ``(remote, dest)`` pairs; returns the ones that turned out too big for a batch."""
    from ferry.client.aclient import _Route

    route = _Route(0)  # unbounded, but at most ``window`` small files are in flight
    pending: dict[int, _Get] = {}
    too_big: list[tuple[str, Path]] = []
    todo: Iterator[tuple[str, Path]] = iter(items)

    async def fill() -> None:
        while len(pending) < window:
            item = next(todo, None)
            if item is None:
                return
            req_id = client._open_shared(route)
            pending[req_id] = _Get(*item)
            await client.send(m.GetFile(id=req_id, path=item[0], hash=hash))

    try:
        await fill()
        while pending:
            ev = await client._recv(route)
            req_id = ev.channel if isinstance(ev, Data) else ev.id
            st = pending.get(req_id)
            if st is None:
                continue
            if isinstance(ev, Data):
                st.chunks.append(ev.data)
                continue
            if isinstance(ev, m.FileInfo):
                if ev.size > BATCH_MAX:  # grew since the listing: stream it separately
                    await client.send(m.Cancel(id=req_id))
                    client._forget(req_id)
                    del pending[req_id]
                    too_big.append((st.remote, st.dest))
                    await fill()
                else:
                    st.info = ev
                continue
            if isinstance(ev, m.Error):
                raise from_wire(ev)
            assert isinstance(ev, m.FileEnd) and st.info is not None
            data = b"".join(st.chunks)
            hasher = ChunkHasher(hash, DEFAULT_CHUNK)
            hasher.update(data)
            hashes, digest = hasher.finish()
            if len(data) != st.info.size or hashes != ev.chunk_hashes or digest != ev.digest:
                raise IntegrityError(
                    f"{st.remote}: received data does not match the server's hash; run the command again"
                )
            write_atomically(st.dest, data, st.info.mode, st.info.mtime)
            client._forget(req_id)
            del pending[req_id]
            if on_file is not None:
                on_file(len(data))
            await fill()
    finally:
        for req_id in pending:
            client._forget(req_id)
    return too_big


async def put_small_files(
    client: AsyncClient,
    items: list[tuple[Path, str]],
    *,
    hash: HashName = "blake3",
    overwrite: bool = True,
    window: int = WINDOW,
    on_file: Callable[[int], None] | None = None,
) -> list[tuple[Path, str]]:
    """Upload ``(local, remote)`` pairs inline; returns the ones that turned out too big."""
    from ferry.client.aclient import _Route

    route = _Route(0)
    pending: dict[int, tuple[str, int]] = {}
    too_big: list[tuple[Path, str]] = []
    todo: Iterator[tuple[Path, str]] = iter(items)

    async def fill() -> None:
        while len(pending) < window:
            item = next(todo, None)
            if item is None:
                return
            local, remote = item
            fd = os.open(local, os.O_RDONLY | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
                data = os.pread(fd, BATCH_MAX + 1, 0)
            finally:
                os.close(fd)
            if len(data) > BATCH_MAX or not statmod.S_ISREG(st.st_mode):
                too_big.append(item)
                continue
            hasher = ChunkHasher(hash, DEFAULT_CHUNK)
            hasher.update(data)
            _, digest = hasher.finish()
            req_id = client._open_shared(route)
            pending[req_id] = (remote, len(data))
            await client.send(
                m.PutFile(
                    id=req_id,
                    path=remote,
                    size=len(data),
                    mtime=m.wire_time(st.st_mtime),
                    mode=statmod.S_IMODE(st.st_mode),
                    hash=hash,
                    overwrite=overwrite,
                    data=data,
                    digest=digest,
                )
            )

    try:
        await fill()
        while pending:
            ev = await client._recv(route)
            entry = pending.pop(getattr(ev, "id", -1), None)
            if entry is None:
                continue
            client._forget(ev.id)
            if isinstance(ev, m.Error):
                raise from_wire(ev)
            if not isinstance(ev, m.Ok):
                raise TransferError(f"{entry[0]}: unexpected reply {type(ev).__name__} to an upload")
            if on_file is not None:
                on_file(entry[1])
            await fill()
    finally:
        for req_id in pending:
            client._forget(req_id)
    return too_big
