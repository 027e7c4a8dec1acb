"""ferry.aio's cleanup helpers: a cancel aimed at the task that cleans up is never swallowed.

The pattern they replace (``task.cancel()`` then ``await task`` under
``suppress(BaseException)``) swallowed such a cancel: a session's worker, cancelled when its client
went away while a handler was dropping its reads ahead, went back to waiting for requests and the
session never ended (seen as test_cancel_stops_a_tree_download failing about one run in fifteen).
These run on a real event loop; the slow cleanups are real tasks that take a while to end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from ferry.aio import aclose_quietly, cancel_and_wait, settle, uninterrupted

pytestmark = pytest.mark.timeout(20)


async def _slow_to_die(ended: list[str], delay: float = 0.2) -> None:
    """Sleeps until cancelled, then takes ``delay`` seconds to clean up (like a cancelled read
    waiting for its database connection to be given back)."""
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        await asyncio.sleep(delay)
        ended.append("cleaned up")
        raise


async def _cleaner(target: asyncio.Task[None], after: list[str]) -> None:
    await cancel_and_wait(target)
    after.append("went on")  # a swallowed cancel would get here


def test_cancel_and_wait_raises_the_callers_cancel_after_the_task_ended() -> None:
    async def main() -> None:
        ended: list[str] = []
        after: list[str] = []
        target = asyncio.ensure_future(_slow_to_die(ended))
        await asyncio.sleep(0.01)
        cleaner = asyncio.ensure_future(_cleaner(target, after))
        await asyncio.sleep(0.05)  # the cleaner now waits for the target's cleanup
        cleaner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cleaner
        assert ended == ["cleaned up"]  # it still waited for the cleanup to finish
        assert after == []  # and did not go on as if nothing had happened
        assert target.cancelled()

    asyncio.run(main())


def test_cancel_and_wait_drops_the_tasks_failures() -> None:
    async def fails() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RuntimeError("failed while cancelled") from None

    async def main() -> None:
        tasks = [asyncio.ensure_future(fails()), asyncio.ensure_future(asyncio.sleep(3600)), None]
        await asyncio.sleep(0.01)
        await cancel_and_wait(*tasks)  # neither the RuntimeError nor the CancelledError comes out
        assert all(t is None or t.done() for t in tasks)

    asyncio.run(main())


def test_settle_waits_without_cancelling_and_lets_the_callers_cancel_out() -> None:
    async def main() -> None:
        job = asyncio.ensure_future(asyncio.sleep(0.3, result="done"))
        waiter = asyncio.ensure_future(settle(job))
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert not job.done()  # the job itself was left to finish
        assert await job == "done"

        async def broken() -> None:
            raise OSError("disk full")

        failed = asyncio.ensure_future(broken())
        await settle(failed)  # its failure is retrieved, not raised
        assert isinstance(failed.exception(), OSError)

    asyncio.run(main())


def test_aclose_quietly_lets_the_callers_cancel_out() -> None:
    async def source(ended: list[str]) -> AsyncIterator[int]:
        try:
            yield 1
            yield 2
        finally:
            await asyncio.sleep(0.2)  # a cleanup that waits (dropping its reads ahead)
            ended.append("closed")

    async def closer(it: AsyncIterator[int], after: list[str]) -> None:
        await aclose_quietly(it)
        after.append("went on")

    async def main() -> None:
        ended: list[str] = []
        after: list[str] = []
        it = source(ended)
        assert await it.__anext__() == 1
        task = asyncio.ensure_future(closer(it, after))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert after == []

        broken_ended: list[str] = []
        broken = source(broken_ended)
        await broken.__anext__()
        await aclose_quietly(broken)  # a cleanup of its own finishing normally: no error
        assert broken_ended == ["closed"]
        await aclose_quietly(iter([]))  # not closable: nothing to do

    asyncio.run(main())


def test_uninterrupted_runs_the_cleanup_to_its_end_then_raises_the_cancel() -> None:
    """The session's end (abort the uploads, record their partials, close the home) runs whole even
    when a server shutdown cancels the session meanwhile (seen: a partial's chunk list not written,
    so a resume after a restart started from zero)."""

    async def cleanup(steps: list[str]) -> str:
        steps.append("abort uploads")
        await asyncio.sleep(0.2)
        steps.append("close the home")
        return "ended"

    async def session(steps: list[str]) -> str:
        try:
            await asyncio.sleep(3600)
        finally:
            await uninterrupted(cleanup(steps))
        return "unreachable"

    async def main() -> None:
        steps: list[str] = []
        task = asyncio.ensure_future(session(steps))
        await asyncio.sleep(0.01)
        task.cancel()  # the client went away
        await asyncio.sleep(0.05)
        task.cancel()  # and the server shuts down during the cleanup
        with pytest.raises(asyncio.CancelledError):
            await task
        assert steps == ["abort uploads", "close the home"]
        assert await uninterrupted(cleanup([])) == "ended"

    asyncio.run(main())
