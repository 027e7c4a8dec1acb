"""Interactive terminal sessions: a real PTY on the server, this terminal in raw mode.

The server runs the command with a pseudo-terminal as its controlling terminal (so job control,
Ctrl-C and full-screen programs work there); locally the terminal is put in raw mode so every key,
Ctrl-C included, goes to the remote side as a byte and the remote line discipline does the rest.
Window-size changes (SIGWINCH) are sent as Resize messages. The local terminal settings are restored
on every way out -- normal exit, exceptions, signals -- by one ``try/finally`` around the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import termios
import tty
from typing import Any

from ferry.client.exec import Command, RemoteProcess, attach
from ferry.client.mux import Mux
from ferry.wire.messages import PtySpec

__all__ = ["pty_session", "run_pty_session", "terminal_size"]


def terminal_size(*fds: int) -> tuple[int, int]:
    """``(rows, cols)`` of the first of ``fds`` that is a terminal; 24x80 otherwise."""
    for fd in fds:
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(fd)
            if size.lines > 0 and size.columns > 0:
                return min(size.lines, 10000), min(size.columns, 10000)
    return 24, 80


async def run_pty_session(
    mux: Mux, command: str | None = None, env: dict[str, str] | None = None, cwd: str = ""
) -> int:
    """Run ``command`` (None: an interactive ``/bin/sh``) under a PTY on the server, wired to this
    terminal; return its exit status (128+N when signal N killed it).

    ``command`` runs through ``/bin/sh -c`` on the server; ``env`` adds allowed variables (see
    docs/exec.md); ``cwd`` is relative to the home. Used by ``ferry shell --pty`` and ``ferry exec -t``.
    """
    proc = await pty_session(mux, command, env=env, cwd=cwd)
    code = proc.exit_code
    assert code is not None
    return code


async def pty_session(
    mux: Mux,
    cmd: Command | None,
    *,
    env: dict[str, str] | None = None,
    cwd: str = "",
    timeout: float | None = None,
    stdin_fd: int = 0,
    stdout_fd: int = 1,
) -> RemoteProcess:
    """Like :func:`run_pty_session` for a command string or argv; returns the finished process
    (``exit_code``, ``timed_out``). Without a local terminal on ``stdin_fd`` the remote side still
    gets a PTY (like ``ssh -tt``), but nothing is switched to raw mode."""
    rows, cols = terminal_size(stdin_fd, stdout_fd)
    term = (os.environ.get("TERM") or "xterm-256color")[:256]
    spec = PtySpec(term=term, rows=rows, cols=cols)
    proc = await RemoteProcess.start(mux, cmd, env=env, cwd=cwd, pty=spec, timeout=timeout)
    tasks: set[asyncio.Task[Any]] = set()

    def on_winch(_signum: int) -> None:
        task = asyncio.ensure_future(proc.resize(*terminal_size(stdin_fd, stdout_fd)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    saved = None
    if os.isatty(stdin_fd):
        with contextlib.suppress(termios.error):
            saved = termios.tcgetattr(stdin_fd)
    try:
        if saved is not None:
            # TCSADRAIN (not tty's default TCSAFLUSH): keys typed ahead are sent, not thrown away.
            tty.setraw(stdin_fd, termios.TCSADRAIN)
        await attach(
            proc,
            stdin_fd=stdin_fd,
            stdout_fd=stdout_fd,
            stderr_fd=stdout_fd,
            handlers={signal.SIGWINCH: on_winch},
        )
    finally:
        if saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
        for task in tasks:
            task.cancel()
        await proc.close()
    return proc
