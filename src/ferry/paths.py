"""Where ferry keeps its files: the server's data root and the client's own folder.

Everything here is a pure function of the environment (``os.environ`` unless a mapping is passed),
so tests and embedders can point ferry anywhere without global state.

Server data root (``default_root()``)::

    $FERRY_ROOT                      if set, else
    $XDG_DATA_HOME/ferry             if set (and absolute), else
    ~/.local/share/ferry

    <root>/users.db                  accounts (SQLite, mode 0600)
    <root>/tls/cert.pem              the server's self-signed certificate
    <root>/tls/key.pem               its private key (mode 0600)
    <root>/homes/<user>/             each user's home folder (mode 0700)
    <root>/logs/ferry.log            the server log

Client folder (``client_home()``)::

    $FERRY_HOME                      if set, else
    $XDG_CONFIG_HOME/ferry           if set (and absolute), else
    ~/.config/ferry

    <home>/known_hosts               pinned server certificates (mode 0600)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

#: The TCP port ``ferry serve`` listens on and clients connect to when none is given.
#: Above 1024 so an unprivileged user can run the server; documented in docs/accounts.md.
DEFAULT_PORT: Final = 7373

#: File and directory modes: the server's data is private to the account that runs it.
PRIVATE_DIR_MODE: Final = 0o700
PRIVATE_FILE_MODE: Final = 0o600


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def _xdg_base(env: Mapping[str, str], var: str, fallback: str) -> Path:
    """An XDG base directory: the XDG spec says empty or relative values must be ignored."""
    value = env.get(var, "")
    if value and os.path.isabs(value):
        return Path(value)
    home = env.get("HOME")
    # Prefer $HOME from the given mapping so the function stays pure; fall back to the pwd database.
    base = Path(home) if home else Path.home()
    return base / fallback


def default_root(env: Mapping[str, str] | None = None) -> Path:
    """The server's data root: ``$FERRY_ROOT``, else ``$XDG_DATA_HOME/ferry``, else ``~/.local/share/ferry``."""
    e = _env(env)
    root = e.get("FERRY_ROOT", "")
    if root:
        return Path(root).expanduser()
    return _xdg_base(e, "XDG_DATA_HOME", ".local/share") / "ferry"


def client_home(env: Mapping[str, str] | None = None) -> Path:
    """The client's own folder: ``$FERRY_HOME``, else ``$XDG_CONFIG_HOME/ferry``, else ``~/.config/ferry``."""
    e = _env(env)
    home = e.get("FERRY_HOME", "")
    if home:
        return Path(home).expanduser()
    return _xdg_base(e, "XDG_CONFIG_HOME", ".config") / "ferry"


# --- layout of the server root -------------------------------------------------------------------


def users_db(root: Path) -> Path:
    """The SQLite accounts database under ``root``."""
    return root / "users.db"


def tls_dir(root: Path) -> Path:
    """The folder holding the server's certificate and key."""
    return root / "tls"


def cert_file(root: Path) -> Path:
    """The server's PEM certificate."""
    return tls_dir(root) / "cert.pem"


def key_file(root: Path) -> Path:
    """The server's PEM private key (mode 0600)."""
    return tls_dir(root) / "key.pem"


def homes_dir(root: Path) -> Path:
    """The folder holding every user's home folder."""
    return root / "homes"


def home_dir(root: Path, user: str) -> Path:
    """The home folder of ``user``; the caller must have validated the name (no ``/``, no ``..``)."""
    return homes_dir(root) / user


def logs_dir(root: Path) -> Path:
    """The folder holding the server's logs."""
    return root / "logs"


def log_file(root: Path) -> Path:
    """The server's log file."""
    return logs_dir(root) / "ferry.log"


# --- layout of the client folder -----------------------------------------------------------------


def known_hosts_file(home: Path | None = None) -> Path:
    """The client's pinned-certificate file (``client_home()/known_hosts`` by default)."""
    return (client_home() if home is None else home) / "known_hosts"


# --- helpers -------------------------------------------------------------------------------------


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if missing; a directory we create gets mode 0700.

    Existing directories keep their mode: the admin may have chosen it on purpose (for example a
    shared parent), and silently tightening someone's folder would be surprising.
    """
    # mkdir's mode is filtered by the umask; chmod afterwards so 0700 holds under any umask.
    if not path.is_dir():
        path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        os.chmod(path, PRIVATE_DIR_MODE)
    return path
