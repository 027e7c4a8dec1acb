"""Pinned server certificates, one line per server, like SSH's ``known_hosts``.

File format (``client_home()/known_hosts``, mode 0600)::

    # comments and blank lines are kept
    example.org:7373 SHA256:3q2+7w...
    [::1]:7373 SHA256:Zm9v...

The first connection to a ``host:port`` pins the certificate's fingerprint (trust on first use);
later connections must present the same certificate, or :class:`HostKeyMismatch` is raised.

Updates write a temporary file and rename it over the old one, so a crash never leaves a
truncated file; an advisory lock (where the OS has ``fcntl``) keeps two clients pinning at the
same moment from losing each other's line.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from ferry import paths
from ferry.errors import FerryError, HostKeyMismatch, UsageError
from ferry.errtext import os_reason
from ferry.fskit import store_atomically

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["KnownHosts", "host_key"]


def host_key(host: str, port: int) -> str:
    """The ``host:port`` token of a line: lower-case name or canonical IP, IPv6 in brackets.

    Canonical so that ``[::1]``, ``::1`` and ``0:0::1`` share one pin, and ``Example.org.`` is
    ``example.org``.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise UsageError(f"invalid port {port!r}: use 1 to 65535")
    name = host.strip()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        addr = ipaddress.ip_address(name)
    except ValueError:
        name = name.lower().rstrip(".")
        if not name or any(c.isspace() or c in "[]#" for c in name):
            raise UsageError(f"invalid host name {host!r}") from None
        return f"{name}:{port}"
    if isinstance(addr, ipaddress.IPv6Address):
        return f"[{addr.compressed}]:{port}"
    return f"{addr.compressed}:{port}"


class KnownHosts:
    """The pinned fingerprints in one file (default ``client_home()/known_hosts``)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else paths.known_hosts_file()

    # --- file access -----------------------------------------------------------------------------

    def _read_lines(self) -> list[str]:
        try:
            with open(self.path, encoding="utf-8") as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []
        except UnicodeDecodeError as exc:
            raise FerryError(f"cannot read {self.path}: it is not UTF-8 text") from exc
        except OSError as exc:
            raise FerryError(f"cannot read {self.path}: {os_reason(exc)}") from exc

    def _write_lines(self, lines: list[str]) -> None:
        """Replace the file atomically: a new temp file (0600) in the same folder, fsync, rename."""
        data = "".join(line + "\n" for line in lines).encode("utf-8")
        store_atomically(self.path, data, mode=0o600, fsync=True)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive advisory lock on a side file while reading-modifying-writing.

        The data file itself cannot carry the lock: it is replaced by rename, so a lock on it
        would be on an inode that no longer is the file.
        """
        try:
            paths.ensure_private_dir(self.path.parent)
            lock_fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise FerryError(f"cannot update {self.path}: {os_reason(exc)}") from exc
        try:
            if fcntl is not None:
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(lock_fd)  # closing releases the flock

    @staticmethod
    def _entries(lines: list[str]) -> Iterator[tuple[int, str, str]]:
        """``(line_number, host_key, fingerprint)`` of each well-formed line (1-based numbers)."""
        for number, line in enumerate(lines, start=1):
            fields = line.split()
            if len(fields) >= 2 and not fields[0].startswith("#"):
                yield number, fields[0], fields[1]

    # --- public API ------------------------------------------------------------------------------

    def lookup(self, host: str, port: int) -> str | None:
        """The pinned fingerprint of ``host:port``, or ``None`` if it was never seen."""
        key = host_key(host, port)
        for _, entry_key, fp in self._entries(self._read_lines()):
            if entry_key == key:
                return fp
        return None

    def check(self, host: str, port: int, fingerprint: str) -> Literal["known", "new"]:
        """``"known"`` if ``fingerprint`` is pinned for ``host:port``; pin it and return ``"new"``.

        Raises :class:`HostKeyMismatch` if a *different* fingerprint is pinned: the caller must
        then abort before sending a password.
        """
        key = host_key(host, port)
        if not fingerprint or any(c.isspace() for c in fingerprint):
            raise ValueError(f"malformed fingerprint {fingerprint!r}")
        # Fast path without the lock: most connections are to known hosts.
        lines = self._read_lines()
        status = self._match(lines, key, fingerprint)
        if status != "new":
            return status
        with self._locked():
            lines = self._read_lines()  # again: another client may have pinned it meanwhile
            status = self._match(lines, key, fingerprint)
            if status == "new":
                try:
                    self._write_lines([*lines, f"{key} {fingerprint}"])
                except OSError as exc:
                    raise FerryError(f"cannot save the server's fingerprint to {self.path}: {os_reason(exc)}") from exc
        return status

    def _match(self, lines: list[str], key: str, fingerprint: str) -> Literal["known", "new"]:
        pinned = [(number, fp) for number, entry_key, fp in self._entries(lines) if entry_key == key]
        if not pinned:
            return "new"
        if any(fp == fingerprint for _, fp in pinned):
            return "known"
        numbers = ", ".join(str(number) for number, _ in pinned)
        line_word = "line" if len(pinned) == 1 else "lines"
        raise HostKeyMismatch(
            f"WARNING: the certificate of {key} changed!\n"
            f"  pinned:    {pinned[0][1]}  ({self.path}, {line_word} {numbers})\n"
            f"  presented: {fingerprint}\n"
            "Someone may be intercepting this connection (man in the middle), or the server's "
            "certificate was regenerated (for example its data folder was reset).\n"
            f"If you expect this, remove {line_word} {numbers} of {self.path} "
            "and connect again; otherwise do not connect."
        )

    def pins(self) -> list[tuple[str, int, str]]:
        """Every pin as ``(host, port, fingerprint)``, in file order (IPv6 hosts without brackets)."""
        out = []
        for _, key, fp in self._entries(self._read_lines()):
            host, _, port = key.rpartition(":")
            if port.isdigit():
                out.append((host.strip("[]"), int(port), fp))
        return out

    def forget(self, host: str, port: int) -> bool:
        """Remove every pin for ``host:port``; returns whether there was one."""
        key = host_key(host, port)
        with self._locked():
            lines = self._read_lines()
            drop = {number for number, entry_key, _ in self._entries(lines) if entry_key == key}
            if not drop:
                return False
            kept = [line for number, line in enumerate(lines, start=1) if number not in drop]
            try:
                self._write_lines(kept)
            except OSError as exc:
                raise FerryError(f"cannot update {self.path}: {os_reason(exc)}") from exc
        return True
