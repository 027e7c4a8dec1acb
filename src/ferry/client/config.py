"""The client's config file: host aliases and defaults (``client_home()/config.toml``).

Example (every key is optional; docs/cli.md "The config file" documents each)::

    [defaults]
    hash = "blake3"          # --hash of get, put, shell
    bwlimit = "10M"          # --bwlimit of the commands that have it
    progress = false         # progress bars on a terminal (true/false)
    resident = 600           # the resident connection: false, true, or seconds it stays idle

    [hosts.box]
    host = "files.example.org"
    port = 7373
    user = "ann"
    identity = "~/.ssh/id_ed25519"       # or a list of key files
    plain = false

``ferry ls box:``, ``ferry://box/`` and ``ferry.connect("box")`` then mean that server, user and
key. Read with tomllib; a file that is not valid TOML, an unknown key or a wrong type is a
:class:`ConfigError` naming the file and the line. Loaded once per process, and only when the
file exists (a stat otherwise), so commands do not pay for it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from ferry import paths
from ferry.errors import UsageError
from ferry.ratelimit import parse_rate

__all__ = ["Config", "ConfigError", "Defaults", "HostAlias", "config_file", "load_config"]

_HOST_KEYS: Final = {"host", "port", "user", "identity", "plain"}
_DEFAULT_KEYS: Final = {"hash", "bwlimit", "progress", "resident"}
_ALIAS_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class ConfigError(UsageError):
    """The config file is malformed; the message names the file and the line."""


@dataclass(frozen=True)
class HostAlias:
    """One ``[hosts.NAME]`` table."""

    name: str
    host: str
    port: int | None = None
    user: str | None = None
    identity: tuple[str, ...] = ()
    plain: bool | None = None


@dataclass(frozen=True)
class Defaults:
    """The ``[defaults]`` table (None: not set)."""

    hash: str | None = None
    bwlimit: str | None = None
    progress: bool | None = None
    #: the resident connection (docs/cli.md): False (off), True (on), or seconds it stays idle
    resident: bool | int | None = None


@dataclass(frozen=True)
class Config:
    """A parsed config file (empty when there is none)."""

    path: Path
    hosts: dict[str, HostAlias] = field(default_factory=dict)
    defaults: Defaults = field(default_factory=Defaults)

    def alias(self, name: str) -> HostAlias | None:
        """The alias called ``name`` (case does not matter, as in host names), or None."""
        return self.hosts.get(name.lower())


def config_file(env: dict[str, str] | None = None) -> Path:
    """``client_home()/config.toml`` (``$FERRY_HOME/config.toml``, else ``~/.config/ferry/config.toml``)."""
    return paths.client_home(env) / "config.toml"


def _line_of(text: str, table: str, key: str | None) -> int:
    """The line (1-based) of ``key`` in ``[table]`` (or of the table header), for messages."""
    header = re.compile(r"\s*\[\s*" + r"\s*\.\s*".join(re.escape(p) for p in table.split(".")) + r"\s*\]")
    in_table = False
    header_line = 0
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("["):
            in_table = bool(header.match(line))
            if in_table:
                header_line = number
            continue
        if in_table and key is not None and re.match(rf"\s*{re.escape(key)}\s*=", line):
            return number
    return header_line or 1


def _parse(path: Path, text: str) -> Config:
    import tomllib  # here: most commands never read a config file

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None

    def fail(table: str, key: str | None, what: str) -> ConfigError:
        return ConfigError(f"{path}, line {_line_of(text, table, key)}: {what}")

    for top in data:
        if top not in ("hosts", "defaults"):
            raise fail(top, None, f"unknown table or key {top!r} (expected [defaults] and [hosts.NAME])")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise fail("defaults", None, "'defaults' must be a table: [defaults]")
    for key, value in defaults.items():
        if key not in _DEFAULT_KEYS:
            raise fail("defaults", key, f"unknown key {key!r} in [defaults] (known: {', '.join(sorted(_DEFAULT_KEYS))})")
        if key == "progress" and not isinstance(value, bool):
            raise fail("defaults", key, "progress must be true or false")
        if key == "resident" and not (isinstance(value, bool) or (isinstance(value, int) and value > 0)):
            raise fail("defaults", key, "resident must be true, false or a number of seconds")
        if key == "hash" and value not in ("blake3", "md5"):
            raise fail("defaults", key, "hash must be \"blake3\" or \"md5\"")
        if key == "bwlimit" and not _is_rate(value):
            raise fail("defaults", key, 'bwlimit must be a rate like "10M" or a number of bytes per second')
    hosts_table = data.get("hosts", {})
    if not isinstance(hosts_table, dict):
        raise fail("hosts", None, "'hosts' must hold tables: [hosts.NAME]")
    hosts: dict[str, HostAlias] = {}
    for name, entry in hosts_table.items():
        table = f"hosts.{name}"
        if not isinstance(entry, dict):
            raise fail("hosts", None, f"hosts.{name} must be a table: [hosts.{name}]")
        if not _ALIAS_RE.fullmatch(name):
            raise fail(table, None, f"alias {name!r}: use letters, digits, '_', '.', '-'")
        for key in entry:
            if key not in _HOST_KEYS:
                raise fail(table, key, f"unknown key {key!r} in [{table}] (known: {', '.join(sorted(_HOST_KEYS))})")
        host = entry.get("host", name)
        if not isinstance(host, str) or not host or any(c.isspace() or c in "/@" for c in host):
            raise fail(table, "host", "host must be a host name or address")
        port = entry.get("port")
        if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
            raise fail(table, "port", "port must be a number from 1 to 65535")
        user = entry.get("user")
        if user is not None and (not isinstance(user, str) or not user):
            raise fail(table, "user", "user must be a user name")
        identity = entry.get("identity", ())
        if isinstance(identity, str):
            identity = (identity,)
        if not isinstance(identity, list | tuple) or not all(isinstance(i, str) and i for i in identity):
            raise fail(table, "identity", "identity must be a key file path or a list of them")
        plain = entry.get("plain")
        if plain is not None and not isinstance(plain, bool):
            raise fail(table, "plain", "plain must be true or false")
        hosts[name.lower()] = HostAlias(name, host.strip("[]"), port, user, tuple(identity), plain)
    bwlimit = defaults.get("bwlimit")
    return Config(
        path,
        hosts,
        Defaults(
            defaults.get("hash"),
            None if bwlimit is None else str(bwlimit),
            defaults.get("progress"),
            defaults.get("resident"),
        ),
    )


_cache: dict[Path, tuple[tuple[int, int], Config]] = {}


def load_config(path: Path | None = None) -> Config:
    """The config at ``path`` (default :func:`config_file`); an empty one when there is no file."""
    path = config_file() if path is None else Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Config(path)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    stamp = (st.st_mtime_ns, st.st_size)
    cached = _cache.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    config = _parse(path, text)
    _cache[path] = (stamp, config)
    return config


def _is_rate(value: object) -> bool:
    """Whether a config value reads as ``--bwlimit`` would read it (checked at load, so a bad rate is
    reported with the file's line rather than as a command-line option the user never typed)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return False
    try:
        parse_rate(str(value))
    except UsageError:
        return False
    return True
