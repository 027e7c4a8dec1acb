"""The blocking client: :func:`connect` and :class:`Client`, a thin "portal" over the async one.

Why a portal and not a second implementation: the protocol (pipelining, resume, verification,
backpressure) lives in exactly one place, :class:`~ferry.client.aclient.AsyncClient`. A blocking
client written separately would duplicate all of it and drift. Instead each :class:`Client` owns a
private event loop running in a daemon thread; the async client lives on that loop, and every method
call is submitted to it with :func:`asyncio.run_coroutine_threadsafe` and waited for. The cost is one
thread per client and a few microseconds per call, negligible next to a network round trip.

Consequences worth knowing:

- **Progress callbacks run on the client's loop thread**, not the thread that called ``get``/``put``.
  Keep them short and thread-safe (updating a counter or a rich progress bar is fine), and do not call
  the same client from inside a callback: that would wait for the loop the callback is blocking
  (it raises ``RuntimeError`` instead of deadlocking).
- **Ctrl-C** (``KeyboardInterrupt``) while a call waits cancels that call on the loop, then re-raises.
- A client may be used from several threads; calls from different threads run concurrently on the one
  connection (the async client pipelines them).
- A command's output stream (``stream``) and a remote process (``start``) come back as an
  :class:`AsyncProxy`, usable with ``for`` and ``with``. Methods of the async client not written
  out here (``send``, ``list_pages``, ...) are forwarded generically in the same way: each runs
  on the loop and blocks until done.

Example::

    import ferry

    with ferry.connect("ann@files.example.org", password=pw) as c:
        c.put("report.pdf", "inbox/report.pdf")
        for e in c.listdir("inbox"):
            print(e.name, e.size)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import getpass
import inspect
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from ferry.client.aclient import AsyncClient
from ferry.errors import AuthError, UsageError

if TYPE_CHECKING:
    from ferry.client.aclient import HostInfo
    from ferry.client.known_hosts import KnownHosts

__all__ = ["AsyncProxy", "Client", "connect"]

T = TypeVar("T")
P = ParamSpec("P")
_DONE = object()


class _Portal:
    """An event loop in a daemon thread, and a way to run coroutines on it from other threads."""

    def __init__(self) -> None:
        self.loop = _new_loop()
        self._ready = threading.Event()
        # Daemon: a client that is never closed must not keep the interpreter alive at exit.
        self.thread = threading.Thread(target=self._run, name="ferry-client-loop", daemon=True)
        self.thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
        finally:
            # Cancel whatever is left (a call abandoned by Ctrl-C) so its cleanup code runs.
            tasks = asyncio.all_tasks(self.loop)
            for t in tasks:
                t.cancel()
            if tasks:
                self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            # Name resolution and file I/O ran in the loop's default executor: end its threads too.
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and return its result (or raise its exception) here."""
        if threading.get_ident() == self.thread.ident:
            coro.close()
            raise RuntimeError(
                "a ferry Client was called from its own loop thread (e.g. inside a progress "
                "callback); that would deadlock. Use the AsyncClient there, or call from another thread."
            )
        if not self.thread.is_alive():
            coro.close()
            raise RuntimeError("this ferry Client is closed")
        started, finished, interrupted = threading.Event(), threading.Event(), threading.Event()
        running: list[asyncio.Task[Any]] = []

        async def runner() -> T:
            if interrupted.is_set():  # Ctrl-C came while the call was being handed to the loop
                coro.close()
                raise asyncio.CancelledError
            task = asyncio.current_task()
            assert task is not None
            running.append(task)
            started.set()
            try:
                return await coro
            finally:
                finished.set()

        def cancel() -> None:
            for task in running:
                task.cancel()

        try:
            # Inside the try: on asyncio's loop the hand-over writes to a socket, which lets other
            # threads run (the call may start, and Ctrl-C arrive) before it returns.
            fut = asyncio.run_coroutine_threadsafe(runner(), self.loop)
            # Wait in slices: a wait without timeout is not interruptible everywhere (Windows, and
            # _thread.interrupt_main), and Ctrl-C must reach this thread promptly.
            while not fut.done():
                concurrent.futures.wait([fut], timeout=0.25)
            return fut.result()
        except KeyboardInterrupt:
            # Stop the work on the loop too: a call that has not started sees ``interrupted`` and
            # does not; one that has is cancelled there (both run on the loop, in order). Then
            # wait (briefly) for the call's own cleanup (files closed, progress bar cleared) here.
            interrupted.set()
            self.loop.call_soon_threadsafe(cancel)
            if started.is_set():
                finished.wait(5)
            raise
        except concurrent.futures.CancelledError:
            raise RuntimeError("the call was cancelled because the client closed") from None

    def stop(self) -> None:
        """Stop the loop and wait for its thread (idempotent)."""
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def _forward(portal: _Portal, attr: Any, name: str) -> Any:
    """A blocking stand-in for an attribute of an object living on the loop."""
    return _blocking(portal, attr, name) if callable(attr) else attr


