"""The resident process: one logged-in connection, lent to later commands through a Unix socket.

Started by :func:`ferry.resident.spawn.start` (``python -m ferry.resident``), it reads its
:class:`~ferry.resident.spawn.Spec` from standard input, connects and logs in, and listens on its
socket in the private runtime folder (:mod:`ferry.resident.runtime`). It leaves when:

* nothing ran for ``persist`` seconds (checked when a command ends and when that time is up);
* its connection ended (the server closed it, e.g. its own idle timeout, or it broke);
* a command found the server's pin changed in known_hosts, or ``ferry resident stop`` asked;
* it gets SIGTERM.

On the way out it removes its socket (only if the name is still its own) and says goodbye.

A command (:meth:`Resident.handle`): the peer must be our user and group (SO_PEERCRED), in our
mount namespace and root; the request brings the command line, the environment, the umask and
four descriptors: the working folder and standard input, output and error. One command runs at
a time (another one meanwhile is told to run itself: it connects directly, as without a resident);
it runs in a thread of its own, with the process's working folder, umask, environment and
descriptors 0-2 set to the caller's for its duration (they are per process, hence one at a time),
through :func:`ferry.cli.main`, the same code as a direct command. Its coroutine runs on this
process's event loop, where the connection lives (:class:`CommandSession`); a ``C`` from the
caller (Ctrl-C), or the caller going away, cancels it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import click

from ferry.aio import run as aio_run
from ferry.cli import main as cli_main
from ferry.cli.common import PLAIN_WARNING, default_user
from ferry.client.aclient import AsyncClient
from ferry.client.auth import LoginOptions
from ferry.client.config import load_config
from ferry.client.known_hosts import KnownHosts
from ferry.client.location import Location
from ferry.errors import FerryError
from ferry.resident import context, runtime, thin
from ferry.resident.spawn import Spec, creds_digest

T = TypeVar("T")

#: Seconds a caller has to send its request once connected.
_REQUEST_TIMEOUT = 10.0
#: Connections handled at once (one runs, the others are told to run themselves quickly).
_MAX_HANDLERS = 16


def main() -> None:
    """``python -m ferry.resident``: read the spec, log in, serve; the first line on standard
    output says ``ready`` or ``failed: REASON`` (``ferry resident start`` waits for it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # its own session: a Ctrl-C is never for it
    try:
        spec = Spec(**json.loads(sys.stdin.buffer.read()))
    except (ValueError, TypeError) as exc:
        _say(f"failed: bad start request: {exc}")
        return
    spec.identities = tuple(spec.identities)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 2)
    os.close(null)
    aio_run(Resident(spec).serve())


def _say(line: str) -> None:
    """One line to whoever started us (then standard output goes to /dev/null)."""
    with contextlib.suppress(OSError):
        os.write(1, (line + "\n").encode("utf-8", "replace"))
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)


