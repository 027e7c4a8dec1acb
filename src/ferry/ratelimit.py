"""A token bucket for ``--bwlimit``: how long to wait so that bytes stay under a rate."""

from __future__ import annotations

import time
from collections.abc import Callable


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
