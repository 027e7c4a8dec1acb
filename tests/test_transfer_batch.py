"""Batched small-file transfers (ferry.client.batch) inside tree get/put, over real sockets."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from ferry.client import batch
from ferry.errors import IntegrityError
from ferry.hashing import ChunkHasher
from transfer_support import connect, home, running_server


def make_tree(root: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for i in range(300):
        files[f"d{i % 7}/sub{i % 3}/f{i}.bin"] = os.urandom(i * 13 % 5000)
    files["empty"] = b""
    files["big/one.bin"] = os.urandom(3 * 1024 * 1024 + 5)  # streamed, not batched
    files["big/two.bin"] = os.urandom(batch.BATCH_MAX + 1)
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


@pytest.mark.timeout(60)
@pytest.mark.parametrize("plain", [False, True], ids=["tls", "plain"])
def test_tree_round_trip_with_small_empty_and_large_files(tmp_path: Path, plain: bool) -> None:
    files = make_tree(tmp_path / "src")
    with running_server(tmp_path / "root", plain=plain) as srv:

        async def main() -> None:
            async with await connect(srv, tmp_path) as c:
                up = await c.put_tree(tmp_path / "src", "tree")
                assert up.files == len(files)
                down = await c.get_tree("tree", tmp_path / "dst")
                assert down.files == len(files)

        asyncio.run(main())
        for rel, data in files.items():
            assert (home(srv) / "tree" / rel).read_bytes() == data, rel
            assert (tmp_path / "dst" / rel).read_bytes() == data, rel
        leftovers = [p for p in (tmp_path / "dst").rglob("*") if "ferry-part" in p.name]
        assert leftovers == []


@pytest.mark.timeout(60)
def test_a_file_that_grew_since_the_listing_is_handed_back_to_the_streaming_path(tmp_path: Path) -> None:
    with running_server(tmp_path / "root") as srv:
        (home(srv) / "small").write_bytes(b"s" * 100)
        (home(srv) / "grown").write_bytes(os.urandom(2 * 1024 * 1024))
        out = tmp_path / "out"
        out.mkdir()

        async def main() -> list[tuple[str, Path]]:
            async with await connect(srv, tmp_path) as c:
                rest = await batch.get_small_files(c, [("small", out / "small"), ("grown", out / "grown")])
                assert await c.ping() < 5  # the connection is still in a clean state
                return rest

        rest = asyncio.run(main())
        assert rest == [("grown", out / "grown")]
        assert (out / "small").read_bytes() == b"s" * 100
        assert not (out / "grown").exists()


@pytest.mark.timeout(60)
def test_a_wrong_hash_in_the_batch_path_is_detected_and_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Lying(ChunkHasher):
        def finish(self) -> tuple[list[bytes], bytes]:
            hashes, digest = super().finish()
            return hashes, bytes([digest[0] ^ 1]) + digest[1:]

    with running_server(tmp_path / "root") as srv:
        (home(srv) / "f").write_bytes(b"payload")
        monkeypatch.setattr("ferry.server.transfer.ChunkHasher", Lying)
        out = tmp_path / "out"
        out.mkdir()

        async def main() -> None:
            async with await connect(srv, tmp_path) as c:
                with pytest.raises(IntegrityError):
                    await batch.get_small_files(c, [("f", out / "f")])

        asyncio.run(main())
        assert list(out.iterdir()) == []
