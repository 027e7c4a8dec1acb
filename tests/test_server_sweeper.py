"""Stale partial uploads are swept: old ones go, fresh and in-progress ones stay, symlinks are never
followed, and a real interrupted upload's partial disappears once it is older than the limit."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from ferry.server.context import Limits
from ferry.server.sweeper import sweep_home, sweep_once
from transfer_support import (
    SMALL_CHUNK,
    Interrupt,
    MiB,
    await_until,
    connect,
    home,
    interrupt_after,
    no_sessions,
    partials,
    running_server,
    wait_until,
    write_random,
)

DAY = 86400.0


def _age(path: Path, days: float) -> None:
    t = time.time() - days * DAY
    os.utime(path, (t, t), follow_symlinks=False)


def test_sweep_home_removes_only_old_regular_partials(tmp_path: Path) -> None:
    h = tmp_path / "home"
    (h / "a" / "b").mkdir(parents=True)
    old = h / "a" / "b" / ".big.bin.ferry-part-abc123"
    old.write_bytes(b"x" * 1000)
    _age(old, 8)
    fresh = h / ".new.bin.ferry-part-t1"
    fresh.write_bytes(b"y" * 10)
    _age(fresh, 1)
    busy = h / "a" / ".busy.ferry-part-t2"
    busy.write_bytes(b"z")
    _age(busy, 30)
    user_file = h / "a" / "old-notes.txt"  # an old file of the user's own: never touched
    user_file.write_bytes(b"mine")
    _age(user_file, 100)
    outside = tmp_path / "outside.ferry-part-x"  # a symlink named like a partial, pointing out
    outside.write_bytes(b"keep")
    link = h / ".evil.ferry-part-t3"
    link.symlink_to(outside)
    _age(link, 30)

    result = sweep_home(str(h), 7 * DAY, active={"a/.busy.ferry-part-t2"})

    assert result.files == 1 and result.bytes == 1000
    assert not old.exists()
    assert fresh.exists() and busy.exists() and user_file.exists()
    assert link.is_symlink() and outside.read_bytes() == b"keep"


def test_sweep_does_not_follow_a_symlinked_folder(tmp_path: Path) -> None:
    h = tmp_path / "home"
    h.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / ".data.ferry-part-t"
    victim.write_bytes(b"not yours")
    _age(victim, 30)
    (h / "dir").symlink_to(elsewhere, target_is_directory=True)

    assert sweep_home(str(h), 7 * DAY, active=()).files == 0
    assert victim.read_bytes() == b"not yours"


def test_sweep_of_a_missing_home_is_a_no_op(tmp_path: Path) -> None:
    assert sweep_home(str(tmp_path / "gone"), DAY, active=()).files == 0


@pytest.mark.timeout(60)
def test_an_abandoned_upload_is_swept_and_quota_recounted(tmp_path: Path) -> None:
    """A real interrupted put leaves a partial; a sweep after it aged removes it and logs it."""
    src = tmp_path / "big.bin"
    write_random(src, 4 * MiB, 3)
    # A huge interval: only the start-up sweep (and the explicit one below) runs in this test.
    limits = Limits(partial_max_age=7 * DAY, sweep_interval=3600)
    with running_server(tmp_path / "root", limits=limits) as srv:
        h = home(srv)

        async def interrupted() -> None:
            async with await connect(srv, tmp_path) as c:
                with pytest.raises(Interrupt):
                    await c.put(src, "big.bin", chunk_size=SMALL_CHUNK, progress=interrupt_after(2 * MiB))
            assert await await_until(lambda: no_sessions(srv))

        async def usage() -> int:
            async with await connect(srv, tmp_path) as c:
                return (await c.df()).used

        asyncio.run(interrupted())
        [name] = partials(h)
        assert asyncio.run(usage()) >= 2 * MiB  # the partial counts against the quota...
        assert srv.loop is not None and srv.server.ctx is not None
        ctx = srv.server.ctx
        # Not old yet: a sweep keeps it (the client may come back to resume).
        assert asyncio.run_coroutine_threadsafe(sweep_once(ctx), srv.loop).result(10).files == 0
        assert partials(h) == [name]
        _age(h / name, 8)
        swept = asyncio.run_coroutine_threadsafe(sweep_once(ctx), srv.loop).result(10)
        assert swept.files == 1 and swept.bytes > 0
        assert partials(h) == []
        log = (srv.root / "logs" / "ferry.log").read_text(encoding="utf-8")
        assert "sweep user=alice removed=1 stale partial uploads" in log
        assert asyncio.run(usage()) == 0  # ...until it is swept


@pytest.mark.timeout(60)
def test_the_server_sweeps_soon_after_start(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with running_server(root, limits=Limits(partial_max_age=DAY, sweep_interval=3600)) as srv:
        stale = home(srv) / ".left.bin.ferry-part-zz"
        stale.write_bytes(b"old")
        _age(stale, 2)
        # The first sweep runs about a second after start (then hourly here).
        assert wait_until(lambda: not stale.exists(), timeout=15)


@pytest.mark.timeout(60)
def test_partial_max_age_zero_keeps_partials(tmp_path: Path) -> None:
    with running_server(tmp_path / "root", limits=Limits(partial_max_age=0)) as srv:
        stale = home(srv) / ".left.bin.ferry-part-zz"
        stale.write_bytes(b"old")
        _age(stale, 365)
        assert srv.server._sweeper is None
        assert srv.loop is not None and srv.server.ctx is not None
        result = asyncio.run_coroutine_threadsafe(sweep_once(srv.server.ctx), srv.loop).result(10)
        assert result.files == 0 and stale.exists()
