"""``sync`` over real loopback sockets, both directions: quick check, checksum, delta, compression,
deletions, dry runs, filters, attributes, skipped entries, and what crosses the wire."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from conformance import BY_TRANSPORT, OBJECT, Cell
from ferry.client.sync import SyncItem, SyncResult
from ferry_server import ServerThread
from transfer_support import MiB, connect, home, no_logged_errors, running_server  # noqa: F401

pytestmark = pytest.mark.usefixtures("no_logged_errors")
#: TLS and plain TCP on either backend.
TRANSPORTS_AND_BACKENDS = [*BY_TRANSPORT, OBJECT, Cell("plain", backend="object")]


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def snapshot(root: Path) -> dict[str, tuple[str, bytes | str, int, int]]:
    """Every entry under ``root``: kind, content (files) or link target, permission bits, mtime (ns)."""
    out: dict[str, tuple[str, bytes | str, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p), 0, 0)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", b"", stat.S_IMODE(st.st_mode), 0)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", p.read_bytes(), stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            else:
                out[rel] = ("other", b"", 0, 0)
    return out


def content(root: Path) -> dict[str, Any]:
    """Like :func:`snapshot` without links and special files (they are skipped by a sync)."""
    return {k: v for k, v in snapshot(root).items() if v[0] in ("file", "dir")}


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal trees: names, kinds, bytes and modes exactly, file mtimes within 2 us (they travel as
    float seconds: preserved to about a microsecond)."""
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    for k in a:
        assert a[k][:3] == b[k][:3], k
        assert abs(a[k][3] - b[k][3]) <= 2000, (k, a[k][3], b[k][3])
    return True


def make_source(root: Path) -> None:
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "empty").mkdir()
    for i in range(30):
        (root / "sub" / f"s{i}.txt").write_bytes(b"small %d\n" % i * (i + 1))
    (root / "sub" / "deep" / "zero").write_bytes(b"")
    (root / "big.bin").write_bytes(rand(3 * MiB, 1))
    (root / "mid.bin").write_bytes(rand(300_000, 2))
    os.chmod(root / "sub" / "s3.txt", 0o600)
    os.chmod(root / "sub" / "deep", 0o750)
    os.utime(root / "mid.bin", (1_600_000_000.5, 1_600_000_000.5))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _sync(srv: Any, tmp_path: Path, src: str, dest: str, **kw: Any) -> tuple[SyncResult, list[SyncItem]]:
    items: list[SyncItem] = []
    c = await connect(srv, tmp_path)
    try:
        r = await c.sync(src, dest, on_item=items.append, **kw)
    finally:
        await c.close()
    return r, items


def changes(items: list[SyncItem]) -> dict[str, str]:
    return {i.path: i.action for i in items if i.action != "skip"}


def file_changes(items: list[SyncItem]) -> dict[str, str]:
    """:func:`changes` of files only."""
    return {i.path: i.action for i in items if i.action != "skip" and i.kind == "file"}


def remote_content(srv: Any, tmp_path: Path, remote: str) -> dict[str, Any]:
    """:func:`content` of the server's ``remote`` on either backend: pulled by a sync into a fresh
    folder (files keep their bytes, modes and mtimes, folders their modes)."""
    dest = tmp_path / f"pulled-{time.monotonic_ns()}"
    r, _ = run(_sync(srv, tmp_path, f":{remote}/" if remote else ":", f"{dest}"))
    assert r.failed == 0, r
    return content(dest)


async def _client_call(srv: Any, tmp_path: Path, fn: Any) -> Any:
    c = await connect(srv, tmp_path)
    try:
        return await fn(c)
    finally:
        await c.close()


def on_client(srv: Any, tmp_path: Path, fn: Any) -> Any:
    """``await fn(client)`` with a client of its own (how a test changes the server's side)."""
    return run(_client_call(srv, tmp_path, fn))


def put_local(srv: Any, tmp_path: Path, remote: str, files: dict[str, bytes | tuple[bytes, float]]) -> None:
    """Write ``files`` (relative path -> bytes, or (bytes, mtime)) into the server's ``remote`` with a
    tree upload (existing files are replaced, others stay)."""
    src = tmp_path / f"put-{time.monotonic_ns()}"
    for rel, spec in files.items():
        data, mtime = spec if isinstance(spec, tuple) else (spec, None)
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
        if mtime is not None:
            os.utime(src / rel, (mtime, mtime))
    src.mkdir(exist_ok=True)
    on_client(srv, tmp_path, lambda c: c.put_tree(src, remote))


