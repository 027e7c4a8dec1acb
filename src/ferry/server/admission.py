"""Who may hold a connection: counts of connections before and after login, per address and per user.

A connection is *pre-login* from the moment it is accepted (its TLS handshake included) until its
password is accepted. Pre-login connections cost the server a descriptor and some memory while
nobody has proved who they are, so they are capped twice: per client address (a small number: one
address cannot take the pool) and in total (the pre-login pool). Logged-in sessions have their own
caps, in total and per user, so that neither a flood of strangers nor one account's thousand idle
sessions can lock out everyone else.

This module only counts and decides; the listener (:mod:`ferry.server.listener`) asks it about each
accepted connection and the session tells it when a login succeeds. Every decision is immediate:
a refused client is told ``busy`` at once, never after waiting out its timeout.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

__all__ = ["Admission", "Counts", "Refused", "Ticket", "address_key"]

#: IPv6 clients are grouped by their /64: one host commonly has a whole /64 to pick addresses from.
IPV6_GROUP_PREFIX: Final = 64


class Refused(Exception):
    """A connection or login the server will not take now; ``str()`` is the message for the client.

    ``reason`` is a short fixed word for logs and counters (``per-address``, ``pre-login-pool``,
    ``sessions``, ``per-user``, ``login-queue``, ``descriptors``, ``shutdown``).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def address_key(peer: object) -> str:
    """The group a peer address counts in: the IPv4 address, or the /64 of an IPv6 address
    (IPv4-mapped IPv6 addresses count as the IPv4 address); anything else (Unix sockets) is
    ``"local"``."""
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return "local"
    try:
        ip = ipaddress.ip_address(peer[0].split("%", 1)[0])  # drop an IPv6 zone ("fe80::1%eth0")
    except ValueError:
        return "local"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_GROUP_PREFIX), strict=False))
    return str(ip)


@dataclass
class Counts:
    """What admission has seen since the server started (for the log, tests and benchmarks)."""

    accepted: int = 0  #: connections admitted to the pre-login pool
    logins: int = 0  #: logins that became sessions
    refused: Counter[str] = field(default_factory=Counter)  #: refusals by :attr:`Refused.reason`


class Ticket:
    """One admitted connection's place in the counts; :meth:`release` it when the connection ends."""

    def __init__(self, admission: Admission, key: str) -> None:
        self._admission = admission
        self.key = key  #: the address group (see :func:`address_key`)
        self.user: str | None = None  #: set once logged in
        self._released = False

    def login(self, user: str) -> None:
        """Turn this pre-login connection into a session of ``user``, or raise :class:`Refused`
        when the server or the user is at the session limit (the connection stays pre-login)."""
        self._admission._login(self, user)

    def release(self) -> None:
        """Give the place back (idempotent)."""
        if not self._released:
            self._released = True
            self._admission._release(self)


class Admission:
    """The counts and limits behind :class:`Ticket` (one per server; event-loop thread only).

    ``per_address`` and ``pre_login`` cap connections that have not logged in (per address group,
    and in total); ``sessions`` and ``per_user`` cap logged-in sessions.
    """

    def __init__(self, *, per_address: int, pre_login: int, sessions: int, per_user: int) -> None:
        self.per_address = per_address
        self.pre_login = pre_login
        self.sessions = sessions
        self.per_user = per_user
        self._pre_by_key: Counter[str] = Counter()
        self._pre_total = 0
        self._by_user: Counter[str] = Counter()
        self._sessions_total = 0
        self.counts = Counts()

    @property
    def pre_login_open(self) -> int:
        """Connections admitted that have not logged in yet."""
        return self._pre_total

    @property
    def sessions_open(self) -> int:
        """Logged-in sessions."""
        return self._sessions_total

    def sessions_of(self, user: str) -> int:
        """Logged-in sessions of ``user``."""
        return self._by_user[user]

    def refuse(self, reason: str, message: str) -> Refused:
        """Count a refusal decided elsewhere (e.g. out of descriptors) and return it to raise."""
        self.counts.refused[reason] += 1
        return Refused(reason, message)

    def enter(self, key: str) -> Ticket:
        """Admit a new connection from address group ``key`` to the pre-login pool, or raise
        :class:`Refused`."""
        if self._pre_by_key[key] >= self.per_address:
            raise self.refuse(
                "per-address",
                f"too many connections from your address are still logging in (at most {self.per_address}); "
                "try again in a few seconds",
            )
        if self._pre_total >= self.pre_login:
            raise self.refuse(
                "pre-login-pool", "the server has too many connections logging in; try again later"
            )
        if self._sessions_total >= self.sessions:
            # Checked here too, so a client learns it before spending a TLS handshake and a password.
            raise self.full_refusal()
        self._pre_by_key[key] += 1
        self._pre_total += 1
        self.counts.accepted += 1
        return Ticket(self, key)

    def full_refusal(self) -> Refused:
        """The refusal for a server at its session limit (counted)."""
        return self.refuse(
            "sessions", f"the server is at its session limit ({self.sessions} sessions); try again later"
        )

    def sessions_full(self) -> bool:
        """True when no further session could log in (checked before spending a password check)."""
        return self._sessions_total >= self.sessions

    def _login(self, ticket: Ticket, user: str) -> None:
        if ticket._released or ticket.user is not None:
            raise RuntimeError("login on a released or logged-in ticket")
        if self._sessions_total >= self.sessions:
            raise self.full_refusal()
        if self._by_user[user] >= self.per_user:
            raise self.refuse(
                "per-user",
                f"user {user!r} already has {self._by_user[user]} sessions open (at most {self.per_user}); "
                "close some first",
            )
        self._leave_pre(ticket.key)
        ticket.user = user
        self._by_user[user] += 1
        self._sessions_total += 1
        self.counts.logins += 1

    def _leave_pre(self, key: str) -> None:
        self._pre_by_key[key] -= 1
        if self._pre_by_key[key] <= 0:
            del self._pre_by_key[key]  # bounded memory: only addresses with connections have an entry
        self._pre_total -= 1

    def _release(self, ticket: Ticket) -> None:
        if ticket.user is None:
            self._leave_pre(ticket.key)
            return
        self._by_user[ticket.user] -= 1
        if self._by_user[ticket.user] <= 0:
            del self._by_user[ticket.user]
        self._sessions_total -= 1
