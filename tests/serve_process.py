"""``ferry serve`` as a subprocess for CLI tests: start on port 0, read the banner, stop by PID."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from conftest import FERRY

LISTENING = re.compile(r"^ferry serve: listening on (?P<host>\S+):(?P<port>\d+)$")
PASSWORD = re.compile(r"^ferry serve: created the first user '(?P<user>[^']+)' with password: (?P<pw>\S+)$")
FINGERPRINT = re.compile(r"TLS certificate: (?P<fp>SHA256:\S+)")


class ServeProcess:
    """One ``ferry serve`` process; ``port``, ``password`` (first start only) and ``lines`` after start."""

    def __init__(
        self,
        root: Path,
        env: dict[str, str],
        *,
        plain: bool = False,
        port: int = 0,
        root_option: bool = True,
        args: list[str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.root = root
        self.args = list(args or [])  # more `ferry serve` options
        self.preexec_fn = preexec_fn  # runs in the child before exec (e.g. to lower its rlimits)
        self.root_option = root_option  # False: no --root, the server finds its root in the environment
        self.env = env
        self.plain = plain
        self.requested_port = port
        self.port = 0
        self.password: str | None = None
        self.user: str | None = None
        self.fingerprint: str | None = None
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self._queue: queue.Queue[str | None] = queue.Queue()

    def start(self, timeout: float = 30.0) -> ServeProcess:
        """Start and wait (bounded) until the banner has been printed in full."""
        args = [*FERRY, "serve", "--port", str(self.requested_port)]
        if self.root_option:
            args += ["--root", str(self.root)]
        if self.plain:
            args.append("--plain")
        args += self.args
        self.root.parent.mkdir(parents=True, exist_ok=True)
        self._stderr = open(self.root.parent / f"serve-{self.root.name}.err", "a")  # noqa: SIM115
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=self.env, preexec_fn=self.preexec_fn
        )
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                raise AssertionError(f"ferry serve printed no complete banner in {timeout} s: {self.lines}")
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"ferry serve exited early ({self.proc.wait()}): {self.lines}")
            self.lines.append(line)
            if m := LISTENING.match(line):
                self.port = int(m["port"])
            elif m := PASSWORD.match(line):
                self.user, self.password = m["user"], m["pw"]
            elif m := FINGERPRINT.search(line):
                self.fingerprint = m["fp"]
            if line.strip().startswith("stop with"):  # the last banner line
                return self

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the server (only ours, by PID) and return its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(5)
        self._stderr.close()
        return rc

    def remote(self, path: str = "") -> str:
        """``ferry://USER@127.0.0.1:PORT/PATH`` (the URL form needs no -P)."""
        return f"ferry://{self.user or 'ferry'}@127.0.0.1:{self.port}/{path}"

    def scp(self, path: str = "") -> list[str]:
        """``-P PORT USER@127.0.0.1:PATH`` as argv words (the scp form)."""
        return ["-P", str(self.port), f"{self.user or 'ferry'}@127.0.0.1:{path}"]

    def tls_args(self) -> list[str]:
        """``--plain`` when the server runs without TLS."""
        return ["--plain"] if self.plain else []


def run_ferry(
    args: list[str],
    env: dict[str, str],
    *,
    timeout: float = 60.0,
    input: str | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``ferry ARGS`` to completion (bounded) and capture its output."""
    return subprocess.run(
        [*FERRY, *args], env=env, capture_output=True, text=True, timeout=timeout, input=input, cwd=cwd
    )
