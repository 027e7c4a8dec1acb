"""The client operations over the whole conformance matrix (tests/conformance.py): TLS and plain,
the async and the blocking client, asyncio and uvloop on both ends. One body per behaviour; each
runs on all 8 cells, so a difference between the clients, loops or transports fails here."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from conformance import Cell, open_client
from ferry.client.blocking import AsyncProxy
from ferry.errors import AlreadyExists, AuthError, DiskFull, NotFound, PathRefused
from ferry_server import ServerThread
from transfer_support import home

pytestmark = [pytest.mark.matrix, pytest.mark.timeout(60)]

MiB = 1 << 20


def test_put_get_roundtrip_small_and_large(
    cell: Cell, server: ServerThread, client: Any, tmp_path: Path
) -> None:
    small = tmp_path / "small.txt"
    small.write_bytes(b"hello ferry\n")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(9 * MiB + 123))
    c = client
    c.put(small, "small.txt")
    r = c.put(big, "big.bin")
    assert r.size == big.stat().st_size
    out = tmp_path / "out"
    out.mkdir()
    c.get("small.txt", out / "small.txt")
    g = c.get("big.bin", out)
    assert g.digest == r.digest
    assert (out / "small.txt").read_bytes() == small.read_bytes()
    assert (out / "big.bin").read_bytes() == big.read_bytes()
    names = {e.name: e for e in c.listdir("")}
    assert names["big.bin"].size == big.stat().st_size
    assert names["big.bin"].kind == "file"
    assert not any(".ferry-part" in n for n in names)
    assert not list(out.glob(".*ferry-part*"))
    if not cell.objects:  # (the object backend has no folder: the get above read it back)
        assert (home(server) / "big.bin").read_bytes() == big.read_bytes()


def test_mkdir_ls_stat_mv_rm_df_glob(client: Any, tmp_path: Path) -> None:
    c = client
    c.mkdir("a/b/c", parents=True)
    with pytest.raises(AlreadyExists):
        c.mkdir("a")
    f = tmp_path / "f"
    f.write_bytes(b"x" * 1000)
    c.put(f, "a/b/c/f")
    assert c.stat("a/b/c/f").size == 1000
    c.rename("a/b/c/f", "a/g")
    with pytest.raises(NotFound):
        c.stat("a/b/c/f")
    assert [e.name for e in c.glob("a/*")] == ["a/b", "a/g"]
    tree = [e.name for e in c.listdir("a", recursive=True)]
    assert tree == ["b", "g", "b/c"] or set(tree) == {"b", "g", "b/c"}
    usage = c.df()
    assert usage.used >= 1000 and usage.quota is None and usage.free > 0
    c.remove("a", recursive=True)
    assert c.listdir("") == []


def test_every_method(cell: Cell, server: ServerThread, client: Any, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * MiB + 5))
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "x.txt").write_text("x")
    calls: list[tuple[int, int, int]] = []

    def progress(done: int, total: int) -> None:
        calls.append((threading.get_ident(), done, total))

    c = client
    assert c.info is not None and c.info.tls is not cell.plain
    if not cell.plain:
        assert c.info.pin_status == "new"
    assert c.ping() < 5
    c.mkdir("a/b", parents=True)
    r = c.put(src, "a/b/src.bin", progress=progress)
    assert r.size == src.stat().st_size and r.resumed_from == 0
    assert c.stat("a/b/src.bin").size == r.size
    assert [e.name for e in c.listdir("a", recursive=True)] == ["b", "b/src.bin"]
    g = c.get("a/b/src.bin", tmp_path / "back.bin", progress=progress)
    assert g.digest == r.digest and (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    c.rename("a/b/src.bin", "a/moved.bin")
    with pytest.raises(NotFound):
        c.stat("a/b/src.bin")
    with pytest.raises(PathRefused):
        c.stat("../etc")
    t = c.put_tree(tree, "t")
    assert t.files == 1
    t = c.get_tree("t", tmp_path / "t-back")
    assert (tmp_path / "t-back" / "sub" / "x.txt").read_text() == "x"
    usage = c.df()
    assert usage.used >= r.size and usage.quota is None
    c.remove("a", recursive=True)
    assert sorted(e.name for e in c.listdir("")) == ["t"]
    # Progress callbacks end at 100 %; the blocking client runs them on its loop thread
    # (documented), the async client on the caller's loop (here: this thread).
    assert calls and calls[-1][1] == calls[-1][2] == r.size
    elsewhere = cell.client == "sync"
    assert all((ident != threading.get_ident()) is elsewhere for ident, _, _ in calls)


def test_sync_both_ways_sends_only_what_changed(server: ServerThread, client: Any, tmp_path: Path) -> None:
    local = tmp_path / "local"
    (local / "sub").mkdir(parents=True)
    (local / "a.txt").write_text("alpha\n")
    (local / "sub" / "b.bin").write_bytes(os.urandom(300_000))
    c = client
    first = c.sync(f"{local}/", ":mirror")
    assert (first.files, first.sent_files, first.unchanged, first.failed) == (2, 2, 0, 0)
    assert c.stat("mirror/sub/b.bin").size == 300_000  # (its bytes: checked by the sync back below)
    (local / "a.txt").write_text("alpha, changed\n")
    again = c.sync(f"{local}/", ":mirror")
    assert (again.sent_files, again.unchanged, again.failed) == (1, 1, 0)
    assert again.sent_bytes == len("alpha, changed\n")
    assert c.stat("mirror/a.txt").size == len("alpha, changed\n")
    back = tmp_path / "back"
    down = c.sync(":mirror/", back)
    assert (down.sent_files, down.failed) == (2, 0)
    assert (back / "sub" / "b.bin").read_bytes() == (local / "sub" / "b.bin").read_bytes()
    assert (back / "a.txt").read_text() == "alpha, changed\n"


@pytest.mark.matrix(backend="folder")  # (the object backend refuses commands: tests/test_object_backend.py)
def test_remote_commands_run_stream_start(client: Any) -> None:
    """run/stream/start: coroutines block, async iterators and context managers come back as
    blocking proxies (the same for both clients)."""
    c = client
    r = c.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.exit_code, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
    with c.stream(["sh", "-c", "echo one; echo two"]) as s:
        assert isinstance(s, AsyncProxy)
        chunks = list(s)
    assert b"".join(data for kind, data in chunks if kind == "stdout") == b"one\ntwo\n"
    assert s.exit_code == 0
    with c.start(["cat"]) as proc:
        proc.write(b"through cat")
        proc.close_stdin()
        assert proc.collect() == (b"through cat", b"")
        assert proc.wait() == 0


@pytest.mark.matrix(backend="folder")  # (symbolic links made on disk; the object backend: test_object_backend.py)
def test_jail_escapes_are_refused_over_the_wire(server: ServerThread, client: Any, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("top secret")
    os.symlink(outside, home(server) / "link")
    os.symlink(outside / "secret", home(server) / "filelink")
    c = client
    for bad in ["../x", "/etc/passwd", "link/secret", "filelink", "a/../../x"]:
        with pytest.raises(PathRefused):
            c.get(bad, tmp_path / "got")
    with pytest.raises(PathRefused):
        c.put(outside / "secret", "link/planted")
    assert not (outside / "planted").exists()
    assert c.ping() < 5  # the session survives refusals


def test_wrong_password_and_unknown_user(cell: Cell, server: ServerThread, tmp_path: Path) -> None:
    with pytest.raises(AuthError):
        open_client(cell, server, tmp_path, password="nope")
    with pytest.raises(AuthError):
        open_client(cell, server, tmp_path, user="mallory")


def test_quota_is_enforced_and_nothing_is_left(cell: Cell, server: ServerThread, tmp_path: Path) -> None:
    bob = server.add_user("bob", quota=5 * MiB)
    f = tmp_path / "big"
    f.write_bytes(os.urandom(6 * MiB))
    small = tmp_path / "small"
    small.write_bytes(b"ok")
    c = open_client(cell, server, tmp_path, user="bob")
    try:
        with pytest.raises(DiskFull, match="quota"):
            c.put(f, "big")
        c.put(small, "small")  # still serving
        assert [e.name for e in c.listdir("")] == ["small"]
        assert c.df().partial == 0  # nothing set aside for the refused upload
    finally:
        c.close()
    if not cell.objects:  # (no hidden partial either: the object backend has no folder to look in)
        assert sorted(os.listdir(bob)) == ["small"]
