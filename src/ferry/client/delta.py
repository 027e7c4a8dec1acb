"""Delta transfers of one file on the client, both directions (``GetChunks`` + ``DeltaPut``,
``DeltaGet`` + ``Chunks``), used by ``ferry sync``, ``get -r`` / ``put -r`` and ``get -z`` / ``put -z``.

Upload: the client chunks its file while the server lists the chunks of its copy, then streams
ops (copy these basis chunks, here is a literal chunk) that the server assembles and verifies
(:mod:`ferry.server.delta`). Download: the client offers its old version and an interrupted
download's partial as basis, and assembles what the server streams into the partial file,
verified against the content digest before it is renamed into place (:mod:`ferry.delta`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import stat as statmod
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry import cdc
from ferry.aio import close_after
from ferry.client.mux import Mux
from ferry.client.transfer import raise_if_refused
from ferry.delta import Assembler, BasisFile, DeltaEncoder, basis_id
from ferry.errors import ConnectionBroken, NotFound, RemoteError, TransferError
from ferry.fskit import partial_name
from ferry.textsafe import safe_name
from ferry.wire import messages as m
from ferry.wire.codes import ErrorCode, from_wire

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Moved:
    """What one delta transfer moved: ``literal`` bytes of content the receiver lacked, in ``wire``
    bytes of payload (less with compression)."""

    literal: int
    wire: int




def delta_refused(exc: BaseException) -> bool:
    """True if ``exc`` is a server's refusal of the delta requests themselves (``invalid``: a
    server, or a storage backend, that does not do delta transfers): the caller sends the file
    whole instead. Nothing was changed on either side."""
    return isinstance(exc, RemoteError) and exc.code == ErrorCode.INVALID


async def get_chunks(mux: Mux, path: str, width: int = cdc.BASIS_WIDTH) -> bytes | None:
    """The server's chunk hashes of ``path``, each cut to ``width`` bytes (None if it has no such
    file)."""
    req_id, route = mux.open(8)
    parts: list[bytes] = []
    try:
        await mux.send(m.GetChunks(id=req_id, path=path, width=width))
        while True:
            ev = await mux.recv(route)
            if isinstance(ev, m.Error):
                err = from_wire(ev)
                if isinstance(err, NotFound):
                    return None
                raise err
            if not isinstance(ev, m.Chunks) or ev.width != width or len(ev.hashes) % width:
                raise ConnectionBroken("the server sent a malformed chunk list")
            parts.append(ev.hashes)
            if ev.end:
                return b"".join(parts)
    finally:
        mux.close_route(req_id)


async def delta_put(
    mux: Mux,
    local: Path,
    remote: str,
    *,
    use_basis: bool = True,
    compress: bool = False,
    progress: Progress | None = None,
) -> Moved:
    """Upload ``local`` as ``remote``, sending only the chunks the server's copy lacks (all of them
    without a basis). Returns what moved. Raises ``changed`` errors when either side's
    file changed meanwhile (the server keeps its old version)."""
    from ferry.client.transfer import upload_token

    loop = asyncio.get_running_loop()
    try:
        fd = os.open(local, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise TransferError(f"{safe_name(str(local))}: {exc.strerror or exc}") from exc
    job: asyncio.Future[Any] | None = None
    try:
        st = os.fstat(fd)
        if not statmod.S_ISREG(st.st_mode):
            raise TransferError(f"{safe_name(str(local))}: not a regular file")
        index: cdc.ChunkIndex | None = None
        hashes: bytes | None = None
        width = cdc.BASIS_WIDTH
        if use_basis:
            # Chunk our file while the server lists its own (the two big reads overlap); once its
            # list is here, the rest is chunked as it is sent.
            stop = threading.Event()
            job = loop.run_in_executor(None, functools.partial(cdc.index_fd, fd, st.st_size, stop=stop))
            try:
                hashes = await get_chunks(mux, remote, width)
            finally:
                stop.set()
                index = await asyncio.shield(job)
                job = None
        enc = DeltaEncoder(fd, st.st_size, hashes or b"", width=width, compress=compress, index=index)
        req_id, route = mux.open(8)
        ended = False
        try:
            await mux.send(
                m.DeltaPut(
                    id=req_id,
                    path=remote,
                    size=st.st_size,
                    mtime=m.wire_time(st.st_mtime),
                    mode=statmod.S_IMODE(st.st_mode),
                    basis=basis_id(hashes) if hashes else b"",
                    token=upload_token(remote, st),
                    width=width,
                )
            )
            job = loop.run_in_executor(None, enc.next_batch)
            while True:
                assert job is not None
                batch, done = await asyncio.shield(job)
                job = None
                if not done:  # chunk and hash the next batch while this one is sent
                    job = loop.run_in_executor(None, enc.next_batch)
                if not route.queue.empty():  # the server gave up (quota, basis changed, ...)
                    ended = True
                    raise_if_refused(route)
                digest = b""
                if done:
                    if cdc.stat_key(os.fstat(fd)) != cdc.stat_key(st):
                        raise cdc.FileChanged(f"{safe_name(str(local))} changed while it was being sent")
                    digest = enc.digest
                await mux.send(
                    m.DeltaData(id=req_id, ops=batch.ops, data=bytes(batch.data), end=done, digest=digest)
                )
                if progress is not None:
                    progress(enc.copied + enc.literal, st.st_size)
                if done:
                    break
            reply = await mux.recv(route)
            ended = True
            if isinstance(reply, m.Error):
                raise from_wire(reply)
        except BaseException:
            if not ended:
                await mux.cancel(req_id)
            raise
        finally:
            mux.close_route(req_id)
        return Moved(enc.literal, enc.wire)
    finally:
        close_after(job, lambda: os.close(fd))


# --- pulling -----------------------------------------------------------------------------------------


def _index_of(fd: int) -> cdc.ChunkIndex:
    return cdc.index_fd(fd, os.fstat(fd).st_size)


async def delta_get(
    mux: Mux,
    remote: str,
    dest: Path,
    *,
    use_basis: bool = True,
    compress: bool = False,
    progress: Progress | None = None,
) -> Moved:
    """Download ``remote`` to ``dest``, receiving only the chunks that neither the old ``dest`` (unless
    ``use_basis`` is False) nor an interrupted download's partial already hold. Returns the literal
    bytes received and what they took on the wire.

    The new version is built in ``dest``'s partial file (``.NAME.ferry-part-TOKEN``, locked as a plain
    ``get`` locks it), verified against the server's content digest, and renamed into place. A
    partial left by an interrupted download is moved aside first and used as a second basis: what
    arrived before is not sent again, whichever kind of download left it.
    """
    from ferry.client.transfer import _open_partial, partial_path

    loop = asyncio.get_running_loop()
    part = partial_path(dest)
    aside = dest.with_name(partial_name(dest.name, "old"))
    fds: list[int] = []
    basis: list[BasisFile] = []
    out = -1
    job: asyncio.Future[Any] | None = None
    try:
        try:
            old_part = _open_partial(part, dest)
        except OSError as exc:
            raise TransferError(f"cannot write {safe_name(str(dest))}: {exc.strerror or exc}") from exc
        fds.append(old_part)
        moved_aside = False
        if os.fstat(old_part).st_size:
            os.replace(part, aside)  # the lock moves with the file; a new partial takes the name
            moved_aside = True
            out = _open_partial(part, dest)
        else:
            aside.unlink(missing_ok=True)  # a stale one from a run killed after the move
            out, old_part = old_part, -1
            fds.remove(out)
        if use_basis:
            with contextlib.suppress(OSError):
                fds.append(os.open(dest, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC))
        for fd in fds:
            if statmod.S_ISREG(os.fstat(fd).st_mode):
                basis.append(BasisFile(fd, await loop.run_in_executor(None, _index_of, fd)))
        width = cdc.BASIS_WIDTH
        offered = b"".join(cdc.truncate(b.index.hashes, width) for b in basis)
        step = m.CHUNKS_PAGE * width
        req_id, route = mux.open(8)
        ended = False
        try:
            await mux.send(m.DeltaGet(id=req_id, path=remote, compress=compress, width=width))
            for i in range(0, max(len(offered), 1), step):
                page = offered[i : i + step]
                await mux.send(m.Chunks(id=req_id, hashes=page, end=i + step >= len(offered), width=width))
            info = await mux.recv(route)
            if isinstance(info, m.Error):
                ended = True
                err = from_wire(info)
                if moved_aside and delta_refused(err):
                    # Nothing was written: the interrupted download's partial goes back in its
                    # place, for the whole-file download the caller falls back to to resume.
                    os.replace(aside, part)
                raise err
            if not isinstance(info, m.FileInfo):
                raise ConnectionBroken(f"unexpected {type(info).__name__} in a delta download")
            asm = Assembler(out, info.size, basis)
            os.ftruncate(out, 0)
            while True:
                ev = await mux.recv(route)
                if isinstance(ev, m.Error):
                    ended = True
                    raise from_wire(ev)
                if not isinstance(ev, m.DeltaData):
                    raise ConnectionBroken(f"unexpected {type(ev).__name__} in a delta download")
                job = loop.run_in_executor(None, asm.apply, ev.ops, ev.data)
                await asyncio.shield(job)
                job = None
                if progress is not None:
                    progress(asm.pos, info.size)
                if ev.end:
                    ended = True
                    job = loop.run_in_executor(None, _seal, asm, ev.digest, out, info)
                    await asyncio.shield(job)
                    job = None
                    break
        except BaseException:
            if not ended:
                await mux.cancel(req_id)
            raise
        finally:
            mux.close_route(req_id)
        os.replace(part, dest)  # only now does the new version appear
        aside.unlink(missing_ok=True)
        return Moved(asm.received, asm.wire)
    finally:

        def release() -> None:
            for fd in (*fds, out):
                if fd >= 0:
                    os.close(fd)

        close_after(job, release)


def _seal(asm: Assembler, digest: bytes, fd: int, info: m.FileInfo) -> None:
    asm.finish(digest)
    os.fchmod(fd, info.mode & 0o777 or 0o644)
    os.utime(fd, (info.mtime, info.mtime))
    os.fsync(fd)
