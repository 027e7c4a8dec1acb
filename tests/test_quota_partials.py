"""Interrupted uploads count against the quota (issue 10, break 4), are capped per user, are shown by
``df`` and are swept on a configurable schedule; over real sockets against a real server.

The attack: with a 1 MiB quota, 12 uploads of 900 KiB dropped just before their end used to leave
10.5 MiB of hidden partial files while ``df`` reported 0 used.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from ferry.client.aclient import AsyncClient, Usage
from ferry.client.known_hosts import KnownHosts
from ferry.client.stdio import put_stream
from ferry.errors import DiskFull
from ferry.server import context
from ferry.server.context import Limits
from ferry.server.jail import HomeUsage
from ferry_server import ServerThread
from serve_process import ServeProcess
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
    write_random,
)

KiB = 1 << 10


def _partial_bytes(h: Path) -> int:
    """Bytes of the partial files anywhere under home ``h``, as found on disk."""
    return sum((Path(d) / n).stat().st_size for d, _, names in os.walk(h) for n in names if ".ferry-part-" in n)


async def _dropped_put(srv: ServerThread, tmp_path: Path, src: Path, remote: str, cut: int, user: str = "alice") -> str:
    """Upload ``src`` on a connection of its own and drop it after ``cut`` bytes: "dropped" if the
    server took it, "refused" if it said quota at the start. Returns once the server has let go."""
    try:
        async with await connect(srv, tmp_path, user=user) as c:
            await c.put(src, remote, chunk_size=SMALL_CHUNK, progress=interrupt_after(cut))
        raise AssertionError(f"{remote}: the upload was not interrupted")
    except Interrupt:
        result = "dropped"
    except DiskFull as exc:
        assert exc.code == "quota", exc
        result = "refused"
    assert await await_until(lambda: no_sessions(srv), 15)
    return result


async def _df(srv: ServerThread, tmp_path: Path, user: str = "alice") -> Usage:
    async with await connect(srv, tmp_path, user=user) as c:
        return await c.df()


@pytest.mark.timeout(120)
def test_dropped_uploads_stay_within_the_quota_and_show_in_df(tmp_path: Path) -> None:
    """The attack replayed: only what fits is taken; the partial it leaves counts (df shows it), so
    the other 11 are refused at their start, and a streamed put is stopped where it crosses the
    quota; resuming the dropped upload still works and turns its partial into the file."""
    quota, size = MiB, 900 * KiB
    with running_server(tmp_path / "root", users=()) as srv:
        h = srv.add_user("alice", quota=quota)
        srcs = [tmp_path / f"f{i}.bin" for i in range(12)]
        for i, src in enumerate(srcs):
            write_random(src, size, 100 + i)

        async def attack() -> list[str]:
            return [await _dropped_put(srv, tmp_path, src, src.name, size - SMALL_CHUNK) for src in srcs]

        results = asyncio.run(attack())
        assert results == ["dropped"] + ["refused"] * 11, results
        held = _partial_bytes(h)
        assert 0 < held <= quota, f"{held} bytes of partials with a {quota}-byte quota"
        df = asyncio.run(_df(srv, tmp_path))
        assert (df.partial, df.partials) == (held, 1)
        assert df.used == held and df.quota == quota  # nothing complete yet: all of it is partial

        # A streamed upload (size unknown in advance) is refused where it crosses the quota.
        stream_src = tmp_path / "stream.bin"
        write_random(stream_src, 300 * KiB, 7)

        async def streamed() -> None:
            async with await connect(srv, tmp_path) as c:
                fd = os.open(stream_src, os.O_RDONLY)
                try:
                    with pytest.raises(DiskFull, match="quota exceeded"):
                        await put_stream(c.mux, fd, "stream.bin", chunk_size=SMALL_CHUNK)
                finally:
                    os.close(fd)

        asyncio.run(streamed())
        assert not (h / "stream.bin").exists()

        async def resume() -> None:
            async with await connect(srv, tmp_path) as c:
                r = await c.put(srcs[0], srcs[0].name, chunk_size=SMALL_CHUNK)
                assert r.resumed_from > 0  # resumed, not refused for counting its own partial twice

        asyncio.run(resume())
        assert (h / "f0.bin").read_bytes() == srcs[0].read_bytes()
        assert partials(h) == []
        df = asyncio.run(_df(srv, tmp_path))
        assert (df.used, df.partial, df.partials) == (size, 0, 0)


@pytest.mark.timeout(120)
def test_two_sessions_dropping_uploads_at_once_stay_within_the_quota(tmp_path: Path) -> None:
    """Two sessions of one user, each dropping uploads one after the other at the same time: the
    reservations and partials of both count for each start, so together they stay within the quota."""
    quota, size = MiB, 400 * KiB
    with running_server(tmp_path / "root", users=()) as srv:
        h = srv.add_user("alice", quota=quota)

        async def lane(k: int) -> list[str]:
            out = []
            for i in range(4):
                src = tmp_path / f"l{k}-{i}.bin"
                write_random(src, size, 10 * k + i)
                try:
                    async with await connect(srv, tmp_path) as c:
                        await c.put(src, src.name, chunk_size=SMALL_CHUNK, progress=interrupt_after(size - SMALL_CHUNK))
                except Interrupt:
                    out.append("dropped")
                except DiskFull as exc:
                    assert exc.code == "quota", exc
                    out.append("refused")
            return out

        async def main() -> list[list[str]]:
            lanes = await asyncio.gather(lane(1), lane(2))
            assert await await_until(lambda: no_sessions(srv), 15)
            return lanes

        lanes = asyncio.run(main())
        dropped = sum(r == "dropped" for lane_results in lanes for r in lane_results)
        held = _partial_bytes(h)
        assert 1 <= dropped <= 2, lanes  # 2 x 400 KiB fit in 1 MiB, a third never
        assert held <= quota, f"{held} bytes of partials with a {quota}-byte quota ({lanes})"
        df = asyncio.run(_df(srv, tmp_path))
        assert (df.partial, df.partials) == (held, dropped)


@pytest.mark.timeout(120)
def test_partials_are_capped_in_number_and_bytes(tmp_path: Path) -> None:
    """Without a quota a user's unfinished uploads are still bounded: the one beyond the cap is
    refused at its start with what to do; resuming one frees its place."""
    size = 300 * KiB
    limits = Limits(max_partials=3, max_partial_bytes=1100 * KiB)
    with running_server(tmp_path / "root", limits=limits) as srv:
        h = home(srv)
        srcs = [tmp_path / f"p{i}.bin" for i in range(5)]
        for i, src in enumerate(srcs):
            write_random(src, size, 200 + i)

        async def main() -> None:
            for src in srcs[:3]:
                # Dropped near the end: each partial holds 236-300 KiB.
                assert await _dropped_put(srv, tmp_path, src, src.name, size - SMALL_CHUNK) == "dropped"
            async with await connect(srv, tmp_path) as c:
                with pytest.raises(DiskFull) as info:
                    await c.put(srcs[3], "p3.bin", chunk_size=SMALL_CHUNK)
                msg = str(info.value)
                assert info.value.code == "quota"
                assert "you have 3 unfinished uploads" in msg and "at most 3" in msg, msg
                assert "run the same put again to resume" in msg and "ferry rm" in msg, msg
                assert "'.p0.bin.ferry-part-" in msg, msg  # names what to resume or remove
                # A resume adds no partial: it is taken, and its partial becomes the file.
                r = await c.put(srcs[0], "p0.bin", chunk_size=SMALL_CHUNK)
                assert r.resumed_from > 0
                await c.put(srcs[3], "p3.bin", chunk_size=SMALL_CHUNK)
            assert len(partials(h)) == 2
            # Bytes: two partials of 236-300 KiB held; a 700 KiB upload would take them above 1100
            # KiB, with one of them removed it fits.
            big = tmp_path / "big.bin"
            write_random(big, 700 * KiB, 9)
            async with await connect(srv, tmp_path) as c:
                with pytest.raises(DiskFull, match="at most 1126400"):
                    await c.put(big, "big.bin", chunk_size=SMALL_CHUNK)
                await c.remove(partials(h)[0])  # removing one by its name frees its bytes
                await c.put(big, "big.bin", chunk_size=SMALL_CHUNK)
                df = await c.df()
            assert (df.partials, df.partial) == (1, _partial_bytes(h))

        asyncio.run(main())


@pytest.mark.timeout(90)
def test_sweep_schedule_comes_from_serve_options(tmp_path: Path) -> None:
    """`ferry serve --keep-partials DAYS --sweep-interval SECONDS`: a dropped upload's partial is
    counted by df, then deleted by the sweep once it is older than the age, and df drops it."""
    env = dict(os.environ, FERRY_HOME=str(tmp_path / "client-home"))
    age = 2.0
    args = ["--keep-partials", repr(age / 86400), "--sweep-interval", "0.25", "--max-partials", "5"]
    srv = ServeProcess(tmp_path / "root", env, args=args).start()
    try:
        assert srv.password is not None and srv.user is not None
        log = tmp_path / "root" / "logs" / "ferry.log"
        assert "unfinished uploads: per-user=5 bytes=68719476736 kept=2s sweep-every=0.25s" in log.read_text()
        h = tmp_path / "root" / "homes" / srv.user
        src = tmp_path / "s.bin"
        write_random(src, 600 * KiB, 5)

        async def client() -> AsyncClient:
            return await AsyncClient.connect(
                "127.0.0.1",
                srv.port,
                user=srv.user or "",
                password=srv.password or "",
                known_hosts=KnownHosts(tmp_path / "known_hosts"),
            )

        async def main() -> None:
            c = await client()
            try:
                with pytest.raises(Interrupt):
                    await c.put(src, "s.bin", chunk_size=SMALL_CHUNK, progress=interrupt_after(300 * KiB))
            finally:
                await c.close()
            c = await client()
            try:
                dropped = time.monotonic()
                df = await c.df()
                assert df.partials == 1 and df.partial > 0
                # Gone within the age plus a few sweep intervals, never before the age.
                deadline = dropped + age + 10
                while (await c.df()).partials and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                assert time.monotonic() - dropped >= age - 1.0
                df = await c.df()
                assert (df.partials, df.partial, df.used) == (0, 0, 0)
                assert partials(h) == []
            finally:
                await c.close()

        asyncio.run(main())
        assert "removed=1 stale partial uploads" in log.read_text()
    finally:
        assert srv.stop(signal.SIGTERM) == 0


def test_partials_changed_while_a_usage_walk_runs_are_applied_over_its_result() -> None:
    """The walk may or may not have seen what happened meanwhile: changes are recorded by path and
    win over its result; a partial being written is not idle; an invalidation discards the walk."""
    usage = context.Usage()  # (the server's; Usage above is what the client's df returns)
    usage.begin_walk("a")
    usage.park("a", "x/.f.ferry-part-1", 10)  # dropped during the walk, which saw 4 bytes of it
    usage.claim("a", ".g.ferry-part-2")  # resumed during the walk, which saw it idle
    tally = HomeUsage(bytes=100, entries=3, partials={"x/.f.ferry-part-1": 4, ".g.ferry-part-2": 7, ".w.ferry-part-3": 5})
    assert usage.set("a", tally, writing={".w.ferry-part-3"})
    assert usage.partials("a") == {"x/.f.ferry-part-1": 10}
    assert usage.known("a") == 110 and usage.entries("a") == 3
    usage.moved_tree("a", "x", "y/z")  # a folder moved with its partials
    assert usage.partials("a") == {"y/z/.f.ferry-part-1": 10}
    usage.begin_walk("a")
    usage.invalidate("a")  # e.g. rm -r while walking: the walk may have missed it
    assert not usage.set("a", tally) and usage.known("a") is None
    assert usage.partials("a") == {"y/z/.f.ferry-part-1": 10}  # partials stay known
    usage.removed_tree("a", "y")
    assert usage.partials("a") == {}


@pytest.mark.timeout(60)
def test_a_partial_deleted_while_its_upload_runs_is_not_counted_after_it(tmp_path: Path) -> None:
    """The sweep (or a local process) may delete a partial while its upload still writes it (the
    upload took an old partial over): when that upload then stops, nothing is left to count, and
    df must not keep counting a partial that is gone."""
    src = tmp_path / "s.bin"
    write_random(src, 600 * KiB, 11)
    with running_server(tmp_path / "root") as srv:
        h = home(srv)

        def delete_partial() -> None:
            for name in partials(h):
                (h / name).unlink()

        async def main() -> Usage:
            with pytest.raises(Interrupt):
                async with await connect(srv, tmp_path) as c:
                    await c.put(src, "s.bin", chunk_size=SMALL_CHUNK, progress=interrupt_after(300 * KiB, delete_partial))
            assert await await_until(lambda: no_sessions(srv), 15)
            return await _df(srv, tmp_path)

        df = asyncio.run(main())
        assert partials(h) == []
        assert (df.partials, df.partial) == (0, 0)
