"""Transfers to and from a stream: ``ferry get HOST:FILE -`` and ``... | ferry put - HOST:FILE``.

A stream cannot seek, so there is no partial file and no resume, but the data is verified as for
any transfer, and memory stays bounded:

- A download is written to the descriptor in order, by the same write-and-hash worker as a file
  download (:class:`~ferry.client.receive.DownloadWriter`), and checked against the server's chunk
  hashes and digest at the end. The bytes have left by then (a pipe cannot take them back), so a
  mismatch is an error after the fact, as with ``curl ... | sha256sum -c``: the command fails.
- An upload is a *streamed* ``PutFile`` (its size is unknown until the stream ends; the server
  checks the quota as the data arrives). A daemon thread reads the stream in blocks of up to 1 MiB
  and hashes them, at most two blocks ahead of the network; the server verifies every chunk and
  the digest before the file appears under its name.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import threading
import time
from functools import partial
from typing import Any

from ferry.client.mux import Mux
from ferry.client.receive import DownloadWriter
from ferry.client.transfer import (
    BLOCK,
    Progress,
    TransferResult,
    fetch,
    file_checksum,
    raise_if_refused,
    upload,
)
from ferry.errors import IntegrityError
from ferry.hashing import DEFAULT_CHUNK, ChunkHasher, HashName, matching_prefix
from ferry.wire import messages as m

#: The mode a file uploaded from a stream gets (as ``> file`` under the usual umask 022).
STREAM_MODE = 0o644
#: Blocks read ahead of the network (each at most BLOCK bytes): bounds an upload's memory.
READ_AHEAD = 2


class _PipeWriter(DownloadWriter):
    """A DownloadWriter for a descriptor that cannot seek: its single worker thread runs the jobs
    in order, so plain writes land in order (``pos`` is not needed)."""

    def _write(self, buf: bytearray, n: int, pos: int) -> None:
        view = memoryview(buf)[:n]
        while view:
            view = view[os.write(self.fd, view) :]


async def get_stream(
    mux: Mux,
    remote: str,
    fd: int,
    *,
    hash: HashName = "blake3",
    chunk_size: int = DEFAULT_CHUNK,
    progress: Progress | None = None,
    checksum: bool = False,
) -> TransferResult:
    """Download ``remote`` and write it to ``fd`` (a pipe, a terminal, standard output) in order."""
    t0 = time.monotonic()

    async def start(info: m.FileInfo) -> DownloadWriter:
        return _PipeWriter(fd, 0, ChunkHasher(hash, chunk_size, file_hash=checksum), expect=info.size)

    info, writer, end = await fetch(
        mux, remote, hash=hash, chunk_size=chunk_size, held=[], progress=progress, start=start
    )
    hashes, digest = writer.hasher.finish()
    if writer.pos != info.size or hashes != end.chunk_hashes or digest != end.digest:
        bad = matching_prefix(hashes, end.chunk_hashes)
        raise IntegrityError(
            f"{remote}: the data written out does not match the server's hash (chunk {bad}); "
            "discard it and run the command again"
        )
    return TransferResult(
        remote, info.size, info.size, 0, time.monotonic() - t0, digest.hex(), file_checksum(writer.hasher)
    )


def read_block(fd: int, limit: int = BLOCK) -> bytes:
    """Up to ``limit`` bytes from ``fd``: waits for the first ones, then takes whatever is already
    there (a pipe hands out at most its buffer per read; a slow writer is not waited for). ``b""``
    at the end of the stream."""
    first = os.read(fd, limit)
    parts, n = [first], len(first)
    while first and n < limit and select.select([fd], [], [], 0)[0]:
        more = os.read(fd, limit - n)
        if not more:
            break  # the end: the next call returns b""
        parts.append(more)
        n += len(more)
    return b"".join(parts)


def _read_ahead(
    fd: int, hasher: ChunkHasher, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[bytes | BaseException]
) -> None:
    """The reading thread of :func:`put_stream`: blocks, hashed in order, into ``queue`` (bounded).

    A daemon thread, not the loop's executor: a read from a terminal or an idle pipe can block for
    ever, and the executor's shutdown would wait for it (Ctrl-C would hang)."""
    try:
        while True:
            data = read_block(fd)
            hasher.update(data)
            asyncio.run_coroutine_threadsafe(queue.put(data), loop).result()
            if not data:
                return
    except BaseException as exc:  # handed to the upload, which raises it
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(queue.put(exc), loop).result()


async def put_stream(
    mux: Mux,
    fd: int,
    remote: str,
    *,
    hash: HashName = "blake3",
    chunk_size: int = DEFAULT_CHUNK,
    overwrite: bool = True,
    progress: Progress | None = None,
    checksum: bool = False,
) -> TransferResult:
    """Upload what ``fd`` (standard input, a pipe) gives until its end as the file ``remote``."""
    t0 = time.monotonic()
    loop = asyncio.get_running_loop()
    hasher = ChunkHasher(hash, chunk_size, file_hash=checksum)
    size = 0

    async def body(req_id: int, route: Any, ready: m.PutReady) -> tuple[int, list[bytes], bytes]:
        nonlocal size
        await mux.send(m.PutFrom(id=req_id, offset=0))
        blocks: asyncio.Queue[bytes | BaseException] = asyncio.Queue(READ_AHEAD)
        reader = threading.Thread(target=_read_ahead, args=(fd, hasher, loop, blocks), daemon=True)
        reader.start()
        while data := await blocks.get():
            if isinstance(data, BaseException):
                raise data
            raise_if_refused(route)
            await mux.send_data(req_id, m.STDIN, data)
            size += len(data)
            if progress is not None:
                progress(size, 0)  # 0: the total is not known
        return (size, *hasher.finish())

    request = partial(
        m.PutFile,
        path=remote,
        size=0,
        mtime=time.time(),
        mode=STREAM_MODE,
        hash=hash,
        chunk_size=chunk_size,
        overwrite=overwrite,
        streamed=True,
    )
    digest = await upload(mux, lambda i: request(id=i), body)
    return TransferResult(remote, size, size, 0, time.monotonic() - t0, digest.hex(), file_checksum(hasher))
