"""File operations end to end over real loopback sockets (TLS and plain)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.client.aclient import AsyncClient
from ferry.client.known_hosts import KnownHosts
from ferry.errors import AlreadyExists, AuthError, DiskFull, NotFound, PathRefused
from ferry_server import PASSWORD, ServerThread


@pytest.fixture(params=["tls", "plain"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerThread]:
    srv = ServerThread(tmp_path / "root", plain=request.param == "plain")
    srv.add_user("alice")
    srv.start()
    yield srv
    srv.stop()


def connect(srv: ServerThread, tmp_path: Path, user: str = "alice", password: str = PASSWORD) -> AsyncClient:
    return AsyncClient.connect(  # type: ignore[return-value]
        "127.0.0.1",
        srv.port,
        user=user,
        password=password,
        plain=srv.config.plain,
        known_hosts=KnownHosts(tmp_path / "known_hosts"),
    )


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_put_get_roundtrip_small_and_large(server: ServerThread, tmp_path: Path) -> None:
    small = tmp_path / "small.txt"
    small.write_bytes(b"hello ferry\n")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(9 * 1024 * 1024 + 123))

    async def main() -> None:
        async with await connect(server, tmp_path) as c:
            await c.put(small, "small.txt")
            r = await c.put(big, "big.bin")
            assert r.size == big.stat().st_size
            out = tmp_path / "out"
            out.mkdir()
            await c.get("small.txt", out / "small.txt")
            g = await c.get("big.bin", out)
            assert g.digest == r.digest
            assert (out / "small.txt").read_bytes() == small.read_bytes()
            assert (out / "big.bin").read_bytes() == big.read_bytes()
            names = {e.name: e for e in await c.listdir("")}
            assert names["big.bin"].size == big.stat().st_size
            assert names["big.bin"].kind == "file"
            assert not any(".ferry-part" in n for n in names)
            assert not list(out.glob(".*ferry-part*"))

    run(main())
    home = server.root / "homes" / "alice"
    assert (home / "big.bin").read_bytes() == big.read_bytes()


@pytest.mark.timeout(60)
def test_mkdir_ls_stat_mv_rm_df(server: ServerThread, tmp_path: Path) -> None:
    async def main() -> None:
        async with await connect(server, tmp_path) as c:
            await c.mkdir("a/b/c", parents=True)
            with pytest.raises(AlreadyExists):
                await c.mkdir("a")
            f = tmp_path / "f"
            f.write_bytes(b"x" * 1000)
            await c.put(f, "a/b/c/f")
            assert (await c.stat("a/b/c/f")).size == 1000
            await c.rename("a/b/c/f", "a/g")
            with pytest.raises(NotFound):
                await c.stat("a/b/c/f")
            tree = [e.name for e in await c.listdir("a", recursive=True)]
            assert tree == ["b", "g", "b/c"] or set(tree) == {"b", "g", "b/c"}
            usage = await c.df()
            assert usage.used >= 1000 and usage.quota is None and usage.free > 0
            await c.remove("a", recursive=True)
            assert await c.listdir("") == []

    run(main())


@pytest.mark.timeout(60)
def test_jail_escapes_are_refused_over_the_wire(server: ServerThread, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("top secret")
    home = server.root / "homes" / "alice"
    os.symlink(outside, home / "link")
    os.symlink(outside / "secret", home / "filelink")

    async def main() -> None:
        async with await connect(server, tmp_path) as c:
            for bad in ["../x", "/etc/passwd", "link/secret", "filelink", "a/../../x"]:
                with pytest.raises(PathRefused):
                    await c.get(bad, tmp_path / "got")
            with pytest.raises(PathRefused):
                await c.put(outside / "secret", "link/planted")
            assert not (outside / "planted").exists()
            # the session survives refusals
            assert await c.ping() < 5

    run(main())


@pytest.mark.timeout(60)
def test_wrong_password_and_unknown_user(server: ServerThread, tmp_path: Path) -> None:
    with pytest.raises(AuthError):
        run(connect(server, tmp_path, password="nope"))
    with pytest.raises(AuthError):
        run(connect(server, tmp_path, user="mallory"))


@pytest.mark.timeout(60)
def test_quota_is_enforced_and_nothing_is_left(tmp_path: Path) -> None:
    srv = ServerThread(tmp_path / "root")
    srv.add_user("bob", quota=5 * 1024 * 1024)
    srv.start()
    try:
        f = tmp_path / "big"
        f.write_bytes(os.urandom(6 * 1024 * 1024))
        small = tmp_path / "small"
        small.write_bytes(b"ok")

        async def main() -> None:
            async with await connect(srv, tmp_path, user="bob") as c:
                with pytest.raises(DiskFull, match="quota"):
                    await c.put(f, "big")
                await c.put(small, "small")  # still serving
                assert [e.name for e in await c.listdir("")] == ["small"]

        run(main())
        assert sorted(os.listdir(srv.root / "homes" / "bob")) == ["small"]
    finally:
        srv.stop()
