"""asyncio helpers shared by the server and the client (the I/O side; the protocol is in ferry.wire)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
CORK_LIMIT = 1 << 16


class CorkedWriter:
    """Coalesces the small frames written during one loop iteration into one transport write.

    Pipelined small requests and replies (a 10,000-file tree) would otherwise cost one TLS record
    and one system call each. Frames are appended synchronously (so their order is the call order)
    and flushed at the end of the iteration, or at once past ``CORK_LIMIT`` bytes. :meth:`drain`
    applies the transport's backpressure, so memory stays bounded by its high-water mark plus
    ``CORK_LIMIT``.
    """

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._parts: list[bytes | memoryview] = []
        self._size = 0
        self._scheduled = False

    def write(self, data: bytes | memoryview) -> None:
        """Queue ``data``; it goes out at the end of this loop iteration at the latest."""
        self._parts.append(data)
        self._size += len(data)
        if self._size >= CORK_LIMIT:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Hand everything queued to the transport now."""
        self._scheduled = False
        if self._parts:
            parts, self._parts, self._size = self._parts, [], 0
            if self._writer.transport.is_closing():
                return
            self._writer.writelines(parts)

    async def drain(self) -> None:
        """Wait while the transport holds more than its high-water mark."""
        await self._writer.drain()


def run(coro: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """``asyncio.run`` on uvloop when it is installed (and FERRY_NO_UVLOOP is not 1)."""
    if use_uvloop and os.environ.get("FERRY_NO_UVLOOP") != "1":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(coro)
    return asyncio.run(coro)
