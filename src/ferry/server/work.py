"""Blocking file work on the server: bounded thread pools, fair between users, stopped with their
session.

Why this exists: a recursive listing of a very deep tree once ran in asyncio's default executor,
the same few threads (``min(32, cores + 4)``: 6 on two cores) that password checks use. Six such
listings from one user filled them; nobody could log in or ``stat`` for minutes, and closing the
attacking connections did not stop the work. So:

- **Separate pools.** File work never uses the default executor, nor the login threads that run
  password checks (:mod:`ferry.server.login_queue`). :class:`WorkPools` holds two :class:`FairPool` s: ``files`` for calls whose cost is
  bounded by the request (a stat, an open, a 1 MiB read or write, a mkdir of one path, a commit),
  and ``walks`` for work that grows with a folder tree (a recursive listing, a GetTree scan, a
  PutTree batch, ``rm -r``, the usage count). Walks come in steps (a page, a batch), so a walk
  holds a thread for one step at a time, and a step also stops between entries once its session
  is closed (:meth:`SessionWork.check`).
- **Fair between users.** A pool runs at most ``threads`` jobs at once and at most ``per_user``
  of them for one user; waiting jobs start round-robin across users. One user's many walks (from
  many connections) therefore never take a whole pool, and another user's job waits at most for
  one step of the jobs already running.
- **Per-session limit.** A session runs at most ``walks_per_session`` expensive operations at
  once (:meth:`SessionWork.walk_slot`); more wait their turn inside the session, in order.
- **Cancelled with the connection.** When a session ends, its walk steps that have not started
  are dropped, and running ones see :meth:`SessionWork.check` fail before their next entry. The jail
  is closed only once every thread that may use it has returned (:meth:`SessionWork.after_jobs`).

The session's :class:`SessionWork` is found through a context variable set by ``Session.run``
(the tasks it starts inherit it), so handlers call :func:`start_thread` / :func:`in_thread` (file
pool), :func:`start_walk`, :func:`run_steps` and :func:`prefetched` (walk pool) without passing
the session around.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ferry.aio import close_after

T = TypeVar("T")

__all__ = [
    "FairPool",
    "SessionClosed",
    "SessionWork",
    "WorkPools",
    "current",
    "in_thread",
    "prefetched",
    "run_steps",
    "start_thread",
    "start_walk",
]


class SessionClosed(ConnectionError):
    """Raised inside a thread job whose session has ended: the work is abandoned (nobody is left
    to receive its result). A ``ConnectionError``, so a handler still waiting ends like one whose
    connection broke."""


@dataclass(eq=False)
class _Job:
    """One queued or running call. ``result`` is what the caller awaits; ``finished`` resolves once
    no thread runs it any more (it ran, or it was dropped before it started)."""

    pool: FairPool
    owner: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    result: asyncio.Future[Any]
    finished: asyncio.Future[None]
    started: bool = False


class FairPool:
    """A bounded thread pool that shares its threads fairly between owners (users).

    At most ``threads`` jobs run at once, at most ``per_user`` of them for one owner; waiting jobs
    are started round-robin over the owners that have some, oldest first within an owner. Lives on
    one event loop: :meth:`submit` must be called from it.
    """

    def __init__(self, name: str, threads: int, per_user: int) -> None:
        self.name = name
        self.threads = max(1, threads)
        self.per_user = max(1, min(per_user, self.threads))
        self._executor = concurrent.futures.ThreadPoolExecutor(
            self.threads, thread_name_prefix=f"ferry-{name}"
        )
        #: owners with waiting jobs, in round-robin order (the next to serve first)
        self._waiting: collections.OrderedDict[str, collections.deque[_Job]] = collections.OrderedDict()
        self._busy: dict[str, int] = {}
        self._running = 0
        self._closed = False

    @property
    def running(self) -> int:
        """Jobs running in a thread now."""
        return self._running

    @property
    def queued(self) -> int:
        """Jobs waiting for a thread (including ones already cancelled, until they are skipped)."""
        return sum(len(q) for q in self._waiting.values())

    def running_for(self, owner: str) -> int:
        """Jobs of ``owner`` running now."""
        return self._busy.get(owner, 0)

    def submit(self, owner: str, fn: Callable[..., T], *args: Any) -> _Job:
        """Queue ``fn(*args)`` for ``owner``; the returned job's ``result`` future gets its outcome.
        Cancelling ``result`` before the job has started drops it (it never runs)."""
        loop = asyncio.get_running_loop()
        job = _Job(self, owner, fn, args, loop.create_future(), loop.create_future())
        job.result.add_done_callback(lambda _f: self._dropped(job))
        if self._closed:
            job.result.set_exception(RuntimeError(f"the {self.name} pool is shut down"))
            return job
        self._waiting.setdefault(owner, collections.deque()).append(job)
        self._dispatch()
        return job

    def shutdown(self) -> None:
        """Drop waiting jobs and let the threads end once their current job returns (no wait)."""
        self._closed = True
        for queue in self._waiting.values():
            for job in queue:
                job.result.cancel()
        self._waiting.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _dropped(self, job: _Job) -> None:
        """``job.result`` is done: if the job never started (cancelled while waiting), no thread
        will ever run it."""
        if not job.started and not job.finished.done():
            job.finished.set_result(None)

    def _dispatch(self) -> None:
        while self._running < self.threads and self._waiting:
            owner = next((o for o in self._waiting if self._busy.get(o, 0) < self.per_user), None)
            if owner is None:
                return  # every owner with waiting jobs is at its share
            queue = self._waiting[owner]
            job = queue.popleft()
            if queue:
                self._waiting.move_to_end(owner)  # round-robin: the others go first next time
            else:
                del self._waiting[owner]
            if job.result.done():  # cancelled while waiting
                continue
            self._start(job)

    def _start(self, job: _Job) -> None:
        loop = asyncio.get_running_loop()
        job.started = True
        self._running += 1
        self._busy[job.owner] = self._busy.get(job.owner, 0) + 1
        try:
            cf = self._executor.submit(job.fn, *job.args)
        except RuntimeError as exc:  # shut down meanwhile
            self._finish(job, None, exc)
            return

        def done(cf: concurrent.futures.Future[Any]) -> None:  # runs in the worker thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
                loop.call_soon_threadsafe(self._finish, job, cf, None)

        cf.add_done_callback(done)

    def _finish(
        self, job: _Job, cf: concurrent.futures.Future[Any] | None, error: BaseException | None
    ) -> None:
        self._running -= 1
        left = self._busy[job.owner] - 1
        if left:
            self._busy[job.owner] = left
        else:
            del self._busy[job.owner]
        if not job.result.done():
            if cf is None:
                job.result.set_exception(error or RuntimeError("job did not run"))
            elif cf.cancelled():
                job.result.cancel()
            elif cf.exception() is not None:
                job.result.set_exception(cf.exception())  # type: ignore[arg-type]
            else:
                job.result.set_result(cf.result())
        if not job.finished.done():
            job.finished.set_result(None)
        self._dispatch()


class WorkPools:
    """The server's two file-work pools (see the module docstring); one per server."""

    def __init__(
        self, *, file_threads: int, file_threads_per_user: int, walk_threads: int, walk_threads_per_user: int
    ) -> None:
        self.files = FairPool("files", file_threads, file_threads_per_user)
        self.walks = FairPool("walks", walk_threads, walk_threads_per_user)

    @property
    def busy(self) -> int:
        """Jobs running or waiting in either pool (0: idle)."""
        return self.files.running + self.files.queued + self.walks.running + self.walks.queued

    def shutdown(self) -> None:
        """Stop both pools (server shutdown)."""
        self.files.shutdown()
        self.walks.shutdown()


