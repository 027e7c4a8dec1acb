"""Remote commands on the server: spawn, stream, flow control, signals, PTYs, clean-up.

One :class:`ExecService` per session (created only for users with ``exec_allowed``) owns the
session's running :class:`Command` objects, keyed by the request id chosen by the client.

Design decisions (see docs/exec.md for the user-facing side):

* **Flow control per stream.** The client grants a window per output stream (``Exec.window`` to
  start with, then :class:`~ferry.wire.messages.Window` increments). The server reads from the
  child's stdout/stderr pipe only as many bytes as the client has granted *on that stream*, so it
  never buffers output (memory stays bounded whatever the command prints) and a stalled stderr
  consumer never blocks stdout (the SSH-client deadlock with >2 MiB of output). Stdin works the same
  the other way round: the server grants the client :data:`STDIN_WINDOW` bytes and more as the child
  consumes them, and data frames are only queued, never awaited, so the session's reader loop can
  never be blocked by a child that does not read its stdin.
* **Process groups and sessions.** Every command starts in a new session (``setsid``), so the
  leader's pid is the process-group and session id. Signals go to the whole group. The leader is
  reaped *last*: while it is an unreaped zombie its pid cannot be reused, so ``killpg`` on it can
  never hit an unrelated process.
* **No orphans.** When the leader exits, whatever it left in its process group is killed; when the
  session ends (client gone, server stopping) every command gets SIGTERM, then SIGKILL after a
  grace period, including processes that moved to another process group of the same session.
* **Exit detection** uses a pidfd in the event loop (no SIGCHLD handler, no thread per command,
  works in any thread and with uvloop); a waiting thread is the fallback where pidfds are missing.
* **Working directory** is opened through the session's storage (the jail of the folder backend)
  (``O_NOFOLLOW`` walk from the home) and handed to the child as ``/proc/self/fd/N``: the child
  ``chdir``\\s into that already-opened directory, never re-resolving a path, so a symlink swapped
  in after the check cannot redirect it.

Commands run with the OS rights of the server process; the jail only limits the *start* directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import re
import resource
import shlex
import signal
import struct
import subprocess
import termios
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Final

from ferry.errors import RemoteError
from ferry.server.folder import FolderStorage
from ferry.server.service import FolderService, ServiceHost
from ferry.textsafe import safe_text
from ferry.wire import Data
from ferry.wire import messages as m
from ferry.wire.codes import ErrorCode
from ferry.wire.credit import Credit
from ferry.wire.errors import RemoteProtocolError

if TYPE_CHECKING:
    from ferry.server.accounts import User

__all__ = [
    "BASE_PATH",
    "ENV_ALLOWED_NAMES",
    "ENV_ALLOWED_PREFIXES",
    "Command",
    "ExecService",
    "build_env",
    "plan_argv",
    "simple_words",
]

#: Largest read from a child's pipe, i.e. the largest data frame a command produces.
CHUNK: Final = 1 << 18
#: Requested pipe capacity (F_SETPIPE_SZ): fewer wake-ups per megabyte for fast producers.
PIPE_SIZE: Final = 1 << 20
#: Stdin bytes the client may send ahead of what the child has consumed.
STDIN_WINDOW: Final = 1 << 20
#: After the leader exited, how long a *quiet* output pipe is still waited on (it may be held open
#: by a process that escaped the process group); a pipe that keeps delivering data is read to the end.
EXIT_GRACE: Final = 1.0
#: SIGTERM -> SIGKILL delay when a command is cancelled (client timeout, Cancel).
KILL_GRACE: Final = 2.0
#: SIGTERM -> SIGKILL delay when the session ends (shorter: the server may be shutting down).
CLOSE_GRACE: Final = 1.0
#: Give up waiting for a SIGKILLed process after this long (uninterruptible sleep on a dead NFS...).
REAP_LIMIT: Final = 5.0

#: The fixed PATH of every command (the server's own PATH is not leaked into commands).
BASE_PATH: Final = "/usr/local/bin:/usr/bin:/bin"
#: Variables a client may set with ``-e NAME=VALUE`` (plus the prefixes below).
ENV_ALLOWED_NAMES: Final = frozenset({"LANG", "TZ", "TERM", "COLUMNS", "LINES"})
ENV_ALLOWED_PREFIXES: Final = ("LC_", "FERRY_")
_ENV_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

#: Characters that mean something to ``sh`` outside quotes. With a program allow list a command
#: string is only accepted when it is a plain list of words (see :func:`simple_words`).
_SHELL_META: Final = frozenset(";&|<>()$`*?[]{}~#!\n\r\\\"'")

_SIGNAL_NAMES: Final = {int(s): s.name for s in signal.Signals}


def _denied(message: str) -> RemoteError:
    """The refusal every client sees as ``exec-denied`` (a PermissionDenied on the client)."""
    return ErrorCode.EXEC_DENIED.error(message)


# --- policy: environment and program ------------------------------------------------------------


def env_name_allowed(name: str) -> bool:
    """Whether a client may set environment variable ``name`` (see :data:`ENV_ALLOWED_NAMES`)."""
    if not _ENV_NAME_RE.fullmatch(name):
        return False
    return name in ENV_ALLOWED_NAMES or name.startswith(ENV_ALLOWED_PREFIXES)


def build_env(user: User, client_env: dict[str, str], term: str | None) -> dict[str, str]:
    """The complete environment of a command: a fixed minimal base plus allowed client variables.

    Nothing of the server's own environment is passed on (it may hold secrets, and commands must
    behave the same whoever started the server). Raises ``exec-denied`` naming a refused variable.
    """
    env = {
        "PATH": BASE_PATH,
        "HOME": str(user.home),
        "USER": user.name,
        "LOGNAME": user.name,
        "SHELL": "/bin/sh",
        "LANG": "C.UTF-8",
    }
    if term is not None:
        env["TERM"] = term
    for name, value in client_env.items():
        if not env_name_allowed(name):
            raise _denied(
                f"environment variable {safe_text(name)!r} may not be set by a client; allowed are "
                f"{', '.join(sorted(ENV_ALLOWED_NAMES))}, LC_* and FERRY_*"
            )
        if "\0" in value:
            raise _denied(f"environment variable {safe_text(name)!r} contains a NUL character")
        env[name] = value
    return env


def simple_words(command: str) -> list[str]:
    """Split a command string into words *only* if ``sh`` would read it as a plain simple command.

    Used when the user has a program allow list: then ``sh -c`` is not used at all (the allow list
    would be meaningless: ``ls; rm -rf ~`` starts with ``ls``). Quotes, ``$``, globs, redirections,
    separators, ``~``, backslashes and assignments are refused (we would otherwise run the words with
    different meaning than a shell would), so what runs is exactly what ``sh`` would have run.
    Raises ``exec-denied`` naming the first offending character.
    """
    for ch in command:
        if ch in _SHELL_META:
            raise _denied(
                f"this account may only run allowed programs, so the command must be plain words "
                f"without shell syntax (found {safe_text(ch)!r}); pass the program and its "
                "arguments separately instead (ferry exec HOST -- PROG ARG...)"
            )
    return shlex.split(command)


def plan_argv(user: User, msg: m.Exec) -> tuple[list[str], str]:
    """The argv to execute for ``msg`` and the program name checked against the allow list.

    * ``argv`` given: run it directly (no shell); the program is ``argv[0]``.
    * ``command`` given: ``/bin/sh -c command`` (like ssh) -- unless the user has an allow list,
      then the command must be plain words (:func:`simple_words`) and runs without a shell.
    * neither, with a PTY: an interactive ``/bin/sh`` (allowed when ``sh`` or ``/bin/sh`` is).
    """
    if msg.command is not None and msg.argv is not None:
        raise ErrorCode.BAD_REQUEST.error("give either a command string or an argv list, not both")
    if msg.argv is not None:
        if not msg.argv or not msg.argv[0]:
            raise ErrorCode.BAD_REQUEST.error("empty argv: nothing to run")
        argv = list(msg.argv)
        program = argv[0]
    elif msg.command is not None:
        if user.exec_allow is None:
            return ["/bin/sh", "-c", msg.command], "sh"
        argv = simple_words(msg.command)
        if not argv:
            raise ErrorCode.BAD_REQUEST.error("empty command: nothing to run")
        program = argv[0]
    elif msg.pty is not None:
        if not (user.may_exec("sh") or user.may_exec("/bin/sh")):
            raise _denied("this account may not start an interactive shell (sh is not in its allow list)")
        return ["/bin/sh"], "sh"
    else:
        raise ErrorCode.BAD_REQUEST.error("no command given")
    if any("\0" in a for a in argv):
        raise ErrorCode.BAD_REQUEST.error("the command contains a NUL character")
    if not user.may_exec(program):
        allowed = ", ".join(user.exec_allow or ())
        raise _denied(
            f"program {safe_text(program)!r} is not allowed for user {user.name!r} (allowed: {allowed})"
        )
    return argv, program


# --- process helpers ----------------------------------------------------------------------------


def _take_ctty() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Make the PTY on fd 0 the controlling terminal of the new session (after setsid)."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _child_setup(take_ctty: bool, max_file_size: int | None) -> Callable[[], None] | None:
    """What the child runs between fork and exec, or None (a ``preexec_fn`` disables the faster
    vfork, so only when needed): take the PTY as controlling terminal, and cap the size of the
    files it writes (``RLIMIT_FSIZE``, soft and hard, so the command cannot raise it again)."""
    if max_file_size is None:
        return _take_ctty if take_ctty else None
    limits = (max_file_size, max_file_size)

    def setup() -> None:  # pragma: no cover - runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)  # one C call, as _take_ctty
        if take_ctty:
            _take_ctty()

    return setup


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _session_members(sid: int) -> Iterable[int]:
    """Pids of live processes in session ``sid`` (read from /proc; empty without /proc)."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return
    for name in names:
        if name.isdigit() and _sid_of(int(name)) == sid:
            yield int(name)


