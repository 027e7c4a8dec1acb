"""Expensive operations on the server (recursive listings, tree transfers, rm -r, usage) against one
user freezing everyone: separate bounded pools, fair shares, per-session slots, cancellation with
the connection (issue 10, break 1; ferry.server.work).

Every test runs a real server on loopback and talks to it over sockets.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.hashing import small_digest
from ferry.server.context import Limits
from ferry.server.jail import Entry, Jail
from ferry.server.sweeper import sweep_once
from ferry.server.work import FairPool
from ferry.wire import CONNECTION_ENDED, Data
from ferry.wire import messages as m
from ferry_server import ServerThread
from transfer_support import (
    RawClient,
    SessionRecorder,
    home,
    no_logged_errors,  # noqa: F401 (a fixture: see pytestmark)
    no_sessions,
    running_server,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("no_logged_errors")

DEPTH = 1500  # the attack's depth: a single mkdir -p (3 KB path) makes it


@pytest.fixture(autouse=True)
def _remove_deep_trees(tmp_path: Path) -> Iterator[None]:
    """pytest removes old temp folders with a recursive ``shutil.rmtree``, which dies of
    RecursionError on a tree ~1,000 levels deep, in every later run on this machine: remove what
    the test made here, with the jail's iterative removal."""
    yield
    with Jail(tmp_path) as jail:
        for name in os.listdir(tmp_path):
            jail.remove(name, recursive=True)


def deep_path(depth: int) -> str:
    return "/".join(["d"] * depth)


def login(srv: ServerThread, user: str = "alice") -> RawClient:
    raw = RawClient(srv.port)
    raw.login(user)
    return raw


def make_deep_tree(srv: ServerThread, depth: int) -> None:
    """One ``mkdir -p`` over the wire, as the attacker did."""
    raw = login(srv)
    try:
        raw.send(m.Mkdir(id=1, path=deep_path(depth), parents=True))
        assert isinstance(raw.reply(1), m.Ok)
    finally:
        raw.close()


def pools_idle(srv: ServerThread) -> bool:
    return srv.server.ctx is not None and srv.server.ctx.work.busy == 0


def read_listing(raw: RawClient, req_id: int, timeout: float = 10.0) -> list[m.Entry]:
    """Every page of listing ``req_id`` (raises on an Error reply)."""
    entries: list[m.Entry] = []
    for _ in range(100_000):
        page = raw.reply(req_id, timeout)
        assert isinstance(page, m.ListReply), page
        entries += page.entries
        if not page.more:
            return entries
    raise AssertionError("the listing did not end")


