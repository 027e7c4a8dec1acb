"""Remote locations as users write them: scp-like ``[USER@]HOST:PATH`` or ``ferry://USER@HOST:PORT/PATH``."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from ferry.errors import UsageError
from ferry.paths import DEFAULT_PORT


@dataclass(frozen=True)
class Location:
    """A parsed remote location. ``path`` is relative to the user's home ("" = the home itself)."""

    host: str
    port: int = DEFAULT_PORT
    user: str | None = None
    path: str = ""
    #: the config file's host alias this location was written with (``box:`` for ``[hosts.box]``);
    #: its ``identity`` and ``plain`` apply to the connection (ferry.client.config)
    alias: str | None = None

    @property
    def address(self) -> str:
        """host:port with IPv6 hosts bracketed."""
        return format_address(self.host, self.port)


def format_address(host: str, port: int) -> str:
    """``host:port`` as users write it: an IPv6 address in brackets (``[::1]:7373``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_SCP = re.compile(r"^(?:(?P<user>[^@/:\[\]]+)@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^@/:\[\]]+):(?P<path>.*)$", re.S)


def is_remote(spec: str) -> bool:
    """Whether ``spec`` names a remote location (a URL, or scp-like HOST:PATH) rather than a local path."""
    if spec.startswith("ferry://"):
        return True
    if spec.startswith(("/", "./", "../")) or (os.sep != "/" and os.sep in spec):
        return False
    return _SCP.match(spec) is not None


def parse_location(spec: str, *, default_user: str | None = None, require_path: bool = False) -> Location:
    """Parse a remote location; raises UsageError naming what is wrong."""
    if spec.startswith("ferry://"):
        parts = urlsplit(spec)
        if not parts.hostname:
            raise UsageError(f"{spec!r}: the URL has no host; write ferry://USER@HOST:PORT/PATH")
        if spec[len("ferry://") + len(parts.netloc) :] != parts.path:
            # urlsplit cuts the path at '?' or '#' and drops tabs and newlines: the transfer would
            # silently go to another file ('notes#1' -> 'notes').
            raise UsageError(
                f"{spec!r}: a URL path cannot hold '?', '#', tabs or newlines as they are; "
                "percent-encode them (%3F, %23, ...)"
            )
        try:
            port = parts.port
        except ValueError as exc:
            raise UsageError(f"{spec!r}: port out of range (1-65535)") from exc
        if port == 0:  # not 'no port': 'ferry://h:0/x' must not quietly mean the default port
            raise UsageError(f"{spec!r}: port out of range (1-65535)")
        port = DEFAULT_PORT if port is None else port
        path = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
        user = unquote(parts.username) if parts.username else None
        return _resolve(parts.hostname, port if parts.port is not None else None, user, path, default_user)
    if "://" in spec:
        raise UsageError(f"{spec!r}: unknown scheme; use ferry://USER@HOST:PORT/PATH or USER@HOST:PATH")
    mt = _SCP.match(spec)
    if mt is None:
        if require_path:
            raise UsageError(
                f"{spec!r} is not a remote location; write [USER@]HOST:PATH or ferry://USER@HOST/PATH"
            )
        mt = _SCP.match(spec + ":")
        if mt is None:
            raise UsageError(f"{spec!r} is not a host; write [USER@]HOST or ferry://USER@HOST:PORT")
    host = mt.group("host").strip("[]")
    return _resolve(host, None, mt.group("user"), mt.group("path"), default_user)


def parse_target(spec: str, *, default_user: str | None = None) -> Location:
    """Parse a host target (``[USER@]HOST[:PORT]`` or a URL) for commands that take no path."""
    if spec.startswith("ferry://") or "://" in spec:
        return parse_location(spec, default_user=default_user)
    user = None
    rest = spec
    if "@" in spec:
        user, rest = spec.rsplit("@", 1)
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        if tail and not tail.startswith(":"):  # '[::1]junk' must not quietly mean [::1]
            raise UsageError(f"{spec!r}: write [IPV6] or [IPV6]:PORT")
        port_s = tail[1:]
    elif rest.count(":") == 1:
        host, port_s = rest.split(":")
    else:
        host, port_s = rest, ""
    if not host:
        raise UsageError(f"{spec!r}: no host")
    port = None
    if port_s:
        # isascii: str.isdigit() accepts '²', which int() then rejects with a bare ValueError
        if not (port_s.isascii() and port_s.isdigit()) or not 0 < int(port_s) < 65536:
            raise UsageError(f"{spec!r}: port out of range (1-65535)")
        port = int(port_s)
    return _resolve(host, port, user or None, "", default_user)


def _resolve(host: str, port: int | None, user: str | None, path: str, default_user: str | None) -> Location:
    """The location, with a config file host alias (``[hosts.NAME]``) put in: what the user wrote
    (a port, ``USER@``) wins over the alias, the alias over the defaults."""
    from ferry.client.config import load_config  # a stat when there is no config file

    alias = load_config().alias(host) if not host.startswith("[") and ":" not in host else None
    if alias is None:
        return Location(host, DEFAULT_PORT if port is None else port, user or default_user, path)
    return Location(
        alias.host,
        port if port is not None else alias.port or DEFAULT_PORT,
        user or alias.user or default_user,
        path,
        alias.name,
    )
