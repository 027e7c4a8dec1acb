"""TCP reachability probes: is anything accepting connections at ``host:port``?

A probe is one ``connect_ex`` with a timeout per resolved address; the connection is closed at
once without sending anything. Several targets are probed concurrently (bounded thread pool) so a
list of unreachable hosts costs about one timeout, not one timeout each; results keep the order of
the input.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum

from ferry.errors import UsageError
from ferry.net.target import HostPort, UnknownHost, resolve

__all__ = ["ProbeResult", "Status", "probe", "probe_one"]

# connect_ex on a socket with a timeout reports an expired timeout as EWOULDBLOCK (CPython's
# SOCK_TIMEOUT_ERR); a kernel-level SYN timeout is ETIMEDOUT. Both mean "no answer in time".
_TIMEOUT_ERRNOS = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ETIMEDOUT, errno.EINPROGRESS})

#: Upper bound on concurrent probes: enough to hide timeouts, few enough to stay polite.
MAX_WORKERS = 32


class Status(StrEnum):
    """The outcome of probing one target."""

    OPEN = "open"  #: something accepted the connection
    CLOSED = "closed"  #: the host answered with a refusal (RST): reachable, nothing listening
    TIMEOUT = "timeout"  #: no answer within the timeout (filtered, or host down)
    ERROR = "error"  #: anything else: unknown host, unreachable network, ...


@dataclass(frozen=True)
class ProbeResult:
    """The result of probing one target; ``detail`` names the error for :attr:`Status.ERROR`."""

    target: HostPort
    status: Status
    detail: str = ""

    def line(self) -> str:
        """One human-readable line, e.g. ``127.0.0.1:22 open`` or ``db:5432 error EHOSTUNREACH``."""
        suffix = f" {self.detail}" if self.detail else ""
        return f"{self.target} {self.status.value}{suffix}"


def _classify(code: int) -> tuple[Status, str]:
    if code == 0:
        return Status.OPEN, ""
    if code == errno.ECONNREFUSED:
        return Status.CLOSED, ""
    if code in _TIMEOUT_ERRNOS:
        return Status.TIMEOUT, ""
    return Status.ERROR, errno.errorcode.get(code, f"errno-{code}")


def probe_one(target: HostPort, timeout: float) -> ProbeResult:
    """Probe one target; never raises for network conditions, only reports them.

    Every resolved address is tried (each with the full ``timeout``) until one is open, because a
    name such as ``localhost`` may resolve to ``::1`` and ``127.0.0.1`` while the service listens
    on only one of them. If none is open, the outcome for the first address is reported.
    """
    if timeout <= 0:
        raise UsageError(f"timeout must be positive, not {timeout:g}")
    try:
        addresses = resolve(target.host, target.port, socket.SOCK_STREAM)
    except UnknownHost:
        return ProbeResult(target, Status.ERROR, "unknown-host")
    first: ProbeResult | None = None
    for family, socktype, proto, sockaddr in addresses:
        try:
            with socket.socket(family, socktype, proto) as sock:
                sock.settimeout(timeout)
                status, detail = _classify(sock.connect_ex(sockaddr))
        except OSError as exc:  # e.g. EAFNOSUPPORT when the host has no IPv6 at all
            status, detail = Status.ERROR, errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        result = ProbeResult(target, status, detail)
        if status is Status.OPEN:
            return result
        first = first or result
    assert first is not None  # resolve() never returns an empty list
    return first


def probe(targets: Sequence[HostPort], timeout: float) -> list[ProbeResult]:
    """Probe all ``targets`` concurrently; the results are in the order of ``targets``."""
    if not targets:
        return []
    workers = min(MAX_WORKERS, len(targets))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ferry-probe") as pool:
        return list(pool.map(lambda t: probe_one(t, timeout), targets))