@pytest.mark.timeout(120)
def test_one_users_deep_listings_do_not_stall_another_users_login_and_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attack of issue 10 (break 1), scaled down: a 1,500-level tree and six connections of
    one user each asking for a recursive listing of it. Another user must still log in, stat and
    list at once; closing the attacking connections must stop their thread work.

    Walks are linear now (milliseconds for this tree), so the disk is made slow for the attacker's
    folders (2 ms per entry, as on a busy network file system): her listings then hold threads
    for seconds, as they did on the attacked server, whatever the speed of the walk itself."""
    original = Entry.from_stat.__func__  # type: ignore[attr-defined]

    def slow_for_d(cls: type[Entry], name: str, st: Any) -> Entry:
        if name == "d":
            time.sleep(0.002)  # releases the GIL, as a real slow stat does
        return original(cls, name, st)  # type: ignore[no-any-return]

    with running_server(tmp_path / "root", plain=True, users=("alice", "bob")) as srv:
        make_deep_tree(srv, DEPTH)
        monkeypatch.setattr(Entry, "from_stat", classmethod(slow_for_d))
        assert srv.server.ctx is not None
        walks = srv.server.ctx.work.walks
        attackers: list[RawClient] = []
        try:
            for _ in range(6):
                raw = login(srv)
                raw.send(m.ListDir(id=1, path="", recursive=True))
                attackers.append(raw)
            assert wait_until(lambda: walks.running_for("alice") > 0, 10)
            t0 = time.monotonic()
            bob = login(srv, "bob")
            bob.send(m.Stat(id=1, path=""))
            assert isinstance(bob.reply(1), m.StatReply)
            answered = time.monotonic() - t0
            # bob's own recursive listing needs a walk thread: alice's walks hold only her share
            (bob_home := home(srv, "bob") / "x" / "y").mkdir(parents=True)
            (bob_home / "f").write_bytes(b"f")
            t1 = time.monotonic()
            bob.send(m.ListDir(id=2, path="", recursive=True))
            names = [e.name for e in read_listing(bob, 2)]
            listed = time.monotonic() - t1
            bob.close()
            still_walking = walks.running_for("alice")
            assert answered < 2.0, f"bob's login and stat took {answered:.1f} s"
            assert listed < 2.0, f"bob's recursive listing took {listed:.1f} s"
            assert names == ["x", "x/y", "x/y/f"]
            assert still_walking == srv.config.limits.walk_threads_per_user  # the attack was on, capped
        finally:
            for raw in attackers:
                raw.close()
        # Closing the connections stops the work: no thread keeps walking for nobody (each listing
        # had seconds left).
        assert wait_until(lambda: no_sessions(srv) and pools_idle(srv), 5)


@pytest.mark.cell(transport="plain")
@pytest.mark.timeout(60)
def test_a_listing_stops_between_entries_when_its_connection_closes(
    server: ServerThread,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A walk in a thread looks at its session between entries: once the connection is gone it
    stops at the next entry instead of walking the rest of the tree for nobody."""
    sessions = SessionRecorder(monkeypatch)
    stat_calls = 0
    paused = threading.Event()
    resume = threading.Event()
    original = Entry.from_stat.__func__  # type: ignore[attr-defined]

    def from_stat(cls: type[Entry], name: str, st: Any) -> Entry:
        nonlocal stat_calls
        stat_calls += 1
        if stat_calls == 100:  # a hundred folders down: hold the walk here, in its thread
            paused.set()
            resume.wait(20)
        return original(cls, name, st)  # type: ignore[no-any-return]

    srv = server
    make_deep_tree(srv, 300)
    monkeypatch.setattr(Entry, "from_stat", classmethod(from_stat))
    raw = login(srv)
    try:
        raw.send(m.ListDir(id=1, path="", recursive=True))
        assert paused.wait(10)
    finally:
        raw.close()
    session = sessions.sessions[-1]
    assert wait_until(lambda: session.writer.is_closing(), 10)  # the session saw it
    resume.set()
    assert wait_until(lambda: no_sessions(srv), 20)
    assert stat_calls <= 101, f"the walk went on for {stat_calls - 100} entries after its session ended"
    assert pools_idle(srv)


@pytest.mark.cell(transport="plain")
@pytest.mark.timeout(120)
def test_walks_of_a_2000_level_tree_cost_time_linear_in_its_folders(server: ServerThread, tmp_path: Path) -> None:
    """A recursive listing used to reopen every folder from the home: 13-16 s for 1,500 levels.
    Listing, usage (df), a tree download and rm -r of the deepest tree one mkdir -p can make now
    walk it once, with a bounded number of descriptors."""
    depth = 2000  # a 3,999-byte path
    srv = server
    make_deep_tree(srv, depth)
    raw = login(srv)
    try:
        t0 = time.monotonic()
        raw.send(m.ListDir(id=1, path="", recursive=True))
        entries = read_listing(raw, 1, timeout=60)
        listed = time.monotonic() - t0
        assert [e.name for e in entries] == [deep_path(n) for n in range(1, depth + 1)]
        assert listed < 3.0, f"listing {depth} levels took {listed:.1f} s"
        raw.send(m.Df(id=2))
        assert isinstance(raw.reply(2), m.DfReply)
        raw.send(m.GetTree(id=3, path="d"))
        items: list[m.TreeItem] = []
        for _ in range(depth):
            batch = raw.reply(3)
            assert isinstance(batch, m.TreeItems), batch
            items += batch.items
            if batch.end:
                break
        assert [it.path for it in items] == [deep_path(n) for n in range(1, depth)]
        raw.send(m.Remove(id=4, path="d", recursive=True))
        assert isinstance(raw.reply(4, timeout=60), m.Ok)
        assert list(home(srv).iterdir()) == []
        elapsed = time.monotonic() - t0
        assert elapsed < 20.0, f"list, df, get-tree and rm -r of {depth} levels took {elapsed:.1f} s"
    finally:
        raw.close()


