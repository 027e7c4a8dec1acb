"""A token bucket for ``--bwlimit``: how long to wait so that bytes stay under a rate."""

from __future__ import annotations

import time
from collections.abc import Callable

from ferry.errors import UsageError


class RateLimiter:
    """``rate`` bytes a second on average, in bursts of at most ``burst`` bytes (default: 1/8 s worth,
    at least 64 KiB, so a limited transfer still moves in large writes)."""

    def __init__(self, rate: int, burst: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("a rate limit must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(rate // 8, 1 << 16)
        self._clock = clock
        self._tokens = float(self.burst)
        self._t = clock()

    def take(self, n: int) -> float:
        """Count ``n`` bytes; return the seconds to wait before the next ones (0: go on)."""
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._t) * self.rate) - n
        self._t = now
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


def parse_rate(text: str | None) -> int | None:
    """``--bwlimit`` values: bytes per second with an optional K, M or G suffix (binary: ``10M`` is
    10 MiB/s); ``0`` or nothing means no limit."""
    if text is None:
        return None
    t = text.strip().upper().removesuffix("/S").removesuffix("B")
    factor = 1
    for suffix, f in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if t.endswith(suffix):
            t, factor = t[:-1], f
            break
    try:
        value = float(t)
    except ValueError:
        raise UsageError(f"--bwlimit {text!r}: write a rate like 500K, 10M or 1.5G (bytes per second)") from None
    if value < 0 or value != value or value == float("inf"):
        raise UsageError(f"--bwlimit {text!r}: a rate must be a positive number")
    return int(value * factor) or None