def _sid_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and ')': parse after the *last* ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[3])  # state ppid pgrp session ...
    except (IndexError, ValueError):
        return None


def _kill_session(sid: int, signum: int, *, skip: int) -> None:
    """Send ``signum`` to every process of session ``sid`` except pid ``skip`` (the zombie leader).

    Race-free against pid reuse: each process is pinned with a pidfd *before* its session is
    re-checked, so the signal can only reach the process that was checked.
    """
    for pid in _session_members(sid):
        if pid == skip:
            continue
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            if _sid_of(pid) == sid:
                signal.pidfd_send_signal(pidfd, signum)
        except OSError:
            pass
        finally:
            os.close(pidfd)


def _describe(status: m.ExitStatus) -> str:
    if status.signal is not None:
        return f"signal {_SIGNAL_NAMES.get(status.signal, status.signal)}"
    return str(status.code)


# --- one running command --------------------------------------------------------------------------


class Command:
    """One command started by an :class:`~ferry.wire.messages.Exec` request.

    Registered in the session's channels under its id so stdin data frames reach :meth:`on_data`;
    ``abort`` (Cancel from the client) terminates it. Its life is one task, :meth:`_run`: wait for the
    leader to exit, kill leftovers, drain the outputs, reap, send :class:`ExitStatus`, log.
    """

    def __init__(self, handler: ExecService, msg: m.Exec, argv: list[str], env: dict[str, str]) -> None:
        self.handler = handler
        self.svc = handler
        self.id = msg.id
        self.msg = msg
        self.argv = argv
        self.env = env
        self.pty = msg.pty
        self.loop = asyncio.get_running_loop()
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.started = time.monotonic()
        # Output: fd per stream (pty: only STDOUT, the master); credit granted by the client.
        self.out_fds: dict[int, int] = {}
        # The client may grow its window (its grants are only checked for sanity): window=None.
        self.credit = {m.STDOUT: Credit(None, initial=msg.window), m.STDERR: Credit(None, initial=msg.window)}
        self.sent = {m.STDOUT: 0, m.STDERR: 0}
        self._credit_wake: dict[int, asyncio.Event] = {m.STDOUT: asyncio.Event(), m.STDERR: asyncio.Event()}
        self._read_waiters: dict[int, asyncio.Future[None]] = {}
        # Stdin: queued frames (bounded by the window we granted), our fd, state.
        self.in_fd = -1
        self._stdin: deque[bytes] = deque()
        self._stdin_queued = 0
        self._stdin_credit = Credit(STDIN_WINDOW)  # what the client may still send
        self._stdin_eof = False
        self._stdin_broken = False  # the child closed its stdin: data is dropped
        self._stdin_wake = asyncio.Event()
        self.received = 0
        # Lifecycle.
        self._exited = asyncio.Event()
        self._pidfd = -1
        self._task: asyncio.Task[None] | None = None
        self._aux: set[asyncio.Task[None]] = set()
        self._reaped = False
        self.status: m.ExitStatus | None = None
        self.note = ""  # why it ended, when not by itself (cancelled, disconnected)
        self.timed_out = False
        self._timer: asyncio.TimerHandle | None = None

    # --- start ---------------------------------------------------------------------------------

    def spawn(self, cwd_fd: int, max_file_size: int | None = None) -> None:
        """Start the process in directory ``cwd_fd`` (closed by the caller), each file it writes
        limited to ``max_file_size`` bytes (None: no limit); raises OSError."""
        child_fds: list[int] = []
        try:
            if self.pty is not None:
                master, slave = os.openpty()
                child_fds.append(slave)
                self.out_fds[m.STDOUT] = master
                self.in_fd = master
                _set_winsize(slave, self.pty.rows, self.pty.cols)
                stdio = (slave, slave, slave)
                # preexec_fn (which disables vfork) only when needed: TIOCSCTTY must run in the
                # child after setsid, and it calls a single C function, nothing that takes Python locks.
                preexec = _child_setup(True, max_file_size)
            else:
                in_r, in_w = os.pipe2(os.O_CLOEXEC)
                out_r, out_w = os.pipe2(os.O_CLOEXEC)
                err_r, err_w = os.pipe2(os.O_CLOEXEC)
                child_fds += (in_r, out_w, err_w)
                self.in_fd, self.out_fds[m.STDOUT], self.out_fds[m.STDERR] = in_w, out_r, err_r
                for fd in (out_r, err_r):
                    with contextlib.suppress(OSError):  # capped by fs.pipe-max-size: best effort
                        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
                stdio = (in_r, out_w, err_w)
                preexec = _child_setup(False, max_file_size)
            for fd in (self.in_fd, *self.out_fds.values()):
                os.set_blocking(fd, False)
            self.proc = subprocess.Popen(
                self.argv,
                stdin=stdio[0],
                stdout=stdio[1],
                stderr=stdio[2],
                # The child chdir()s into the directory we opened (race-free, see module docstring);
                # chdir happens in the child before fds are closed, so this fd is still there.
                cwd=_fd_path(cwd_fd),
                env=self.env,
                start_new_session=True,
                preexec_fn=preexec,
                close_fds=True,
            )
        except BaseException:
            for fd in {self.in_fd, *self.out_fds.values()}:
                if fd >= 0:
                    os.close(fd)
            self.in_fd = -1
            self.out_fds.clear()
            raise
        finally:
            for fd in child_fds:
                os.close(fd)
        self.pid = self.proc.pid
        self._watch_exit()

    def _watch_exit(self) -> None:
        """Set ``_exited`` when the leader exits, *without* reaping it (see module docstring)."""
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except OSError:  # no pidfd (old kernel, seccomp): a thread waits with WNOWAIT instead
            threading.Thread(target=self._wait_thread, name=f"ferry-exec-{self.pid}", daemon=True).start()
            return

        def ready() -> None:
            self.loop.remove_reader(self._pidfd)
            self._exited.set()

        self.loop.add_reader(self._pidfd, ready)

    def _wait_thread(self) -> None:
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        with contextlib.suppress(RuntimeError):  # loop closed: nothing left to tell
            self.loop.call_soon_threadsafe(self._exited.set)

    def start_task(self) -> None:
        """Start the lifecycle task (after ExecStarted was sent) and the timeout, if any."""
        self._task = asyncio.create_task(self._run(), name=f"ferry-exec-{self.id}")
        # Protocol version 1 has no timeout field in Exec (clients time out with Cancel); should one
        # be added, the server enforces it and reports ExitStatus.timed_out.
        timeout = getattr(self.msg, "timeout", None)
        if isinstance(timeout, int | float) and timeout > 0:
            self._timer = self.loop.call_later(timeout, self._expire)

    def _expire(self) -> None:
        if self._reaped or self._exited.is_set():
            return
        self.timed_out = True
        self.note = "timed out"
        self._spawn_aux(self._terminate(KILL_GRACE))

    # --- input from the client -------------------------------------------------------------------

    async def on_data(self, ev: Data) -> None:
        """Queue stdin bytes (never waits for the child: the session's reader must not block)."""
        if ev.stream != m.STDIN:
            raise RemoteProtocolError(f"data on stream {ev.stream} of command {self.id}: only stdin (0)")
        n = len(ev.data)
        self._stdin_credit.receive(n)  # more than the window we granted: a protocol error
        self.received += n
        if self._stdin_broken or self._stdin_eof:
            await self._grant_stdin(n)  # dropped: keep the client flowing until the exit status
            return
        self._stdin.append(ev.data)
        self._stdin_queued += n
        self._stdin_wake.set()

    def stdin_eof(self) -> None:
        """The client's stdin ended: close the child's stdin once the queue is written."""
        self._stdin_eof = True
        self._stdin_wake.set()

    def grant(self, stream: int, increment: int) -> None:
        """The client granted ``increment`` more bytes on output ``stream`` (beyond its own
        window: a protocol error)."""
        if stream in self.credit:
            self.credit[stream].grant(increment)
            self._credit_wake[stream].set()

    def send_signal(self, signum: int) -> None:
        """Deliver ``signum`` to the command's process group (a PTY's foreground group)."""
        if self._reaped:
            return  # the pgid may belong to someone else by now
        pgid = self.pid
        if self.pty is not None and m.STDOUT in self.out_fds:
            with contextlib.suppress(OSError):
                pgid = os.tcgetpgrp(self.out_fds[m.STDOUT])  # the job in the foreground
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signum)

    def resize(self, rows: int, cols: int) -> None:
        """Set the PTY size (the kernel sends SIGWINCH to the foreground group)."""
        fd = self.out_fds.get(m.STDOUT)
        if self.pty is not None and fd is not None:
            with contextlib.suppress(OSError):
                _set_winsize(fd, rows, cols)

    async def abort(self) -> None:
        """Cancel from the client (e.g. its timeout): SIGTERM the group now, SIGKILL after a grace."""
        if self.svc.channels.get(self.id) is self:
            # Still registered: this is the session's clean-up (a Cancel pops us first), and
            # ExecService.close() follows, which kills and reaps without sending anything.
            return
        self.note = self.note or "cancelled"
        self._spawn_aux(self._terminate(KILL_GRACE))

    # --- lifecycle ------------------------------------------------------------------------------

    def _spawn_aux(self, coro: Coroutine[None, None, None]) -> None:
        task = asyncio.create_task(coro)
        self._aux.add(task)  # keep a reference: the loop only holds weak ones
        task.add_done_callback(self._aux.discard)

    async def _terminate(self, grace: float) -> None:
        """SIGTERM everything of the command; SIGKILL what is left after ``grace`` seconds."""
        self._kill_all(signal.SIGTERM)
        try:
            async with asyncio.timeout(grace):
                await self._exited.wait()
        except TimeoutError:
            pass
        # Also after the leader's exit: what it left behind may ignore SIGTERM.
        self._kill_all(signal.SIGKILL)

    def _kill_all(self, signum: int) -> None:
        if self._reaped or self.pid <= 0:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)
        # Processes that moved to another process group of the session (job control, PTY shells).
        _kill_session(self.pid, signum, skip=self.pid)

    async def _run(self) -> None:
        try:
            await self._lifecycle()
        except (ConnectionError, OSError) as exc:
            # The connection broke while streaming: the session ends, and ExecService.close() kills
            # and reaps whatever is left (we are still in self.handler.commands).
            self.note = f"connection lost ({type(exc).__name__})"
        except Exception:
            # A bug or an unexpected I/O error: kill the command (reaped when the session ends)
            # and tell the client instead of leaving it waiting for an exit status.
            self.svc.ctx.log.exception("exec %d failed", self.id)
            self.note = "internal error"
            self._spawn_aux(self._terminate(CLOSE_GRACE))
            with contextlib.suppress(Exception):
                await self.svc.send(
                    ErrorCode.INTERNAL.reply(self.id, "the command failed on the server; it was killed")
                )

    async def _lifecycle(self) -> None:
        pumps = [asyncio.create_task(self._pump(stream, fd)) for stream, fd in self.out_fds.items()]
        feeder = asyncio.create_task(self._feed_stdin())
        try:
            await self._exited.wait()
            # The leader is a zombie now (pid reserved): kill what it left in its group, cheaply.
            # PTY sessions also scan for jobs in other groups (a shell with job control).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            if self.pty is not None:
                _kill_session(self.pid, signal.SIGKILL, skip=self.pid)
            for fut in self._read_waiters.values():  # re-check the pipes, now with the exit grace
                _resolve(fut)
            await asyncio.gather(*pumps)
        finally:
            for task in (*pumps, feeder):
                task.cancel()
            await asyncio.gather(*pumps, feeder, return_exceptions=True)
            self._close_fds()
        status = self._reap()
        self.status = status
        if self.svc.channels.get(self.id) is self:
            del self.svc.channels[self.id]
        self.handler.commands.pop(self.id, None)
        self._log(status)
        await self.svc.send(status)

    async def shutdown(self, grace: float) -> None:
        """The session ends: stop streaming, kill everything, reap (never sends anything)."""
        self.note = self.note or "session ended"
        try:
            if self._task is not None and not self._task.done():
                self._task.cancel()
                await asyncio.wait({self._task})  # (_run never raises anything but cancellation)
            for task in list(self._aux):
                task.cancel()
            self._close_fds()
            if self._reaped:
                return
            await self._terminate(grace)
            try:
                async with asyncio.timeout(REAP_LIMIT):
                    await self._exited.wait()
            except TimeoutError:
                self.svc.ctx.log.warning("exec pid %d did not die after SIGKILL", self.pid)
                return
            self._log(self._reap())
        except asyncio.CancelledError:
            # Cancelled again (a server shutdown that ran out of time): skip the grace period
            # rather than leave anything running.
            self._kill_all(signal.SIGKILL)
            raise

    def _reap(self) -> m.ExitStatus:
        assert self.proc is not None
        rc = self.proc.poll()  # Popen reaps, so its own bookkeeping stays right
        if rc is None:  # cannot happen after _exited; be safe rather than hang
            rc = self.proc.wait()
        self._reaped = True
        if self._timer is not None:
            self._timer.cancel()
        if self._pidfd >= 0:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if rc < 0:
            return m.ExitStatus(id=self.id, signal=-rc, timed_out=self.timed_out)
        return m.ExitStatus(id=self.id, code=rc, timed_out=self.timed_out)

    def _close_fds(self) -> None:
        for fd in {self.in_fd, *self.out_fds.values()}:
            if fd >= 0:
                with contextlib.suppress(Exception):
                    self.loop.remove_reader(fd)
                with contextlib.suppress(Exception):
                    self.loop.remove_writer(fd)
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.in_fd = -1
        self.out_fds.clear()

    def _log(self, status: m.ExitStatus) -> None:
        user = self.svc.user
        self.svc.ctx.log.info(
            "exec user=%s peer=%s id=%d pid=%d pty=%s command=%s exit=%s seconds=%.3f "
            "stdout=%d stderr=%d stdin=%d%s",
            user.name if user else "-",
            self.svc.peer,
            self.id,
            self.pid,
            self.pty is not None,
            self.label(),
            _describe(status),
            time.monotonic() - self.started,
            self.sent[m.STDOUT],
            self.sent[m.STDERR],
            self.received,
            f" note={self.note}" if self.note else "",
        )

    def label(self) -> str:
        """The command as the client gave it (for logs)."""
        if self.msg.command is not None:
            return self.msg.command
        if self.msg.argv is not None:
            return shlex.join(self.msg.argv)
        return "(interactive shell)"

    # --- output pumps ---------------------------------------------------------------------------

    async def _wait_readable(self, stream: int, fd: int) -> bool:
        """Wait until ``fd`` is readable; False if the leader has exited and the pipe stayed quiet.

        :meth:`_run` resolves a pending wait when the leader exits (a spurious wake-up: the pump
        simply reads again), so every later wait runs with the :data:`EXIT_GRACE` deadline.
        """
        fut: asyncio.Future[None] = self.loop.create_future()
        self.loop.add_reader(fd, _resolve, fut)
        self._read_waiters[stream] = fut
        try:
            if not self._exited.is_set():
                await fut
                return True
            try:
                async with asyncio.timeout(EXIT_GRACE):
                    await fut
            except TimeoutError:
                return False
            return True
        finally:
            self._read_waiters.pop(stream, None)
            self.loop.remove_reader(fd)

    async def _pump(self, stream: int, fd: int) -> None:
        """Move output from ``fd`` to the client, never more than the client granted on ``stream``."""
        wake = self._credit_wake[stream]
        credit = self.credit[stream]
        while True:
            while credit.available <= 0:
                wake.clear()
                await wake.wait()
            try:
                data = os.read(fd, min(credit.available, CHUNK))
            except BlockingIOError:
                if not await self._wait_readable(stream, fd):
                    break  # held open by something that escaped the group; stop waiting
                continue
            except OSError as exc:
                if exc.errno == errno.EIO:  # PTY master: every slave fd is closed
                    break
                raise
            if not data:
                break
            credit.spend(len(data))
            self.sent[stream] += len(data)
            await self.svc.send_data(self.id, stream, data)
        await self.svc.send(m.Eof(id=self.id, stream=stream))

    # --- stdin ----------------------------------------------------------------------------------

    async def _grant_stdin(self, n: int) -> None:
        """Return ``n`` consumed stdin bytes to the client's window (batched: half a window)."""
        inc = self._stdin_credit.consumed(n)
        if inc:
            await self.svc.send(m.Window(id=self.id, stream=m.STDIN, increment=inc))

    async def _feed_stdin(self) -> None:
        fd = self.in_fd
        while True:
            while not self._stdin and not self._stdin_eof:
                self._stdin_wake.clear()
                await self._stdin_wake.wait()
            if not self._stdin:
                break  # EOF and everything written
            data = self._stdin[0]
            try:
                n = os.write(fd, data)
            except BlockingIOError:
                fut: asyncio.Future[None] = self.loop.create_future()
                self.loop.add_writer(fd, _resolve, fut)
                try:
                    await fut
                finally:
                    self.loop.remove_writer(fd)
                continue
            except OSError as exc:  # EPIPE: the child closed its stdin; EIO: PTY gone
                if exc.errno not in (errno.EPIPE, errno.EIO):
                    raise
                self._stdin_broken = True
                dropped = self._stdin_queued
                self._stdin.clear()
                self._stdin_queued = 0
                await self._grant_stdin(dropped)
                return
            if n == len(data):
                self._stdin.popleft()
            else:
                self._stdin[0] = data[n:]
            self._stdin_queued -= n
            await self._grant_stdin(n)
        if self.pty is not None:
            # A terminal has no half-close: type the EOF character (^D) instead, like a user would.
            with contextlib.suppress(OSError):
                os.write(fd, termios.tcgetattr(fd)[6][termios.VEOF])
        else:
            os.close(fd)
            self.in_fd = -1


