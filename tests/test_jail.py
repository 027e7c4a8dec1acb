"""Tests for ferry.server.jail: no client path may ever leave the user's home.

Everything runs on real files under tmp_path. Layout of every test::

    tmp_path/home/      the jail
    tmp_path/outside/   must never be read, written or listed through the jail
        secret.txt      "SECRET"
        sub/inner.txt

An autouse fixture checks that no test leaks a file descriptor.
"""

from __future__ import annotations

import errno
import gc
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.errors import (
    AlreadyExists,
    DirectoryNotEmpty,
    DiskFull,
    FerryError,
    IsADirectory,
    NotADirectory,
    NotAFile,
    NotFound,
    PathRefused,
    PermissionDenied,
    RemoteError,
    RemoteTransferError,
    ServerBusy,
    TransferError,
)
from ferry.fskit import MAX_NAME_BYTES, is_partial_name, partial_name
from ferry.server import jailcore as jail_mod
from ferry.server.jail import MAX_PATH_BYTES, Entry, HomeUsage, Jail, parse_path, translate_oserror

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the jail targets Linux")

SECRET = b"SECRET"


# --------------------------------------------------------------------------------------------------
# fixtures and helpers


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    """Every test must close every descriptor it (or the jail) opened."""
    gc.collect()
    before = open_fds()
    yield
    gc.collect()
    leaked = open_fds() - before
    # listdir("/proc/self/fd") itself briefly holds one fd, which is closed again by now.
    assert not leaked, {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in leaked if _exists_fd(fd)}


def _exists_fd(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    o = tmp_path / "outside"
    (o / "sub").mkdir(parents=True)
    (o / "secret.txt").write_bytes(SECRET)
    (o / "sub" / "inner.txt").write_bytes(SECRET)
    return o


@pytest.fixture
def jail(home: Path) -> Iterator[Jail]:
    with Jail(home) as j:
        yield j


def snapshot(root: Path) -> dict[str, tuple[str, bytes | str, int]]:
    """Everything under ``root`` (without following links): kind, content or link target, mode."""
    out: dict[str, tuple[str, bytes | str, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p), 0)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", b"", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", p.read_bytes(), stat.S_IMODE(st.st_mode))
    return out


@pytest.fixture
def guard(outside: Path) -> Iterator[Path]:
    """``outside`` must be byte-for-byte unchanged (content, modes, mtimes) when the test ends."""
    before = snapshot(outside)
    mtimes = {p: p.lstat().st_mtime_ns for p in outside.rglob("*")}
    yield outside
    assert snapshot(outside) == before
    assert {p: p.lstat().st_mtime_ns for p in outside.rglob("*")} == mtimes


def write(path: Path, data: bytes = b"data") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def refused(code: str) -> Any:
    """``pytest.raises`` for a PathRefused with the given code."""
    return _Raises(PathRefused, code)


class _Raises:
    def __init__(self, cls: type[RemoteError], code: str) -> None:
        self.cls, self.code = cls, code
        self.ctx = pytest.raises(cls)

    def __enter__(self) -> Any:
        self.info = self.ctx.__enter__()
        return self.info

    def __exit__(self, *exc: Any) -> bool:
        result = bool(self.ctx.__exit__(*exc))
        assert self.info.value.code == self.code, (self.info.value.code, str(self.info.value))
        return result


def raises(cls: type[RemoteError], code: str) -> Any:
    return _Raises(cls, code)


# --------------------------------------------------------------------------------------------------
# lexical checks


@pytest.mark.parametrize(
    ("path", "parts"),
    [("", ()), (".", ()), ("a", ("a",)), ("a/b c/d", ("a", "b c", "d")), ("é/日本", ("é", "日本"))],
)
def test_parse_path_accepts(path: str, parts: tuple[str, ...]) -> None:
    assert parse_path(path) == parts


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("..", "outside-home"),
        ("../x", "outside-home"),
        ("a/../../x", "outside-home"),
        ("a/..", "outside-home"),
        ("a/../b", "outside-home"),  # even when it would stay inside: one canonical spelling
        ("/etc/passwd", "outside-home"),
        ("/", "outside-home"),
        ("//x", "outside-home"),
        ("a\x00b", "bad-path"),
        ("a//b", "bad-path"),
        ("a/", "bad-path"),
        ("./a", "bad-path"),
        ("a/./b", "bad-path"),
        ("x" * (MAX_NAME_BYTES + 1), "bad-path"),
        ("a/" * (MAX_PATH_BYTES // 2) + "a", "bad-path"),
    ],
)
def test_parse_path_refuses(path: str, code: str) -> None:
    with refused(code):
        parse_path(path)


def test_refusal_messages_say_what_to_do() -> None:
    with pytest.raises(PathRefused) as info:
        parse_path("../x")
    assert str(info.value) == "'../x': paths may not contain '..'; paths are relative to your home folder"
    assert info.value.exit_code == 4
    with pytest.raises(PathRefused, match="drop the leading '/'"):
        parse_path("/etc/passwd")


