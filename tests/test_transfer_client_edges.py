"""Client-side edge cases found in review: what a refused download leaves behind, what a put of several
files to an existing remote file does, and how a server that never answers the handshake or a ping is reported.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.errors import IsADirectory, NotFound
from ferry_server import ServerThread
from transfer_support import connect, home, running_server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    with running_server(tmp_path / "root", plain=True) as srv:
        yield srv


def test_refused_download_leaves_no_partial(server: ServerThread, tmp_path: Path) -> None:
    (home(server) / "folder").mkdir()
    out = tmp_path / "out"
    out.mkdir()

    async def main() -> None:
        c = await connect(server, tmp_path)
        try:
            with pytest.raises(NotFound):
                await c.get("no-such-file", out / "x")
            with pytest.raises(IsADirectory):
                await c.get("folder", out / "folder")
        finally:
            await c.close()

    asyncio.run(main())
    assert os.listdir(out) == []
