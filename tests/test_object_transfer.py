"""Downloads and uploads on the object backend (ferry.server.objectsvc.transfer): what is its own.

The transfer behaviour both backends share runs over both (``pytest.mark.backends`` in the transfer
tests, the conformance matrix); here: the chunked store underneath (parameters other than the
store's, resume through another server, damaged chunks, quota across the store).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.cell(backend="object"), pytest.mark.timeout(90)]

MiB = 1 << 20


@pytest.mark.parametrize(
    "size",
    [0, 5, 300_000, 4 * MiB, 9 * MiB + 123],
    ids=["empty", "tiny", "small", "one-chunk", "three-chunks"],
)
def test_roundtrip_with_the_stores_and_other_parameters(client: Any, tmp_path: Path, size: int) -> None:
    """The store's parameters (BLAKE3, 4 MiB: the stored hashes are the transfer's) and others (md5,
    64 KiB: hashed while streaming) give the same bytes and the digest each side computes."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(size))
    c = client
    r = c.put(src, "f")
    g = c.get("f", tmp_path / "back")
    assert g.digest == r.digest and (tmp_path / "back").read_bytes() == src.read_bytes()
    g = c.get("f", tmp_path / "md5", hash="md5", chunk_size=1 << 16)
    assert (tmp_path / "md5").read_bytes() == src.read_bytes()
    r = c.put(src, "g", hash="md5", chunk_size=1 << 16)
    g = c.get("g", tmp_path / "g", hash="md5", chunk_size=1 << 16)
    assert g.digest == r.digest and (tmp_path / "g").read_bytes() == src.read_bytes()
    assert c.stat("g").size == c.stat("f").size == size