def test_messages_are_terminal_safe(jail: Jail) -> None:
    with pytest.raises(NotFound) as info:
        jail.open_read("evil\x1b]0;pwned\x07")
    assert "\x1b" not in str(info.value) and "\\x1b" in str(info.value)


# --------------------------------------------------------------------------------------------------
# every operation refuses paths that leave the home


ESCAPES = ["..", "../outside/secret.txt", "a/../../outside/secret.txt", "/etc/passwd", "/tmp"]


def all_operations(jail: Jail, path: str) -> list[Callable[[], object]]:
    return [
        lambda: jail.lstat(path),
        lambda: jail.open_read(path),
        lambda: jail.open_dir(path),
        lambda: jail.listdir(path),
        lambda: list(jail.iter_dir(path)),
        lambda: jail.mkdir(path, parents=True, exist_ok=True),
        lambda: [jail.remove(path, recursive=True)],  # (a count, not a descriptor to close)
        lambda: jail.rename(path, "x"),
        lambda: jail.rename("x", path),
        lambda: jail.create_temp(path),
        lambda: jail.open_partial(path, "tok"),
        lambda: jail.commit(".x.ferry-part-t", path),
        lambda: jail.utime(path, 0),
        lambda: jail.chmod(path, 0o777),
    ]


@pytest.mark.parametrize("path", ESCAPES)
def test_every_operation_refuses_escapes(jail: Jail, home: Path, guard: Path, path: str) -> None:
    write(home / "x")
    write(home / ".x.ferry-part-t")
    for op in all_operations(jail, path):
        with pytest.raises(PathRefused) as info:
            op()
        assert info.value.code == "outside-home"


def test_nul_in_path_is_refused_everywhere(jail: Jail, guard: Path) -> None:
    for op in all_operations(jail, "a\x00/../../outside"):
        with refused("bad-path"):
            op()


# --------------------------------------------------------------------------------------------------
# symbolic links


def test_symlinked_file_pointing_outside(jail: Jail, home: Path, guard: Path) -> None:
    os.symlink(guard / "secret.txt", home / "link")
    with refused("symlink") as info:
        jail.open_read("link")
    assert "symbolic link" in str(info.value)
    with refused("symlink"):
        jail.chmod("link", 0o777)
    with refused("symlink"):
        jail.open_dir("link")
    with refused("symlink"):
        jail.mkdir("link", exist_ok=True)
    # lstat and listings describe the link itself.
    assert stat.S_ISLNK(jail.lstat("link").st_mode)
    [entry] = jail.listdir()
    assert (entry.name, entry.kind) == ("link", "link")
    # Setting times touches the link, not the target (guard checks the target's mtime).
    jail.utime("link", 1_000_000_000 * 10**9)
    # Uploading over the link replaces the link itself; the target is untouched.
    fd, rel = jail.create_temp("link")
    os.write(fd, b"new")
    os.close(fd)
    jail.commit(rel, "link")
    assert (home / "link").read_bytes() == b"new" and not (home / "link").is_symlink()


def test_symlinked_dir_pointing_outside_as_intermediate(jail: Jail, home: Path, guard: Path) -> None:
    os.symlink(guard, home / "d")
    write(home / "mine.txt")
    attempts: list[Callable[[], object]] = [
        lambda: jail.open_read("d/secret.txt"),
        lambda: jail.lstat("d/secret.txt"),
        lambda: jail.listdir("d/sub"),
        lambda: jail.mkdir("d/new"),
        lambda: jail.mkdir("d/x/y", parents=True),
        lambda: jail.create_temp("d/new.txt"),
        lambda: jail.open_partial("d/new.txt", "t1"),
        lambda: jail.remove("d/secret.txt"),
        lambda: jail.remove("d/sub", recursive=True),
        lambda: jail.rename("d/secret.txt", "stolen.txt"),
        lambda: jail.rename("mine.txt", "d/planted.txt"),
        lambda: jail.utime("d/secret.txt", 0),
        lambda: jail.chmod("d/secret.txt", 0o777),
    ]
    for attempt in attempts:
        with refused("symlink") as info:
            attempt()
        assert "'d'" in str(info.value)
    assert (home / "mine.txt").exists()


def test_symlinked_dir_pointing_outside_as_final(jail: Jail, home: Path, guard: Path) -> None:
    os.symlink(guard, home / "d")
    for attempt in (lambda: jail.open_dir("d"), lambda: jail.listdir("d"), lambda: jail.open_read("d")):
        with refused("symlink"):
            attempt()
    # Removing removes the link only, recursive or not: never what it points to.
    jail.remove("d", recursive=True)
    assert not os.path.lexists(home / "d")
    os.symlink(guard, home / "d")
    jail.remove("d")
    assert not os.path.lexists(home / "d")