@pytest.mark.cell(transport="plain")
@pytest.mark.timeout(60)
def test_a_recursive_listing_comes_in_ls_r_order(server: ServerThread, tmp_path: Path) -> None:
    """A folder's entries (by name), then each subfolder's in name order; links, FIFOs and
    partial uploads as before (links and FIFOs listed, never followed; partials hidden)."""
    srv = server
    h = home(srv)
    (h / "a" / "b" / "c").mkdir(parents=True)
    (h / "a" / "f").write_bytes(b"12345")
    (h / "a" / "b" / ".x.ferry-part-tok").write_bytes(b"partial")
    (h / "z").mkdir()
    (h / "z" / "link").symlink_to("/etc")
    os.mkfifo(h / "z" / "pipe")
    raw = login(srv)
    try:
        raw.send(m.ListDir(id=1, path="", recursive=True))
        got = [(e.name, e.kind) for e in read_listing(raw, 1)]
        assert got == [
            ("a", "dir"),
            ("z", "dir"),
            ("a/b", "dir"),
            ("a/f", "file"),
            ("a/b/c", "dir"),
            ("z/link", "link"),
            ("z/pipe", "other"),
        ]
        raw.send(m.ListDir(id=2, path="a", recursive=True))
        assert [e.name for e in read_listing(raw, 2)] == ["b", "f", "b/c"]
        raw.send(m.ListDir(id=3, path="a/f", recursive=True))  # a file lists as itself
        assert [(e.name, e.size) for e in read_listing(raw, 3)] == [("f", 5)]
        raw.send(m.ListDir(id=4, path="z/link", recursive=True))  # a link too, never followed
        assert [(e.name, e.kind) for e in read_listing(raw, 4)] == [("link", "link")]
    finally:
        raw.close()


@pytest.mark.cell(transport="plain")
@pytest.mark.timeout(120)
def test_a_big_recursive_listing_is_streamed_in_bounded_memory(server: ServerThread, tmp_path: Path) -> None:
    """A listing used to be built whole before its first page (+61 MiB for 200,000 entries); now
    pages are cut from the walk as they are sent. 40,040 entries (hard links: cheap to make) cost
    the server (and this client, reading a page at a time) about 1 MiB at the peak, the whole list
    about 9.5 MiB. bench/listing_memory.py measures 200,000 entries and four listings at once."""
    folders, per_folder = 40, 1000
    srv = server
    h = home(srv)
    (h / "one").write_bytes(b"1")
    for k in range(folders):
        folder = h / f"folder-{k:03d}"
        folder.mkdir()
        for i in range(per_folder):
            os.link(h / "one", folder / f"a-file-with-a-longish-name-{i:05d}")
    raw = login(srv)
    try:
        tracemalloc.start()
        try:
            raw.send(m.ListDir(id=1, path="", recursive=True))
            count = pages = 0
            for _ in range(1000):
                page = raw.reply(1, timeout=60)
                assert isinstance(page, m.ListReply), page
                count += len(page.entries)
                pages += 1
                if not page.more:
                    break
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    finally:
        raw.close()
    assert count == 1 + folders * (per_folder + 1) and pages > 40
    assert peak < 3 << 20, f"the listing peaked at {peak / (1 << 20):.1f} MiB"


def tree_files(folder: Path, count: int, size: int) -> None:
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"f{i:03d}").write_bytes(bytes([i % 251]) * size)


@pytest.mark.timeout(60)
def test_expensive_operations_beyond_the_session_limit_wait_their_turn(tmp_path: Path) -> None:
    """With ``walks_per_session=1`` a tree upload's batch waits while the session's tree download
    holds the slot (here: stalled on a client that does not read), and runs as soon as it ends."""
    limits = Limits(walks_per_session=1)
    with running_server(tmp_path / "root", plain=True, limits=limits) as srv:
        tree_files(home(srv) / "big", 48, 1 << 18)  # 12 MiB in 256 KiB inline files: many batches
        raw = RawClient(srv.port, rcvbuf=1 << 16)
        raw.login()
        try:
            raw.send(m.GetTree(id=1, path="big"))
            raw.send(m.PutTree(id=2, path="up"))
            data = b"payload"
            item = m.TreeItem(
                path="x", kind="file", size=len(data), data=data, digest=small_digest("blake3", data)
            )
            raw.send(m.TreeItems(id=2, items=[item], end=True))
            assert wait_until(lambda: (home(srv) / "up").is_dir(), 10)  # the PutTree was read
            time.sleep(1.0)  # generous: the batch would be stored within milliseconds
            assert not (home(srv) / "up" / "x").exists(), "the batch ran beside the stalled download"
            ack = None
            for _ in range(10_000):
                ev = raw.next_event()
                assert ev is not CONNECTION_ENDED
                if isinstance(ev, m.TreeAck):
                    ack = ev
                    break
                assert isinstance(ev, m.TreeItems | Data), ev
            assert ack is not None and ack.files == 1 and ack.end
            assert (home(srv) / "up" / "x").read_bytes() == data
        finally:
            raw.close()


