"""Password checks: a bounded first-come-first-served queue in front of threads of their own.

A password check (argon2id) costs ~20 ms of a core and ~19 MiB, on purpose. When many clients
log in at once they queue for one of ``workers`` threads. The queue keeps four promises:

- **oldest first**: waiting checks start in the order they arrived;
- **never for nobody**: a check is not started for a connection that has closed (or whose waiting
  coroutine was cancelled, e.g. by its deadline or a shutdown): it is skipped, and a connection
  that closes while waiting leaves the queue at once;
- **bounded**: at most ``max_waiting`` checks wait, and none longer than ``max_wait`` seconds;
- **early answers**: a client that would not be served within ``max_wait`` (queue full, or the
  queue ahead of it would take longer, estimated from the recent cost of a check) is refused at
  once with :class:`~ferry.server.admission.Refused`, instead of after waiting out its timeout.

The threads belong to this queue alone (not the loop's default executor), so blocking file work
elsewhere in the server can never hold logins up, and a check is only handed to a thread when that
thread is free: nothing waits unseen inside an executor's own queue.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ferry.server.admission import Refused

__all__ = ["LoginQueue"]

T = TypeVar("T")

#: Assumed cost of one check until one has been measured (argon2id m=19 MiB t=2 here: ~22 ms).
_INITIAL_COST = 0.03
#: Weight of the newest measurement in the running cost estimate.
_COST_WEIGHT = 0.2


class LoginQueue:
    """Runs credential checks ``workers`` at a time, oldest first (see the module docstring)."""

    def __init__(self, *, workers: int, max_waiting: int, max_wait: float) -> None:
        self.workers = max(1, workers)
        self.max_waiting = max_waiting
        self.max_wait = max_wait
        self._executor = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="ferry-login")
        self._free = self.workers
        self._waiting: collections.deque[tuple[asyncio.Future[None], asyncio.Future[None]]] = (
            collections.deque()
        )
        self._cost = _INITIAL_COST  #: running estimate of one check's wall time (seconds)
        self._measured = False
        self.checks = 0  #: checks started
        self.skipped = 0  #: waiting checks dropped because their connection had gone
        self.refused = 0  #: logins told busy (queue full, or the wait too long)

    @property
    def waiting(self) -> int:
        """Checks waiting for a thread (including ones whose connection is gone, until skipped)."""
        return len(self._waiting)

    @property
    def cost(self) -> float:
        """Recent wall time of one check in seconds (a running average; a guess until measured)."""
        return self._cost

    def estimated_wait(self, position: int) -> float:
        """Seconds until a check queued behind ``position`` others would start (an estimate)."""
        return position * self._cost / self.workers

    async def check(self, gone: asyncio.Future[None], fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in a login thread once it is this caller's turn, and return its result.

        ``gone`` is the connection's "closed" future: once it is done the check is not started (and
        :class:`ConnectionResetError` is raised). Raises :class:`Refused` when the queue cannot take
        the check or it waited ``max_wait`` seconds. Exceptions of ``fn`` propagate.
        """
        if gone.done():
            self.skipped += 1
            raise ConnectionResetError("the connection closed before its password check")
        if self._free and not self._waiting:
            self._free -= 1
        else:
            await self._wait_turn(gone)
        # The turn is ours: a thread is free and reserved for this check.
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            job = self._executor.submit(fn, *args)
        except BaseException:
            self._release()
            raise
        self.checks += 1
        # The thread is given back when the check really ends, not when this coroutine stops waiting
        # for it (a cancelled caller must not let a second check start on a busy thread).
        job.add_done_callback(lambda _j: loop.call_soon_threadsafe(self._done, time.monotonic() - started))
        return await asyncio.wrap_future(job)

    async def _wait_turn(self, gone: asyncio.Future[None]) -> None:
        position = len(self._waiting)
        if position >= self.max_waiting:
            self.refused += 1
            raise Refused("login-queue", "the server has too many logins waiting; try again in a few seconds")
        wait = self.estimated_wait(position + 1)
        if wait > self.max_wait:
            self.refused += 1
            raise Refused(
                "login-queue",
                f"the server is busy with logins (about {wait:.0f} s of waiting); try again later",
            )
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (turn, gone)
        self._waiting.append(entry)
        try:
            await asyncio.wait((turn, gone), timeout=self.max_wait, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            self._give_up(entry)  # cancelled (deadline, shutdown): hand the turn on if it came
            raise
        if turn.done() and not gone.done():
            return
        self._give_up(entry)
        if gone.done():
            self.skipped += 1
            raise ConnectionResetError("the connection closed while waiting for its password check")
        self.refused += 1
        raise Refused(
            "login-queue", f"the server is busy with logins (waited {self.max_wait:g} s); try again later"
        )

    def _give_up(self, entry: tuple[asyncio.Future[None], asyncio.Future[None]]) -> None:
        turn = entry[0]
        if turn.done() and not turn.cancelled():
            self._release()  # the turn came but will not be used: pass it on
        elif not turn.done():
            turn.cancel()
            try:
                self._waiting.remove(entry)  # O(n), but only on a give-up, and n <= max_waiting
            except ValueError:
                pass

    def _done(self, seconds: float) -> None:
        if self._measured:
            self._cost += _COST_WEIGHT * (seconds - self._cost)
        else:  # the first real measurement replaces the guess outright
            self._cost, self._measured = seconds, True
        self._release()

    def _release(self) -> None:
        """A thread became free: start the oldest waiting check whose connection is still there."""
        self._free += 1
        while self._free and self._waiting:
            turn, gone = self._waiting.popleft()
            if turn.done():
                continue
            if gone.done():
                turn.cancel()  # its coroutine sees ``gone`` and counts the skip
                continue
            self._free -= 1
            turn.set_result(None)

    def close(self) -> None:
        """Stop the threads once the checks running now are done (no new check starts)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