def test_symlink_pointing_inside_is_refused_too(jail: Jail, home: Path) -> None:
    """Strict policy (docs/security.md): no symlink is followed, even one that stays in the home."""
    write(home / "real" / "f.txt", b"inside")
    os.symlink("real", home / "alias")
    os.symlink("real/f.txt", home / "falias")
    with refused("symlink"):
        jail.open_read("alias/f.txt")
    with refused("symlink"):
        jail.open_read("falias")
    fd = jail.open_read("real/f.txt")
    assert read_all(fd) == b"inside"
    os.close(fd)


def test_dangling_symlink(jail: Jail, home: Path) -> None:
    os.symlink("nowhere", home / "dangling")
    assert jail.exists("dangling")
    with refused("symlink"):
        jail.open_read("dangling")
    jail.remove("dangling")
    assert not jail.exists("dangling")


def test_rename_moves_the_symlink_itself(jail: Jail, home: Path, guard: Path) -> None:
    os.symlink(guard / "secret.txt", home / "link")
    jail.rename("link", "moved")
    assert os.readlink(home / "moved") == str(guard / "secret.txt")
    write(home / "f.txt", b"mine")
    jail.rename("f.txt", "moved")  # replaces the link, not its target
    assert (home / "moved").read_bytes() == b"mine"


def test_swap_during_transfer(jail: Jail, home: Path, guard: Path) -> None:
    """An intermediate folder replaced by a symlink between two calls of one transfer."""
    write(home / "a" / "b" / "keep.txt")
    fd, rel = jail.create_temp("a/b/upload.bin")
    dir_fd = jail.open_dir("a/b")
    try:
        os.write(fd, b"first half ")
        # A local attacker swaps a -> outside (which has the same shape: sub/...).
        os.rename(home / "a", home / "a.orig")
        os.symlink(guard, home / "a")
        # Subsequent operations of the transfer refuse the new path...
        with refused("symlink"):
            jail.commit(rel, "a/b/upload.bin")
        with refused("symlink"):
            jail.open_partial("a/b/upload.bin", "tok")
        with refused("symlink"):
            jail.create_temp("a/sub/upload.bin")
        with refused("symlink"):
            jail.open_read("a/secret.txt")
        # ...while the descriptors already open keep pointing at the real (moved) folder, inside home.
        os.write(fd, b"second half")
        assert sorted(os.listdir(dir_fd)) == sorted(["keep.txt", rel.rsplit("/", 1)[1]])
    finally:
        os.close(fd)
        os.close(dir_fd)
    data = (home / "a.orig" / "b" / rel.rsplit("/", 1)[1]).read_bytes()
    assert data == b"first half second half"
    # Once the swap is undone, the transfer can finish.
    os.unlink(home / "a")
    os.rename(home / "a.orig", home / "a")
    jail.commit(rel, "a/b/upload.bin")
    assert (home / "a" / "b" / "upload.bin").read_bytes() == data


