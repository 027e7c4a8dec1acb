"""Checking one login attempt: password, key or token (the session calls :meth:`Authenticator.attempt`
once per attempt; admission, queues and deadlines around that call belong to the session and app).

Equal cost whatever the answer, so timing does not tell which user names or keys exist:

* passwords: an unknown user costs the same argon2 check as a wrong password (a dummy hash,
  :meth:`ferry.server.accounts.Accounts.verify`);
* keys: every signed offer's signature is verified against the key *it* carries before the
  account is looked up, so the work depends only on what the client sent, not on what is stored;
* tokens: the hash is compared against a dummy when the token id is unknown.

Failures are logged (one line each, with the slowdown they caused; the log's formatter escapes
the remote user name) and slowed per source
address and user name by :class:`ferry.server.throttle.Throttle`. Key and token checks are cheap
(well under a millisecond) and do not wait in the login queue that password checks go through.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from ferry.errors import AuthError
from ferry.server.accounts import Accounts, User
from ferry.server.credentials import Credentials
from ferry.server.pwcache import VerifiedPasswords
from ferry.server.throttle import Throttle
from ferry.wire import RemoteProtocolError
from ferry.wire import messages as m
from ferry.wire.auth import key_transcript, read_ssh_string

__all__ = ["AuthAttempt", "Authenticator", "Login", "LoginThrottled", "PasswordCheck"]

AuthAttempt = m.Auth | m.AuthKey | m.AuthToken
#: How a password check is run: ``check(gone, verify, user, password)`` (the login queue's ``check``).
PasswordCheck = Callable[..., Awaitable[User]]

_PASSWORD_FAILED: Final = "wrong user name or password"
_KEY_FAILED: Final = "none of the offered keys is accepted for this user"
_TOKEN_FAILED: Final = "invalid, expired or revoked token"


class LoginThrottled(AuthError):
    """Too many failed logins from this address: the attempt is refused without being checked."""


@dataclass(frozen=True)
class Login:
    """A successful login: who, how, and with which credential.

    ``credential`` is the key fingerprint (``key``), the token id (``token``) or ``""``
    (``password``; the password generation is ``user.pw_gen``). ``expires`` is a token's expiry
    (Unix time) and ``read_only`` whether the token may only read.
    """

    user: User
    method: str
    credential: str = ""
    read_only: bool = False
    expires: int | None = None


class Authenticator:
    """Checks login attempts against the accounts of one server (shared by all sessions)."""

    def __init__(
        self,
        accounts: Accounts,
        *,
        log: logging.Logger,
        fingerprint: str | None,
        password_check: PasswordCheck,
        fail_delay: float = 0.3,
        throttle: Throttle | None = None,
        verified: VerifiedPasswords | None = None,
    ) -> None:
        self.accounts = accounts
        self.credentials = Credentials(accounts)
        self.log = log
        #: the ``SHA256:...`` of the server's certificate, "" without TLS: part of what keys sign
        self.fingerprint = fingerprint or ""
        #: runs the argon2 check (the server's login queue: ferry.server.login_queue.LoginQueue.check)
        self.password_check = password_check
        self.fail_delay = fail_delay
        self.throttle = throttle if throttle is not None else Throttle()
        #: passwords argon2 accepted a short while ago (ferry.server.pwcache); used on the loop thread only
        self.verified = verified if verified is not None else VerifiedPasswords(0)
        #: password checks running now, by (name, MAC of the password): see _verify_once
        self._checking: dict[tuple[str, bytes], asyncio.Future[User]] = {}

    async def attempt(
        self,
        msg: AuthAttempt,
        *,
        address: str,
        peer: str,
        version: int,
        server_nonce: bytes,
        gone: asyncio.Future[None],
    ) -> Login | m.AuthKeyOk:
        """Check one attempt from ``address`` (the client's IP; ``peer`` is what the log shows).

        ``gone`` is the connection's "closed" future: a password check is not started for a client
        that left (see the login queue).

        Returns the :class:`Login`, or for a key query the :class:`~ferry.wire.messages.AuthKeyOk`
        to send. Raises :class:`~ferry.errors.AuthError` (:class:`LoginThrottled` when refused
        unchecked) and RemoteProtocolError for key or token login on a version-1 connection.
        """
        if not isinstance(msg, m.Auth) and version < m.KEY_LOGIN_VERSION:
            raise RemoteProtocolError(f"{type(msg).__name__} needs protocol version {m.KEY_LOGIN_VERSION}")
        method = "password" if isinstance(msg, m.Auth) else "key" if isinstance(msg, m.AuthKey) else "token"
        name = msg.user
        wait = self.throttle.reserve(address, name, password=method == "password")
        if wait is None:
            retry = self.throttle.retry_after(address)
            self.log.warning(
                "auth refused (too many failures) method=%s user=%s peer=%s retry_after=%.0f",
                method, name, peer, retry,
            )  # fmt: skip
            raise LoginThrottled(
                f"too many failed logins from {address}; try again in {max(1, round(retry))} s"
            )
        if wait > 0:
            await asyncio.sleep(wait)
        loop = asyncio.get_running_loop()
        result: Login | m.AuthKeyOk | None
        if isinstance(msg, m.Auth):
            result = await self._check_password(msg, gone)
        elif isinstance(msg, m.AuthKey):
            result = await loop.run_in_executor(None, self._check_keys, msg, version, server_nonce)
        else:
            result = await loop.run_in_executor(None, self._check_token, msg)
        if result is None:
            await self._failed(method, name, address, peer)
        if isinstance(result, Login):
            self.throttle.succeeded(address, result.user.name)
        assert result is not None
        return result

    async def _check_password(self, msg: m.Auth, gone: asyncio.Future[None]) -> Login | None:
        """A password login: from the cache of recently verified passwords, else through argon2."""
        # The lookup is done for every name, known or not, so a miss costs the same either way.
        loop = asyncio.get_running_loop()
        user = await loop.run_in_executor(None, self.accounts.get, msg.user)
        if user is not None and not user.disabled and self.verified.matches(user, msg.password):
            return Login(user, "password")
        try:
            user = await self._verify_once(msg.user, msg.password, gone)
        except AuthError:
            return None
        self.verified.remember(user, msg.password)
        return Login(user, "password")

    async def _verify_once(self, name: str, password: str, gone: asyncio.Future[None]) -> User:
        """argon2 through the login queue. With the cache on, logins that arrive together with the
        same name and password (a script's parallel commands, a burst of one account) share one
        check instead of each queuing their own: the answer can only be the same."""
        if not self.verified.enabled:
            # argon2 is deliberately slow: the login queue runs it in its own threads.
            return await self.password_check(gone, self.accounts.verify, name, password)
        key = (name, self.verified.mac(name, password))
        while (shared := self._checking.get(key)) is not None:
            try:
                return await asyncio.shield(shared)  # our own cancellation must not cancel theirs
            except ConnectionResetError:
                continue  # that client left before its check ran: check for ourselves
        shared = asyncio.get_running_loop().create_future()
        self._checking[key] = shared
        try:
            user = await self.password_check(gone, self.accounts.verify, name, password)
        except BaseException as exc:
            # A cancelled or departed leader tells its followers to check for themselves; a
            # refusal (queue full) or a wrong password is their answer too.
            err = exc if isinstance(exc, Exception) else ConnectionResetError("the login was cancelled")
            shared.set_exception(err)
            shared.exception()  # retrieved here: nobody may be following
            raise
        else:
            shared.set_result(user)
            return user
        finally:
            del self._checking[key]

    async def _failed(self, method: str, name: str, address: str, peer: str) -> None:
        counted = method != "key"  # see ferry.server.throttle: key offers cannot be guessed
        spacing = self.throttle.failed(address, name) if counted else 0.0
        self.log.warning(
            "auth failed method=%s user=%s peer=%s failures_from_address=%d next_attempt_delay=%.1f",
            method, name, peer, self.throttle.failures(address), spacing,
        )  # fmt: skip
        if method == "password":
            await asyncio.sleep(self.fail_delay)  # slows guessing over one connection
            raise AuthError(_PASSWORD_FAILED)
        raise AuthError(_KEY_FAILED if method == "key" else _TOKEN_FAILED)

    def _check_keys(self, msg: m.AuthKey, version: int, server_nonce: bytes) -> Login | m.AuthKeyOk | None:
        """Verify the offers (in a thread: RSA and ECDSA checks take up to a millisecond each)."""
        from ferry.sshkeys import KeyError_, PublicKey, parse_public_blob, verify

        keys: list[PublicKey | None] = []
        for offer in msg.offers:
            try:
                keys.append(parse_public_blob(offer.public_key))
            except KeyError_:
                keys.append(None)
        signed = any(offer.signature for offer in msg.offers)
        verified: set[int] = set()
        for i, (offer, key) in enumerate(zip(msg.offers, keys, strict=True)):
            if not offer.signature or key is None:
                continue
            try:
                algorithm = read_ssh_string(offer.signature, 0)[0].decode("ascii", "replace")
            except ValueError:
                continue
            data = key_transcript(
                version=version,
                server_nonce=server_nonce,
                client_nonce=msg.client_nonce,
                user=msg.user,
                server_fingerprint=self.fingerprint,
                public_key=key.blob,
                algorithm=algorithm,
            )
            if verify(key, data, offer.signature):
                verified.add(i)
        fingerprints = [k.fingerprint for k in keys if k is not None]
        user, found = self.credentials.login_keys(msg.user, fingerprints)
        if user is None or user.disabled:
            return None
        acceptable = [i for i, k in enumerate(keys) if k is not None and found.get(k.fingerprint) == k.blob]
        if not signed:
            return m.AuthKeyOk(accepted=acceptable) if acceptable else None
        for i in acceptable:
            if i in verified:
                fp = keys[i].fingerprint  # type: ignore[union-attr]
                return Login(user, "key", fp)
        return None

    def _check_token(self, msg: m.AuthToken) -> Login | None:
        found = self.credentials.login_token(msg.token)
        if found is None:
            return None
        user, record = found
        if user.disabled or (msg.user and msg.user != user.name):
            return None
        return Login(user, "token", record.id, record.read_only, record.expires)
