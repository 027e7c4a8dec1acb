"""What the thin client and the resident process agree on: where sockets live, how they are
named, the request frame, and who may connect.

Every ``ferry`` command imports this module before anything else (see
:mod:`ferry.resident.thin`), so it uses the standard library's cheapest parts only: ``os``,
``sys`` and ``_socket``. No ``typing``, ``re``, ``pathlib``, ``json``, ``hashlib`` or
``socket`` (each costs 2-12 ms here; the whole thin path must stay near the interpreter's own
start-up time).

The runtime folder (one per user, mode 0700, owned by the user; anything else is refused and
the commands connect directly)::

    $FERRY_RUNTIME_DIR            if set (tests), else
    $XDG_RUNTIME_DIR/ferry        if XDG_RUNTIME_DIR is set (systemd's /run/user/UID), else
    /tmp/ferry-UID

One socket per destination, named by a 64-bit FNV-1a hash of its key: ferry's version, the client folder
(``$FERRY_HOME``: known_hosts and the config differ per folder), the user, the host as written
(after a config alias), the port and TLS or plain. The name is only a lookup: the resident checks
the full key, the credentials and the pinned fingerprint again for every command.
"""

from __future__ import annotations

import _socket
import os
import sys

from ferry import __version__

TYPE_CHECKING = False  # not typing's: importing typing costs ~8 ms, and mypy reads this name alike
if TYPE_CHECKING:
    from collections.abc import Mapping

#: Seconds a resident process stays after its last command (as a common ssh ControlPersist).
DEFAULT_PERSIST = 600
#: The most a setting may ask for: a resident process never lingers longer than a day.
MAX_PERSIST = 86_400
#: Values of FERRY_RESIDENT (and the config's ``resident``) that turn the feature off.
OFF_WORDS = frozenset({"0", "no", "off", "false", "never"})
#: The commands a resident process runs (they open one connection through ``cli.files.connected``).
RESIDENT_COMMANDS = frozenset({"sync", "get", "put", "ls", "stat", "mkdir", "rm", "mv", "df"})

MAGIC = b"FRY1"
#: A request frame is at most this long (the command line and the environment).
MAX_REQUEST = 1 << 20
#: The resident's replies: accepted (it runs the command now), run it yourself (nothing was
#: done), the exit status follows (one byte), information follows (until the end).
ACCEPTED, FALLBACK, EXITED, INFO = b"A", b"F", b"X", b"I"
#: The thin client's one message after its request: the user pressed Ctrl-C.
CANCEL = b"C"
#: Longest Unix socket path Linux takes (108 bytes with the terminating NUL).
_MAX_SOCKET_PATH = 107


def setting(env: Mapping[str, str]) -> int | bool | None:
    """FERRY_RESIDENT: False (off), seconds to persist (a number), True (on, default time) or
    None (not set: the config file, then the default, decide)."""
    raw = env.get("FERRY_RESIDENT", "").strip().lower()
    if not raw:
        return None
    if raw in OFF_WORDS:
        return False
    if raw.isascii() and raw.isdigit():
        return clamp_persist(int(raw))
    return True


def clamp_persist(seconds: int) -> int:
    """A persist time within 1 second and :data:`MAX_PERSIST`."""
    return max(1, min(int(seconds), MAX_PERSIST))


def client_home(env: Mapping[str, str]) -> str:
    """The client folder as :func:`ferry.paths.client_home` finds it, as a string (no pathlib)."""
    home = env.get("FERRY_HOME", "")
    if home:
        return os.path.expanduser(home)
    xdg = env.get("XDG_CONFIG_HOME", "")
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "ferry")
    return os.path.join(env.get("HOME") or os.path.expanduser("~"), ".config", "ferry")


def default_user(env: Mapping[str, str]) -> str:
    """The user name when a location names none, as :func:`ferry.cli.common.default_user`
    finds it ($FERRY_USER, else what ``getpass.getuser`` reads), without importing getpass."""
    for name in ("FERRY_USER", "LOGNAME", "USER", "LNAME", "USERNAME"):
        value = env.get(name)
        if value:
            return value
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def runtime_dir(env: Mapping[str, str], *, create: bool = False) -> str | None:
    """The private runtime folder, or None when it is missing (and not ``create``), or is not a
    folder of ours that only we can enter (then nobody's socket there is trusted)."""
    base = env.get("FERRY_RUNTIME_DIR", "")
    if base and os.path.isabs(base):
        path = base
    else:
        xdg = env.get("XDG_RUNTIME_DIR", "")
        path = os.path.join(xdg, "ferry") if xdg and os.path.isabs(xdg) else f"/tmp/ferry-{os.getuid()}"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            return None
        try:
            os.mkdir(path, 0o700)
            st = os.lstat(path)
        except OSError:
            return None
    except OSError:
        return None
    # lstat: a symbolic link (someone else's folder behind our name) fails the S_ISDIR test
    if (st.st_mode & 0o170000) != 0o040000 or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return path