def _fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


# --- the per-session service --------------------------------------------------------------------


async def _handle_exec(svc: ExecService, msg: m.Exec) -> None:
    await svc.start(msg)


async def _handle_command_input(svc: ExecService, msg: m.Window | m.Eof | m.Signal | m.Resize) -> None:
    """Flow control, stdin end, signals and resizes of a running command (called by the session's
    reader, must not block)."""
    svc.command_input(msg)


class ExecService(FolderService):
    """Routes Exec/Window/Eof/Signal/Resize of one session to its commands; kills them at the end."""

    reader_handlers = {
        m.Exec: _handle_exec,
        m.Window: _handle_command_input,
        m.Eof: _handle_command_input,
        m.Signal: _handle_command_input,
        m.Resize: _handle_command_input,
    }

    def __init__(self, host: ServiceHost, storage: FolderStorage) -> None:
        super().__init__(host, storage)
        self.commands: dict[int, Command] = {}

    def command_input(self, msg: m.Window | m.Eof | m.Signal | m.Resize) -> None:
        """Hand a command's input message to it."""
        cmd = self.commands.get(msg.id)
        if cmd is None:
            return  # the command just ended: late window updates, signals, resizes are harmless
        if isinstance(msg, m.Window):
            cmd.grant(msg.stream, msg.increment)
        elif isinstance(msg, m.Eof):
            if msg.stream == m.STDIN:
                cmd.stdin_eof()
        elif isinstance(msg, m.Signal):
            cmd.send_signal(msg.signum)
        elif isinstance(msg, m.Resize):
            cmd.resize(msg.rows, msg.cols)

    async def start(self, msg: m.Exec) -> None:
        """Start the command ``msg`` asks for (or answer why not)."""
        user, storage = self.user, self.storage
        if msg.id in self.commands or msg.id in self.channels or msg.id in self.requests.gets or msg.id == 0:
            raise ErrorCode.BAD_REQUEST.error(f"request id {msg.id} is already in use")
        try:
            argv, program = plan_argv(user, msg)
            env = build_env(user, dict(msg.env), msg.pty.term if msg.pty is not None else None)
        except RemoteError as exc:
            self.ctx.log.warning(
                "exec refused user=%s peer=%s command=%s: %s",
                user.name,
                self.peer,
                msg.command if msg.command is not None else shlex.join(msg.argv or []),
                exc.message,
            )
            raise
        max_file_size = await self._max_file_size()
        cwd_fd = storage.open_dir(msg.cwd)  # NotFound / PathRefused (symlink, .., absolute) as usual
        cmd = Command(self, msg, argv, env)
        cwd = _fd_path(cwd_fd)
        try:
            cmd.spawn(cwd_fd, max_file_size)
        except OSError as exc:
            if exc.filename == cwd:  # the child's chdir failed: no /proc?
                raise ErrorCode.EXEC_FAILED.error(
                    f"cannot enter the working directory: {exc.strerror}"
                ) from exc
            if isinstance(exc, FileNotFoundError | PermissionError | NotADirectoryError):
                # Like sh: "command not found" is exit status 127, "not executable" 126.
                await self._failed_start(cmd, program, exc)
                return
            raise ErrorCode.EXEC_FAILED.error(f"cannot start the command: {exc.strerror or exc}") from exc
        finally:
            os.close(cwd_fd)
        self.commands[msg.id] = cmd
        self.channels[msg.id] = cmd
        await self.send(m.ExecStarted(id=msg.id, pid=cmd.pid))
        await self.send(m.Window(id=msg.id, stream=m.STDIN, increment=STDIN_WINDOW))
        cmd.start_task()

    async def _max_file_size(self) -> int | None:
        """The most bytes one file written by a command of this user may reach: what is left of the
        quota when the command starts (a command's writes are not counted against the quota, so
        this bounds each file, not the total); None without a quota."""
        quota = self.user.quota
        if quota is None:
            return None
        used = await self.current_usage() + self.ctx.usage.reserved(self.user.name)
        left = max(0, quota - used)
        _soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        # A child cannot raise its hard limit: never ask for more than the server has.
        return left if hard == resource.RLIM_INFINITY else min(left, hard)

    async def _failed_start(self, cmd: Command, program: str, exc: OSError) -> None:
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        what = "command not found" if code == 127 else (exc.strerror or "cannot execute").lower()
        text = f"ferry: {program}: {what}\n".encode("utf-8", "replace")
        await self.send(m.ExecStarted(id=cmd.id, pid=0))
        text = text[: cmd.msg.window]  # never more than the client granted
        if text:
            await self.send_data(cmd.id, m.STDERR, text)
        await self.send(m.Eof(id=cmd.id, stream=m.STDOUT))
        await self.send(m.Eof(id=cmd.id, stream=m.STDERR))
        status = m.ExitStatus(id=cmd.id, code=code)
        cmd.sent[m.STDERR] = len(text)
        cmd._log(status)
        await self.send(status)

    async def close(self) -> None:
        """The session ended: kill every command (SIGTERM, then SIGKILL) and reap it."""
        cmds = list(self.commands.values())
        self.commands.clear()
        if cmds:
            await asyncio.gather(*(c.shutdown(CLOSE_GRACE) for c in cmds), return_exceptions=True)
