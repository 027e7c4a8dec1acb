"""Remote commands from the client side: start one, stream its output, or run it to completion.

Three levels, all over one connection's :class:`~ferry.client.mux.Mux` (several commands may run
at once on one connection, each under its own request id); the
:class:`~ferry.client.aclient.AsyncClient` offers them as ``run``, ``stream`` and ``start``:

* :func:`run` -> :class:`Result`: run to completion, optionally feeding ``input``; output collected.
* :class:`CommandStream` (``client.stream(cmd)``): ``async for kind, data in stream`` yields
  ``("stdout", bytes)`` / ``("stderr", bytes)`` chunks as the command writes them; the exit status is
  on the stream object afterwards.
* :class:`RemoteProcess` (``client.start(cmd)``): the full handle: ``read``, ``write``,
  ``close_stdin``, ``signal``, ``resize``, ``cancel``, ``wait``.

Flow control: the client grants the server a window per output stream (:data:`DEFAULT_WINDOW`
bytes, topped up as chunks are *consumed*), so unread output never piles up beyond the window in
memory, and a consumer that only reads stdout does not block stderr or vice versa -- the server
stops reading the child's pipe for a stream whose window is used up. Stdin is sent only within the
window the server grants.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal as _signal
import stat
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from ferry.aio import cancel_and_wait
from ferry.client.mux import Mux, Route
from ferry.errors import FerryError, FerryTimeout, UsageError
from ferry.wire import Data
from ferry.wire import messages as m
from ferry.wire.codes import from_wire
from ferry.wire.credit import Credit

__all__ = [
    "DEFAULT_WINDOW",
    "CommandStream",
    "Interrupted",
    "RemoteProcess",
    "Result",
    "SignalForwarder",
    "attach",
    "exit_code_of",
    "pump_stdin",
    "run",
    "write_all",
]

#: Bytes of each output stream the server may send ahead of what the caller has consumed.
DEFAULT_WINDOW: Final = 4 << 20
#: Largest stdin data frame.
STDIN_CHUNK: Final = 1 << 18
#: After a client-side timeout the server gets SIGTERM -> SIGKILL (2 s); this is how much longer
#: we wait for its exit status before giving up on the server.
_TIMEOUT_SLACK: Final = 10.0
#: Waiting for a command's next event: commands may be silent for a very long time.
_NO_LIMIT: Final = 10.0**9

Command = str | Sequence[str]
"""A command: one string runs through ``/bin/sh -c`` on the server, a sequence is the argv itself."""

Kind = Literal["stdout", "stderr"]
_KIND: Final[dict[int, Kind]] = {m.STDOUT: "stdout", m.STDERR: "stderr"}


@dataclass(frozen=True)
class Result:
    """What a finished command produced.

    ``exit_code`` follows the shell convention: the exit status, or 128+N when signal N killed the
    command (``signal`` is then N). ``timed_out`` is True when our ``timeout`` ended it.
    """

    exit_code: int
    stdout: bytes
    stderr: bytes
    signal: int | None = None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """True when the command exited with status 0."""
        return self.exit_code == 0


def exit_code_of(status: m.ExitStatus) -> int:
    """The shell-style exit code of an :class:`~ferry.wire.messages.ExitStatus` (128+N for signal N)."""
    if status.signal is not None:
        return 128 + status.signal
    return status.code if status.code is not None else 255


#: Whether this protocol version's Exec carries a timeout the server enforces (not in version 1).
_SERVER_TIMEOUTS: Final = "timeout" in m.Exec.__struct_fields__


def _exec_message(
    req_id: int,
    cmd: Command | None,
    env: dict[str, str] | None,
    cwd: str,
    pty: m.PtySpec | None,
    window: int,
    timeout: float | None = None,
) -> m.Exec:
    fields: dict[str, Any] = {"id": req_id, "env": dict(env or {}), "cwd": cwd, "pty": pty, "window": window}
    if timeout is not None and _SERVER_TIMEOUTS and timeout < m.MAX_TIMEOUT:
        # Longer (``--timeout inf``) is no timeout for the server: the wire refuses it as malformed.
        fields["timeout"] = timeout
    if isinstance(cmd, str):
        return m.Exec(command=cmd, **fields)
    if cmd is None:
        if pty is None:
            raise UsageError("no command given")
        return m.Exec(**fields)
    argv = [str(a) for a in cmd]
    if not argv:
        raise UsageError("empty argv: nothing to run")
    return m.Exec(argv=argv, **fields)


class RemoteProcess:
    """A command running on the server. Create with :meth:`start` (or ``client.start(cmd)``).

    Output is read in arrival order with :meth:`read` (or ``async for kind, data in proc``). A
    dispatcher task sorts the connection's events for this command so that stdin credit and the exit
    status are seen even while nobody reads output.
    """

    def __init__(self, mux: Mux, req_id: int, route: Route, window: int) -> None:
        self.mux = mux
        self.id = req_id
        self._route = route
        self.window = window
        #: the process id on the server (0 if the program could not be started)
        self.pid = 0
        #: the exit status once it arrived
        self.status: m.ExitStatus | None = None
        #: True when our ``timeout`` ended the command
        self.timed_out = False
        self._chunks: deque[tuple[int, bytes]] = deque()
        self._have = asyncio.Event()
        #: what the server may still send per output stream, granted back as it is consumed
        self._out_credit = {m.STDOUT: Credit(window), m.STDERR: Credit(window)}
        #: stdin bytes the server accepts now (it grants its window after ExecStarted)
        self._credit = Credit(None, initial=0)
        self._credit_wake = asyncio.Event()
        self._stdin_closed = False
        self._done = asyncio.Event()
        self._error: FerryError | None = None
        self._task: asyncio.Task[None] | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._aux: set[asyncio.Task[Any]] = set()

    # --- starting ---------------------------------------------------------------------------------

    @classmethod
    async def start(
        cls,
        mux: Mux,
        cmd: Command | None,
        *,
        env: dict[str, str] | None = None,
        cwd: str = "",
        pty: m.PtySpec | None = None,
        timeout: float | None = None,
        window: int | None = None,
    ) -> RemoteProcess:
        """Start ``cmd`` on the server and return once it runs.

        ``env``: extra variables (only those the server allows: LANG, LC_*, TZ, TERM, COLUMNS,
        LINES, FERRY_*); ``cwd``: home-relative working folder; ``pty``: run under a terminal;
        ``timeout``: seconds after which the command is cancelled (SIGTERM, SIGKILL 2 s later) and
        :attr:`timed_out` set. Raises :class:`~ferry.errors.PermissionDenied` (``exec-denied``) when
        the account may not run it, NotFound/PathRefused for a bad ``cwd``.
        """
        if timeout is not None and timeout <= 0:
            raise UsageError("the timeout must be positive")
        window = DEFAULT_WINDOW if window is None else window
        req_id, route = mux.open(0)  # unbounded queue: the windows bound what can arrive
        try:
            await mux.send(_exec_message(req_id, cmd, env, cwd, pty, window, timeout))
            reply = await mux.expect(route, m.ExecStarted)
        except BaseException:
            mux.close_route(req_id)
            raise
        proc = cls(mux, req_id, route, window)
        proc.pid = reply.pid
        proc._task = asyncio.create_task(proc._dispatch(), name=f"ferry-exec-{req_id}")
        if timeout is not None:
            loop = asyncio.get_running_loop()
            # Our own clock in any case (Cancel: SIGTERM, SIGKILL 2 s later): a server that does not
            # know Exec.timeout ignores the field.
            proc._timers.append(loop.call_later(timeout, proc._on_timeout))
            proc._timers.append(loop.call_later(timeout + _TIMEOUT_SLACK, proc._on_lost))
        return proc

    async def _dispatch(self) -> None:
        err: FerryError | None = None
        try:
            while True:
                ev = await self.mux.recv(self._route, timeout=_NO_LIMIT)
                if isinstance(ev, Data):
                    credit = self._out_credit.get(ev.stream)
                    if credit is not None and ev.data:
                        credit.receive(len(ev.data))  # beyond our window: the server broke the protocol
                        self._chunks.append((ev.stream, ev.data))
                        self._have.set()
                elif isinstance(ev, m.Window):
                    if ev.stream == m.STDIN:
                        self._credit.grant(ev.increment)
                        self._credit_wake.set()
                elif isinstance(ev, m.ExitStatus):
                    self.status = ev
                    self.timed_out = self.timed_out or ev.timed_out
                    return
                elif isinstance(ev, m.Error):
                    err = from_wire(ev)
                    return
                # ExecStarted, Eof of an output (the exit status follows), Ok for a Cancel: nothing.
        except FerryError as exc:
            err = exc
        finally:
            if err is not None and self._error is None:
                self._error = err
            self._finish()

    def _finish(self) -> None:
        for t in self._timers:
            t.cancel()
        self._done.set()
        self._have.set()
        self._credit_wake.set()
        self.mux.close_route(self.id)

    def _on_timeout(self) -> None:
        if self._done.is_set():
            return
        self.timed_out = True
        self._spawn(self.cancel())

    def _on_lost(self) -> None:
        if not self._done.is_set():
            self._error = FerryTimeout("the server did not end the timed-out command; giving up on it")
            self._finish()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._aux.add(task)
        task.add_done_callback(self._aux.discard)

    # --- state --------------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once the command ended (or the connection failed)."""
        return self._done.is_set()

    @property
    def exit_code(self) -> int | None:
        """Shell-style exit code once known (128+N for signal N), else None."""
        return None if self.status is None else exit_code_of(self.status)

    # --- output -------------------------------------------------------------------------------------

    async def read(self) -> tuple[Kind, bytes] | None:
        """The next output chunk as ``("stdout"|"stderr", bytes)``, or None after the last one.

        Raises the connection's error if it broke, or the server's error for this command.
        """
        while not self._chunks:
            if self._done.is_set():
                if self._error is not None:
                    raise self._error
                return None
            self._have.clear()
            await self._have.wait()
        stream, data = self._chunks.popleft()
        await self._consumed(stream, len(data))
        return _KIND[stream], data

    async def _consumed(self, stream: int, n: int) -> None:
        # Batched by the credit: one Window message per half window consumed (not one per chunk).
        inc = self._out_credit[stream].consumed(n)
        if inc and not self._done.is_set():
            with contextlib.suppress(FerryError):  # a broken connection surfaces in read()
                await self.mux.send(m.Window(id=self.id, stream=stream, increment=inc))

    def __aiter__(self) -> RemoteProcess:
        return self

    async def __anext__(self) -> tuple[Kind, bytes]:
        item = await self.read()
        if item is None:
            raise StopAsyncIteration
        return item

    async def collect(self) -> tuple[bytes, bytes]:
        """Read all remaining output: ``(stdout, stderr)``."""
        out: list[bytes] = []
        err: list[bytes] = []
        while (item := await self.read()) is not None:
            (out if item[0] == "stdout" else err).append(item[1])
        return b"".join(out), b"".join(err)

    async def wait(self) -> int:
        """Wait for the exit and return the exit code; output not read yet is *discarded*."""
        while await self.read() is not None:
            pass
        code = self.exit_code
        assert code is not None
        return code

    # --- input and control -----------------------------------------------------------------------

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` to the command's stdin, waiting for the server's window when it is used up.

        Returns silently when the command has already ended (its remaining input is not needed).
        """
        if self._stdin_closed:
            raise UsageError("stdin of this command was already closed")
        view = memoryview(data).cast("B")
        while view:
            while self._credit.available <= 0:
                if self._done.is_set():
                    return
                self._credit_wake.clear()
                await self._credit_wake.wait()
            if self._done.is_set():
                return
            n = self._credit.take(min(len(view), STDIN_CHUNK))
            await self.mux.send_data(self.id, m.STDIN, view[:n])
            view = view[n:]

    async def close_stdin(self) -> None:
        """Signal end of input (the command reads EOF; under a PTY the server types ^D)."""
        if self._stdin_closed:
            return
        self._stdin_closed = True
        if not self._done.is_set():
            await self.mux.send(m.Eof(id=self.id, stream=m.STDIN))

    async def signal(self, signum: int) -> None:
        """Send signal ``signum`` to the command's process group (a PTY's foreground job)."""
        if not self._done.is_set():
            await self.mux.send(m.Signal(id=self.id, signum=int(signum)))

    async def resize(self, rows: int, cols: int) -> None:
        """Tell the server the terminal size changed (PTY commands)."""
        if not self._done.is_set():
            await self.mux.send(m.Resize(id=self.id, rows=max(1, rows), cols=max(1, cols)))

    async def cancel(self) -> None:
        """Stop the command: SIGTERM to everything it runs, SIGKILL 2 s later (done by the server)."""
        if not self._done.is_set():
            with contextlib.suppress(FerryError):
                await self.mux.send(m.Cancel(id=self.id))

    async def close(self, grace: float = 5.0) -> None:
        """Cancel the command if it still runs and wait (up to ``grace`` s) for it to end."""
        if not self._done.is_set():
            await self.cancel()
            with contextlib.suppress(TimeoutError, FerryError):
                async with asyncio.timeout(grace):
                    await self.wait()
        try:
            await cancel_and_wait(self._task)
        finally:
            self._finish()

    async def __aenter__(self) -> RemoteProcess:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def result(self, stdout: bytes = b"", stderr: bytes = b"") -> Result:
        """A :class:`Result` for the finished command (with the given collected output)."""
        if self.status is None:
            raise UsageError("the command has not finished yet")
        return Result(exit_code_of(self.status), stdout, stderr, self.status.signal, self.timed_out)


class CommandStream:
    """``async for kind, data in client.stream(cmd)``: output chunks as the command writes them.

    The command starts on the first iteration. Afterwards :attr:`exit_code`, :attr:`status` and
    :attr:`timed_out` tell how it ended. Use ``async with client.stream(cmd) as s`` to have the
    command cancelled if you stop iterating early.
    """

    def __init__(
        self,
        mux: Mux,
        cmd: Command,
        *,
        env: dict[str, str] | None = None,
        cwd: str = "",
        timeout: float | None = None,
        window: int | None = None,
    ) -> None:
        self._mux = mux
        self._cmd = cmd
        self._env, self._cwd, self._timeout, self._window = env, cwd, timeout, window
        #: the running process (None until the first iteration)
        self.process: RemoteProcess | None = None

    async def _ensure(self) -> RemoteProcess:
        if self.process is None:
            self.process = await RemoteProcess.start(
                self._mux, self._cmd, env=self._env, cwd=self._cwd, timeout=self._timeout, window=self._window
            )
            await self.process.close_stdin()  # a stream has no input
        return self.process

    def __aiter__(self) -> CommandStream:
        return self

    async def __anext__(self) -> tuple[Kind, bytes]:
        proc = await self._ensure()
        item = await proc.read()
        if item is None:
            raise StopAsyncIteration
        return item

    async def __aenter__(self) -> CommandStream:
        await self._ensure()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.process is not None:
            await self.process.close()

    @property
    def status(self) -> m.ExitStatus | None:
        """The exit status once the stream ended."""
        return None if self.process is None else self.process.status

    @property
    def exit_code(self) -> int | None:
        """Shell-style exit code once the stream ended (128+N for signal N)."""
        return None if self.process is None else self.process.exit_code

    @property
    def timed_out(self) -> bool:
        """True when the stream's ``timeout`` ended the command."""
        return self.process is not None and self.process.timed_out


async def run(
    mux: Mux,
    cmd: Command,
    *,
    input: bytes | None = None,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    cwd: str = "",
) -> Result:
    """Run ``cmd`` to completion and return its :class:`Result` (output collected in memory).

    ``input`` is fed to stdin (then EOF; without it stdin is empty). ``timeout`` cancels the command
    after that many seconds (SIGTERM, then SIGKILL) and returns with ``timed_out=True``.
    """
    proc = await RemoteProcess.start(mux, cmd, env=env, cwd=cwd, timeout=timeout)
    feeder: asyncio.Task[None] | None = None
    try:
        if input:
            # Concurrently with reading: a command that writes before it has read all its input
            # would otherwise wait for us while we wait for it.
            feeder = asyncio.create_task(_feed(proc, input))
        else:
            await proc.close_stdin()
        out, err = await proc.collect()
        if feeder is not None:
            await feeder
        return proc.result(out, err)
    finally:
        if feeder is not None and not feeder.done():
            feeder.cancel()
        await proc.close()


async def _feed(proc: RemoteProcess, data: bytes) -> None:
    await proc.write(data)
    await proc.close_stdin()


# --- local I/O for the command line (ferry exec, ferry shell --pty) ----------------------------------


async def pump_stdin(proc: RemoteProcess, fd: int = 0, chunk: int = 1 << 16) -> None:
    """Forward local ``fd`` to the command's stdin until EOF, then send EOF.

    Terminals, pipes and sockets are waited on with the event loop (``add_reader``) and then read
    with a plain ``read``: the descriptor is *not* switched to non-blocking mode (it is shared with the
    parent shell), and when the command ends nothing is left blocked in a read that would swallow
    the next line typed to the shell. Regular files and ``/dev/null`` (which cannot be polled) are
    simply read. Waits for the server's stdin window, so memory stays bounded.
    """
    loop = asyncio.get_running_loop()
    try:
        pollable = not stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        pollable = False
    while not proc.done:
        if pollable:
            ready: asyncio.Future[None] = loop.create_future()
            try:
                loop.add_reader(fd, _resolve, ready)
            except (OSError, ValueError):  # EPERM: /dev/null and friends cannot be polled
                pollable = False
            else:
                try:
                    await ready
                finally:
                    loop.remove_reader(fd)
        try:
            data = os.read(fd, chunk)
        except BlockingIOError:  # someone else made the shared descriptor non-blocking
            continue
        except OSError:  # EIO: the terminal went away; treat as end of input
            data = b""
        if not data:
            break
        await proc.write(data)
    await proc.close_stdin()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to ``fd`` (blocking; copes with a descriptor left non-blocking)."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]


class Interrupted(FerryError):
    """The user insisted (the third interrupt): we stopped waiting; the server kills the command."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted ({signal_name(signum)}); the remote command is being killed")
        self.signum = signum
        self.exit_code = 128 + signum


#: Local signals forwarded to the remote command by :func:`attach`.
FORWARDED_SIGNALS: Final = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT)


async def attach(
    proc: RemoteProcess,
    *,
    stdin: bool = True,
    stdin_fd: int = 0,
    stdout_fd: int = 1,
    stderr_fd: int = 2,
    handlers: dict[int, Callable[[int], None]] | None = None,
    give_up_after: int = 3,
) -> int:
    """Wire a running command to local descriptors until it ends; return its exit code.

    Output goes to ``stdout_fd``/``stderr_fd`` as it arrives, local stdin is forwarded (EOF too),
    and SIGINT/SIGTERM/SIGHUP/SIGQUIT are forwarded to the remote process group. The
    ``give_up_after``-th such signal stops waiting: the command is cancelled and
    :class:`Interrupted` raised (for a remote command that ignores signals). ``handlers`` adds or
    overrides signal callbacks (e.g. SIGWINCH for terminals). A closed stdout (``| head``) sends the
    command SIGPIPE, as a local pipeline would, and cancels it if it has not ended 2 s later.
    """
    loop = asyncio.get_running_loop()
    gave_up: asyncio.Future[int] = loop.create_future()
    tasks: set[asyncio.Task[Any]] = set()
    count = 0

    def spawn(coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def forward(signum: int) -> None:
        nonlocal count
        count += 1
        if count >= give_up_after:
            if not gave_up.done():
                gave_up.set_result(signum)
            return
        spawn(proc.signal(signum))

    async def cancel_later() -> None:
        await asyncio.sleep(2.0)
        await proc.cancel()

    async def copy_output() -> None:
        stdout_open = True
        async for kind, data in proc:
            if kind == "stderr":
                with contextlib.suppress(OSError):  # nowhere to report a broken stderr
                    write_all(stderr_fd, data)
            elif stdout_open:
                try:
                    write_all(stdout_fd, data)
                except BrokenPipeError:
                    stdout_open = False  # the rest is read and dropped so the command is not stuck
                    spawn(proc.signal(_signal.SIGPIPE))
                    spawn(cancel_later())

    table: dict[int, Callable[[int], None]] = {sig: forward for sig in FORWARDED_SIGNALS}
    table.update(handlers or {})
    output = asyncio.create_task(copy_output())
    feeder: asyncio.Task[None] | None = None
    try:
        with SignalForwarder(table):
            if stdin:
                feeder = asyncio.create_task(pump_stdin(proc, stdin_fd))
            else:
                await proc.close_stdin()
            waiters: set[asyncio.Future[Any]] = {output, gave_up}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if gave_up.done() and not output.done():
                await proc.cancel()
                raise Interrupted(gave_up.result())
            await output  # raises the connection's error, if any
    finally:
        for task in (output, feeder, *tasks):
            if task is not None and not task.done():
                task.cancel()
        await asyncio.gather(*(t for t in (output, feeder, *tasks) if t is not None), return_exceptions=True)
    code = proc.exit_code
    assert code is not None
    return code


class SignalForwarder:
    """Route local signals to callbacks on the event loop while a command runs; restore afterwards.

    ``add_signal_handler`` replaces the Python-level handler; on exit the previous handler (e.g.
    ``asyncio.run``'s Ctrl-C handler) is put back, so a REPL around us keeps working. Outside the
    main thread signals cannot be caught, and nothing is installed.
    """

    def __init__(self, handlers: dict[int, Callable[[int], None]]) -> None:
        self._handlers = handlers
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> SignalForwarder:
        loop = asyncio.get_running_loop()
        for signum, callback in self._handlers.items():
            previous = _signal.getsignal(signum)
            try:
                loop.add_signal_handler(signum, callback, signum)
            except (RuntimeError, ValueError):  # not the main thread / not supported
                continue
            self._saved[signum] = previous
        return self

    def __exit__(self, *exc: object) -> None:
        loop = asyncio.get_running_loop()
        for signum, previous in self._saved.items():
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
                _signal.signal(signum, previous if previous is not None else _signal.SIG_DFL)
        self._saved.clear()


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15 (or the number when unknown)."""
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return str(signum)