def test_a_fair_pool_serves_a_second_owner_before_the_first_owners_backlog() -> None:
    """The pool itself (no server): one owner's queue of jobs does not delay another owner's job
    beyond the jobs already running, and an owner never holds more than its share of threads."""

    async def main() -> list[str]:
        pool = FairPool("test", threads=2, per_user=1)
        gate = threading.Event()
        order: list[str] = []

        def job(name: str) -> str:
            order.append(name)
            gate.wait(10)
            return name

        try:
            a_jobs = [pool.submit("alice", job, f"a{i}").result for i in range(5)]
            await asyncio.sleep(0.05)
            assert pool.running == 1 and pool.running_for("alice") == 1  # her share: one thread
            b_job = pool.submit("bob", job, "b0").result
            await asyncio.sleep(0.05)
            assert pool.running == 2 and order == ["a0", "b0"]  # bob did not queue behind her backlog
            a_jobs[4].cancel()  # a job cancelled while waiting never runs
            gate.set()
            done = await asyncio.gather(*a_jobs[:4], b_job)
            assert done == ["a0", "a1", "a2", "a3", "b0"]
            return order
        finally:
            gate.set()
            pool.shutdown()

    order = asyncio.run(main())
    assert "a4" not in order


# --- depth limits ------------------------------------------------------------------------------


