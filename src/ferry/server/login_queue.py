"""Password checks: a bounded first-come-first-served queue in front of threads of their own.

A password check (argon2id) costs ~22 ms of a core and ~19 MiB, on purpose. When many clients
log in at once they queue for one of ``workers`` threads. The queue keeps four promises:

- **oldest first**: waiting checks start in the order they arrived;
- **never for nobody**: a check is not started for a connection that has closed (or whose waiting
  coroutine was cancelled, e.g. by a shutdown): it is skipped, and a connection that closes while
  waiting leaves the queue at once;
- **bounded**: at most ``max_waiting`` checks wait, and none longer than ``max_wait`` seconds;
- **early answers**: a client that will not be served within ``max_wait`` is refused with
  :class:`~ferry.server.admission.Refused` as soon as that is clear, not after waiting out its
  timeout. Two estimates decide. On arrival, the *best case*: the checks ahead of it, at the CPU
  time a check really costs, spread over all the threads; if even that is too long (a queue far
  beyond capacity), the answer is immediate. Then, once checks have been waiting for a few seconds,
  the *measured* rate of finished checks (but never less than 3/4 of the best case): twice a
  second, the waiting logins at the back of the queue that would not start in time at that rate
  are refused. The best case alone would leave the hopeless tail of a burst waiting until
  ``max_wait``, for instance when the machine is busy with other work; the measured rate alone,
  taken in the first seconds of a burst (when TLS handshakes and session set-ups compete with the
  checks for the cores), would refuse clients the server then had time for.

The threads belong to this queue alone (not the loop's default executor), so blocking file work
elsewhere in the server can never hold logins up, and a check is only handed to a thread when that
thread is free: nothing waits unseen inside an executor's own queue.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar

from ferry.server.admission import Refused

__all__ = ["LoginQueue"]

T = TypeVar("T")

#: Assumed CPU cost of one check until one has been measured (argon2id m=19 MiB t=2 here: ~22 ms).
_INITIAL_COST: Final = 0.025
#: Weight of the newest measurement in the running cost estimate.
_COST_WEIGHT: Final = 0.2
#: Seconds of finished checks the measured rate looks at; it is used only once checks have been
#: waiting at least this long without a break.
_RATE_WINDOW: Final = 3.0
#: Seconds between two looks at the back of the queue.
_PRUNE_EVERY: Final = 0.5
#: A waiting login is refused when the rate says it would start this much past max_wait.
_PRUNE_SLACK: Final = 1.1
#: The rate used for that is never taken below this share of the best case (all threads checking
#: at the measured CPU cost): in the first seconds of a burst, TLS handshakes and session set-ups
#: compete with the checks, and the rate measured then understates what follows (a 1,000-client
#: burst here measured ~10 checks/s in its first 3 s, then ran at ~60/s).
_RATE_FLOOR: Final = 0.75


class _Waiter:
    """One check waiting for a thread."""

    __slots__ = ("gone", "since", "turn")

    def __init__(self, turn: asyncio.Future[None], gone: asyncio.Future[None], since: float) -> None:
        self.turn = turn  #: resolved when a thread is reserved for it (or with Refused)
        self.gone = gone  #: the connection's "closed" future
        self.since = since  #: when it started waiting (monotonic)


class LoginQueue:
    """Runs credential checks ``workers`` at a time, oldest first (see the module docstring)."""

    def __init__(self, *, workers: int, max_waiting: int, max_wait: float) -> None:
        self.workers = max(1, workers)
        self.max_waiting = max_waiting
        self.max_wait = max_wait
        self._executor = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="ferry-login")
        self._free = self.workers
        self._waiting: collections.deque[_Waiter] = collections.deque()
        self._cost = _INITIAL_COST  #: running estimate of one check's CPU time (seconds)
        self._measured = False
        self._finished: collections.deque[float] = collections.deque(maxlen=4096)  # when checks ended
        self._backlog_since: float | None = None  # since when checks have been waiting, unbroken
        self._pruner: asyncio.TimerHandle | None = None
        self.checks = 0  #: checks started
        self.skipped = 0  #: waiting checks dropped because their connection had gone
        self.refused = 0  #: logins told busy (queue full, or the wait too long)

    @property
    def waiting(self) -> int:
        """Checks waiting for a thread (including ones whose connection is gone, until skipped)."""
        return len(self._waiting)

    @property
    def cost(self) -> float:
        """Recent CPU time of one check in seconds (a running average; a guess until measured)."""
        return self._cost

    def best_case_wait(self, position: int) -> float:
        """Seconds until a check queued behind ``position`` others could start if the server did
        nothing but checks: a lower bound, used to refuse a hopeless login on arrival."""
        return position * self._cost / self.workers

    def measured_rate(self) -> float | None:
        """Checks finished per second over the last few seconds, or None while checks have not
        been waiting long enough for that to say anything about the queue."""
        now = time.monotonic()
        if self._backlog_since is None or now - self._backlog_since < _RATE_WINDOW:
            return None
        recent = sum(1 for t in self._finished if t >= now - _RATE_WINDOW)
        return recent / _RATE_WINDOW

    async def check(self, gone: asyncio.Future[None], fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in a login thread once it is this caller's turn, and return its result.

        ``gone`` is the connection's "closed" future: once it is done the check is not started (and
        :class:`ConnectionResetError` is raised). Raises :class:`Refused` when the queue cannot take
        the check or it would wait more than ``max_wait`` seconds. Exceptions of ``fn`` propagate.
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

        def timed() -> T:
            started = time.thread_time()
            try:
                return fn(*args)
            finally:
                cpu = time.thread_time() - started
                # The thread is given back when the check really ends, not when this coroutine
                # stops waiting for it (a cancelled caller must not let a second check start on a
                # busy thread). After a shutdown there is no loop left to tell.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._done, cpu)

        try:
            job = self._executor.submit(timed)
        except BaseException:
            self._release()
            raise
        self.checks += 1
        return await asyncio.wrap_future(job)

    async def _wait_turn(self, gone: asyncio.Future[None]) -> None:
        position = len(self._waiting)
        if position >= self.max_waiting:
            self.refused += 1
            raise Refused("login-queue", "the server has too many logins waiting; try again in a few seconds")
        wait = self.best_case_wait(position + 1)
        if wait > self.max_wait:
            self.refused += 1
            raise Refused(
                "login-queue", f"the server is busy with logins (about {wait:.0f} s of waiting); try again later"
            )
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), gone, time.monotonic())
        self._waiting.append(waiter)
        if self._backlog_since is None:
            self._backlog_since = waiter.since
        if self._pruner is None:
            self._pruner = loop.call_later(_PRUNE_EVERY, self._prune)
        turn = waiter.turn
        try:
            await asyncio.wait((turn, gone), timeout=self.max_wait, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            self._give_up(waiter)  # cancelled (shutdown): hand the turn on if it came
            raise
        if _granted(turn) and not gone.done():
            return
        refusal = turn.exception() if turn.done() and not turn.cancelled() else None
        if isinstance(refusal, Refused):
            raise refusal  # refused by _prune (counted there)
        self._give_up(waiter)
        if gone.done():
            self.skipped += 1
            raise ConnectionResetError("the connection closed while waiting for its password check")
        self.refused += 1
        raise Refused("login-queue", f"the server is busy with logins (waited {self.max_wait:g} s); try again later")

    def _give_up(self, waiter: _Waiter) -> None:
        turn = waiter.turn
        if _granted(turn):
            self._release()  # the turn came but will not be used: pass it on
        elif turn.done():
            if not turn.cancelled():
                turn.exception()  # a refusal nobody will raise now: mark it as seen
        else:
            turn.cancel()
            try:
                self._waiting.remove(waiter)  # O(n), but only on a give-up, and n <= max_waiting
            except ValueError:
                pass
            self._backlog_ended()

    def _done(self, cpu_seconds: float) -> None:
        if self._measured:
            self._cost += _COST_WEIGHT * (cpu_seconds - self._cost)
        else:  # the first real measurement replaces the guess outright
            self._cost, self._measured = cpu_seconds, True
        self._finished.append(time.monotonic())
        self._release()

    def _release(self) -> None:
        """A thread became free: start the oldest waiting check whose connection is still there."""
        self._free += 1
        while self._free and self._waiting:
            waiter = self._waiting.popleft()
            if waiter.turn.done():
                continue
            if waiter.gone.done():
                waiter.turn.cancel()  # its coroutine sees ``gone`` and counts the skip
                continue
            self._free -= 1
            waiter.turn.set_result(None)
        self._backlog_ended()

    def _backlog_ended(self) -> None:
        if not self._waiting:
            self._backlog_since = None

    def _prune(self) -> None:
        """Refuse the waiting logins at the back of the queue that the measured rate says will not
        start within ``max_wait`` (see the module docstring)."""
        self._pruner = None
        if not self._waiting:
            return
        self._pruner = asyncio.get_running_loop().call_later(_PRUNE_EVERY, self._prune)
        measured = self.measured_rate()
        if measured is None:
            return
        rate = max(measured, _RATE_FLOOR * self.workers / self._cost)
        live = [w for w in self._waiting if not w.turn.done() and not w.gone.done()]
        now = time.monotonic()
        refused = 0
        for position in range(len(live), 0, -1):
            waiter = live[position - 1]
            start_in = position / rate
            if now - waiter.since + start_in <= self.max_wait * _PRUNE_SLACK:
                break  # everyone ahead of it is served even sooner
            waiter.turn.set_exception(
                Refused(
                    "login-queue",
                    f"the server is busy with logins (about {start_in:.0f} s more of waiting); try again later",
                )
            )
            refused += 1
        if refused:
            self.refused += refused
            self._waiting = collections.deque(w for w in self._waiting if not w.turn.done())
            self._backlog_ended()

    def close(self) -> None:
        """Stop the threads once the checks running now are done (no new check starts)."""
        if self._pruner is not None:
            self._pruner.cancel()
            self._pruner = None
        self._executor.shutdown(wait=False, cancel_futures=True)


def _granted(turn: asyncio.Future[None]) -> bool:
    """True if ``turn`` was resolved by :meth:`LoginQueue._release` (a thread is reserved)."""
    return turn.done() and not turn.cancelled() and turn.exception() is None
