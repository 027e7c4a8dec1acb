"""Recently verified passwords, so that one account's repeated logins do not each pay argon2.

Every ``ferry`` command is a new connection and a new login. argon2id costs ~25 ms of server CPU
by design (that is what makes a stolen password database slow to crack); paid once per login, it
caps a 2-core server at ~70 password logins per second and makes a script that runs ``ferry ls``
in a loop spend most of the server's time on hashing. After a password has been verified with
argon2, this cache remembers a keyed MAC of it for a short time (default 10 minutes), and a login
with the same password for the same account within that time is checked against the MAC instead.

What this does not weaken:

* wrong passwords, and every password of an account without a fresh entry, still go through
  argon2 (and the login queue, and the failed-login slowdown): guessing costs what it did;
* a hit needs the right password, so its shorter answer time tells the client only what the
  ``AuthOk`` that follows tells it anyway; unknown users and wrong passwords cost the same as
  before (one cheap account lookup each, then argon2);
* an entry is tied to the account's password generation (``User.pw_gen``): a password change
  makes it useless at once, and a disabled or deleted account is refused before it is consulted;
* the MAC key is random per server process and never leaves memory; the cache is bounded in size.

What it does change: for the lifetime of an entry, someone who can read the server's memory could
test guesses against the MAC at SHA-256 speed instead of argon2 speed. Such a reader already sees
passwords as they arrive; where memory snapshots (core dumps, swap) are a concern of their own,
run the server with ``--password-cache 0``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

from ferry.server.accounts import User

__all__ = ["VerifiedPasswords"]


class VerifiedPasswords:
    """A bounded, expiring map of account -> MAC of the password verified last (see the module)."""

    def __init__(
        self, ttl: float, *, max_entries: int = 4096, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl  #: seconds an entry is trusted after its argon2 check; 0 disables the cache
        self._max = max_entries
        self._clock = clock
        self._key = secrets.token_bytes(32)
        #: user name -> (password generation, MAC of the password, expiry on ``clock``)
        self._entries: OrderedDict[str, tuple[int, bytes, float]] = OrderedDict()
        self.hits = 0  #: logins answered from the cache (for tests and the log of limits)

    @property
    def enabled(self) -> bool:
        """Whether verified passwords are reused at all (``ttl`` > 0)."""
        return self.ttl > 0

    def mac(self, name: str, password: str) -> bytes:
        """The keyed MAC of ``password`` for the account ``name`` (what an entry holds)."""
        # The name is in the MAC so an entry cannot be replayed under another account.
        data = name.encode("utf-8") + b"\0" + password.encode("utf-8", "surrogatepass")
        return hmac.new(self._key, data, hashlib.sha256).digest()

    def matches(self, user: User, password: str) -> bool:
        """True when ``password`` is the one verified for ``user`` (same password generation)
        within the last ``ttl`` seconds. The caller has already refused disabled accounts."""
        entry = self._entries.get(user.name)
        if entry is None:
            return False
        gen, mac, expires = entry
        if gen != user.pw_gen or self._clock() >= expires:
            del self._entries[user.name]
            return False
        if not hmac.compare_digest(mac, self.mac(user.name, password)):
            return False
        self.hits += 1
        return True

    def remember(self, user: User, password: str) -> None:
        """Record that argon2 just accepted ``password`` for ``user``."""
        if self.ttl <= 0:
            return
        self._entries[user.name] = (user.pw_gen, self.mac(user.name, password), self._clock() + self.ttl)
        self._entries.move_to_end(user.name)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)
