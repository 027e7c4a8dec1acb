"""A real ferry server for tests: runs in a thread with its own event loop, on 127.0.0.1:0.

The loop is asyncio's or uvloop's (``loop=``): the conformance matrix (tests/conformance.py) runs
the client operations over both.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher

from ferry.server.accounts import Accounts
from ferry.server.app import ServeConfig, Server
from ferry.server.context import Limits
from ferry.store.config import S3Config

CHEAP_HASHER = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
PASSWORD = "correct horse battery staple"


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event-loop constructor of ``kind``: ``"asyncio"`` or ``"uvloop"``."""
    if kind == "uvloop":
        import uvloop  # a dependency of ferry on this platform: a missing one must fail, not skip

        return uvloop.new_event_loop
    if kind != "asyncio":
        raise ValueError(f"unknown event loop {kind!r}")
    return asyncio.new_event_loop


class ServerThread:
    """Start with :meth:`start`, stop with :meth:`stop`; ``port``, ``root`` and ``add_user`` for tests."""

    def __init__(
        self,
        root: Path,
        *,
        plain: bool = False,
        limits: Limits | None = None,
        server_cls: type[Server] = Server,
        loop: str = "asyncio",
        db: str | None = None,
        store: S3Config | None = None,
    ) -> None:
        self.root = root
        self.loop_kind = loop
        self._loop_factory = loop_factory(loop)
        self.config = ServeConfig(
            root=root,
            host="127.0.0.1",
            port=0,
            plain=plain,
            limits=limits or Limits(),
            log_to_console=False,
            hasher=CHEAP_HASHER,
            db=db,
            store=store,
        )
        self.server = server_cls(self.config)
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._error: BaseException | None = None

    def add_user(self, name: str, password: str = PASSWORD, **kw: Any) -> Path:
        acc = Accounts(self.root, hasher=CHEAP_HASHER, db=self.config.db)
        try:
            return acc.add(name, password, **kw).home
        finally:
            acc.close()

    def start(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(20):
            raise RuntimeError("server did not start")
        if self._error:
            raise self._error
        return self

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                banner = await self.server.start()
                self.banner = banner
                self.port = int(banner.address.rsplit(":", 1)[1])
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            await self._stop.wait()
            await self.server.close(grace=2)

        with asyncio.Runner(loop_factory=self._loop_factory) as runner:
            runner.run(main())

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
