"""Interactive terminal sessions over ferry: a real PTY on the server, raw mode locally."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ferry.client.aclient import AsyncClient


async def run_pty_session(
    client: AsyncClient, command: str | None = None, env: dict[str, str] | None = None, cwd: str = ""
) -> int:
    """Run ``command`` (None: an interactive shell) under a PTY on the server, wired to this terminal.

    Returns the exit status (128+N when a signal N killed the command).
    """
    raise NotImplementedError("work in progress (issue 4)")