@dataclass(eq=False)
class SessionWork:
    """The thread work of one session: which pools, for whom, what is still running, and whether
    the session has ended (threads look at that between entries)."""

    pools: WorkPools
    walks_per_session: int
    #: the user the work is done for (set at login): the pools share their threads per owner
    owner: str = "-"
    _jobs: set[_Job] = field(default_factory=set)
    _closed: threading.Event = field(default_factory=threading.Event)
    _slots: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.walks_per_session)

    def start(self, pool: FairPool, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue ``fn(*args)`` in ``pool`` as a job of this session; returns its result future.
        Still possible once the session has ended: its cleanup may need a last bounded job (an
        upload flushing what it received, so that it can be resumed)."""
        job = pool.submit(self.owner, fn, *args)
        self._jobs.add(job)
        job.finished.add_done_callback(lambda _f: self._jobs.discard(job))
        return job.result

    def cancel_waiting(self, fut: asyncio.Future[Any]) -> bool:
        """Drop the job behind ``fut`` if it has not started; True if it was dropped."""
        for job in self._jobs:
            if job.result is fut:
                if job.started:
                    return False
                return fut.cancel()
        return False

    @property
    def closed(self) -> bool:
        """True once the session has ended."""
        return self._closed.is_set()

    def check(self) -> None:
        """Raise :class:`SessionClosed` if the session has ended (called by threads between
        entries; thread-safe)."""
        if self._closed.is_set():
            raise SessionClosed("the session has ended; its work was abandoned")

    def close(self) -> None:
        """The session is ending: drop its walk steps that have not started, and let running ones
        stop at their next :meth:`check`. Waiting file-pool jobs still run: they are bounded, and
        an upload's last write must not be lost (its partial is kept for a resume)."""
        self._closed.set()
        for job in list(self._jobs):
            if job.pool is self.pools.walks and not job.started:
                job.result.cancel()

    @property
    def running(self) -> int:
        """Jobs of this session that a thread may still be running (or that still wait)."""
        return len(self._jobs)

    async def wait(self) -> None:
        """Wait until no thread runs (or will run) a job of this session."""
        while self._jobs:
            await asyncio.wait([j.finished for j in self._jobs])

    def after_jobs(self, fn: Callable[[], object]) -> None:
        """Call ``fn`` now if no job of this session is running, else once the last one is done."""
        pending = next((j for j in self._jobs if not j.finished.done()), None)
        if pending is None:
            fn()
        else:
            pending.finished.add_done_callback(lambda _f: self.after_jobs(fn))

    @contextlib.asynccontextmanager
    async def walk_slot(self) -> AsyncIterator[None]:
        """Hold one of the session's ``walks_per_session`` slots for an expensive operation; waits
        (in order) while they are all taken."""
        async with self._slots:
            yield

    async def acquire_walk_slot(self) -> Callable[[], None]:
        """Take a slot as :meth:`walk_slot` does, for a caller that releases it from a callback;
        returns the release function (idempotent)."""
        slots = self._slots
        await slots.acquire()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                slots.release()

        return release


#: The work of the current session (set by ``Session.run``; the tasks it starts inherit it).
current: contextvars.ContextVar[SessionWork] = contextvars.ContextVar("ferry_session_work")


def start_thread(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """Start a bounded blocking call in the file pool, as a job of the current session."""
    work = current.get()
    return work.start(work.pools.files, fn, *args)


def start_walk(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """Start one step of a tree walk in the walk pool, as a job of the current session."""
    work = current.get()
    return work.start(work.pools.walks, fn, *args)


async def in_thread(fn: Callable[..., T], *args: Any, release: Callable[[T], object] | None = None) -> T:
    """Run a bounded blocking call in the file pool and return its result.

    If the await is cancelled (client gone, server shutdown) before the job has started, it never
    runs. A job already running cannot be stopped from here: its result is then handed to
    ``release`` once it is done (a result holding descriptors must say how to close them).
    """
    return await _run(start_thread(fn, *args), release)


#: Entries one step of :func:`run_steps` handles before it gives its thread back: milliseconds of
#: work, after which the walk's next step queues behind other users' waiting jobs.
WALK_STEP = 1000


async def run_steps(steps: Generator[T, None, object], *, step: int = WALK_STEP) -> T | None:
    """Drive a walk generator (one ``next`` per entry) to its end in the walk pool, ``step``
    entries per job and checking the session before each entry; returns the last value it yielded
    (None if none). The generator is closed in every case, after the step running in a thread if
    this await is cancelled."""
    work = current.get()
    check = work.check
    last: list[T | None] = [None]

    def advance() -> bool:
        for _ in range(step):
            check()
            try:
                last[0] = next(steps)
            except StopIteration:
                return True
        return False

    job: asyncio.Future[bool] | None = None
    try:
        while True:
            job = work.start(work.pools.walks, advance)
            done = await _run(job, None)
            job = None
            if done:
                return last[0]
    finally:
        close_after(job, steps.close)


async def prefetched(
    step: Callable[[], tuple[T, bool]], close: Callable[[], object]
) -> AsyncGenerator[tuple[T, bool], None]:
    """What ``step`` returns (one walk step: a page, a batch, and whether the walk is done), called
    in the walk pool until the walk is done, one step ahead of the consumer:
    the next page is read while this one is being sent, and never more, so memory holds two steps
    whatever the size of the walk. ``close`` (releasing the walk) runs once no step is running,
    also when the consumer stops early; use with ``contextlib.aclosing``."""
    work = current.get()
    job: asyncio.Future[tuple[T, bool]] | None = work.start(work.pools.walks, step)
    try:
        while job is not None:
            item, done = await asyncio.shield(job)
            job = None if done else work.start(work.pools.walks, step)
            yield item, done
    finally:
        if job is not None:
            work.cancel_waiting(job)
        close_after(job, close)


async def _run(fut: asyncio.Future[T], release: Callable[[T], object] | None) -> T:
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        if not current.get().cancel_waiting(fut):
            fut.add_done_callback(lambda f: _release(f, release))
        raise


def _release(fut: asyncio.Future[T], release: Callable[[T], object] | None) -> None:
    """Dispose of the result of a job nobody waits for any more (its error, too: retrieved here, or
    asyncio would log it as never retrieved)."""
    if fut.cancelled() or fut.exception() is not None:
        return
    if release is not None:
        release(fut.result())
