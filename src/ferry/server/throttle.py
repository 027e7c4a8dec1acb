"""The failed-login slowdown: growing, bounded delays per source address and per user name.

Policy (numbers in :class:`ThrottlePolicy`, documented in docs/security.md):

* Every failed password or token attempt counts against its source **address** and the **user
  name** it tried. Failed key offers do not count: a client offering several keys is normal, and
  a key cannot be guessed.
* A few failures are free (typos). After that, each new attempt from that address waits its turn:
  attempts from one address are spaced by a delay that doubles with each further failure, up to
  a bound. Waiting happens *before* the credential is checked, so opening many connections at
  once does not help an attacker: they all queue behind the same address's schedule, and an
  attempt whose turn is further away than the bound is refused at once (``busy``, with the
  seconds to wait) instead of holding a connection.
* Password attempts for a user name under attack are paced the same way, **except** from
  addresses that logged in as that user successfully before: the real user connecting from a
  known place is not slowed by a storm against their name from elsewhere, and from a new place
  is slowed by at most the (bounded) per-user delay, never locked out. Key and token logins are
  never paced per user name, since they cannot be guessed.
* Counts are forgotten after a quiet period, and the tables are bounded (the oldest entries are
  dropped), so a flood of made-up names or addresses cannot grow the server's memory.

Nothing here touches the network or the database; the clock is injectable for tests.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Throttle", "ThrottlePolicy"]


@dataclass(frozen=True)
class ThrottlePolicy:
    """The numbers of the slowdown (defaults are what ``ferry serve`` uses)."""

    free_per_address: int = 5  #: failures from one address before its attempts are spaced
    free_per_user: int = 10  #: failures against one user name before its password attempts are spaced
    base: float = 0.5  #: the first spacing, in seconds; doubles with each further failure
    max_address_delay: float = 30.0  #: bound of the spacing per address
    max_user_delay: float = 5.0  #: bound of the spacing per user name (the real user may be waiting)
    forget_after: float = 900.0  #: seconds without a failure after which a count starts again
    max_entries: int = 65536  #: addresses, names and known-good pairs kept (oldest dropped first)


class _Counter:
    """Failures of one address or user name, and when its next attempt may run."""

    __slots__ = ("failures", "last", "next_at")

    def __init__(self) -> None:
        self.failures = 0
        self.last = 0.0
        self.next_at = 0.0


class Throttle:
    """Failure counts and attempt schedules per address and per user name (one per server)."""

    def __init__(self, policy: ThrottlePolicy | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy or ThrottlePolicy()
        self._clock = clock
        self._addresses: OrderedDict[str, _Counter] = OrderedDict()
        self._users: OrderedDict[str, _Counter] = OrderedDict()
        self._good: OrderedDict[tuple[str, str], None] = OrderedDict()

    def _counter(self, table: OrderedDict[str, _Counter], key: str, now: float) -> _Counter | None:
        entry = table.get(key)
        if entry is not None and now - entry.last > self.policy.forget_after and now >= entry.next_at:
            del table[key]
            return None
        return entry

    def _spacing(self, entry: _Counter | None, free: int, bound: float) -> float:
        if entry is None or entry.failures < free:
            return 0.0
        return min(bound, self.policy.base * 2.0 ** (entry.failures - free))

    def reserve(self, address: str, user: str, *, password: bool) -> float | None:
        """Take the next attempt slot of ``address`` (and of ``user`` for a password from an
        address not known for it); returns the seconds to wait before checking the attempt, or
        None when the address's next turn is further away than the bound (refuse it now)."""
        now = self._clock()
        p = self.policy
        wait = 0.0
        entry = self._counter(self._addresses, address, now)
        spacing = self._spacing(entry, p.free_per_address, p.max_address_delay)
        if entry is not None and spacing > 0:
            start = max(now, entry.next_at)
            if start - now > p.max_address_delay:
                return None
            entry.next_at = start + spacing
            wait = start - now
        if password and (user, address) not in self._good:
            uentry = self._counter(self._users, user, now)
            uspacing = self._spacing(uentry, p.free_per_user, p.max_user_delay)
            if uentry is not None and uspacing > 0:
                # Bounded on purpose: a real user from a new address waits at most this long.
                start = min(max(now, uentry.next_at), now + p.max_user_delay)
                uentry.next_at = start + uspacing
                wait = max(wait, start - now)
        return wait

    def failed(self, address: str, user: str) -> float:
        """Count a failed password or token attempt; returns the spacing now imposed on ``address``."""
        now = self._clock()
        for table, key in ((self._addresses, address), (self._users, user)):
            entry = self._counter(table, key, now)
            if entry is None:
                entry = table[key] = _Counter()
            table.move_to_end(key)
            entry.failures += 1
            entry.last = now
            while len(table) > self.policy.max_entries:
                table.popitem(last=False)
        return self._spacing(self._addresses.get(address), self.policy.free_per_address, self.policy.max_address_delay)

    def succeeded(self, address: str, user: str) -> None:
        """Remember that ``address`` logged in as ``user``: its password attempts for that name are
        not paced by failures against the name from elsewhere. Counts are not reset: an attacker
        with an account of their own must not clear their address's record by logging in."""
        key = (user, address)
        self._good[key] = None
        self._good.move_to_end(key)
        while len(self._good) > self.policy.max_entries:
            self._good.popitem(last=False)

    def retry_after(self, address: str) -> float:
        """Seconds until ``address`` may try again (0 when it may now)."""
        entry = self._addresses.get(address)
        return 0.0 if entry is None else max(0.0, entry.next_at - self._clock())

    def failures(self, address: str) -> int:
        """Recent failures counted against ``address`` (for logs and tests)."""
        entry = self._counter(self._addresses, address, self._clock())
        return 0 if entry is None else entry.failures