def _blocking(portal: _Portal, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``fn`` as a blocking call: run on the loop, awaited if it returns an awaitable.

    A result that is itself asynchronous (an async iterator or async context manager, e.g. a
    command stream or a remote process) comes back wrapped in :class:`AsyncProxy`, so it can be used
    with ``for`` and ``with`` from this thread.
    """

    def call(*args: Any, **kwargs: Any) -> Any:
        async def invoke() -> Any:
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            return result

        return _wrap_result(portal, portal.call(invoke()))

    call.__name__ = name
    call.__doc__ = fn.__doc__
    return call


def _wrap_result(portal: _Portal, result: Any) -> Any:
    if hasattr(result, "__anext__") or hasattr(result, "__aenter__"):
        return AsyncProxy(portal, result)
    return result


class AsyncProxy:
    """A blocking view of an asynchronous object that lives on a client's loop.

    ``for item in proxy`` drives its ``__anext__``, ``with proxy as p`` its ``__aenter__`` and
    ``__aexit__``, and its methods become blocking calls (attributes are read as they are).
    """

    def __init__(self, portal: _Portal, target: Any) -> None:
        self._portal = portal
        self._target = target

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return _forward(self._portal, getattr(self._target, name), name)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        target = self._target

        async def step() -> Any:
            try:
                return await target.__anext__()
            except StopAsyncIteration:
                return _DONE

        item = self._portal.call(step())
        if item is _DONE:
            raise StopIteration
        return item

    def __enter__(self) -> Any:
        entered = self._portal.call(self._target.__aenter__())
        return self if entered is self._target else _wrap_result(self._portal, entered)

    def __exit__(self, *exc: Any) -> None:
        self._portal.call(self._target.__aexit__(*exc))


def _blocking_method(
    method: Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[Client, P], T]:
    """``method`` of the async client as a blocking method of :class:`Client` (same signature)."""

    def call(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._portal.call(method(self._aclient, *args, **kwargs))

    functools.update_wrapper(call, method)
    return call


def _proxy_method(
    method: Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, Any] | Any],
) -> Callable[Concatenate[Client, P], AsyncProxy]:
    """``method`` of the async client (returning an async iterator or context manager, or a
    coroutine of one) as a method of :class:`Client` returning its :class:`AsyncProxy`."""

    def call(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> AsyncProxy:
        async def invoke() -> Any:
            result = method(self._aclient, *args, **kwargs)
            return await result if inspect.isawaitable(result) else result

        return AsyncProxy(self._portal, self._portal.call(invoke()))

    functools.update_wrapper(call, method)
    return call


class Client:
    """A blocking ferry client: the methods of :class:`~ferry.client.aclient.AsyncClient`, synchronously.

    Create with :func:`ferry.connect`; use as a context manager (or call :meth:`close`). See the
    module documentation for how calls and progress callbacks are run.
    """

    def __init__(self, portal: _Portal, aclient: AsyncClient) -> None:
        self._portal = portal
        self._aclient = aclient

    @classmethod
    def open(cls, factory: Callable[[], Awaitable[AsyncClient]]) -> Client:
        """Start a portal and create its async client with ``factory()`` on the portal's loop.

        For embedders that build the connection themselves, e.g. the CLI's ``open_client``.
        """
        portal = _Portal()

        async def make() -> AsyncClient:
            return await factory()

        try:
            aclient = portal.call(make())
        except BaseException:
            portal.stop()
            raise
        return cls(portal, aclient)

    # --- plumbing ----------------------------------------------------------------------------

    @property
    def aclient(self) -> AsyncClient:
        """The underlying async client (use it only from coroutines run with :meth:`call`)."""
        return self._aclient

    @property
    def info(self) -> HostInfo | None:
        """What the handshake told about the server (address, TLS fingerprint, pin status, ...)."""
        return self._aclient.info

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run any coroutine on this client's loop and wait for its result (advanced use)."""
        return self._portal.call(coro)

    def __getattr__(self, name: str) -> Any:
        # Only called for names not defined here: forward to the async client (run, start,
        # stream, send, ...). Methods run on the loop; see _blocking for what they return.
        if name.startswith("_"):
            raise AttributeError(name)
        return _forward(self._portal, getattr(self._aclient, name), name)

    # --- the API: each method of AsyncClient, blocking, with its very signature ---------------------
    # (mypy and editors see the async method's parameters through ParamSpec; written once there)

    stat = _blocking_method(AsyncClient.stat)
    listdir = _blocking_method(AsyncClient.listdir)
    glob = _blocking_method(AsyncClient.glob)
    mkdir = _blocking_method(AsyncClient.mkdir)
    remove = _blocking_method(AsyncClient.remove)
    rename = _blocking_method(AsyncClient.rename)
    df = _blocking_method(AsyncClient.df)
    ping = _blocking_method(AsyncClient.ping)
    #: ``progress`` callbacks of transfers run on the client's loop thread (see the module docs)
    get = _blocking_method(AsyncClient.get)
    put = _blocking_method(AsyncClient.put)
    get_tree = _blocking_method(AsyncClient.get_tree)
    put_tree = _blocking_method(AsyncClient.put_tree)
    sync = _blocking_method(AsyncClient.sync)
    run = _blocking_method(AsyncClient.run)
    #: ``for kind, data in client.stream(cmd)``; in a ``with`` block the command is cancelled if
    #: you stop early
    stream = _proxy_method(AsyncClient.stream)
    #: a :class:`~ferry.client.exec.RemoteProcess` as a blocking proxy (``with``, ``write``, ``wait``, ...)
    start = _proxy_method(AsyncClient.start)

    # --- lifecycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection and stop the loop thread (idempotent)."""
        if self._portal.thread.is_alive():
            try:
                self._portal.call(self._aclient.close())
            finally:
                self._portal.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _default_user() -> str:
    # Same rule as the command line (ferry.cli.common.default_user), repeated here so that the
    # library does not import click.
    return os.environ.get("FERRY_USER") or getpass.getuser()


def connect(
    host_or_location: str,
    *,
    user: str | None = None,
    password: str | None = None,
    port: int | None = None,
    plain: bool = False,
    known_hosts: KnownHosts | None = None,
    timeout: float = 15.0,
    token: str | None = None,
    key: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    agent: bool | str = False,
    passphrase: str | None = None,
) -> Client:
    """Connect and log in; returns a blocking :class:`Client` (use it in a ``with`` block).

    ``host_or_location`` is a host (``"files.example.org"``, ``"::1"``), ``"USER@HOST[:PORT]"``,
    ``"ferry://USER@HOST:PORT"`` or a host alias of the config file (``[hosts.NAME]``, see
    docs/cli.md). Explicit ``user``/``port`` win over the string, the string over the alias.

    Credentials, tried in this order: ``token`` (default ``$FERRY_TOKEN``); ``key``, a private
    key file or a list of them (``passphrase`` for a protected one; default: the alias's
    ``identity``); the keys of ssh-agent when ``agent`` is True (or the agent's socket path);
    ``password`` (default ``$FERRY_PASSWORD``). Nothing is ever prompted: this is a library. The
    user defaults to ``$FERRY_USER`` or the login name. ``known_hosts`` defaults to the per-user
    pin file; the first connection to a server pins its certificate (``client.info.pin_status ==
    "new"``), a changed certificate raises :class:`~ferry.errors.HostKeyMismatch`.
    """
    from ferry.client.auth import LoginOptions
    from ferry.client.location import parse_target

    loc = parse_target(host_or_location)
    name = user or loc.user or _default_user()
    if password is None:
        password = os.environ.get("FERRY_PASSWORD")
    if token is None:
        token = os.environ.get("FERRY_TOKEN") or None
    keys = [] if key is None else [key] if isinstance(key, str | os.PathLike) else list(key)
    if loc.alias is not None:  # a config file alias: its key files and plain setting apply
        from ferry.client.config import load_config

        alias = load_config().alias(loc.alias)
        if alias is not None:
            keys = keys or list(alias.identity)
            plain = plain or bool(alias.plain)
    if password is None and token is None and not keys and not agent:
        raise AuthError(
            "no credential: pass password=, token=, key= or agent=True, or set FERRY_PASSWORD or FERRY_TOKEN"
        )
    the_port = port if port is not None else loc.port
    if not 0 < the_port < 65536:
        raise UsageError(f"port {the_port} out of range (1-65535)")
    login = LoginOptions(password=password, token=token, identities=keys, agent=agent, passphrase=passphrase)

    def factory() -> Awaitable[AsyncClient]:
        return AsyncClient.connect(
            loc.host,
            the_port,
            user=name,
            login=login,
            plain=plain,
            known_hosts=known_hosts,
            timeout=timeout,
        )

    return Client.open(factory)


def _new_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when installed (faster transfers), else asyncio's default."""
    if os.environ.get("FERRY_NO_UVLOOP") != "1":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()