def _race(
    jail: Jail,
    swap: Callable[[], None],
    attempt: Callable[[], str],
    *,
    seconds: float = 2.0,
    max_rounds: int = 20_000,
) -> dict[str, int]:
    """Run ``swap`` in a thread while calling ``attempt`` in a loop; count the attempt outcomes."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def swapper() -> None:
        try:
            while not stop.is_set():
                swap()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    outcomes: dict[str, int] = {}
    t = threading.Thread(target=swapper, daemon=True)
    t.start()
    deadline = time.monotonic() + seconds
    try:
        for _ in range(max_rounds):
            outcome = attempt()
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            # Stop early once both outcomes were seen often enough to show the race was exercised.
            if time.monotonic() > deadline or (
                outcomes.get("ok", 0) > 200 and len(outcomes) > 1 and sum(outcomes.values()) > 1000
            ):
                break
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive() and not errors, errors
    return outcomes


def test_racing_intermediate_swap_never_escapes(jail: Jail, home: Path, guard: Path) -> None:
    """A thread swaps folder 'a' with a symlink to outside while another opens paths under it."""
    write(home / "a" / "sub" / "inner.txt", b"inside")
    real, link = home / "a", home / "a.link"

    def swap() -> None:
        # real dir -> aside; symlink in; then back. Each step is atomic; the attempts see all states.
        os.rename(real, home / "a.aside")
        os.symlink(guard, link)
        os.rename(link, real)
        os.unlink(real)
        os.rename(home / "a.aside", real)

    def attempt() -> str:
        try:
            fd = jail.open_read("a/sub/inner.txt")
        except (PathRefused, NotFound):
            outcome = "refused"
        else:
            try:
                assert read_all(fd) == b"inside"
            finally:
                os.close(fd)
            outcome = "ok"
        # Writing and creating under the path: must create nothing outside (the guard checks). A fixed
        # token reuses one partial file, so nothing piles up inside either.
        try:
            wfd, _, _ = jail.open_partial("a/sub/new.bin", "race")
        except (PathRefused, NotFound):
            return outcome
        os.close(wfd)
        try:
            jail.mkdir("a/sub/newdir", exist_ok=True)
        except (PathRefused, NotFound):
            pass
        return outcome

    outcomes = _race(jail, swap, attempt)
    assert outcomes.get("ok", 0) > 0 and outcomes.get("refused", 0) > 0, outcomes


def test_racing_final_swap_never_reads_outside(jail: Jail, home: Path, guard: Path) -> None:
    """The final component flips between a regular file and a symlink to the secret."""
    target = home / "f.txt"
    write(target, b"inside")
    write(home / "f.alt", b"inside")
    os.symlink(guard / "secret.txt", home / "f.link")

    def swap() -> None:
        os.rename(target, home / "f.aside")
        os.symlink(guard / "secret.txt", home / "f.tmp")
        os.rename(home / "f.tmp", target)  # atomic replace: the path is now a symlink
        os.rename(home / "f.aside", target)  # and atomically back to the file

    def attempt() -> str:
        try:
            fd = jail.open_read("f.txt")
        except (PathRefused, NotFound):
            return "refused"
        try:
            data = read_all(fd)
        finally:
            os.close(fd)
        assert data == b"inside", data  # never SECRET
        return "ok"

    outcomes = _race(jail, swap, attempt)
    assert outcomes.get("ok", 0) > 0 and outcomes.get("refused", 0) > 0, outcomes


# --------------------------------------------------------------------------------------------------
# special files, hard links


@pytest.mark.timeout(10)
def test_fifo_does_not_block(jail: Jail, home: Path) -> None:
    os.mkfifo(home / "pipe")
    with raises(NotAFile, "not-a-file"):
        jail.open_read("pipe")
    assert [(e.name, e.kind) for e in jail.listdir()] == [("pipe", "other")]
    # A FIFO planted under the name of a partial upload is refused, not opened for writing.
    os.mkfifo(home / partial_name("up.bin", "tok"))
    with raises(NotAFile, "not-a-file"):
        jail.open_partial("up.bin", "tok")
    jail.remove("pipe")
    assert not (home / "pipe").exists()


@pytest.mark.timeout(10)
def test_fifo_swapped_in_after_the_type_check_does_not_block(
    jail: Jail, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second line of defence: O_NONBLOCK on the open, fstat on the fd."""
    os.mkfifo(home / "pipe")
    real = jail_mod._require_regular
    calls = []

    def skip_first_check(st: os.stat_result, path: str) -> None:
        calls.append(path)
        if len(calls) > 1:  # the pre-open lstat check "misses" the FIFO, as if it was swapped in late
            real(st, path)

    monkeypatch.setattr(jail_mod, "_require_regular", skip_first_check)
    with raises(NotAFile, "not-a-file"):
        jail.open_read("pipe")
    assert len(calls) == 2


def test_open_read_refuses_folders(jail: Jail, home: Path) -> None:
    (home / "d").mkdir()
    with raises(IsADirectory, "is-a-directory"):
        jail.open_read("d")
    with raises(IsADirectory, "is-a-directory"):
        jail.open_read("")


def test_open_read_through_a_file_is_not_a_directory(jail: Jail, home: Path) -> None:
    write(home / "f")
    with raises(NotADirectory, "not-a-directory") as info:
        jail.open_read("f/x")
    assert str(info.value) == "'f' is not a folder"


def test_hardlinks_are_fine(jail: Jail, home: Path) -> None:
    write(home / "f", b"12345")
    os.link(home / "f", home / "g")
    for name in ("f", "g"):
        fd = jail.open_read(name)
        assert read_all(fd) == b"12345"
        os.close(fd)
    assert jail.usage().bytes == 5  # counted once


def test_open_read_is_blocking_and_cloexec(jail: Jail, home: Path) -> None:
    write(home / "f")
    fd = jail.open_read("f")
    try:
        assert os.get_blocking(fd)
        assert not os.get_inheritable(fd)
        with pytest.raises(OSError):
            os.write(fd, b"x")  # read-only
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# mkdir, remove, rename


def test_mkdir(jail: Jail, home: Path) -> None:
    jail.mkdir("a")
    assert (home / "a").is_dir()
    with raises(AlreadyExists, "exists"):
        jail.mkdir("a")
    jail.mkdir("a", exist_ok=True)
    with raises(NotFound, "not-found") as info:
        jail.mkdir("x/y/z")
    assert str(info.value) == "'x': no such file or folder"
    jail.mkdir("x/y/z", parents=True)
    assert (home / "x" / "y" / "z").is_dir()
    jail.mkdir("x/y/z", parents=True, exist_ok=True)
    with raises(AlreadyExists, "exists"):
        jail.mkdir("x/y/z", parents=True)
    write(home / "file")
    with raises(AlreadyExists, "exists"):
        jail.mkdir("file", exist_ok=True)
    with raises(NotADirectory, "not-a-directory"):
        jail.mkdir("file/sub", parents=True)
    jail.mkdir("", exist_ok=True)
    with raises(AlreadyExists, "exists"):
        jail.mkdir("")
    jail.mkdir("private", mode=0o700)
    assert stat.S_IMODE((home / "private").stat().st_mode) == 0o700


