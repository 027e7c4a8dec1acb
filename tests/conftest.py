"""Shared test helpers: only loopback, only free ports, only processes we started."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

FERRY = [sys.executable, "-m", "ferry"]


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind to 0). Prefer letting servers bind 0 themselves."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@pytest.fixture
def ferry_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for ferry subprocesses: a private FERRY_HOME so tests never touch ~/.config."""
    env = dict(os.environ)
    env["FERRY_HOME"] = str(tmp_path / "ferry-home")
    env["PYTHONUNBUFFERED"] = "1"
    yield env
