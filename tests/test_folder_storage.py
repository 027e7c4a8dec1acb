"""The folder backend behind the storage interface (ferry.server.folder.FolderStorage), on a real
folder, with the server's real thread pools; and the rule that request services reach files only
through the storage (never the jail itself)."""

from __future__ import annotations

import ast
import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

import ferry.server
from ferry.errors import FerryError
from ferry.server import work
from ferry.server.folder import FolderStorage

T = TypeVar("T")


def run(home: Path, body: Callable[[FolderStorage], Awaitable[T]], user: str = "ann") -> T:
    """Run ``body`` against a FolderStorage on ``home`` inside a session's work context."""

    async def main() -> T:
        pools = work.WorkPools(file_threads=2, file_threads_per_user=2, walk_threads=2, walk_threads_per_user=2)
        session_work = work.SessionWork(pools, 2)
        session_work.owner = user
        work.current.set(session_work)
        storage = FolderStorage(home, user, max_depth=64)
        try:
            return await body(storage)
        finally:
            await storage.close()
            pools.shutdown()

    return asyncio.run(main())


def code(exc: pytest.ExceptionInfo[FerryError]) -> str:
    return str(getattr(exc.value, "code", ""))


def test_namespace_operations_through_the_interface(tmp_path: Path) -> None:
    home = tmp_path / "home" / "ann"  # created at open, 0700

    async def body(st: FolderStorage) -> None:
        assert (os.stat(home).st_mode & 0o777) == 0o700
        root = await st.stat("ann", ())
        assert (root.name, root.kind) == ("", "dir")
        await st.mkdir("ann", ("a", "b", "c"), parents=True, mode=0o750)
        assert (home / "a" / "b" / "c").is_dir()
        await st.mkdir("ann", ("a",), exist_ok=True)
        with pytest.raises(FerryError) as exc:
            await st.mkdir("ann", ("a",))
        assert code(exc) == "exists"
        with pytest.raises(FerryError) as exc:
            await st.mkdir("ann", ("x", "y"))  # no parents
        assert code(exc) == "not-found"

        assert await st.store_small("ann", ("a", "f"), b"hello", mode=0o640, mtime=1000.0, overwrite=True, quota=None) == 0
        f = await st.stat("ann", ("a", "f"))
        assert (f.name, f.kind, f.size, f.mtime, f.mode) == ("f", "file", 5, 1000.0, 0o640)
        assert await st.store_small("ann", ("a", "f"), b"hi", mode=0o600, mtime=2.0, overwrite=True, quota=None) == 5
        with pytest.raises(FerryError) as exc:
            await st.store_small("ann", ("a", "f"), b"x", mode=0o600, mtime=2.0, overwrite=False, quota=None)
        assert code(exc) == "exists"
        assert (home / "a" / "f").read_bytes() == b"hi"

        await st.set_attrs("ann", ("a", "f"), mtime=12345.5, mode=0o604)
        f = await st.stat("ann", ("a", "f"))
        assert (f.mtime, f.mode) == (12345.5, 0o604)

        os.symlink("../elsewhere", home / "a" / "link")
        link = await st.stat("ann", ("a", "link"))
        assert (link.kind, link.target) == ("link", "../elsewhere")  # described, never followed

        await st.rename("ann", ("a", "f"), ("a", "g"))
        assert not (home / "a" / "f").exists() and (home / "a" / "g").read_bytes() == b"hi"
        (home / "a" / "h").write_bytes(b"other")
        with pytest.raises(FerryError) as exc:
            await st.rename("ann", ("a", "g"), ("a", "h"), overwrite=False)
        assert code(exc) == "exists"
        assert (home / "a" / "h").read_bytes() == b"other"

        with pytest.raises(FerryError) as exc:
            await st.remove("ann", ("a",))  # not empty
        assert code(exc) == "not-empty"
        await st.remove("ann", ("a", "g"))
        await st.remove("ann", ("a",), recursive=True)
        assert list(home.iterdir()) == []
        with pytest.raises(FerryError) as exc:
            await st.stat("ann", ("a",))
        assert code(exc) == "not-found"

    run(home, body)


def test_list_dir_pages_in_name_order_without_partial_uploads(tmp_path: Path) -> None:
    home = tmp_path / "ann"
    (home / "d").mkdir(parents=True)
    names = [f"n{i:03d}" for i in range(25)]
    for name in reversed(names):
        (home / "d" / name).write_bytes(b"x" * len(name))
    (home / "d" / ".n000.ferry-part-tok").write_bytes(b"partial")  # the server's own: never listed

    async def body(st: FolderStorage) -> list[str]:
        seen: list[str] = []
        after = ""
        for _ in range(10):  # bounded: 25 entries in pages of 10
            page = await st.list_dir("ann", ("d",), after=after, limit=10)
            if not page:
                break
            assert len(page) <= 10
            seen += [n.name for n in page]
            after = page[-1].name
        return seen

    assert run(home, body) == names


def test_another_account_is_refused_and_close_releases_the_home(tmp_path: Path) -> None:
    home = tmp_path / "ann"

    async def body(st: FolderStorage) -> None:
        with pytest.raises(ValueError, match="'bob'"):
            await st.stat("bob", ())
        await st.close()
        with pytest.raises(ValueError, match="closed"):
            st.node("")  # the home's descriptor is closed: nothing can reach the folder any more

    run(home, body)


def test_request_services_reach_files_only_through_the_storage() -> None:
    """No service module imports the jail's Jail class or the session module (the storage and the
    ServiceHost are what they stand on)."""
    services = ["files", "transfer", "tree", "sync", "delta", "exec", "service"]
    base = Path(ferry.server.__file__).parent
    for name in services:
        tree = ast.parse((base / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported = {a.name for a in node.names}
                assert node.module != "ferry.server.session", f"{name} imports the session"
                assert not (node.module == "ferry.server.jail" and "Jail" in imported), f"{name} imports Jail"
            if isinstance(node, ast.Import):
                assert all(a.name != "ferry.server.session" for a in node.names), f"{name} imports the session"
