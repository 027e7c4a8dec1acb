"""Helpers for the ``ferry net serve`` tests (no tests here): clients, servers, process checks.

Every wait is bounded; every server is stopped by PID (subprocess) or stop request (in-process).
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from conftest import FERRY
from ferry.net.serve import ServeConfig, Server

BANNER_RE = re.compile(r"^ferry net: (\w+) \((\w+), (\w+)\) listening on (\S+)$")
TIMEOUT = 10.0  # per socket operation: generous, a hang fails instead of stalling


def parse_address(address: str) -> tuple[str, int]:
    """``127.0.0.1:9000`` / ``[::1]:9000`` -> (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def connect(address: str, proto: str = "tcp", timeout: float = TIMEOUT) -> socket.socket:
    """A connected client socket (stream for tcp/unix, connected datagram socket for udp)."""
    if proto == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(address)
        return sock
    host, port = parse_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect((host, port))
    return sock


def recv_line(sock: socket.socket, buf: bytearray) -> bytes:
    """Read up to and including the next ``\\n`` (or whatever is left at EOF); ``buf`` keeps extra."""
    while b"\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            out = bytes(buf)
            buf.clear()
            return out
        buf += chunk
    i = buf.index(b"\n") + 1
    out = bytes(buf[:i])
    del buf[:i]
    return out


def recv_all(sock: socket.socket, limit: int = 64 << 20) -> bytes:
    """Everything until EOF (bounded by ``limit``)."""
    out = bytearray()
    while len(out) <= limit:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return bytes(out)
        out += chunk
    raise AssertionError("peer sent more than expected")


def is_closed(sock: socket.socket, timeout: float) -> bool:
    """True if the peer closed (EOF or reset) within ``timeout``; data arriving counts as False."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def reset(sock: socket.socket) -> None:
    """Close abruptly: SO_LINGER 0 makes close() send RST instead of FIN."""
    sock.setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, (1).to_bytes(4, "little") + (0).to_bytes(4, "little")
    )
    sock.close()


def echo_roundtrip(address: str, payload: bytes, proto: str = "tcp") -> bytes:
    """Send ``payload`` from a thread while reading the echo (else both sides' buffers fill up)."""
    with connect(address, proto) as sock:
        errors: list[BaseException] = []

        def sender() -> None:
            try:
                view = memoryview(payload)
                for i in range(0, len(view), 1 << 20):
                    sock.sendall(view[i : i + (1 << 20)])
                sock.shutdown(socket.SHUT_WR)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=sender, daemon=True)
        thread.start()
        got = recv_all(sock, limit=len(payload) + 1)
        thread.join(TIMEOUT)
        assert not thread.is_alive()
        assert not errors, errors
        return got


# -- servers ----------------------------------------------------------------------------------


class CliServer:
    """``ferry net serve ...`` as a subprocess; ``address`` is parsed from its readiness line."""

    def __init__(self, args: list[str], env: dict[str, str], stderr_path: Path) -> None:
        self._stderr_file: IO[bytes] = open(stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        self.stderr_path = stderr_path
        self.proc = subprocess.Popen(
            [*FERRY, "net", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=self._stderr_file,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        assert self.proc.stdout is not None
        self.banner = self._read_banner(self.proc.stdout)
        m = BANNER_RE.match(self.banner)
        assert m, f"unexpected banner {self.banner!r}"
        self.kind, self.proto, self.model, self.address = m.groups()

    def _read_banner(self, stdout: IO[bytes]) -> str:
        deadline = time.monotonic() + 20
        line = b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([stdout], [], [], max(0.0, remaining))
            if not ready:
                self.kill()
                raise AssertionError(f"no readiness line within 20 s; stderr: {self.stderr()}")
            byte = os.read(stdout.fileno(), 1)  # unbuffered: never read past the banner
            if not byte:
                self.proc.wait(TIMEOUT)
                raise AssertionError(f"server exited {self.proc.returncode}; stderr: {self.stderr()}")
            line += byte
        return line.decode().rstrip("\n")

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.proc.pid

    def stderr(self) -> str:
        """What the server wrote to stderr so far (the server writes the file directly)."""
        return self.stderr_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send ``sig`` and wait for the exit status (a server that does not stop fails with what
        its threads were doing and its signal masks, read from /proc before it is killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"server {self.pid} did not exit within {timeout} s of signal {sig}:\n{self._where()}\n"
                f"stderr: {self.stderr()}"
            ) from None
        finally:
            self.kill()

    def _where(self) -> str:
        """Each thread's state, wait channel and system call, and the process's signal masks."""
        lines = []
        task = Path(f"/proc/{self.pid}/task")
        try:
            for tid in sorted(task.iterdir()):
                fields = {name: (tid / name).read_text().strip() for name in ("comm", "wchan", "syscall")}
                state = (tid / "stat").read_text().rsplit(")", 1)[1].split()[0]
                lines.append(f"thread {tid.name} {fields['comm']} state {state} wchan {fields['wchan']} syscall {fields['syscall']}")
            status = (Path(f"/proc/{self.pid}/status")).read_text().splitlines()
            lines += [line for line in status if line.startswith(("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt"))]
        except OSError as exc:
            lines.append(f"(/proc not readable: {exc})")
        return "\n".join(lines)

    def kill(self) -> None:
        """Last resort (fixture teardown): SIGKILL our server and its children by PID, reap it."""
        if self.proc.poll() is None:
            kids = children_of(self.proc.pid)  # fork/prefork children are ours too
            self.proc.kill()
            self.proc.wait(TIMEOUT)
            for pid in kids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr_file.close()


class InProcServer:
    """A :class:`Server` running in a thread of the test process (fast; not for fork/prefork)."""

    def __init__(self, config: ServeConfig) -> None:
        self.server = Server(config)
        self.address = self.server.bind()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.server.serve_forever()
        except BaseException as exc:
            self.errors.append(exc)

    def stop(self) -> None:
        """Request a stop, wait for the serving thread, release the socket."""
        self.server.request_stop()
        self.thread.join(TIMEOUT)
        alive = self.thread.is_alive()
        self.server.close()
        assert not alive, "server thread did not stop"
        assert not self.errors, self.errors


@contextmanager
def in_process(kind: str, **options: object) -> Iterator[InProcServer]:
    """Run an in-process server for the duration of the block."""
    if "path" not in options:
        options.setdefault("port", 0)
    srv = InProcServer(ServeConfig.from_options(kind, **options))  # type: ignore[arg-type]
    try:
        yield srv
    finally:
        srv.stop()


# -- processes --------------------------------------------------------------------------------


def children_of(pid: int) -> dict[int, str]:
    """Child PIDs of ``pid`` -> state letter (``Z`` = zombie), from /proc."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces: split after the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found[int(entry)] = fields[0]
    return found


def running(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (an orphaned zombie may never be reaped here)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] != "Z"


def wait_until(predicate: object, timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate()`` until true or ``timeout`` (for state with no event to wait on)."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def peak_rss_kib(pid: int) -> int:
    """VmHWM: the peak resident set size of ``pid`` in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")
