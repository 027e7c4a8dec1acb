"""The conformance matrix: one server/client fixture family for the whole suite.

A *cell* is one way to talk to a ferry server: the transport (``tls`` or ``plain``), the client
(``async``: :class:`~ferry.client.aclient.AsyncClient`; ``sync``: the blocking :class:`ferry.Client`)
and the event loop both ends run on (``asyncio`` or ``uvloop``). The fixtures in tests/conftest.py
(``cell``, ``server``, ``client``) are built from this module; which tests run which cells
(tests/README.md):

- ``pytest.mark.matrix``: every cell (10). The client operations' conformance (tests/test_conformance.py);
  ``matrix(backend="folder")`` for a behaviour of one backend (commands, symbolic links on disk).
- ``pytest.mark.transports``: TLS and plain, async client, asyncio (2). Tests of data paths that differ
  by transport (sendfile against TLS blocks: faults, resume, integrity).
- ``pytest.mark.cell(transport="plain")`` (any fields): that one cell, for tests about one transport
  detail (raw wire bytes, sendfile).
- ``pytest.mark.backends``: the default cell on each storage backend (``folder``, ``object``) (2).
  Tests of behaviour both backends must give the same (the object backend: files in SeaweedFS,
  namespace and accounts in PostgreSQL, docs/scale-out.md). Together with ``transports`` (a test
  marked ``backends`` in a module marked ``transports``): both transports on the folder backend and
  the default cell on the object backend (3).
- no mark: the default cell (TLS, async, asyncio) only, on the folder backend.

The matrix runs the folder backend on all 8 cells and the object backend on two of them (TLS, async,
asyncio and plain, sync, uvloop): the backend is below the transport, so two cells cover its pairing
with both transports, both clients and both loops.

A test body is written once against a *blocking* client interface: the ``sync`` cells hand it a
:class:`ferry.Client` (its loop in a thread of its own), the ``async`` cells a :class:`LoopClient`
(the AsyncClient driven from the test's own thread, one loop run per call).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import os
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

import ferry
from ferry.client.aclient import AsyncClient
from ferry.client.blocking import AsyncProxy
from ferry.client.known_hosts import KnownHosts
from ferry_server import PASSWORD, ServerThread, loop_factory

T = TypeVar("T")

TRANSPORTS = ("tls", "plain")
CLIENTS = ("async", "sync")
LOOPS = ("asyncio", "uvloop")


@dataclass(frozen=True)
class Cell:
    """One cell of the matrix: ``transport`` x ``client`` x ``loop``, and the server's storage
    ``backend`` (``folder``, the default, or ``object``)."""

    transport: str = "tls"
    client: str = "async"
    loop: str = "asyncio"
    backend: str = "folder"

    @property
    def id(self) -> str:
        """The test-id suffix, e.g. ``tls-sync-uvloop`` (``-object`` added on the object backend)."""
        base = f"{self.transport}-{self.client}-{self.loop}"
        return base if self.backend == "folder" else f"{base}-{self.backend}"

    @property
    def objects(self) -> bool:
        """True when the server keeps files in the object store."""
        return self.backend == "object"

    @property
    def plain(self) -> bool:
        """True when the server runs without TLS."""
        return self.transport == "plain"

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """``asyncio.run`` on this cell's kind of loop."""
        with asyncio.Runner(loop_factory=loop_factory(self.loop)) as runner:
            return runner.run(coro)


DEFAULT = Cell()
OBJECT = Cell(backend="object")
#: The object backend's cells of the matrix (added to it once that backend serves every request the
#: matrix makes: transfers, trees and sync are on their way, docs/scale-out.md).
OBJECT_CELLS = [OBJECT, Cell("plain", "sync", "uvloop", "object")]
MATRIX = [Cell(t, c, lp) for t, c, lp in itertools.product(TRANSPORTS, CLIENTS, LOOPS)] + OBJECT_CELLS
BY_TRANSPORT = [Cell(t) for t in TRANSPORTS]
BY_BACKEND = [DEFAULT, OBJECT]


def cells_for(item: pytest.Function | Any) -> list[Cell]:
    """The cells a test runs on, by its closest mark (the rule in this module's docstring):
    ``matrix``, ``transports``, ``backends``, or ``cell(transport=..., client=..., loop=...,
    backend=...)`` for one cell."""
    marks = [mk.name for mk in item.iter_markers() if mk.name in ("matrix", "transports", "backends", "cell")]
    if marks[:2] in (["backends", "transports"], ["transports", "backends"]):
        # Both (e.g. a test marked backends in a module marked transports): the folder backend over
        # both transports, the object backend on the default cell (it has no sendfile path).
        return [*BY_TRANSPORT, OBJECT]
    for mark in item.iter_markers():  # the test's own marks first, then its class's and module's
        if mark.name == "matrix":  # matrix(backend="folder"): the cells with those fields
            return [c for c in MATRIX if all(getattr(c, k) == v for k, v in mark.kwargs.items())]
        if mark.name == "transports":
            return BY_TRANSPORT
        if mark.name == "backends":
            return BY_BACKEND
        if mark.name == "cell":
            return [Cell(**mark.kwargs)]
    return [DEFAULT]


