"""Client side of downloads and uploads: verify, resume, atomic local writes, bounded memory.

Local writes go to ``.NAME.ferry-part`` next to the destination and are renamed only after every
chunk hash and the digest match the server's. An interrupted download leaves that partial; the next
``get`` hashes its whole chunks, sends the hashes, and the server continues after the matching ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import stat as statmod
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ferry.client.receive import DownloadWriter, RawPayload
from ferry.errors import ConnectionBroken, IntegrityError, RemoteError, TransferError, UsageError
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
from ferry.textsafe import safe_name
from ferry.wire import Data
from ferry.wire import messages as m
from ferry.wire.codes import from_wire

if TYPE_CHECKING:
    from ferry.client.aclient import AsyncClient

Progress = Callable[[int, int], None]
BLOCK = 1 << 20
INLINE_MAX = 1 << 18  # files up to 256 KiB travel inside the PutFile message: one frame, no round trip
QUEUE_DEPTH = 64  # data pieces buffered per transfer before the reader pushes back
WINDOW = 64  # pipelined small-file requests in flight in tree transfers
PART = ".ferry-part"


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
    """Where the unverified download of ``dest`` is kept (hidden, next to it: same filesystem)."""
    return dest.with_name(f".{dest.name}{PART}")


async def _thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


# --- download ------------------------------------------------------------------------------


async def get_file(
    client: AsyncClient,
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
                client, remote, hash=hash, chunk_size=chunk_size, held=held, progress=progress, start=start
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
    client: AsyncClient,
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
    req_id, route = client._open(QUEUE_DEPTH, raw=True)
    writer: DownloadWriter | None = None
    ended = False  # the server finished this request (FileEnd or Error)
    try:
        await client.send(
            m.GetFile(id=req_id, path=remote, hash=hash, chunk_size=chunk_size, chunk_hashes=held)
        )
        info = await client._recv(route)
        if isinstance(info, m.Error):
            ended = True
            raise from_wire(info)
        assert isinstance(info, m.FileInfo)
        writer = await start(info)
        done = info.offset

        def advanced(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, info.size)

        end = await receive_data(client, route, writer, advanced)
        ended = True
        await writer.flush()
        if isinstance(end, m.Error):
            raise from_wire(end)
        assert isinstance(end, m.FileEnd)
        return info, writer, end
    except BaseException:
        try:
            if not ended:  # given up (progress callback, timeout, cancel): stop the server streaming
                await _cancel(client, req_id)
        finally:  # even if cancelled (again) while sending the Cancel
            if writer is not None:
                await writer.settle()  # its thread must not write to the fd after it is closed
        raise
    finally:
        client._close_route(req_id)
        if writer is not None:
            writer.close()


async def receive_data(
    client: AsyncClient, route: Any, writer: DownloadWriter, advanced: Callable[[int], None]
) -> m.Message:
    """Give a download's data to ``writer`` until the server ends it; returns that last message
    (FileEnd or Error). The writer may still be writing: flush it before trusting the hashes."""
    while True:
        ev = await client._recv(route)
        if isinstance(ev, Data):
            await writer.add(ev.data)
            advanced(len(ev.data))
        elif isinstance(ev, RawPayload):  # the bulk of the file, straight off the transport
            try:
                await writer.take_raw(ev, client.read_timeout, advanced)
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
        fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
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


async def _cancel(client: AsyncClient, req_id: int) -> None:
    """Tell the server to stop a transfer we gave up on (best effort: the connection may be gone)."""
    if client._error is None and not client._closed:
        with contextlib.suppress(Exception):
            await client.send(m.Cancel(id=req_id))


# --- upload --------------------------------------------------------------------------------


def upload_token(remote: str, st: os.stat_result) -> str:
    """Same source file + destination = same token, so an interrupted upload is resumed."""
    return hash_bytes("blake3", f"{remote}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}".encode())[:12].hex()


async def put_file(
    client: AsyncClient,
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
            await client._call(lambda i: put_msg(i, data=data, digest=digest))
            if progress is not None:
                progress(size, size)
            return TransferResult(remote, size, size, 0, time.monotonic() - t0, digest.hex(), file_checksum(h))
        token = upload_token(remote, st) if resume else ""
        offset = 0
        hasher = ChunkHasher(hash, chunk_size, file_hash=checksum)

        async def body(req_id: int, route: Any, ready: m.PutReady) -> tuple[int, list[bytes], bytes]:
            nonlocal offset, hasher
            ours = (
                await _thread(hash_fd_chunks, fd, hash, chunk_size, 0, len(ready.chunk_hashes) * chunk_size)
                if ready.chunk_hashes
                else []
            )
            k = matching_prefix(ours, ready.chunk_hashes)
            offset = k * chunk_size
            await client.send(m.PutFrom(id=req_id, offset=offset))
            hasher = ChunkHasher(hash, chunk_size, prefix=ours[:k], file_hash=checksum)
            if checksum and offset:  # resumed: the whole-file hash starts at byte 0
                await _thread(file_hash_prefix, hasher, fd, offset)
            hashes = await _send_body(client, req_id, route, fd, offset, size, hasher, progress)
            return size, hashes, tree_digest(hash, size, hashes)

        digest = await upload(client, lambda i: put_msg(i, token=token), body)
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
    client: AsyncClient,
    request: Callable[[int], m.PutFile],
    body: Callable[[int, Any, m.PutReady], Awaitable[tuple[int, list[bytes], bytes]]],
) -> bytes:
    """The exchange of one streamed upload, wherever its bytes come from: send the ``request``
    built for a fresh id, let ``body(id, route, ready)`` send PutFrom and the data and return (size,
    chunk hashes, digest), end with FileEnd and wait for the server's verdict. Returns the digest.
    When the upload is given up, the server is told to release it (unless it ended it itself)."""
    req_id, route = client._open(QUEUE_DEPTH)
    try:
        await client.send(request(req_id))
        ready = await client._recv(route)
        if isinstance(ready, m.Error):
            raise from_wire(ready)
        assert isinstance(ready, m.PutReady)
        size, hashes, digest = await body(req_id, route, ready)
        await client.send(m.FileEnd(id=req_id, size=size, chunk_hashes=hashes, digest=digest))
        reply = await client._recv(route)
        if isinstance(reply, m.Error):
            raise from_wire(reply)
    except BaseException as exc:
        if not isinstance(exc, RemoteError):  # the server did not end it: release it there
            await _cancel(client, req_id)
        raise
    finally:
        client._close_route(req_id)
    return digest


def raise_if_refused(route: Any) -> None:
    """Raise the server's error if it gave up on an upload while the data was on its way (quota,
    disk full, ...): it answers at once, without waiting for the end."""
    if not route.queue.empty():
        ev = route.queue.get_nowait()
        if isinstance(ev, m.Error):
            raise from_wire(ev)
        raise ConnectionBroken(f"unexpected reply during upload: {type(ev).__name__}")


async def _send_body(
    client: AsyncClient,
    req_id: int,
    route: Any,
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
            await client.send_data(req_id, m.STDIN, data)
            if progress is not None:
                progress(pos, size)
    finally:
        if nxt is not None and not nxt.done():  # the read in flight must not outlive the fd
            with contextlib.suppress(Exception):
                await asyncio.shield(nxt)
    hashes, _ = hasher.finish()
    return hashes


# --- trees ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeResult:
    """What a folder transfer did."""

    files: int
    bytes: int
    seconds: float


async def get_tree(
    client: AsyncClient,
    remote: str,
    local: str | os.PathLike[str],
    *,
    hash: HashName = "blake3",
    progress: Progress | None = None,
    window: int = WINDOW,
) -> TreeResult:
    """Download the folder ``remote`` into ``local`` (created): one streamed GetTree when the server
    supports it (see :mod:`ferry.client.tree`), else pipelined per-file requests."""
    from ferry.client import tree

    if tree.supports_tree(client):
        return await tree.get_tree(client, remote, local, hash=hash, progress=progress)
    t0 = time.monotonic()
    root = Path(local)
    entries = await client.listdir(remote, recursive=True)
    for e in entries:
        # Names come from the server and become local paths: a hostile or broken server must not
        # be able to write outside ``local`` with "../x" or "/etc/x". Checked before creating anything.
        if not _safe_relative(e.name):
            raise TransferError(
                f"the server listed an unsafe name {safe_name(e.name)!r} in {safe_name(remote)!r}; "
                "nothing was downloaded"
            )
    root.mkdir(parents=True, exist_ok=True)
    files = [e for e in entries if e.kind == "file"]
    for e in entries:
        if e.kind == "dir":
            (root / e.name).mkdir(parents=True, exist_ok=True)
    tally = _Tally(sum(e.size for e in files), progress)
    prefix = remote.rstrip("/") + "/" if remote not in ("", ".") else ""
    # Small files go through the batched pipeline (no task per file); large ones stream.
    from ferry.client.batch import BATCH_MAX, get_small_files

    small = [(prefix + e.name, root / e.name) for e in files if e.size <= BATCH_MAX]
    large = [(prefix + e.name, root / e.name) for e in files if e.size > BATCH_MAX]
    large += await get_small_files(client, small, hash=hash, window=window, on_file=tally)
    await _each_large(large, lambda src, dest: get_file(client, src, dest, hash=hash), tally)
    return TreeResult(len(files), tally.total, time.monotonic() - t0)


def _safe_relative(name: str) -> bool:
    """True for a relative POSIX path of plain names (no empty, ``.`` or ``..`` parts, no NUL)."""
    if not name or "\0" in name or (os.sep != "/" and os.sep in name):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


async def put_tree(
    client: AsyncClient,
    local: str | os.PathLike[str],
    remote: str,
    *,
    hash: HashName = "blake3",
    progress: Progress | None = None,
    window: int = WINDOW,
) -> TreeResult:
    """Upload the folder ``local`` as ``remote``: one streamed PutTree when the server supports it
    (see :mod:`ferry.client.tree`), else folders first, then files pipelined."""
    from ferry.client import tree

    if tree.supports_tree(client):
        return await tree.put_tree(client, local, remote, hash=hash, progress=progress)
    t0 = time.monotonic()
    root = Path(local)
    if not root.is_dir():
        raise UsageError(f"{local} is not a folder")
    dirs: list[str] = []
    files: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        dirnames.sort()
        for d in dirnames:
            dirs.append(rel + d)
        for f in sorted(filenames):
            p = os.path.join(dirpath, f)
            st = os.lstat(p)
            if statmod.S_ISREG(st.st_mode):
                files.append((rel + f, st.st_size))
    base = remote.rstrip("/") or remote  # '/' stays absolute (refused by the server), not the home
    join = (lambda r: f"{base}/{r}") if base not in ("", ".") else (lambda r: r)
    if base not in ("", "."):
        await client.mkdir(base, parents=True)
    # Folders must exist before files: pipeline all mkdirs, wait for them, then the files.
    sem = asyncio.Semaphore(window)

    async def mk(d: str) -> None:
        async with sem:
            await client.mkdir(join(d), parents=True)

    await _gather_all([mk(d) for d in dirs])
    tally = _Tally(sum(s for _, s in files), progress)
    from ferry.client.batch import BATCH_MAX, put_small_files

    small = [(root / rel, join(rel)) for rel, size in files if size <= BATCH_MAX]
    large = [(root / rel, join(rel)) for rel, size in files if size > BATCH_MAX]
    large += await put_small_files(client, small, hash=hash, window=window, on_file=tally)
    await _each_large(large, lambda src, dst: put_file(client, src, dst, hash=hash), tally)
    return TreeResult(len(files), tally.total, time.monotonic() - t0)


class _Tally:
    """Bytes done across a tree transfer, reported to the progress callback as files finish."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self.progress = total, 0, progress

    def __call__(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)


async def _each_large(
    items: list[Any], transfer: Callable[[Any, Any], Awaitable[TransferResult]], tally: _Tally
) -> None:
    """Stream the large files of a tree, four at a time (each already pipelines its own data)."""
    sem = asyncio.Semaphore(4)

    async def one(src: Any, dst: Any) -> None:
        async with sem:
            r = await transfer(src, dst)
        tally(r.size)

    await _gather_all([one(src, dst) for src, dst in items])


async def _gather_all(coros: list[Any]) -> None:
    """Run all; on the first failure cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