def test_mkdir_parents_through_symlink(jail: Jail, home: Path, guard: Path) -> None:
    (home / "a").mkdir()
    os.symlink(guard, home / "a" / "b")
    with refused("symlink"):
        jail.mkdir("a/b/c/d", parents=True)


def test_remove(jail: Jail, home: Path) -> None:
    write(home / "d" / "f")
    with raises(DirectoryNotEmpty, "not-empty") as info:
        jail.remove("d")
    assert "recursively" in str(info.value)
    jail.remove("d/f")
    jail.remove("d")
    assert list(home.iterdir()) == []
    with raises(NotFound, "not-found"):
        jail.remove("d")
    with refused("bad-path"):
        jail.remove("", recursive=True)
    assert home.is_dir()


def test_recursive_remove_never_follows_links(jail: Jail, home: Path, guard: Path) -> None:
    tree = home / "tree"
    for rel in ("f1", "a/f2", "a/b/f3", "a/b/c/f4", "e/empty/.hidden"):
        write(tree / rel)
    (tree / "a" / "emptydir").mkdir()
    os.symlink(guard, tree / "a" / "to_outside_dir")
    os.symlink(guard / "sub", tree / "a" / "b" / "to_outside_sub")
    os.symlink(guard / "secret.txt", tree / "a" / "b" / "c" / "to_secret")
    os.symlink("../..", tree / "a" / "b" / "up")
    os.mkfifo(tree / "a" / "pipe")
    write(home / "sibling.txt")
    jail.remove("tree", recursive=True)
    assert sorted(p.name for p in home.iterdir()) == ["sibling.txt"]


def test_recursive_remove_of_a_plain_file(jail: Jail, home: Path) -> None:
    write(home / "f")
    jail.remove("f", recursive=True)
    assert not (home / "f").exists()


def test_deep_trees_with_few_descriptors(home: Path) -> None:
    """Walks deeper than max_open_dirs close and reopen ancestors instead of running out of fds."""
    depth = 60
    deep = home / "deep"
    p = deep
    for i in range(depth):
        p = p / f"d{i}"
        write(p / "f.bin", b"x" * 10)
        write(p.parent / f"side{i}" / "g.bin", b"y")  # siblings force climbing back up
    with Jail(home, max_open_dirs=3) as jail:
        before = len(open_fds())
        assert jail.usage().bytes == depth * 11
        jail.remove("deep", recursive=True)
        assert len(open_fds()) == before
    assert list(home.iterdir()) == []


