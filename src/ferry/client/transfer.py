"""Client side of downloads and uploads: verify, resume, atomic local writes, bounded memory.

Local writes go to ``.NAME.ferry-part-get`` next to the destination and are renamed only after every
chunk hash and the digest match the server's. An interrupted download leaves that partial; the next
``get`` hashes its whole chunks, sends the hashes, and the server continues after the matching ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import stat as statmod
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.cdc import FileChanged, stat_key
from ferry.client.mux import Mux, Route
from ferry.client.receive import DownloadWriter, RawPayload
from ferry.errors import ConnectionBroken, IntegrityError, RemoteError, TransferError, UsageError
from ferry.fskit import RESUME_FLAGS, partial_name
from ferry.hashing import (
    DEFAULT_CHUNK,
    ChunkHasher,
    HashName,
    file_hash_prefix,
    hash_bytes,
    hash_fd_chunks,
    matching_prefix,
    tree_digest,
)
from ferry.wire import Data
from ferry.wire import messages as m
from ferry.wire.codes import from_wire

Progress = Callable[[int, int], None]
BLOCK = 1 << 20
INLINE_MAX = 1 << 18  # files up to 256 KiB travel inside the PutFile message: one frame, no round trip
QUEUE_DEPTH = 64  # data pieces buffered per transfer before the reader pushes back
#: The token of a download's partial file (one per destination: resuming finds it again).
DOWNLOAD_TOKEN = "get"


@dataclass(frozen=True)
class TransferResult:
    """What one transfer did."""

    path: str
    size: int
    sent: int  # bytes that actually crossed the network
    resumed_from: int
    seconds: float
    #: ferry's chunk-tree digest (hex; see ferry.hashing), compared by both sides
    digest: str
    #: the standard hash of the whole file with the transfer's algorithm, hex: what ``b3sum`` or
    #: ``md5sum`` print for it; computed while the data streams, only when asked (``checksum=True``)
    checksum: str | None = None


def partial_path(dest: Path) -> Path:
    """Where the unverified download of ``dest`` is kept: hidden, next to it (same filesystem, so
    the final rename is atomic), named like every partial file (:func:`ferry.fskit.partial_name`,
    which keeps the name within 255 bytes however long the file's own name is)."""
    return dest.with_name(partial_name(dest.name, DOWNLOAD_TOKEN))


async def _thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


# --- download ------------------------------------------------------------------------------


async def get_file(
    mux: Mux,
    remote: str,
    local: str | os.PathLike[str],
    *,
    resume: bool = True,
    hash: HashName = "blake3",
    chunk_size: int = DEFAULT_CHUNK,
    progress: Progress | None = None,
    checksum: bool = False,
) -> TransferResult:
    """Download ``remote`` to ``local`` (a file path, or an existing folder to put it in).

    ``checksum``: also compute the standard whole-file hash (:attr:`TransferResult.checksum`).
    """
    t0 = time.monotonic()
    dest = Path(local)
    if dest.is_dir():
        dest = dest / remote.rstrip("/").rsplit("/", 1)[-1]
    part = partial_path(dest)
    held: list[bytes] = []
    try:
        fd = _open_partial(part, dest)
    except OSError as exc:  # e.g. the local folder does not exist or is not writable
        raise UsageError(f"cannot write {dest}: {exc.strerror}") from exc
    try:
        if resume:
            size = os.fstat(fd).st_size
            n = size // chunk_size
            if n:  # re-check what we hold, chunk by chunk (size alone is not trusted)
                held = await _thread(hash_fd_chunks, fd, hash, chunk_size, 0, n * chunk_size)

        async def start(info: m.FileInfo) -> DownloadWriter:
            offset = info.offset
            os.ftruncate(fd, offset)
            hasher = ChunkHasher(hash, chunk_size, prefix=held[: offset // chunk_size], file_hash=checksum)
            if checksum and offset:  # resumed: the whole-file hash starts at byte 0
                await _thread(file_hash_prefix, hasher, fd, offset)
            return DownloadWriter(fd, offset, hasher, expect=info.size - offset, inline=info.size <= INLINE_MAX)

        try:
            info, writer, end = await fetch(
                mux, remote, hash=hash, chunk_size=chunk_size, held=held, progress=progress, start=start
            )
        except RemoteError:
            if os.fstat(fd).st_size == 0:  # refused (not found, a folder, ...): leave no empty partial
                part.unlink(missing_ok=True)  # before closing: the lock still covers it
            raise
        hashes, digest = writer.hasher.finish()
        if writer.pos != info.size or hashes != end.chunk_hashes or digest != end.digest:
            bad = matching_prefix(hashes, end.chunk_hashes)
            part.unlink(missing_ok=True)  # before closing: the lock still covers it
            raise IntegrityError(
                f"{remote}: received data does not match the server's hash (chunk {bad}); "
                "the bad copy was deleted, run the command again"
            )
        os.fchmod(fd, info.mode & 0o777 or 0o644)
        os.utime(fd, (info.mtime, info.mtime))
        if info.size > INLINE_MAX:  # like the server: no fsync per small file (rename keeps it atomic)
            os.fsync(fd)
        os.replace(part, dest)  # only now does the final name appear
        os.close(fd)  # after the rename: the lock covers the partial until it has a new name
        fd = -1
        offset = info.offset
        return TransferResult(
            remote,
            info.size,
            info.size - offset,
            offset,
            time.monotonic() - t0,
            digest.hex(),
            file_checksum(writer.hasher),
        )
    finally:
        if fd >= 0:
            os.close(fd)


async def fetch(
    mux: Mux,
    remote: str,
    *,
    hash: HashName,
    chunk_size: int,
    held: list[bytes],
    progress: Progress | None,
    start: Callable[[m.FileInfo], Awaitable[DownloadWriter]],
) -> tuple[m.FileInfo, DownloadWriter, m.FileEnd]:
    """The exchange of one download, wherever its bytes go: ask for ``remote`` (offering the
    ``held`` chunk hashes for a resume), let ``start`` make the writer once the server said what
    comes, hand it every byte, and return (the file's info, the flushed writer, the server's
    FileEnd) for the caller to verify. A refusal or an error from the server raises its
    RemoteError; when the download is given up (an error, a cancel) the server is told to stop."""
    req_id, route = mux.open(QUEUE_DEPTH, raw=True)
    writer: DownloadWriter | None = None
    ended = False  # the server finished this request (FileEnd or Error)
    try:
        await mux.send(
            m.GetFile(id=req_id, path=remote, hash=hash, chunk_size=chunk_size, chunk_hashes=held)
        )
        try:
            info = await mux.expect(route, m.FileInfo)
        except RemoteError:
            ended = True  # refused: the server has ended the request
            raise
        writer = await start(info)
        done = info.offset

        def advanced(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, info.size)

        end = await receive_data(mux, route, writer, advanced)
        ended = True
        await writer.flush()
        if isinstance(end, m.Error):
            raise from_wire(end)
        assert isinstance(end, m.FileEnd)
        return info, writer, end
    except BaseException:
        try:
            if not ended:  # given up (progress callback, timeout, cancel): stop the server streaming
                await mux.cancel(req_id)
        finally:  # even if cancelled (again) while sending the Cancel
            if writer is not None:
                await writer.settle()  # its thread must not write to the fd after it is closed
        raise
    finally:
        mux.close_route(req_id)
        if writer is not None:
            writer.close()


async def receive_data(
    mux: Mux, route: Route, writer: DownloadWriter, advanced: Callable[[int], None]
) -> m.Message:
    """Give a download's data to ``writer`` until the server ends it; returns that last message
    (FileEnd or Error). The writer may still be writing: flush it before trusting the hashes."""
    while True:
        ev = await mux.recv(route)
        if isinstance(ev, Data):
            await writer.add(ev.data)
            advanced(len(ev.data))
        elif isinstance(ev, RawPayload):  # the bulk of the file, straight off the transport
            try:
                await writer.take_raw(ev, mux.read_timeout, advanced)
            finally:
                ev.release()
        else:
            assert isinstance(ev, m.Message)
            return ev


def _open_partial(part: Path, dest: Path) -> int:
    """Open (or create) the partial file of a download to ``dest``, locked: a second download to the
    same file at the same time would truncate it under the first (on resume), and the first could
    then rename a file with a hole after verifying only the bytes it received."""
    for _ in range(8):
        try:
            fd = os.open(part, RESUME_FLAGS, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # O_NOFOLLOW: never write through a link planted there
                raise TransferError(
                    f"{dest}: a symbolic link is in the place of its partial download {part.name}; "
                    "ferry does not write through it (remove it)"
                ) from exc
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            st, now = os.fstat(fd), os.stat(part)
            if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                return fd
            # Renamed into place by the download that held the lock until now: open the new one.
        except BlockingIOError:
            os.close(fd)
            raise TransferError(
                f"{dest}: another download to this file is in progress; wait for it or choose another name"
            ) from None
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise TransferError(f"{dest}: its partial file keeps changing; is another download running?")


# --- upload --------------------------------------------------------------------------------


def upload_token(remote: str, st: os.stat_result) -> str:
    """Same source file + destination = same token, so an interrupted upload is resumed."""
    return hash_bytes("blake3", f"{remote}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}".encode())[:12].hex()


async def put_file(
    mux: Mux,
    local: str | os.PathLike[str],
    remote: str,
    *,
    resume: bool = True,
    hash: HashName = "blake3",
    chunk_size: int = DEFAULT_CHUNK,
    overwrite: bool = True,
    progress: Progress | None = None,
    checksum: bool = False,
) -> TransferResult:
    """Upload the file ``local`` to ``remote`` (verified, atomic on the server, resumable).

    ``checksum``: also compute the standard whole-file hash (:attr:`TransferResult.checksum`).
    """
    t0 = time.monotonic()
    try:
        fd = os.open(local, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"{local}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not statmod.S_ISREG(st.st_mode):
            raise UsageError(f"{local} is not a regular file (use -r for folders)")
        size = st.st_size
        mode = statmod.S_IMODE(st.st_mode)

        def put_msg(i: int, **kw: Any) -> m.PutFile:
            return m.PutFile(
                id=i,
                path=remote,
                size=size,
                mtime=m.wire_time(st.st_mtime),
                mode=mode,
                hash=hash,
                chunk_size=chunk_size,
                overwrite=overwrite,
                **kw,
            )

        if size <= INLINE_MAX:
            data = os.pread(fd, size + 1, 0)
            if len(data) != size:
                raise TransferError(f"{local} changed while being read; try again")
            h = ChunkHasher(hash, chunk_size, file_hash=checksum)
            h.update(data)
            _, digest = h.finish()
            await mux.call(lambda i: put_msg(i, data=data, digest=digest), m.Ok)
            if progress is not None:
                progress(size, size)
            return TransferResult(remote, size, size, 0, time.monotonic() - t0, digest.hex(), file_checksum(h))
        token = upload_token(remote, st) if resume else ""
        offset = 0
        hasher = ChunkHasher(hash, chunk_size, file_hash=checksum)

        async def body(req_id: int, route: Route, ready: m.PutReady) -> tuple[int, list[bytes], bytes]:
            nonlocal offset, hasher
            ours = (
                await _thread(hash_fd_chunks, fd, hash, chunk_size, 0, len(ready.chunk_hashes) * chunk_size)
                if ready.chunk_hashes
                else []
            )
            k = matching_prefix(ours, ready.chunk_hashes)
            offset = k * chunk_size
            await mux.send(m.PutFrom(id=req_id, offset=offset))
            hasher = ChunkHasher(hash, chunk_size, prefix=ours[:k], file_hash=checksum)
            if checksum and offset:  # resumed: the whole-file hash starts at byte 0
                await _thread(file_hash_prefix, hasher, fd, offset)
            hashes = await _send_body(mux, req_id, route, fd, offset, size, hasher, progress)
            if stat_key(os.fstat(fd)) != stat_key(st):
                # What was sent may mix the old and the new bytes: the server must not commit it.
                raise FileChanged(f"{local} changed while it was being sent; nothing was kept, try again")
            return size, hashes, tree_digest(hash, size, hashes)

        digest = await upload(mux, lambda i: put_msg(i, token=token), body)
        return TransferResult(
            remote, size, size - offset, offset, time.monotonic() - t0, digest.hex(), file_checksum(hasher)
        )
    finally:
        os.close(fd)


def file_checksum(hasher: ChunkHasher) -> str | None:
    """The whole-file hash of ``hasher`` as hex (None unless it was asked to compute one)."""
    value = hasher.file_digest()
    return None if value is None else value.hex()


async def upload(
    mux: Mux,
    request: Callable[[int], m.PutFile],
    body: Callable[[int, Any, m.PutReady], Awaitable[tuple[int, list[bytes], bytes]]],
) -> bytes:
    """The exchange of one streamed upload, wherever its bytes come from: send the ``request``
    built for a fresh id, let ``body(id, route, ready)`` send PutFrom and the data and return (size,
    chunk hashes, digest), end with FileEnd and wait for the server's verdict. Returns the digest.
    When the upload is given up, the server is told to release it (unless it ended it itself)."""
    req_id, route = mux.open(QUEUE_DEPTH)
    try:
        await mux.send(request(req_id))
        ready = await mux.expect(route, m.PutReady)
        size, hashes, digest = await body(req_id, route, ready)
        await mux.send(m.FileEnd(id=req_id, size=size, chunk_hashes=hashes, digest=digest))
        await mux.expect(route, m.Ok)
    except BaseException as exc:
        if not isinstance(exc, RemoteError):  # the server did not end it: release it there
            await mux.cancel(req_id)
        raise
    finally:
        mux.close_route(req_id)
    return digest


def raise_if_refused(route: Route) -> None:
    """Raise the server's error if it gave up on an upload while the data was on its way (quota,
    disk full, ...): it answers at once, without waiting for the end."""
    if not route.queue.empty():
        ev = route.queue.get_nowait()
        if isinstance(ev, m.Error):
            raise from_wire(ev)
        raise ConnectionBroken(f"unexpected reply during upload: {type(ev).__name__}")


async def _send_body(
    mux: Mux,
    req_id: int,
    route: Route,
    fd: int,
    offset: int,
    size: int,
    hasher: ChunkHasher,
    progress: Progress | None,
) -> list[bytes]:
    """Stream [offset, size) through ``hasher`` (which holds the chunks before ``offset``) and
    return all chunk hashes; stops early if the server reports an error."""
    loop = asyncio.get_running_loop()

    def read_and_hash(pos: int) -> bytes:
        data = os.pread(fd, min(BLOCK, size - pos), pos)
        hasher.update(data)  # sequential: one read in flight at a time
        return data

    pos = offset
    nxt = loop.run_in_executor(None, read_and_hash, pos) if pos < size else None
    try:
        while nxt is not None:
            data = await asyncio.shield(nxt)
            if not data:
                raise TransferError("the local file shrank while being sent; try again")
            pos += len(data)
            nxt = loop.run_in_executor(None, read_and_hash, pos) if pos < size else None
            raise_if_refused(route)
            await mux.send_data(req_id, m.STDIN, data)
            if progress is not None:
                progress(pos, size)
    finally:
        if nxt is not None and not nxt.done():  # the read in flight must not outlive the fd
            with contextlib.suppress(Exception):
                await asyncio.shield(nxt)
    hashes, _ = hasher.finish()
    return hashes
