"""An unauthenticated connection flood for load tests: one source address, bounded in count and time.

:class:`Flood` keeps ``count`` connections to a server from ``source`` (another loopback address,
e.g. 127.0.0.2): some finish the TLS handshake and then say nothing, the others never even start
TLS. Each connection the server closes (refused, or dropped at the login deadline) is opened again
after ``pause`` seconds, as an attacker would. It runs on its own event loop in a thread and stops
when :meth:`stop` is called or ``max_seconds`` have passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
from dataclasses import dataclass


@dataclass
class FloodStats:
    """What the flood saw."""

    connects: int = 0  #: connections opened (TCP accepted by the kernel)
    tls_done: int = 0  #: TLS handshakes completed
    closed_by_server: int = 0  #: connections the server ended
    open_now: int = 0  #: connections open at this moment
    peak_open: int = 0  #: most connections open at once


class Flood:
    """See the module docstring."""

    def __init__(
        self,
        port: int,
        *,
        source: str = "127.0.0.2",
        count: int = 1000,
        tls_share: float = 0.5,
        pause: float = 1.0,
        max_seconds: float = 120.0,
    ) -> None:
        self.port = port
        self.source = source
        self.count = count
        self.tls_share = tls_share
        self.pause = pause
        self.max_seconds = max_seconds
        self.stats = FloodStats()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self, settle: float = 30.0) -> Flood:
        """Start, and return once every connection was opened at least once (bounded by ``settle``)."""
        self._thread.start()
        self._ready.wait(settle)
        return self

    def stop(self) -> FloodStats:
        """Close every connection and end the thread."""
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        return self.stats

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        first_round = asyncio.Semaphore(0)
        n_tls = int(self.count * self.tls_share)
        tasks = [
            asyncio.create_task(self._slot(ctx if i < n_tls else None, first_round))
            for i in range(self.count)
        ]
        deadline = time.monotonic() + self.max_seconds

        async def all_opened() -> None:
            for _ in range(self.count):
                await first_round.acquire()
            self._ready.set()

        opened = asyncio.create_task(all_opened())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), max(0.0, deadline - time.monotonic()))
        opened.cancel()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._ready.set()

    async def _slot(self, ctx: ssl.SSLContext | None, first_round: asyncio.Semaphore) -> None:
        first = True
        while True:
            writer = None
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1",
                    self.port,
                    local_addr=(self.source, 0),
                    ssl=ctx,
                    ssl_handshake_timeout=30 if ctx is not None else None,
                )
                self.stats.connects += 1
                if ctx is not None:
                    self.stats.tls_done += 1
                self.stats.open_now += 1
                self.stats.peak_open = max(self.stats.peak_open, self.stats.open_now)
                if first:
                    first = False
                    first_round.release()
                try:
                    while await reader.read(4096):  # say nothing; read until the server closes
                        pass
                finally:
                    self.stats.open_now -= 1
                self.stats.closed_by_server += 1
            except asyncio.CancelledError:
                raise
            except (OSError, ssl.SSLError, TimeoutError):
                self.stats.closed_by_server += 1
            finally:
                if writer is not None:
                    writer.close()
            if first:
                first = False
                first_round.release()
            await asyncio.sleep(self.pause)
