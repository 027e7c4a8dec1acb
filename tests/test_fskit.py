"""The local-filesystem kit (ferry.fskit), which the client and the server share, and what it fixed
on the client: a download of a file whose name is near the 255-byte limit, and a link planted in
the place of a download's partial file."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from pathlib import Path

import pytest

from ferry.client.transfer import partial_path
from ferry.errors import TransferError
from ferry.fskit import (
    DIR_FLAGS,
    MAX_NAME_BYTES,
    DirCache,
    is_partial_name,
    partial_name,
    safe_relative,
    store_atomically,
    write_new,
)
from ferry_server import ServerThread
from transfer_support import MiB, connect, home, write_random


def test_partial_names_fit_the_name_limit_and_are_recognised() -> None:
    assert partial_name("report.pdf", "t1") == ".report.pdf.ferry-part-t1"
    for name in ("x", "é" * 127, "x" * 255):
        p = partial_name(name, "t" * 64)
        assert len(os.fsencode(p)) <= MAX_NAME_BYTES and is_partial_name(p), name
        assert partial_name(name, "t" * 64) == p  # deterministic: a resume finds it again
    assert partial_name("a" * 250, "x") != partial_name("b" * 250, "x")
    for bad in ("", "a/b", "a b", "t" * 65):
        with pytest.raises(ValueError):
            partial_name("f", bad)
    assert not is_partial_name("report.pdf") and not is_partial_name(".ferry-part-x")


def test_safe_relative_accepts_plain_relative_names_only() -> None:
    """A name from the other side that becomes a local path: no way up, out or around."""
    for good in ("a", "a/b", ".hidden", "a/.b/..c", "...", "a/b../c", "x.", "é/ü"):
        assert safe_relative(good), good
    for bad in ("", "/a", "a/", "a//b", ".", "..", "./a", "a/.", "a/./b", "../a", "a/..", "a/../b", "a\0b"):
        assert not safe_relative(bad), bad


def test_write_new_never_opens_an_existing_name_or_a_link(tmp_path: Path) -> None:
    (tmp_path / "target").write_bytes(b"keep")
    os.symlink(tmp_path / "target", tmp_path / "link")
    for name in ("target", "link"):
        with pytest.raises(FileExistsError):
            write_new(tmp_path / name, b"evil", mode=0o644)
    assert (tmp_path / "target").read_bytes() == b"keep"
    old = os.umask(0o077)
    try:
        write_new(tmp_path / "new", b"data", mode=0o644, mtime=1e9, fsync=True)
    finally:
        os.umask(old)
    st = os.stat(tmp_path / "new")
    assert stat.S_IMODE(st.st_mode) == 0o644 and st.st_mtime == 1e9  # the umask does not apply


def test_store_atomically_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    dfd = os.open(tmp_path, DIR_FLAGS)
    try:
        (tmp_path / "f").write_bytes(b"old")
        store_atomically("f", b"new", dir_fd=dfd, mode=0o600)
        assert (tmp_path / "f").read_bytes() == b"new"

        def refuse(_s: int | None, _src: str, _d: int | None, _dst: str) -> None:
            raise OSError(errno.EEXIST, "refused")

        with pytest.raises(OSError):
            store_atomically("f", b"newer", dir_fd=dfd, mode=0o600, rename=refuse)
        assert (tmp_path / "f").read_bytes() == b"new"
        assert sorted(os.listdir(tmp_path)) == ["f"]  # the temp file is gone again
        # A link under the final name is replaced itself, never followed.
        (tmp_path / "elsewhere").write_bytes(b"untouched")
        os.symlink(tmp_path / "elsewhere", tmp_path / "l")
        store_atomically(tmp_path / "l", b"file", mode=0o600)
        assert (tmp_path / "elsewhere").read_bytes() == b"untouched"
        assert not (tmp_path / "l").is_symlink() and (tmp_path / "l").read_bytes() == b"file"
    finally:
        os.close(dfd)


def test_dir_cache_opens_from_the_nearest_ancestor_and_stays_bounded(tmp_path: Path) -> None:
    opened: list[str] = []

    def open_child(parent: int, name: str, rel: str) -> int:
        opened.append(rel)
        with_mkdir = os.path.join(f"/proc/self/fd/{parent}", name)
        os.makedirs(with_mkdir, exist_ok=True)
        return os.open(name, DIR_FLAGS, dir_fd=parent)

    cache = DirCache(os.open(tmp_path, DIR_FLAGS), open_child, limit=3)
    before = len(os.listdir("/proc/self/fd"))
    try:
        cache.get("a/b/c")
        assert opened == ["a", "a/b", "a/b/c"]
        cache.get("a/b/c/d")
        assert opened[-1] == "a/b/c/d"  # from the cached parent: one open, not four
        assert len(opened) == 4
        assert cache.cached("a") is None  # the least recently used went first (limit 3)
        for i in range(50):
            cache.get(f"x{i}")
        assert len(os.listdir("/proc/self/fd")) <= before + 3
    finally:
        cache.close()
        cache.close()  # idempotent
    assert (tmp_path / "a" / "b" / "c" / "d").is_dir()


@pytest.mark.timeout(60)
def test_a_file_with_a_name_near_the_limit_downloads_and_resumes(server: ServerThread, tmp_path: Path) -> None:
    """``.NAME.ferry-part`` made a 250-byte name too long (ENAMETOOLONG): the download failed."""
    name = "n" * 250
    srv = server
    data = write_random(home(srv) / name, 3 * MiB, seed=7)
    dest = tmp_path / "dl"
    dest.mkdir()
    held = data[: 2 << 20]
    partial_path(dest / name).write_bytes(held)  # an interrupted earlier download

    async def main() -> int:
        async with await connect(srv, tmp_path) as c:
            return (await c.get(name, dest, chunk_size=1 << 20)).resumed_from

    assert asyncio.run(main()) == len(held)
    assert (dest / name).read_bytes() == data
    assert os.listdir(dest) == [name]


@pytest.mark.timeout(60)
def test_a_download_never_writes_through_a_link_in_place_of_its_partial(server: ServerThread, tmp_path: Path) -> None:
    srv = server
    write_random(home(srv) / "f.bin", 1 * MiB, seed=8)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    dest = tmp_path / "dl"
    dest.mkdir()
    os.symlink(victim, partial_path(dest / "f.bin"))

    async def main() -> None:
        async with await connect(srv, tmp_path) as c:
            with pytest.raises(TransferError, match="symbolic link"):
                await c.get("f.bin", dest)

    asyncio.run(main())
    assert victim.read_bytes() == b"precious"
    assert not (dest / "f.bin").exists()