def is_uvloop(loop: asyncio.AbstractEventLoop) -> bool:
    """True for a uvloop loop (the matrix checks it got the loop it asked for)."""
    return type(loop).__module__.startswith("uvloop")


class LoopClient:
    """An :class:`AsyncClient` driven from the calling thread: each call runs the client's coroutine
    on the cell's loop (``asyncio.Runner``) and returns its result, so one blocking test body serves
    the async and the sync client. Async iterators and context managers (``stream``, ``start``)
    come back as :class:`~ferry.client.blocking.AsyncProxy`, as from :class:`ferry.Client`."""

    def __init__(self, runner: asyncio.Runner, aclient: AsyncClient) -> None:
        self._runner = runner
        self._aclient = aclient

    @classmethod
    def open(cls, loop: str, factory: Callable[[], Coroutine[Any, Any, AsyncClient]]) -> LoopClient:
        """A runner on a ``loop`` event loop and the client ``factory()`` makes on it."""
        runner = asyncio.Runner(loop_factory=loop_factory(loop))
        try:
            return cls(runner, runner.run(factory()))
        except BaseException:
            runner.close()
            raise

    @property
    def aclient(self) -> AsyncClient:
        """The async client itself."""
        return self._aclient

    @property
    def info(self) -> Any:
        """What the handshake told about the server."""
        return self._aclient.info

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the client runs on."""
        return self._runner.get_loop()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the client's loop to completion (the AsyncProxy protocol)."""
        return self._runner.run(coro)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        attr = getattr(self._aclient, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kw: Any) -> Any:
            async def invoke() -> Any:
                result = attr(*args, **kw)
                return await result if inspect.isawaitable(result) else result

            result = self.call(invoke())
            if hasattr(result, "__anext__") or hasattr(result, "__aenter__"):
                return AsyncProxy(self, result)  # type: ignore[arg-type]  # duck-typed portal
            return result

        return call

    def close(self) -> None:
        """Close the connection, then the loop."""
        try:
            self._runner.run(self._aclient.close())
        finally:
            self._runner.close()

    def __enter__(self) -> LoopClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def client_loop(c: Any) -> asyncio.AbstractEventLoop:
    """The loop a matrix client runs on (:class:`LoopClient` or :class:`ferry.Client`)."""
    return c.loop if isinstance(c, LoopClient) else c._portal.loop


@contextlib.contextmanager
def _uvloop_setting(loop: str) -> Iterator[None]:
    """FERRY_NO_UVLOOP for the blocking client's loop: it picks uvloop unless told not to."""
    old = os.environ.get("FERRY_NO_UVLOOP")
    os.environ["FERRY_NO_UVLOOP"] = "0" if loop == "uvloop" else "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["FERRY_NO_UVLOOP"]
        else:
            os.environ["FERRY_NO_UVLOOP"] = old


def open_client(
    cell: Cell, srv: ServerThread, tmp_path: Path, *, user: str = "alice", password: str = PASSWORD
) -> Any:
    """A logged-in client of ``cell``'s kind to ``srv`` (pins into ``tmp_path``), blocking interface:
    a :class:`ferry.Client` or a :class:`LoopClient`. Fails if it did not get the loop asked for."""
    known_hosts = KnownHosts(tmp_path / "known_hosts")
    if cell.client == "sync":
        with _uvloop_setting(cell.loop):
            c: Any = ferry.connect(
                f"{user}@127.0.0.1:{srv.port}", password=password, plain=cell.plain, known_hosts=known_hosts
            )
    else:

        async def make() -> AsyncClient:
            ac = await AsyncClient.connect(
                "127.0.0.1", srv.port, user=user, password=password, plain=cell.plain, known_hosts=known_hosts
            )
            ac.read_timeout = 20.0  # a hang fails fast instead of waiting a minute
            return ac

        c = LoopClient.open(cell.loop, make)
    if is_uvloop(client_loop(c)) != (cell.loop == "uvloop"):
        c.close()
        raise AssertionError(f"the {cell.id} client runs on {type(client_loop(c)).__name__}")
    return c