def make_chain(folder: Path, names: list[str]) -> str:
    """Folders ``names[0]/names[1]/...`` under ``folder``, made one at a time relative to their
    parent (a path longer than the OS takes in one call works too); returns the relative path."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            os.mkdir(name, dir_fd=fd)
            fd, parent = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
            os.close(parent)
    finally:
        os.close(fd)
    return "/".join(names)


def tree_acks(raw: RawClient, req_id: int) -> m.TreeAck:
    ack = raw.reply(req_id, timeout=60)
    assert isinstance(ack, m.TreeAck), ack
    return ack


def file_item(path: str, data: bytes = b"x") -> m.TreeItem:
    return m.TreeItem(path=path, kind="file", size=len(data), data=data, digest=small_digest("blake3", data))


@pytest.mark.cell(transport="plain")
@pytest.mark.timeout(60)
def test_a_tree_upload_record_2040_levels_deep_is_stored(server: ServerThread, tmp_path: Path) -> None:
    """The record of the report answered "internal server error (RecursionError)": folders were
    opened by a recursion per level. Now they are opened in a loop from the nearest one already
    open, and 2,040 levels are within the limit (2,048, the deepest one path can name)."""
    srv = server
    raw = login(srv)
    try:
        raw.send(m.PutTree(id=1, path="up"))
        raw.send(m.TreeItems(id=1, items=[file_item(deep_path(2040) + "/f", b"deep")], end=True))
        ack = tree_acks(raw, 1)
        assert (ack.files, ack.errors) == (1, []), ack
        with Jail(home(srv)) as jail:  # the absolute path is longer than the OS takes
            fd = jail.open_read("up/" + deep_path(2040) + "/f")
            try:
                assert os.read(fd, 100) == b"deep"
            finally:
                os.close(fd)
    finally:
        raw.close()


@pytest.mark.timeout(60)
def test_folders_deeper_than_the_limit_are_refused_with_too_deep(tmp_path: Path) -> None:
    """mkdir -p and tree uploads create no folder deeper than max_depth below the home: a clear
    ``too-deep`` error before anything is created; a tree upload goes on with its other records."""
    with running_server(tmp_path / "root", plain=True, limits=Limits(max_depth=100)) as srv:
        raw = login(srv)
        try:
            raw.send(m.Mkdir(id=1, path=deep_path(101), parents=True))
            err = raw.reply(1)
            assert isinstance(err, m.Error) and err.code == "too-deep", err
            assert "goes deeper than 100 folder levels below your home" in err.message
            assert not (home(srv) / "d").exists()
            raw.send(m.Mkdir(id=2, path=deep_path(100), parents=True))
            assert isinstance(raw.reply(2), m.Ok)
            raw.send(m.PutTree(id=3, path="up"))  # "up" is one level: records may add 99
            raw.send(m.TreeItems(id=3, items=[file_item(deep_path(100) + "/f"), file_item("ok.txt")], end=True))
            ack = tree_acks(raw, 3)
            assert ack.files == 1 and ack.end
            [error] = ack.errors
            assert error.code == "too-deep" and error.path.startswith("d/d/"), error
            assert (home(srv) / "up" / "ok.txt").read_bytes() == b"x"
            assert not (home(srv) / "up" / "d").exists()
        finally:
            raw.close()


@pytest.mark.timeout(60)
def test_walks_stop_at_the_depth_limit_with_a_clear_error_and_rm_r_has_none(tmp_path: Path) -> None:
    """A tree moved into another can be deeper than any mkdir makes: a listing then ends with
    ``too-deep`` where it would go deeper than max_depth below the folder listed, a tree download
    reports that folder as a ``too-deep`` record and goes on, a listing further down works, and the
    usage count and rm -r, which must reach everything, have no limit."""
    limit = 40
    with running_server(tmp_path / "root", plain=True, limits=Limits(max_depth=limit)) as srv:
        raw = login(srv)
        try:
            for i, path in enumerate((deep_path(limit), "e/" + deep_path(limit - 1))):
                raw.send(m.Mkdir(id=10 + i, path=path, parents=True))
                assert isinstance(raw.reply(10 + i), m.Ok)
            (home(srv) / "side.txt").write_bytes(b"side")
            raw.send(m.Rename(id=12, src="e", dst=deep_path(limit) + "/e"))  # now 80 levels deep
            assert isinstance(raw.reply(12), m.Ok)
            raw.send(m.ListDir(id=1, path="", recursive=True))
            reply = raw.reply(1)  # the walk meets the limit within its first page
            assert isinstance(reply, m.Error) and reply.code == "too-deep", reply
            assert f"goes deeper than {limit} folder levels below the folder listed" in reply.message
            raw.send(m.ListDir(id=2, path=deep_path(limit), recursive=True))  # further down: fine
            below = [e.name for e in read_listing(raw, 2)]
            assert below[-1] == "e/" + deep_path(limit - 1) and len(below) == limit
            raw.send(m.GetTree(id=3, path=""))
            items: list[m.TreeItem] = []
            for _ in range(100):
                batch = raw.reply(3)
                assert isinstance(batch, m.TreeItems), batch
                items += batch.items
                if batch.end:
                    break
            errors = [it for it in items if it.kind == "error"]
            assert [(e.code, e.path.count("/") + 1) for e in errors] == [("too-deep", limit)]
            assert any(it.path == "side.txt" for it in items)
            raw.send(m.Df(id=4))
            assert isinstance(raw.reply(4), m.DfReply)
            raw.send(m.Remove(id=5, path="d", recursive=True))
            assert isinstance(raw.reply(5), m.Ok)
            assert sorted(p.name for p in home(srv).iterdir()) == ["side.txt"]
        finally:
            raw.close()


@pytest.mark.cell(transport="plain")
@pytest.mark.timeout(60)
def test_a_name_too_long_for_the_wire_ends_the_listing_with_an_error_not_the_connection(server: ServerThread, tmp_path: Path) -> None:
    """Relative names in a deep listing can outgrow what a message may carry (4,096 characters):
    the listing then ends with ``bad-path`` instead of a page the client must refuse (which cost
    the whole connection)."""
    srv = server
    # 20 names of 250 characters: a 5,019-character relative path
    make_chain(home(srv), [f"{i:02d}" + "n" * 248 for i in range(20)])
    raw = login(srv)
    try:
        raw.send(m.ListDir(id=1, path="", recursive=True))
        reply = None
        for _ in range(100):
            reply = raw.reply(1)
            if not isinstance(reply, m.ListReply):
                break
        assert isinstance(reply, m.Error) and reply.code == "bad-path", reply
        assert "too long to send" in reply.message
        raw.send(m.Stat(id=2, path=""))  # the connection is still fine
        assert isinstance(raw.reply(2), m.StatReply)
    finally:
        raw.close()


@pytest.mark.timeout(60)
def test_a_deep_tree_does_not_stop_the_sweep_of_stale_partials(tmp_path: Path) -> None:
    """The sweeper used os.fwalk, which recurses: one home with a ~1,000-level tree raised
    RecursionError and ended the sweep, for that home and every home after it."""
    limits = Limits(partial_max_age=86400.0, sweep_interval=3600)
    with running_server(tmp_path / "root", limits=limits, users=("alice", "bob")) as srv:
        old = time.time() - 2 * 86400
        deepest = make_chain(home(srv), ["d"] * 1200)
        stale = [home(srv) / deepest / ".a.bin.ferry-part-t1", home(srv, "bob") / ".b.bin.ferry-part-t2"]
        for path in stale:
            path.write_bytes(b"left behind")
            os.utime(path, (old, old))
        assert srv.loop is not None and srv.server.ctx is not None
        swept = asyncio.run_coroutine_threadsafe(sweep_once(srv.server.ctx), srv.loop).result(30)
        assert not any(p.exists() for p in stale), swept
