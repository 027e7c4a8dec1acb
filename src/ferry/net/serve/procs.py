"""The process models: ``fork`` (a child per connection) and ``prefork`` (N long-lived workers).

Only the process that forked a child reaps it, always by PID (never ``waitpid(-1)``): the server
may run inside a bigger program with children of its own, and stealing their exit statuses
would break it. Children stop on SIGTERM/SIGINT through their own stop pipe, so they close their
clients properly instead of dying mid-write.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Final

from ferry.net.serve.blocking import AcceptLoop, serve_connection, serve_datagrams
from ferry.net.serve.common import log
from ferry.net.serve.config import ServeConfig
from ferry.net.serve.selector import serve_select
from ferry.net.serve.stop import StopSignal

#: How often a forking parent wakes to reap finished children even without new connections:
#: this bounds how long a zombie can exist.
REAP_INTERVAL: Final = 0.25
#: How long children get to finish after SIGTERM before they are SIGKILLed.
TERM_GRACE: Final = 5.0
#: How often the prefork parent checks on its workers (restarting any that died).
SUPERVISE_INTERVAL_MS: Final = 500

ChildMain = Callable[[StopSignal], None]
_STOP_SIGNALS: Final = {signal.SIGTERM, signal.SIGINT}


class Children:
    """The set of child processes this process forked, with start/reap/terminate."""

    def __init__(self) -> None:
        self.pids: set[int] = set()
        # The lifeline: every child keeps only the read end. When this process dies in any way,
        # even SIGKILL, the kernel closes the write end, children read EOF and shut down instead
        # of lingering as orphans that still hold the listening socket.
        self._life_r, self._life_w = os.pipe()

    def spawn(
        self, main: ChildMain, parent_stop: StopSignal, *, close: tuple[socket.socket, ...] = ()
    ) -> int | None:
        """Fork and run ``main(child_stop)`` in the child, which then exits; None if fork failed."""
        # Flush so buffered output is not written twice (once by each process).
        sys.stdout.flush()
        sys.stderr.flush()
        # Block TERM/INT across fork(): until the child has its own handlers, the inherited
        # (parent's) handler would stop the *parent*. Pending signals arrive once unblocked.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:  # EAGAIN/ENOMEM: too many processes; the caller drops the client
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            log.warning("fork failed: %s", exc.strerror or exc)
            return None
        if pid == 0:  # pragma: no cover - runs in the child; covered by the subprocess tests
            _child(main, parent_stop, close, old_mask, self._life_r, self._life_w)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        self.pids.add(pid)
        return pid

    def reap(self) -> list[tuple[int, int]]:
        """Collect finished children without blocking; returns ``(pid, exit code)`` pairs."""
        done = []
        for pid in list(self.pids):
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # already reaped elsewhere; forget it
                self.pids.discard(pid)
                continue
            if got:
                self.pids.discard(pid)
                done.append((pid, os.waitstatus_to_exitcode(status)))
        return done

    def terminate_all(self, grace: float = TERM_GRACE) -> None:
        """SIGTERM every child, wait up to ``grace`` s for them, SIGKILL the rest; reap them all."""
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        delay = 0.005
        while self.pids and time.monotonic() < deadline:
            self.reap()
            if self.pids:
                time.sleep(delay)  # no child-exit fd to wait on portably; poll with back-off
                delay = min(delay * 2, 0.1)
        for pid in list(self.pids):
            log.warning("child %d ignored SIGTERM; killing it", pid)
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.pids.discard(pid)

    def close(self) -> None:
        """Release the lifeline (after :meth:`terminate_all`: no child is left to need it)."""
        for fd in (self._life_r, self._life_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._life_r = self._life_w = -1


def _watch_parent(life_r: int, stop: StopSignal) -> None:
    """Block on the lifeline; nothing is ever written, so a return means the parent is gone."""
    try:
        while os.read(life_r, 1):
            pass
    except OSError:
        pass
    stop.set()


def _child(
    main: ChildMain,
    parent_stop: StopSignal,
    close: tuple[socket.socket, ...],
    mask: set[int | signal.Signals],
    life_r: int,
    life_w: int,
) -> None:
    """Body of a forked child: own stop pipe and signal handlers, run ``main``, ``_exit``."""
    code = 0
    try:
        os.close(life_w)  # only the parent may hold the write end, or EOF would never come
        # A fresh pipe: setting the inherited one would also stop the parent (same pipe).
        parent_stop.close()
        stop = StopSignal()
        threading.Thread(
            target=_watch_parent, args=(life_r, stop), name="ferry-lifeline", daemon=True
        ).start()

        def on_signal(_signo: int, _frame: FrameType | None) -> None:
            stop.set()

        # Ctrl-C reaches the whole process group; children then stop like on the parent's TERM.
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for sock in close:
            sock.close()
        main(stop)
    except BaseException:
        log.exception("worker process failed")
        code = 1
    finally:
        # _exit: never run the parent's atexit handlers, finalizers or buffered-output flushes.
        os._exit(code)


def serve_forking(lsock: socket.socket, config: ServeConfig, stop: StopSignal) -> None:
    """``fork``: accept in the parent, serve each connection in its own child process."""
    children = Children()
    accept = AcceptLoop(lsock, stop, tick=REAP_INTERVAL)
    try:
        while not stop.is_set:
            conn = accept.next()
            children.reap()  # every tick and every accept: zombies live at most REAP_INTERVAL
            if conn is None:
                continue

            def main(child_stop: StopSignal, conn: socket.socket = conn) -> None:
                serve_connection(conn, config.kind, config.idle_timeout, child_stop)

            children.spawn(main, stop, close=(lsock,))
            conn.close()  # the child has its own copy; ours would keep the connection open
    finally:
        children.terminate_all()
        children.close()


def serve_prefork(lsock: socket.socket, config: ServeConfig, stop: StopSignal) -> None:
    """``prefork``: N workers share the listening socket; the parent only supervises them.

    Each worker multiplexes its clients with the ``select`` loop rather than serving one at a
    time: with one-client-per-worker, N idle ``greet`` sessions would stall the whole server
    until the idle timeout. The kernel hands each new connection to one of the waiting workers.
    """
    if config.proto == "udp":

        def main(child_stop: StopSignal) -> None:
            serve_datagrams(lsock, config, child_stop)

    else:

        def main(child_stop: StopSignal) -> None:
            serve_select(lsock, config, child_stop)

    lsock.setblocking(False)  # workers race for each connection; losers must get EAGAIN, not block
    children = Children()
    waiter = select.poll()
    waiter.register(stop.fileno(), select.POLLIN)
    try:
        while not stop.is_set:
            for pid, code in children.reap():
                log.warning("worker %d exited with status %d; starting a new one", pid, code)
            # Top up to N workers. Done at most once per tick, so a crashing worker costs at
            # most a few forks per second instead of a fork bomb.
            for _ in range(config.workers - len(children.pids)):
                children.spawn(main, stop)
            # A worker exit has no fd to wait on, so the parent polls: sleeps on the stop pipe.
            waiter.poll(SUPERVISE_INTERVAL_MS)
    finally:
        children.terminate_all()
        children.close()