def test_deep_walks_cost_one_open_per_folder(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Climbing back out of a tree deeper than max_open_dirs reopens each closed ancestor as '..' of
    the folder being left: one open per folder. Reopening it from the nearest open ancestor (or the
    home) costs opens growing with the square of the depth (a 1,500-level listing took 13 s)."""
    depth = 600
    (home / "/".join(["d"] * depth)).mkdir(parents=True)
    opens = 0
    real_open = os.open

    def counting_open(*args: Any, **kw: Any) -> int:
        nonlocal opens
        opens += 1
        return real_open(*args, **kw)

    def listing(jail: Jail) -> None:
        scan = jail.list_scan("", recursive=True)
        try:
            assert sum(1 for _ in scan) == depth
        finally:
            scan.close()

    with Jail(home, max_open_dirs=8) as jail:
        monkeypatch.setattr(os, "open", counting_open)
        for walk in (Jail.usage, listing, lambda j: j.remove("d", recursive=True)):
            opens = 0
            walk(jail)
            assert opens <= 2 * depth + 8, opens
        monkeypatch.undo()
    assert list(home.iterdir()) == []


def test_a_walk_climbing_back_into_a_moved_folder_stops_with_changed(home: Path) -> None:
    """A folder moved while a walk is below it is never taken for the one the walk entered: the
    reopened parent must be the same inode, or the walk fails with code ``changed``."""
    (home / "a" / "b" / "c" / "d" / "e").mkdir(parents=True)
    with Jail(home, max_open_dirs=2) as jail:
        walk = jail.usage_walk()
        try:
            for _ in range(5):  # one entry per folder: the walk is in e, its ancestors a..c are closed
                next(walk)
            (home / "a" / "b").rename(home / "b")  # b, with the walk inside it, leaves a
            with raises(RemoteError, "changed"):
                for _ in walk:
                    pass
        finally:
            walk.close()


def test_rename(jail: Jail, home: Path, guard: Path) -> None:
    write(home / "f", b"one")
    (home / "d").mkdir()
    jail.rename("f", "d/f")
    assert (home / "d" / "f").read_bytes() == b"one"
    jail.rename("d", "e")
    assert (home / "e" / "f").is_file()
    write(home / "g", b"two")
    with raises(AlreadyExists, "exists") as info:
        jail.rename("g", "e/f", overwrite=False)
    assert str(info.value) == "'e/f' already exists"
    assert (home / "e" / "f").read_bytes() == b"one"
    jail.rename("g", "e/f")
    assert (home / "e" / "f").read_bytes() == b"two" and not (home / "g").exists()
    jail.rename("e/f", "h", overwrite=False)
    assert (home / "h").read_bytes() == b"two"
    with raises(NotFound, "not-found"):
        jail.rename("missing", "x")
    with raises(NotFound, "not-found"):
        jail.rename("h", "nodir/h")
    with raises(RemoteError, "invalid"):
        jail.rename("e", "e/inside")
    (home / "e" / "sub").mkdir()
    with raises(IsADirectory, "is-a-directory"):
        jail.rename("h", "e")
    (home / "full").mkdir()
    write(home / "full" / "x")
    with raises(DirectoryNotEmpty, "not-empty"):
        jail.rename("e", "full")
    with refused("bad-path"):
        jail.rename("", "x")
    with refused("bad-path"):
        jail.rename("h", "")


def test_rename_noreplace_fallback(jail: Jail, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without renameat2 (old libc), overwrite=False still refuses an existing destination."""
    monkeypatch.setattr(jail_mod, "_RENAMEAT2", None)
    write(home / "a", b"a")
    write(home / "b", b"b")
    with raises(AlreadyExists, "exists"):
        jail.rename("a", "b", overwrite=False)
    jail.rename("a", "c", overwrite=False)
    assert (home / "c").read_bytes() == b"a"


# --------------------------------------------------------------------------------------------------
# uploads: temp files, partial files, commit


def test_create_temp_and_commit(jail: Jail, home: Path) -> None:
    (home / "d").mkdir()
    fd, rel = jail.create_temp("d/report.pdf")
    try:
        assert rel.startswith("d/.report.pdf.ferry-part-") and is_partial_name(rel.split("/")[-1])
        st = os.fstat(fd)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 0
        os.write(fd, b"pdf bytes")
        os.fsync(fd)
    finally:
        os.close(fd)
    assert jail.listdir("d") == []  # partial files are hidden
    assert [e.name for e in jail.listdir("d", include_partial=True)] == [rel.split("/")[-1]]
    jail.commit(rel, "d/report.pdf")
    assert (home / "d" / "report.pdf").read_bytes() == b"pdf bytes"
    assert [e.name for e in jail.listdir("d", include_partial=True)] == ["report.pdf"]
    # A second upload replaces the file atomically.
    fd, rel2 = jail.create_temp("d/report.pdf")
    assert rel2 != rel
    os.write(fd, b"v2")
    os.close(fd)
    jail.commit(rel2, "d/report.pdf", durable=False)
    assert (home / "d" / "report.pdf").read_bytes() == b"v2"


def test_commit_without_overwrite(jail: Jail, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(home / "f", b"old")
    fd, rel = jail.create_temp("f")
    os.write(fd, b"new")
    os.close(fd)
    with raises(AlreadyExists, "exists"):
        jail.commit(rel, "f", overwrite=False)
    assert (home / "f").read_bytes() == b"old"
    jail.commit(rel, "g", overwrite=False)
    assert (home / "g").read_bytes() == b"new"


def test_remove_explains_hidden_partials(jail: Jail, home: Path) -> None:
    (home / "d").mkdir()
    fd, _ = jail.create_temp("d/f")
    os.close(fd)
    assert jail.listdir("d") == []
    with raises(DirectoryNotEmpty, "not-empty") as info:
        jail.remove("d")
    assert "unfinished uploads" in str(info.value)
    jail.remove("d", recursive=True)
    assert not (home / "d").exists()


def test_upload_refusals(jail: Jail, home: Path) -> None:
    (home / "d").mkdir()
    write(home / "plain.txt")
    with raises(IsADirectory, "is-a-directory"):
        jail.create_temp("d")
    with raises(IsADirectory, "is-a-directory"):
        jail.open_partial("d", "tok")
    with refused("bad-path"):
        jail.create_temp("")
    with raises(NotFound, "not-found"):
        jail.create_temp("missing/f")
    with refused("bad-path"):  # only partial files can be committed
        jail.commit("plain.txt", "other.txt")
    fd, rel = jail.create_temp("x")
    os.close(fd)
    with raises(IsADirectory, "is-a-directory"):
        jail.commit(rel, "d")


def test_open_partial_resumes(jail: Jail, home: Path) -> None:
    fd, rel, size = jail.open_partial("big.iso", "t0k-en_1")
    assert (rel, size) == (".big.iso.ferry-part-t0k-en_1", 0)
    os.write(fd, b"0123456789")
    os.close(fd)
    fd, rel2, size = jail.open_partial("big.iso", "t0k-en_1")
    try:
        assert (rel2, size) == (rel, 10)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 10  # positioned to append
        assert os.pread(fd, 4, 0) == b"0123"  # readable: the server can hash what it already has
        os.write(fd, b"abc")
    finally:
        os.close(fd)
    jail.commit(rel, "big.iso")
    assert (home / "big.iso").read_bytes() == b"0123456789abc"


@pytest.mark.parametrize("token", ["", "../x", "a/b", "x" * 65, "sp ace", "nul\x00"])
def test_open_partial_refuses_bad_tokens(jail: Jail, home: Path, token: str) -> None:
    with refused("bad-path"):
        jail.open_partial("f", token)
    assert list(home.iterdir()) == []


def test_open_partial_refuses_symlinked_partial(jail: Jail, home: Path, guard: Path) -> None:
    os.symlink(guard / "secret.txt", home / partial_name("f", "tok"))
    with refused("symlink"):
        jail.open_partial("f", "tok")


def test_partial_names_for_long_names() -> None:
    long = "é" * 120  # 240 bytes: fits as a name, not with the partial decoration
    name = partial_name(long, "t" * 64)
    assert len(os.fsencode(name)) <= MAX_NAME_BYTES and is_partial_name(name)
    assert name == partial_name(long, "t" * 64)  # deterministic, so resume finds it
    assert partial_name("a", "t") == ".a.ferry-part-t"
    assert not is_partial_name("a.ferry-part-t") and not is_partial_name(".a.ferry-part-")


# --------------------------------------------------------------------------------------------------
# listing, usage, times, modes


def test_listdir_and_iter_dir(jail: Jail, home: Path) -> None:
    write(home / "b.txt", b"12")
    (home / "a").mkdir()
    os.symlink("b.txt", home / "c")
    os.utime(home / "b.txt", ns=(0, 1_500_000_000_250_000_000))
    entries = jail.listdir()
    assert [(e.name, e.kind) for e in entries] == [("a", "dir"), ("b.txt", "file"), ("c", "link")]
    b = entries[1]
    assert b == Entry("b.txt", "file", 2, 1_500_000_000.25, stat.S_IMODE((home / "b.txt").stat().st_mode))
    assert jail.listdir(".") == entries
    with raises(NotFound, "not-found"):
        jail.listdir("nope")
    with raises(NotADirectory, "not-a-directory"):
        jail.listdir("b.txt")


def test_iter_dir_streams_and_closes(jail: Jail, home: Path) -> None:
    for i in range(500):
        (home / f"f{i:04d}").touch()
    it = jail.iter_dir()
    first = next(it)
    assert first.kind == "file"
    it.close()  # abandoning the iterator closes its descriptor (checked by no_fd_leak)
    assert sum(1 for _ in jail.iter_dir()) == 500


def test_usage(jail: Jail, home: Path, guard: Path) -> None:
    assert jail.usage().bytes == 0
    write(home / "a" / "f", b"x" * 1000)
    write(home / "a" / "b" / "g", b"y" * 24)
    os.link(home / "a" / "f", home / "a" / "b" / "f.hard")
    os.symlink(guard / "secret.txt", home / "a" / "secret")  # not followed, not counted
    os.symlink(guard, home / "outdir")
    fd, _, _ = jail.open_partial("upload", "tok")
    os.write(fd, b"z" * 76)
    os.close(fd)
    # Complete files and partials apart: the partial occupies the quota but is no entry the user sees.
    assert jail.usage() == HomeUsage(bytes=1024, entries=7, partials={".upload.ferry-part-tok": 76})


def test_utime_and_chmod(jail: Jail, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = write(home / "f")
    jail.utime("f", 1_234_567_890_123_456_789)
    assert f.stat().st_mtime_ns == 1_234_567_890_123_456_789
    jail.utime("f", 5 * 10**9, atime_ns=6 * 10**9)
    assert (f.stat().st_mtime_ns, f.stat().st_atime_ns) == (5 * 10**9, 6 * 10**9)
    jail.chmod("f", 0o4755)  # setuid is dropped on purpose
    assert stat.S_IMODE(f.stat().st_mode) == 0o755
    (home / "d").mkdir()
    jail.chmod("d", 0o700)
    assert stat.S_IMODE((home / "d").stat().st_mode) == 0o700

    # The fallback for a libc without AT_SYMLINK_NOFOLLOW for fchmodat.
    def no_nofollow(*args: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    monkeypatch.setattr(os, "chmod", no_nofollow)
    jail.chmod("f", 0o640)
    assert stat.S_IMODE(f.stat().st_mode) == 0o640
    os.mkfifo(home / "p")
    with raises(NotAFile, "not-a-file"):
        jail.chmod("p", 0o600)


# --------------------------------------------------------------------------------------------------
# error translation, lifecycle, descriptors


@pytest.mark.parametrize(
    ("err", "cls", "code"),
    [
        (errno.ENOENT, NotFound, "not-found"),
        (errno.EACCES, PermissionDenied, "permission"),
        (errno.EPERM, PermissionDenied, "permission"),
        (errno.EROFS, PermissionDenied, "read-only"),
        (errno.ENOSPC, DiskFull, "disk-full"),
        (errno.EDQUOT, DiskFull, "quota"),
        (errno.EEXIST, AlreadyExists, "exists"),
        (errno.ENOTDIR, NotADirectory, "not-a-directory"),
        (errno.EISDIR, IsADirectory, "is-a-directory"),
        (errno.ENOTEMPTY, DirectoryNotEmpty, "not-empty"),
        (errno.ELOOP, PathRefused, "symlink"),
        (errno.ENAMETOOLONG, PathRefused, "bad-path"),
        (errno.EXDEV, RemoteError, "cross-device"),
        (errno.EMFILE, ServerBusy, "busy"),
        (errno.EIO, RemoteTransferError, "io"),
    ],
)
def test_translate_oserror(err: int, cls: type[RemoteError], code: str) -> None:
    exc = translate_oserror(OSError(err, os.strerror(err)), "a/b", dst="c")
    assert type(exc) is cls and exc.code == code
    assert "'a/b'" in str(exc) or "'c'" in str(exc)


def test_disk_full_is_a_transfer_error() -> None:
    exc = translate_oserror(OSError(errno.ENOSPC, "No space"), "f")
    assert isinstance(exc, TransferError) and isinstance(exc, RemoteError) and exc.exit_code == 5


@pytest.mark.skipif(os.geteuid() == 0, reason="root bypasses permission bits")
def test_permission_denied_on_disk(jail: Jail, home: Path) -> None:  # pragma: no cover - non-root
    write(home / "locked" / "f")
    (home / "locked").chmod(0)
    try:
        with raises(PermissionDenied, "permission"):
            jail.open_read("locked/f")
    finally:
        (home / "locked").chmod(0o700)


def test_lifecycle(tmp_path: Path, home: Path) -> None:
    with raises(NotFound, "no-home"):
        Jail(tmp_path / "missing")
    j = Jail(home)
    assert not j.closed and j.home == str(home)
    j.close()
    j.close()  # idempotent
    assert j.closed
    with pytest.raises(ValueError):
        j.listdir()


def test_home_may_be_a_symlink(tmp_path: Path, home: Path) -> None:
    """The home path is trusted configuration; only client paths are confined."""
    write(home / "f", b"ok")
    os.symlink(home, tmp_path / "home.link")
    with Jail(tmp_path / "home.link") as j:
        fd = j.open_read("f")
        assert read_all(fd) == b"ok"
        os.close(fd)


def test_no_descriptor_leak_on_errors(jail: Jail, home: Path, guard: Path) -> None:
    write(home / "a" / "b" / "f")
    os.symlink(guard, home / "a" / "link")
    os.mkfifo(home / "a" / "pipe")
    before = open_fds()
    bad = ["a/b/missing", "a/link/secret.txt", "a/b/f/x", "a/pipe", "a/b", "a/link", "../x", "a/missing/deep"]
    for _ in range(20):
        for path in bad:
            for op in all_operations(jail, path):
                try:
                    result = op()
                except FerryError:
                    continue
                # A few succeed (e.g. lstat, mkdir -p under a/b): close what they return.
                if isinstance(result, int):
                    os.close(result)
                elif type(result) is tuple:  # create_temp, open_partial (not os.stat_result)
                    os.close(result[0])
    assert open_fds() == before


# ---------------------------------------------------------------------------------------------
# store_small: one-walk atomic write of a small file


def test_store_small_writes_atomically_with_mode_and_mtime(jail: Jail, home: Path) -> None:
    (home / "d").mkdir()
    assert jail.store_small("d/f", b"hello", mode=0o640, mtime=1_000_000.0) == 0
    st = (home / "d" / "f").stat()
    assert (home / "d" / "f").read_bytes() == b"hello"
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_mtime == 1_000_000.0
    assert jail.store_small("d/f", b"hi", mode=0o600, mtime=1.0) == 5  # replaced 5 bytes
    assert (home / "d" / "f").read_bytes() == b"hi"
    assert sorted(os.listdir(home / "d")) == ["f"]  # no temp file left


def test_store_small_refuses_existing_without_overwrite_and_folders(jail: Jail, home: Path) -> None:
    (home / "f").write_bytes(b"old")
    (home / "dir").mkdir()
    with pytest.raises(AlreadyExists):
        jail.store_small("f", b"new", mode=0o644, mtime=0.0, overwrite=False)
    with pytest.raises(IsADirectory):
        jail.store_small("dir", b"x", mode=0o644, mtime=0.0)
    assert (home / "f").read_bytes() == b"old"
    assert sorted(os.listdir(home)) == ["dir", "f"]


@pytest.mark.parametrize("bad", ["../x", "/etc/x", "link/x", "a/../../x"])
def test_store_small_never_writes_outside(jail: Jail, home: Path, outside: Path, bad: str) -> None:
    os.symlink(outside / "sub", home / "link")
    before = snapshot(outside)
    with pytest.raises(PathRefused):
        jail.store_small(bad, b"planted", mode=0o644, mtime=0.0)
    assert snapshot(outside) == before


def test_store_small_replaces_a_symlink_not_its_target(jail: Jail, home: Path, outside: Path) -> None:
    os.symlink(outside / "secret.txt", home / "s")
    assert jail.store_small("s", b"mine", mode=0o644, mtime=0.0) == 0
    assert (outside / "secret.txt").read_bytes() == SECRET
    assert not os.path.islink(home / "s") and (home / "s").read_bytes() == b"mine"