@pytest.mark.parametrize("cell", TRANSPORTS_AND_BACKENDS, ids=[c.id for c in TRANSPORTS_AND_BACKENDS])
def test_push_then_noop_then_changes(server: ServerThread, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_source(src)
    srv = server
    r, items = run(_sync(srv, tmp_path, f"{src}/", ":backup"))
    assert r.failed == 0 and r.sent_files == r.files == 33 and r.sent_bytes == r.bytes
    assert r.wire_bytes > r.bytes
    assert same(remote_content(srv, tmp_path, "backup"), content(src))
    # a re-run is a no-op: nothing sent, and only the listing on the wire
    r, items = run(_sync(srv, tmp_path, f"{src}/", ":backup"))
    assert changes(items) == {} and r.sent_files == 0 and r.wire_bytes < 64 * 1024
    # change a small file, 100 KiB in the middle of the big one, and a mode
    (src / "sub" / "s1.txt").write_bytes(b"changed\n")
    data = bytearray((src / "big.bin").read_bytes())
    data[MiB : MiB + 100_000] = rand(100_000, 3)
    (src / "big.bin").write_bytes(bytes(data))
    os.chmod(src / "sub" / "s2.txt", 0o640)
    r, items = run(_sync(srv, tmp_path, f"{src}/", ":backup"))
    assert changes(items) == {"sub/s1.txt": "update", "big.bin": "update", "sub/s2.txt": "attrs"}
    big = next(i for i in items if i.path == "big.bin")
    assert 100_000 <= big.sent <= 100_000 + 2 * 256 * 1024  # only the changed chunks
    assert r.wire_bytes < 1 * MiB  # and the chunk index of 3 MiB: ~1.5 KiB
    assert same(remote_content(srv, tmp_path, "backup"), content(src))


@pytest.mark.backends
def test_after_deletions_folder_times_match_and_the_next_sync_is_a_no_op(server: ServerThread, tmp_path: Path) -> None:
    """Deletions run before the attributes: a folder whose entries were deleted gets the source's
    mtime (set after the deletion moved it), so the next sync finds nothing to do; both ways."""
    src = tmp_path / "src"
    make_source(src)

    def dir_times(root: Path) -> dict[str, int]:
        return {d: (root / d).stat().st_mtime_ns for d in ("sub", "sub/deep")}

    def remote_times(remote: str) -> dict[str, int]:
        async def stat_all(c: Any) -> dict[str, int]:
            return {d: round((await c.stat(f"{remote}/{d}")).mtime * 1e9) for d in ("sub", "sub/deep")}

        return on_client(srv, tmp_path, stat_all)

    def close(a: dict[str, int], b: dict[str, int]) -> bool:
        return all(abs(a[k] - b[k]) <= 2000 for k in a)

    srv = server
    run(_sync(srv, tmp_path, f"{src}/", ":t"))
    (src / "sub" / "s1.txt").unlink()
    (src / "sub" / "deep" / "zero").unlink()
    r, items = run(_sync(srv, tmp_path, f"{src}/", ":t", delete=True))
    assert r.deleted == 2 and close(remote_times("t"), dir_times(src))
    r, items = run(_sync(srv, tmp_path, f"{src}/", ":t", delete=True))
    assert changes(items) == {} and r.deleted == 0
    # a pull: the local folders
    back = tmp_path / "back"
    run(_sync(srv, tmp_path, ":t/", f"{back}"))
    put_local(srv, tmp_path, "t/sub/deep", {"gone": b""})

    async def remove(c: Any) -> None:
        await c.remove("t/sub/s2.txt")
        await c.remove("t/sub/deep/gone")

    on_client(srv, tmp_path, remove)
    (back / "sub" / "deep" / "extra").write_bytes(b"x")  # only in the destination: deleted
    r, items = run(_sync(srv, tmp_path, ":t/", f"{back}", delete=True))
    assert r.deleted == 2 and close(dir_times(back), remote_times("t"))
    r, items = run(_sync(srv, tmp_path, ":t/", f"{back}", delete=True))
    assert changes(items) == {}


@pytest.mark.backends
def test_pull_delta_and_insertion(server: ServerThread, tmp_path: Path) -> None:
    """A tree pushed, pulled, then bytes inserted into its big file at the source and pushed again:
    the next pull gets only the chunks around the insertion (deltas both ways)."""
    srv = server
    src = tmp_path / "src" / "data"
    make_source(src)
    run(_sync(srv, tmp_path, f"{src}/", ":data"))
    dst = tmp_path / "dst"
    r, _ = run(_sync(srv, tmp_path, ":data", f"{dst}"))  # no trailing slash: dst/data
    assert same(content(dst / "data"), content(src))
    r, items = run(_sync(srv, tmp_path, ":data", f"{dst}"))
    assert changes(items) == {}
    blob = (src / "big.bin").read_bytes()
    (src / "big.bin").write_bytes(blob[:MiB] + b"inserted bytes" + blob[MiB:])
    r, items = run(_sync(srv, tmp_path, f"{src}/", ":data"))
    big = next(i for i in items if i.path == "big.bin")
    assert big.sent <= 2 * 256 * 1024 and r.wire_bytes < 600 * 1024
    r, items = run(_sync(srv, tmp_path, ":data", f"{dst}"))
    assert changes(items) == {"big.bin": "update"}
    assert same(content(dst / "data"), content(src))
    big = next(i for i in items if i.path == "big.bin")
    assert big.sent <= 2 * 256 * 1024 and r.wire_bytes < 600 * 1024
    assert not list((dst / "data").glob(".*ferry-part*"))


@pytest.mark.backends
def test_delete_dry_run_and_filters(server: ServerThread, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_source(src)
    (src / "skip.log").write_text("log")
    srv = server
    run(_sync(srv, tmp_path, f"{src}/", ":m", exclude=["*.log"]))
    assert "skip.log" not in remote_content(srv, tmp_path, "m")
    put_local(
        srv,
        tmp_path,
        "m",
        {"extra/x": b"x", "old.txt": b"old", "kept.log": b"excluded on the receiver: protected"},
    )
    for n in range(5):
        (src / "sub" / f"s{n}.txt").unlink()
    (src / "new.txt").write_text("new")
    before_src, before_dst = snapshot(src), remote_content(srv, tmp_path, "m")
    log = srv.root / "logs" / "ferry.log"
    log_size = log.stat().st_size
    r, items = run(_sync(srv, tmp_path, f"{src}/", ":m", exclude=["*.log"], delete=True, dry_run=True))
    assert r.dry_run and changes(items) == {
        "new.txt": "new",
        "extra/x": "delete",
        "extra": "delete",
        "old.txt": "delete",
        "sub": "attrs",  # its mtime moved when files were deleted from it
        **{f"sub/s{n}.txt": "delete" for n in range(5)},
    }
    ops = [line.split("op=")[1].split()[0] for line in log.read_text()[log_size:].splitlines() if " op=" in line]
    assert ops == ["scan"]  # the server only listed
    assert snapshot(src) == before_src  # byte for byte, modes, mtimes
    assert remote_content(srv, tmp_path, "m") == before_dst
    r, items = run(_sync(srv, tmp_path, f"{src}/", ":m", exclude=["*.log"], delete=True))
    assert r.deleted == 8 and r.failed == 0
    after = remote_content(srv, tmp_path, "m")
    assert "kept.log" in after
    assert same(
        {k: v for k, v in after.items() if k != "kept.log"},
        {k: v for k, v in content(src).items() if not k.endswith(".log")},
    )


@pytest.mark.backends
def test_missing_source_deletes_nothing(server: ServerThread, tmp_path: Path) -> None:
    srv = server
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "precious").write_text("keep me")
    with pytest.raises(Exception, match="no such file or folder"):
        run(_sync(srv, tmp_path, ":nothing-here/", f"{dst}", delete=True))
    with pytest.raises(Exception, match="no such file or folder"):
        run(_sync(srv, tmp_path, f"{tmp_path / 'nothing'}/", ":x", delete=True))
    assert (dst / "precious").read_text() == "keep me"


@pytest.mark.backends
def test_unreadable_source_folder_suppresses_deletion(server: ServerThread, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root reads everything: make the folder unreadable another way (a name that is not UTF-8)
        pass
    src = tmp_path / "src"
    make_source(src)
    srv = server
    run(_sync(srv, tmp_path, f"{src}/", ":t"))
    bad = os.fsencode(src / "sub") + b"/\xff\xfe-not-utf8"
    with open(bad, "wb") as f:
        f.write(b"x")
    (src / "big.bin").unlink()
    r, items = run(_sync(srv, tmp_path, f"{src}/", ":t", delete=True))
    assert any(i.action == "skip" and i.kind == "error" for i in items)
    assert "big.bin" in remote_content(srv, tmp_path, "t")  # not deleted: the source had read errors
    assert r.deleted == 0


def test_links_and_fifos_are_reported_as_skipped(server: ServerThread, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_source(src)
    os.symlink("big.bin", src / "link")
    os.mkfifo(src / "fifo")
    srv = server
    r, items = run(_sync(srv, tmp_path, f"{src}/", ":t"))
    skipped = {i.path: i.reason for i in items if i.action == "skip"}
    assert set(skipped) == {"link", "fifo"} and r.skipped == 2
    assert "symbolic link" in skipped["link"] and "FIFO" in skipped["fifo"]
    assert not (home(srv) / "t" / "link").exists()
    # and the other way: a link on the server is reported, not followed
    os.symlink("big.bin", home(srv) / "t" / "slink")
    r, items = run(_sync(srv, tmp_path, ":t/", f"{tmp_path / 'back'}"))
    assert {i.path for i in items if i.action == "skip"} == {"slink"}


@pytest.mark.backends
def test_checksum_finds_same_size_same_mtime_change(server: ServerThread, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_source(src)
    (src / "mid2.bin").write_bytes(rand(100_000, 5))  # several content chunks (larger than one)
    srv = server
    run(_sync(srv, tmp_path, f"{src}/", ":c"))
    # on the server: same size, same mtime, other bytes
    st, st2 = (src / "sub" / "s5.txt").stat(), (src / "mid2.bin").stat()
    put_local(
        srv,
        tmp_path,
        "c",
        {"sub/s5.txt": (b"X" * st.st_size, st.st_mtime), "mid2.bin": (rand(100_000, 6), st2.st_mtime)},
    )
    _, items = run(_sync(srv, tmp_path, f"{src}/", ":c"))
    # the quick check cannot see it (the upload moved the folder's time: only that is set)
    assert file_changes(items) == {}
    _r, items = run(_sync(srv, tmp_path, f"{src}/", ":c", checksum=True))
    assert file_changes(items) == {"sub/s5.txt": "update", "mid2.bin": "update"}
    assert same(remote_content(srv, tmp_path, "c"), content(src))
    _r, items = run(_sync(srv, tmp_path, f"{src}/", ":c", checksum=True))
    assert changes(items) == {}


@pytest.mark.backends
def test_compressed_transfers_shrink_text(server: ServerThread, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    text = b"".join(b"2026-12-02T13:%02d:%02d host app[%d]: request ok in %d ms\n" % (i % 60, i % 59, i % 97, i % 1000) for i in range(40000))
    (src / "app.log").write_bytes(text)
    srv = server
    r, _ = run(_sync(srv, tmp_path, f"{src}/", ":logs", compress=True))
    assert r.wire_bytes < len(text) / 4  # (the copy it made: checked by the pull back below)
    r, _items = run(_sync(srv, tmp_path, ":logs/", f"{tmp_path / 'back'}", compress=True))
    assert (tmp_path / "back" / "app.log").read_bytes() == text
    assert r.wire_bytes < len(text) / 4


@pytest.mark.backends
def test_progress_counts_the_whole_job(server: ServerThread, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_source(src)
    srv = server
    calls: list[tuple[int, int]] = []
    r, _ = run(_sync(srv, tmp_path, f"{src}/", ":p", progress=lambda d, t: calls.append((d, t))))
    total = r.sent_bytes
    assert total == sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    assert calls and {t for _, t in calls} == {total}  # the job's total from the first call on
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == total
    # the blocking client has it too
    from ferry.client.blocking import connect as bconnect
    from ferry.client.known_hosts import KnownHosts
    from transfer_support import PASSWORD

    (src / "sub" / "s1.txt").write_text("changed")
    with bconnect(
        f"alice@127.0.0.1:{srv.port}", password=PASSWORD, known_hosts=KnownHosts(tmp_path / "kh")
    ) as c:
        res = c.sync(f"{src}/", ":p")
    assert res.sent_files == 1 and isinstance(res, SyncResult)


def test_server_batches_stay_inside(tmp_path: Path) -> None:
    """Hostile or broken batches to the server: names that leave the folder move nothing."""
    from ferry.wire import messages as m

    with running_server(tmp_path / "srv") as srv:
        h = home(srv)
        (h / "d").mkdir()
        (h / "outside.txt").write_text("keep")

        async def main() -> None:
            c = await connect(srv, tmp_path)
            try:
                reply = await c.mux.call(
                    lambda i: m.RemoveMany(id=i, path="d", names=["../outside.txt", "/etc/passwd", "", "f/../../x"]),
                    m.BatchReply,
                )
                assert reply.done == 0 and len(reply.errors) == 4
                assert (h / "outside.txt").read_text() == "keep"
            finally:
                await c.close()

        run(main())


async def _read_back(c: Any, remote: str, tmp_path: Path) -> bytes:
    """The content of ``remote`` through the client (a delta download without basis: what every
    backend serves), read into a fresh local file."""
    from ferry.client.delta import delta_get

    dest = tmp_path / f"back-{time.monotonic_ns()}"
    await delta_get(c.mux, remote, dest, use_basis=False)
    data = dest.read_bytes()
    dest.unlink()
    return data


@pytest.mark.backends
def test_deltas_are_verified(server: ServerThread, cell: Any, tmp_path: Path) -> None:
    """Broken delta uploads: a basis that is not the server's, a digest that does not match, a copy
    of chunks the basis lacks. Nothing corrupt lands, the file keeps its old content, and no
    partial upload is left behind (checked through the client: ls lists partials on neither
    backend, so the folder's own listing is checked on disk too)."""
    from ferry import cdc
    from ferry.client.delta import delta_put
    from ferry.delta import basis_id
    from ferry.wire import messages as m

    old = rand(3 * MiB, 40)
    (tmp_path / "f").write_bytes(old)

    async def main() -> None:
        c = await connect(server, tmp_path)
        try:
            await c.mkdir("d")
            await delta_put(c.mux, tmp_path / "f", "d/f")
            # a basis the server does not have: refused before anything is written
            req_id, route = c.mux.open(4)
            await c.send(m.DeltaPut(id=req_id, path="d/f", size=10, mtime=1.0, basis=b"x" * 32, token="t1"))
            ev = await c.mux.recv(route)
            assert isinstance(ev, m.Error) and ev.code == "changed"
            c.mux.close_route(req_id)
            # the right basis, a wrong digest: nothing committed
            hashes = cdc.index_bytes(old).hashes
            for ops, data, code in (([1, 100, 0], b"y" * 100, "integrity"), ([0, len(hashes) // 32, 1], b"", "integrity")):
                req_id, route = c.mux.open(4)
                await c.send(m.DeltaPut(id=req_id, path="d/f", size=100, mtime=1.0, basis=basis_id(hashes), token="t2"))
                await c.send(m.DeltaData(id=req_id, ops=ops, data=data, end=True, digest=b"z" * 32))
                ev = await c.mux.recv(route)
                assert isinstance(ev, m.Error) and ev.code == code, ev
                c.mux.close_route(req_id)
            assert [e.name for e in await c.listdir("d")] == ["f"]
            assert (await c.stat("d/f")).size == len(old)
            assert await _read_back(c, "d/f", tmp_path) == old
            usage = await c.df()
            assert usage.partial == 0  # no upload left holding space
        finally:
            await c.close()

    run(main())
    if not cell.objects:
        assert sorted(p.name for p in (home(server) / "d").iterdir()) == ["f"]  # no partial left


@pytest.mark.backends
def test_delta_transfers_move_only_the_changes_both_ways(server: ServerThread, cell: Any, tmp_path: Path) -> None:
    """A file several stored pieces long (the object backend stores 4 MiB pieces, delta uses ~64 KiB
    content-defined chunks): uploaded whole, then with bytes inserted (only the chunks around the
    insertion travel), downloaded against the old version (the same), and compressed; the server's
    copy is the new one byte for byte each time."""
    from ferry.client.delta import delta_get, delta_put

    old = rand(9 * MiB + 12345, 90)
    new = old[: 5 * MiB] + b"inserted bytes" + old[5 * MiB :]
    near = 2 * 256 * 1024 + 14  # the changed chunk and a neighbour at most

    async def main() -> None:
        c = await connect(server, tmp_path)
        try:
            local = tmp_path / "big"
            local.write_bytes(old)
            moved = await delta_put(c.mux, local, "big")  # nothing there yet: all of it
            assert moved.literal == len(old)
            local.write_bytes(new)
            os.utime(local, (1_700_000_000, 1_700_000_000))
            moved = await delta_put(c.mux, local, "big")
            assert 0 < moved.literal <= near, moved
            entry = await c.stat("big")
            assert entry.size == len(new) and entry.mtime == 1_700_000_000
            assert await _read_back(c, "big", tmp_path) == new
            # a download against the old version
            pulled = tmp_path / "pulled"
            pulled.write_bytes(old)
            moved = await delta_get(c.mux, "big", pulled)
            assert pulled.read_bytes() == new and 0 < moved.literal <= near, moved
            # unchanged: nothing but the index travels, both ways
            assert (await delta_put(c.mux, local, "big")).literal == 0
            assert (await delta_get(c.mux, "big", pulled)).literal == 0
            # changed in place (nothing shifts): the stored pieces around the change are reused
            edited = new[: 6 * MiB] + rand(100, 91) + new[6 * MiB + 100 :]
            local.write_bytes(edited)
            moved = await delta_put(c.mux, local, "big")
            assert 0 < moved.literal <= near, moved
            assert await _read_back(c, "big", tmp_path) == edited
            # compressed, no basis
            text = b"".join(b"line %d of a repetitive log\n" % (i % 100) for i in range(100_000))
            (tmp_path / "t.log").write_bytes(text)
            moved = await delta_put(c.mux, tmp_path / "t.log", "t.log", use_basis=False, compress=True)
            assert moved.wire < len(text) // 10
            moved = await delta_get(c.mux, "t.log", tmp_path / "t2.log", use_basis=False, compress=True)
            assert moved.wire < len(text) // 10 and (tmp_path / "t2.log").read_bytes() == text
        finally:
            await c.close()

    run(main())
    if cell.objects:
        # Pieces of the new version equal to stored pieces of the old one at the same place were
        # linked, not read and stored again: the first 4 MiB after the insertion at 5 MiB, all three
        # when nothing changed, the first and the last around the edit at 6 MiB.
        log = (server.root / "logs" / "ferry.log").read_text()
        reused = [line.rpartition("reused=")[2].split()[0] for line in log.splitlines() if "op=delta-put" in line]
        assert reused == ["0", "1", "3", "2", "0"], reused


@pytest.mark.backends
def test_a_delta_upload_answers_to_the_quota(server: ServerThread, tmp_path: Path) -> None:
    """A delta upload that would take the user past the quota is refused, counting the old
    version it replaces; the old content stays and nothing is left set aside."""
    from ferry.client.delta import delta_put
    from ferry.errors import DiskFull

    server.add_user("quinn", quota=5 * MiB)
    old = rand(3 * MiB, 60)
    local = tmp_path / "f"
    local.write_bytes(old)

    async def main() -> None:
        c = await connect(server, tmp_path, user="quinn")
        try:
            await delta_put(c.mux, local, "f")
            local.write_bytes(old + rand(2 * MiB + 1, 61))  # 5 MiB + 1: one byte too many
            with pytest.raises(DiskFull, match="quota"):
                await delta_put(c.mux, local, "f")
            local.write_bytes(old + rand(2 * MiB, 61))  # exactly the quota, replacing 3 MiB: fine
            moved = await delta_put(c.mux, local, "f")
            assert moved.literal <= 2 * MiB + 2 * 256 * 1024
            assert await _read_back(c, "f", tmp_path) == local.read_bytes()
            usage = await c.df()
            assert usage.partial == 0 and usage.used == 5 * MiB
        finally:
            await c.close()

    run(main())


@pytest.mark.cell(backend="object")
def test_a_server_without_delta_transfers_gets_files_whole(
    server: ServerThread, tmp_path: Path, ferry_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that answers the delta requests with ``invalid`` (a backend without them, as the
    object backend was before its delta service, or an older server): ``put -z`` and ``get -z``
    transfer the file whole instead of failing, and the server's copy is right."""
    import ferry.server.session as session
    from cli_inproc import run_cli
    from ferry.server.objectsvc.delta import ObjectDeltaService
    from transfer_support import PASSWORD

    monkeypatch.setattr(session, "OBJECT_SERVICES", tuple(s for s in session.OBJECT_SERVICES if s is not ObjectDeltaService))
    data = rand(300_000, 7)
    (tmp_path / "f").write_bytes(data)
    url = f"ferry://alice@127.0.0.1:{server.port}"
    env = {**ferry_env, "FERRY_PASSWORD": PASSWORD}
    r = run_cli(["put", "-z", str(tmp_path / "f"), f"{url}/f"], env=env)
    assert r.code == 0, r
    r = run_cli(["get", "-z", f"{url}/f", str(tmp_path / "back")], env=env)
    assert r.code == 0, r
    assert (tmp_path / "back").read_bytes() == data
    log = (server.root / "logs" / "ferry.log").read_text()
    assert "op=put path=f" in log and "op=get path=f" in log and "op=delta" not in log


@pytest.mark.backends
def test_sync_into_the_home_itself(server: ServerThread, tmp_path: Path) -> None:
    """The home as the destination root: files land, and no error about the home's own attributes."""
    src = tmp_path / "src"
    make_source(src)
    srv = server
    r, items = run(_sync(srv, tmp_path, f"{src}/", ":"))
    assert r.failed == 0 and not r.notes, r.notes
    (src / "sub" / "s0.txt").write_text("again")
    r, items = run(_sync(srv, tmp_path, f"{src}/", ":"))
    assert changes(items) == {"sub/s0.txt": "update"} and not r.notes, r.notes
    assert same(remote_content(srv, tmp_path, ""), content(src))


@pytest.mark.backends
def test_compressed_small_files_travel_packed(server: ServerThread, tmp_path: Path) -> None:
    """-z packs the batches of small files too (both ways), and leaves random data as it is."""
    src = tmp_path / "src"
    (src / "code").mkdir(parents=True)
    for i in range(300):
        (src / "code" / f"m{i}.py").write_text("".join(f"def f{j}(x):\n    return x * {j} + {i}\n" for j in range(100)))
    total = sum(p.stat().st_size for p in (src / "code").iterdir())
    srv = server
    r, _ = run(_sync(srv, tmp_path, f"{src}/", ":z", compress=True))
    assert r.sent_files == 300 and r.wire_bytes < total / 3, (r.wire_bytes, total)
    r, _ = run(_sync(srv, tmp_path, ":z/", f"{tmp_path / 'back'}", compress=True))
    assert r.sent_files == 300 and r.wire_bytes < total / 3, (r.wire_bytes, total)
    assert same(content(tmp_path / "back"), content(src))
    (src / "rand").mkdir()
    for i in range(20):
        (src / "rand" / f"r{i}").write_bytes(rand(50_000, 100 + i))
    r, _ = run(_sync(srv, tmp_path, f"{src}/", ":z", compress=True))
    assert r.sent_files == 20 and r.wire_bytes >= 20 * 50_000  # nothing to gain: sent as it is
    assert same(remote_content(srv, tmp_path, "z"), content(src))


@pytest.mark.parametrize("name", ["../escape", "/etc/evil", "a/../../b", "a//b", "./a"])
def test_a_listing_with_unsafe_names_changes_nothing(tmp_path: Path, name: str) -> None:
    """A hostile server lists names that would leave the destination: the pull stops before it
    changes anything (no file written, nothing deleted)."""
    from ferry.errors import TransferError
    from ferry.wire import Connection
    from ferry.wire import messages as m
    from test_tree_transfer import FakeServer

    class Hostile(FakeServer):
        async def answer(self, conn: Connection, writer: Any, ev: m.Message) -> None:
            if isinstance(ev, m.Stat):
                writer.write(conn.send(m.StatReply(id=ev.id, entry=m.Entry(name="x", kind="dir"))))
            elif isinstance(ev, m.ScanTree):
                entries = [m.SyncEntry(path="", kind="dir"), m.SyncEntry(path=name, kind="file", size=3)]
                writer.write(conn.send(m.ScanItems(id=ev.id, entries=entries, end=True)))

    fake = Hostile([])
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep").write_text("keep")

    async def main() -> None:
        async with fake.running(), await fake.client(tmp_path) as c:
            assert c.info is not None
            c.info = dataclasses.replace(c.info, features=("tree", "sync"))
            with pytest.raises(TransferError, match="unsafe name"):
                await c.sync(":x/", dest, delete=True)

    run(main())
    assert [p.name for p in dest.iterdir()] == ["keep"] and (dest / "keep").read_text() == "keep"
    assert not (tmp_path / "escape").exists()


def test_a_large_upload_is_indexed_for_the_next_delta(server: ServerThread, tmp_path: Path) -> None:
    """After a sync uploads a new large file, the server indexes it at once (GetChunks prefetch):
    the next delta of that file finds the index in the cache instead of reading the file first."""
    from ferry import cdc

    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(rand(20 * MiB, 80))
    srv = server
    run(_sync(srv, tmp_path, f"{src}/", ":p"))
    st = (home(srv) / "p" / "big").stat()
    key = (*cdc.stat_key(st), cdc.SCHEME)
    assert srv.server.ctx is not None
    cache = srv.server.ctx.hash_cache
    deadline = time.monotonic() + 20
    while cache.get_index(key) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    index = cache.get_index(key)
    assert index is not None and index.digest == cdc.index_bytes((src / "big").read_bytes()).digest
    log = (srv.root / "logs" / "ferry.log").read_text()
    assert "op=chunks path=p/big" in log and "ok prefetch" in log


@pytest.mark.backends
def test_a_file_time_beyond_the_wire_range_does_not_fail_the_listing(server: ServerThread, cell: Cell, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_source(src)
    os.utime(src / "sub" / "s1.txt", (1e12, 1e12))  # year ~33,658: outside what the wire carries
    srv = server
    if cell.objects:  # (its times come from the wire, which clamps them: no such file there)
        put_local(srv, tmp_path, "far", {"f": (b"far", 1e12)})
    else:
        os.makedirs(home(srv) / "far")
        (home(srv) / "far" / "f").write_text("far")
        os.utime(home(srv) / "far" / "f", (1e12, 1e12))
    r, _ = run(_sync(srv, tmp_path, f"{src}/", ":t"))
    assert r.failed == 0 and "sub/s1.txt" in remote_content(srv, tmp_path, "t")
    r, _ = run(_sync(srv, tmp_path, ":far/", f"{tmp_path / 'back'}"))
    assert r.failed == 0 and (tmp_path / "back" / "f").read_text() == "far"


@pytest.mark.backends
def test_a_local_listing_made_ahead_is_used_once(server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command line lists the local side before it connects (``local_listing_for``): the sync
    uses that listing instead of listing again, and lists again when it was made for another root
    or other options."""
    from ferry.client import synclocal
    from ferry.client.sync import local_listing_for

    src = tmp_path / "src"
    make_source(src)
    scans: list[Path] = []
    real_scan = synclocal.scan_local

    def counted(root: Path, filt: Any, checksum: bool) -> Any:
        scans.append(root)
        return real_scan(root, filt, checksum)

    monkeypatch.setattr(synclocal, "scan_local", counted)
    srv = server
    ahead = local_listing_for(f"{src}/", ":t")
    r, _ = run(_sync(srv, tmp_path, f"{src}/", ":t", local_listing=ahead))
    assert scans == [src] and r.sent_files == r.files > 0
    # made for a pull into "back/" (a folder "t" there): fits the pull of "t" into "back"
    ahead = local_listing_for(":t", tmp_path / "back")
    r, _ = run(_sync(srv, tmp_path, ":t", f"{tmp_path / 'back'}", local_listing=ahead))
    assert scans == [src, tmp_path / "back" / "t"] and r.sent_files == r.files
    assert same(content(tmp_path / "back" / "t"), content(src))
    # other options (checksum) or another root: listed again
    ahead = local_listing_for(f"{src}/", ":t")
    r, _ = run(_sync(srv, tmp_path, f"{src}/", ":t", checksum=True, local_listing=ahead))
    assert scans[3:] == [src] and r.sent_files == 0
    ahead = local_listing_for(f"{tmp_path}/", ":t")
    run(_sync(srv, tmp_path, f"{src}/", ":t", local_listing=ahead))
    assert scans[4:] == [tmp_path, src]


@pytest.mark.backends
def test_a_local_listing_that_fails_late_stops_the_sync_before_any_deletion(
    server: ServerThread,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local listing runs beside the connection and the remote listing: when it fails after
    the remote listing has arrived, the sync still stops before it plans, so ``--delete`` removes
    nothing; an entry it could not read still holds back every deletion."""
    import threading

    from ferry.client import sync as sync_mod
    from ferry.client import synclocal
    from ferry.client.sync import local_listing_for

    src = tmp_path / "src"
    make_source(src)
    srv = server
    run(_sync(srv, tmp_path, f"{src}/", ":t"))
    before = remote_content(srv, tmp_path, "t")
    (src / "big.bin").unlink()
    (src / "sub" / "s1.txt").unlink()
    remote_listed = threading.Event()
    real_remote = sync_mod.scan_remote

    async def signalling_remote(*a: Any, **kw: Any) -> Any:
        try:
            return await real_remote(*a, **kw)
        finally:
            remote_listed.set()

    def failing_scan(root: Path, filt: Any, checksum: bool) -> Any:
        assert remote_listed.wait(30)  # fail only once the remote side is listed
        raise PermissionError(13, "Permission denied", str(root))

    monkeypatch.setattr(sync_mod, "scan_remote", signalling_remote)
    monkeypatch.setattr(synclocal, "scan_local", failing_scan)
    ahead = local_listing_for(f"{src}/", ":t")
    with pytest.raises(PermissionError):
        run(_sync(srv, tmp_path, f"{src}/", ":t", delete=True, local_listing=ahead))
    assert remote_listed.is_set()
    monkeypatch.undo()
    assert remote_content(srv, tmp_path, "t") == before  # nothing deleted, nothing sent
    # an entry that cannot be read (a name that is not UTF-8): listed as an error, no deletion
    with open(os.fsencode(src / "sub") + b"/\xff-not-utf8", "wb") as f:
        f.write(b"x")
    ahead = local_listing_for(f"{src}/", ":t")
    r, items = run(_sync(srv, tmp_path, f"{src}/", ":t", delete=True, local_listing=ahead))
    assert r.deleted == 0 and any(i.kind == "error" for i in items)
    after = remote_content(srv, tmp_path, "t")
    assert "big.bin" in after and "sub/s1.txt" in after