def key_string(home: str, user: str, host: str, port: int, plain: bool) -> str:
    """The identity of one resident connection (see the module docstring). The version of ferry
    is part of it: after an upgrade, commands do not hand themselves to a process running the
    old code (it idles out)."""
    return "\0".join((__version__, home, user, host, str(port), "plain" if plain else "tls"))


def socket_name(key: str) -> str:
    """The socket's file name for ``key``: its 64-bit FNV-1a hash in hex (not a secret, and
    not a security check: the resident compares the whole key)."""
    h = 0xCBF29CE484222325
    for byte in key.encode("utf-8", "surrogateescape"):
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}.sock"


def socket_path(key: str, env: Mapping[str, str], *, create: bool = False) -> str | None:
    """Where the resident for ``key`` listens (None: no usable runtime folder)."""
    folder = runtime_dir(env, create=create)
    if folder is None:
        return None
    path = os.path.join(folder, socket_name(key))
    return path if len(os.fsencode(path)) <= _MAX_SOCKET_PATH else None


# --- who is on the other end -----------------------------------------------------------------


def peer_credentials(sock: _socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of a connected Unix socket (Linux
    SO_PEERCRED: what the kernel recorded at connect time, not what the peer claims)."""
    raw = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    pid, uid, gid = (int.from_bytes(raw[i : i + 4], sys.byteorder) for i in (0, 4, 8))
    return pid, uid, gid


def same_user(sock: _socket.socket) -> bool:
    """Whether the peer runs as our user and group: a resident process reads and writes local
    files for its callers, so it serves exactly the credentials it has itself."""
    try:
        _pid, uid, gid = peer_credentials(sock)
    except OSError:
        return False
    return uid == os.getuid() and gid == os.getgid()


# --- the request frame -------------------------------------------------------------------------


def encode_request(kind: bytes, fields: list[bytes]) -> bytes:
    """``MAGIC``, the payload's length (4 bytes, big-endian), then ``kind`` and ``fields``
    separated by NUL (a command line and an environment cannot hold NUL)."""
    payload = b"\0".join((kind, *fields))
    return MAGIC + len(payload).to_bytes(4, "big") + payload


def decode_payload(payload: bytes) -> tuple[bytes, list[bytes]]:
    """``(kind, fields)`` of a payload (after the magic and the length)."""
    kind, *fields = payload.split(b"\0")
    return kind, fields


def run_fields(umask: int, argv: list[bytes], env: list[bytes]) -> list[bytes]:
    """The fields of a ``run`` request: the umask, the argument count, the arguments, then the
    environment as ``NAME=value``."""
    return [b"%o" % umask, b"%d" % len(argv), *argv, *env]


def parse_run_fields(fields: list[bytes]) -> tuple[int, list[str], dict[str, str]]:
    """``(umask, argv, env)`` from :func:`run_fields` (strings decoded as the OS does);
    raises ValueError on a malformed request."""
    umask = int(fields[0], 8)
    count = int(fields[1])
    if not 0 <= count <= len(fields) - 2 or not 0 <= umask <= 0o777:
        raise ValueError("malformed request")
    argv = [os.fsdecode(a) for a in fields[2 : 2 + count]]
    env: dict[str, str] = {}
    for item in fields[2 + count :]:
        name, sep, value = item.partition(b"=")
        if sep and name:
            env[os.fsdecode(name)] = os.fsdecode(value)
    return umask, argv, env


def fd_bytes(fds: list[int]) -> bytes:
    """The SCM_RIGHTS payload for ``fds`` (C ints), without the ``array`` module."""
    return b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)


def fds_from(data: bytes) -> list[int]:
    """The descriptors of an SCM_RIGHTS payload."""
    return [int.from_bytes(data[i : i + 4], sys.byteorder) for i in range(0, len(data) - len(data) % 4, 4)]
