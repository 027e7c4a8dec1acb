"""ferry: fast, verified file transfer and remote commands over plain sockets."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
