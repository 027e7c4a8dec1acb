"""``ferry.writeback.start_writeback``: the early-writeback advice given while a large file arrives.

Its effect (the final fsync waits less) is a speed and is measured in bench/transfer.py --disk, not
here; these check that it reaches the kernel on a real file, refuses what is not one without
raising, and leaves the data alone. Downloads and uploads through it are covered by the transfer
tests over loopback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from ferry.writeback import start_writeback

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")


@linux_only
def test_a_regular_file_is_accepted_and_unchanged(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, data, 0)
        assert start_writeback(fd, 0, len(data)) is True
        assert start_writeback(fd, 1 << 20, 1 << 20) is True  # a range in the middle
        os.fsync(fd)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == data


def test_a_pipe_a_closed_fd_and_an_empty_range_are_refused_quietly(tmp_path: Path) -> None:
    r, w = os.pipe()
    try:
        os.write(w, b"abc")
        assert start_writeback(w, 0, 3) is False  # ESPIPE
    finally:
        os.close(r)
        os.close(w)
    assert start_writeback(w, 0, 3) is False  # EBADF: closed just above
    fd = os.open(tmp_path / "e", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        assert start_writeback(fd, 0, 0) is False
    finally:
        os.close(fd)