class Resident:
    """The resident process's state: its client, socket, timers and the one running command."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.key = spec.key
        self.client: AsyncClient | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.path: str | None = None
        self.listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self.lock = threading.Lock()
        self.busy = False
        self.closing = False
        self.handlers = 0
        self.commands = 0
        self.started = time.time()
        self.last_used = time.monotonic()
        #: how long the last command took here, from its acceptance to its exit status
        self.last_seconds = 0.0
        self._wake: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None

    # --- life --------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Log in, listen, and wait for a reason to leave."""
        self.loop = asyncio.get_running_loop()
        self._wake, self._stop = asyncio.Event(), asyncio.Event()
        spec = self.spec
        try:
            client = await AsyncClient.connect(
                spec.host,
                spec.port,
                user=spec.user,
                plain=spec.plain,
                login=LoginOptions(
                    password=spec.password,
                    token=spec.token,
                    identities=list(spec.identities),
                    agent=spec.agent,
                    default_keys=spec.default_keys,
                    passphrase=spec.passphrase,
                ),
            )
        except FerryError as exc:
            _say(f"failed: {exc}")
            return
        finally:  # the secrets are not needed any more
            spec.password = spec.token = spec.passphrase = None
        self.client = client
        if spec.fingerprint is not None and client.info.fingerprint != spec.fingerprint:
            _say("failed: the server presented another certificate than the one just checked")
            await client.close()
            return
        why = self._listen()
        if why is not None:
            _say(f"failed: {why}")
            await client.close()
            return
        _say(f"ready {os.getpid()}")
        self.loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        threading.Thread(target=self._accept_loop, name="resident-accept", daemon=True).start()
        try:
            await self._run_until_done()
        finally:
            self._remove_socket()
            await client.close()
        os._exit(0)  # the accept thread and handler threads have nothing left to finish

    def _listen(self) -> str | None:
        """Bind a temporary name, listen, then link it to the final name: a caller never finds a
        name with nobody listening behind it, and of two processes started at once one wins."""
        path = runtime.socket_path(self.key, os.environ, create=True)
        if path is None:
            return "no private runtime folder for the socket"
        tmp = f"{path}.{os.getpid()}.tmp"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            sock.bind(tmp)
            os.chmod(tmp, 0o600)
            sock.listen(32)
            for _ in range(2):
                try:
                    os.link(tmp, path)
                    break
                except FileExistsError:
                    if thin.connect(path) is not None:  # (a stale one is removed: then try again)
                        return "another resident process serves this destination"
            else:
                return "cannot take the socket's name"
            st = os.stat(path)
        except OSError as exc:
            sock.close()
            return f"cannot listen on {path}: {exc.strerror or exc}"
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self.path, self.listener, self._inode = path, sock, (st.st_dev, st.st_ino)
        return None

    def _remove_socket(self) -> None:
        """Remove our socket's name, unless another process has taken the name since."""
        if self.path is None or self._inode is None:
            return
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)

    async def _run_until_done(self) -> None:
        assert self.client is not None and self._wake is not None and self._stop is not None
        ended = asyncio.ensure_future(self.client.mux.wait_ended())
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            while True:
                with self.lock:
                    idle = time.monotonic() - self.last_used
                    if not self.busy and (stop.done() or ended.done() or idle >= self.spec.persist):
                        self.closing = True  # from now on every caller runs itself
                        return
                    busy = self.busy
                self._wake.clear()
                wake = asyncio.ensure_future(self._wake.wait())
                # Busy: the end of the command wakes us. Idle: the persist time, a stop or the end.
                timeout = None if busy else self.spec.persist - idle
                await asyncio.wait({wake, ended, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                wake.cancel()
        finally:
            ended.cancel()
            stop.cancel()

    def request_stop(self) -> None:
        """Leave as soon as no command runs (thread-safe)."""
        loop, stop = self.loop, self._stop
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)

    def _woken(self) -> None:
        loop, wake = self.loop, self._wake
        if loop is not None and wake is not None:
            loop.call_soon_threadsafe(wake.set)

    # --- callers -------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self.listener is not None
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                time.sleep(0.05)  # (EMFILE and the like: do not spin; the process leaves by _exit)
                continue
            with self.lock:
                full = self.handlers >= _MAX_HANDLERS
                if not full:
                    self.handlers += 1
            if full:
                conn.close()
                continue
            threading.Thread(target=self._handle_counted, args=(conn,), daemon=True).start()

    def _handle_counted(self, conn: socket.socket) -> None:
        try:
            with conn:
                self.handle(conn)
        except Exception:  # one caller's trouble must not end the process
            pass
        finally:
            with self.lock:
                self.handlers -= 1

    def handle(self, conn: socket.socket) -> None:
        """One caller: check who it is, read its request, answer it."""
        conn.settimeout(_REQUEST_TIMEOUT)
        if not runtime.same_user(conn):
            return
        pid = runtime.peer_credentials(conn)[0]
        kind, fields, fds = receive_request(conn)
        try:
            if kind == b"info":
                conn.sendall(runtime.INFO + json.dumps(self.info()).encode())
            elif kind == b"stop":
                self.request_stop()
                conn.sendall(runtime.EXITED + b"\0")
            elif kind == b"run":
                if len(fds) != 4 or not same_place(pid):
                    conn.sendall(runtime.FALLBACK)
                    return
                umask, argv, env = runtime.parse_run_fields(fields)
                self._run(conn, argv, env, umask, fds)
        finally:  # (those the command had are closed already: _execute empties the list)
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def info(self) -> dict[str, Any]:
        """What ``ferry resident list`` shows."""
        spec = self.spec
        return {
            "pid": os.getpid(),
            "user": spec.user,
            "host": spec.host,
            "port": spec.port,
            "plain": spec.plain,
            "fingerprint": spec.fingerprint,
            "persist": spec.persist,
            "idle": 0.0 if self.busy else round(time.monotonic() - self.last_used, 1),
            "busy": self.busy,
            "commands": self.commands,
            "last_seconds": round(self.last_seconds, 4),
            "started": self.started,
            "login": self.client.info.login_detail if self.client is not None else "",
        }

    def _run(self, conn: socket.socket, argv: list[str], env: dict[str, str], umask: int, fds: list[int]) -> None:
        with self.lock:
            refuse = self.busy or self.closing
            if not refuse:
                self.busy = True
        if refuse:
            conn.sendall(runtime.FALLBACK)
            return
        status: int | None = None
        t0 = time.perf_counter()
        try:
            conn.sendall(runtime.ACCEPTED)
            status = self._execute(conn, argv, env, umask, fds)
        finally:
            self.last_seconds = time.perf_counter() - t0
            with self.lock:
                self.busy = False
                self.commands += status is not None  # (a command sent back to run itself is not one)
                self.last_used = time.monotonic()
            self._woken()
        conn.sendall(runtime.FALLBACK if status is None else runtime.EXITED + bytes([status & 0xFF]))

    def _execute(self, conn: socket.socket, argv: list[str], env: dict[str, str], umask: int, fds: list[int]) -> int | None:
        """Run ``argv`` as the caller would have, with its folder, umask, environment and
        standard descriptors; its exit status (None: it must run itself)."""
        assert self.loop is not None and self.client is not None
        cwd, *std = fds
        saved_env = dict(os.environ)
        saved_umask = os.umask(umask)
        saved_streams = sys.stdin, sys.stdout, sys.stderr
        session = CommandSession(self, conn)
        try:
            try:
                os.fchdir(cwd)
                os.environ.clear()
                os.environ.update(env)
                time.tzset()  # times print in the caller's zone
                for target, fd in enumerate(std):
                    os.dup2(fd, target)
                if os.isatty(0):
                    # No command here reads a terminal (no prompts: the login is done; `put -`
                    # runs directly), and a read that outlived a cancelled command would take
                    # the user's keystrokes from the shell.
                    null = os.open(os.devnull, os.O_RDONLY)
                    os.dup2(null, 0)
                    os.close(null)
                sys.stdin, sys.stdout, sys.stderr = _std_streams(env)
            except (OSError, ValueError):  # nothing has run yet: the caller runs it itself
                return None
            context.set_current(session)
            asyncio.run_coroutine_threadsafe(session.watch(), self.loop).result()
            return _invoke(argv)
        finally:
            context.set_current(None)
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(session.done(), self.loop).result(timeout=10)
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            sys.stdin, sys.stdout, sys.stderr = saved_streams
            # The caller's descriptors are all closed before the exit status goes out: a reader
            # of its output (`$(ferry ls host:)`) sees the end when the caller exits.
            null = os.open(os.devnull, os.O_RDWR)
            for target in (0, 1, 2):
                os.dup2(null, target)
            os.close(null)
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            fds.clear()  # closed: the caller of this method must not close these numbers again
            os.environ.clear()
            os.environ.update(saved_env)
            time.tzset()
            os.umask(saved_umask)
            os.chdir("/")


class CommandSession(context.Session):
    """The running command's side of the resident process (see :mod:`ferry.resident.context`)."""

    def __init__(self, resident: Resident, conn: socket.socket) -> None:
        assert resident.loop is not None and resident.client is not None
        self.resident = resident
        self.loop = resident.loop
        self.client = resident.client
        self.conn = conn
        self.cancelled = False
        self.task: asyncio.Task[Any] | None = None
        self._read_timeout = self.client.read_timeout

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the resident's loop; a cancel from the caller cancels it and is a
        KeyboardInterrupt here (the command then says what Ctrl-C says)."""

        async def wrapped() -> T:
            self.task = asyncio.current_task()
            if self.cancelled:
                coro.close()
                raise asyncio.CancelledError
            return await coro

        future = asyncio.run_coroutine_threadsafe(wrapped(), self.loop)
        try:
            return future.result()
        except (concurrent.futures.CancelledError, asyncio.CancelledError):
            raise KeyboardInterrupt from None

    async def client_for(
        self,
        loc: Location,
        *,
        plain: bool,
        identities: Sequence[str],
        token_file: str | None,
        password_file: str | None,
        verbose: bool,
    ) -> AsyncClient:
        """The resident's client, if this command would log in to the same place the same way."""
        resident, client = self.resident, self.client
        user = loc.user or default_user()
        if loc.alias is not None:  # the alias's plain applies, as in open_client
            alias = load_config().alias(loc.alias)
            plain = plain or bool(alias is not None and alias.plain)
        key = runtime.key_string(runtime.client_home(os.environ), user, loc.host, loc.port, plain)
        if key != resident.key:
            raise context.Fallback
        if creds_digest(identities, token_file, password_file, os.environ) != resident.spec.creds:
            raise context.Fallback
        if not client.mux.usable:
            resident.request_stop()
            raise context.Fallback
        if not plain and KnownHosts().lookup(loc.host, loc.port) != client.info.fingerprint:
            # The pin was removed or changed since we logged in: this connection is no longer
            # the one the user trusts. Leave; the command connects (and checks) itself.
            resident.request_stop()
            raise context.Fallback
        if plain:
            click.echo(PLAIN_WARNING, err=True)
        if verbose:
            info = client.info
            extra = " (read-only)" if info.read_only else ""
            click.echo(
                f"ferry: logged in to {loc.address} as {user} with {info.login_detail}{extra} "
                f"(the resident connection, process {os.getpid()})",
                err=True,
            )
        return client

    async def watch(self) -> None:
        """Watch the caller's socket: a cancel, or its end, cancels the command."""
        self.loop.add_reader(self.conn.fileno(), self._from_caller)

    def _from_caller(self) -> None:
        try:
            data = self.conn.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # gone: stop watching (the end stays readable), and stop its command
            self.loop.remove_reader(self.conn.fileno())
        if not data or runtime.CANCEL in data:
            self.cancelled = True
            if self.task is not None:
                self.task.cancel()

    async def done(self) -> None:
        """After the command: stop watching, undo what it set on the shared connection."""
        self.loop.remove_reader(self.conn.fileno())
        self.client.set_bwlimit(None)
        self.client.read_timeout = self._read_timeout


def receive_request(conn: socket.socket) -> tuple[bytes, list[bytes], list[int]]:
    """``(kind, fields, descriptors)`` of one request; raises ValueError or OSError."""
    fds: list[int] = []
    data, ancdata, flags, _addr = conn.recvmsg(1 << 16, socket.CMSG_SPACE(8 * 4))
    for level, ctype, cdata in ancdata:
        if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
            fds.extend(runtime.fds_from(cdata))
    try:
        if flags & socket.MSG_CTRUNC or len(fds) > 4 or data[:4] != runtime.MAGIC:
            raise ValueError("not a ferry request")
        while len(data) < 8:
            more = conn.recv(8 - len(data))
            if not more:
                raise ValueError("short request")
            data += more
        size = int.from_bytes(data[4:8], "big")
        if size > runtime.MAX_REQUEST:
            raise ValueError("request too long")
        payload = bytearray(data[8:])
        while len(payload) < size:
            more = conn.recv(min(size - len(payload), 1 << 16))
            if not more:
                raise ValueError("short request")
            payload += more
        kind, fields = runtime.decode_payload(bytes(payload[:size]))
    except BaseException:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    return kind, fields, fds


def same_place(pid: int) -> bool:
    """Whether process ``pid`` sees the same files as we do (same mount namespace and root): its
    relative paths are resolved from its folder, but absolute ones from our root."""
    try:
        theirs = os.stat(f"/proc/{pid}/ns/mnt"), os.stat(f"/proc/{pid}/root")
        ours = os.stat("/proc/self/ns/mnt"), os.stat("/")
    except OSError:
        return False
    return all((a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) for a, b in zip(theirs, ours, strict=True))


def _std_streams(env: dict[str, str]) -> tuple[io.TextIOWrapper, io.TextIOWrapper, io.TextIOWrapper]:
    """New ``sys.stdin``/``stdout``/``stderr`` on descriptors 0-2, buffered as Python buffers
    them at start-up: standard output line by line on a terminal, standard error always line by
    line, nothing buffered with PYTHONUNBUFFERED."""
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    streams = []
    for fd, template in ((0, sys.__stdin__), (1, sys.__stdout__), (2, sys.__stderr__)):
        encoding = getattr(template, "encoding", None) or "utf-8"
        errors = getattr(template, "errors", None) or "strict"
        binary = open(fd, "rb" if fd == 0 else "wb", buffering=0 if unbuffered and fd else -1, closefd=False)  # noqa: SIM115
        line = fd == 2 or (fd == 1 and os.isatty(fd))
        streams.append(
            io.TextIOWrapper(binary, encoding=encoding, errors=errors, line_buffering=line, write_through=unbuffered and fd != 0)
        )
    return streams[0], streams[1], streams[2]


def _invoke(argv: list[str]) -> int | None:
    """``ferry ARGV`` through the command line's own main: its exit status (None: fall back)."""
    try:
        cli_main(argv)
        return 0
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code & 0xFF
        print(code, file=sys.stderr)
        return 1
    except context.Fallback:
        return None
    except KeyboardInterrupt:
        print("ferry: interrupted", file=sys.stderr)
        return 130
    except BaseException:
        traceback.print_exc()
        return 1
