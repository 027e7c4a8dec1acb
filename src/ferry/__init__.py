"""ferry: fast, verified file transfer and remote commands over plain sockets.

The Python API::

    import ferry

    with ferry.connect("ann@files.example.org", password=pw) as c:   # blocking client
        c.put("report.pdf", "inbox/report.pdf")

    async with await ferry.AsyncClient.connect("files.example.org", user="ann", password=pw) as c:
        await c.get("inbox/report.pdf", ".")

``connect``, ``Client`` and ``AsyncClient`` are loaded on first use (module ``__getattr__``), so
``import ferry`` stays cheap: the command line imports this package on every start.
"""

from __future__ import annotations

# Not typing's TYPE_CHECKING: importing typing costs ~8 ms, and every command imports this
# package first (mypy treats a name TYPE_CHECKING the same).
TYPE_CHECKING = False

__version__ = "0.1.0"

__all__ = ["AsyncClient", "Client", "__version__", "connect"]

if TYPE_CHECKING:
    from typing import Any

    from ferry.client.aclient import AsyncClient
    from ferry.client.blocking import Client, connect

# name -> module that defines it; imported on first attribute access.
_LAZY = {
    "connect": "ferry.client.blocking",
    "Client": "ferry.client.blocking",
    "AsyncClient": "ferry.client.aclient",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ferry' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
