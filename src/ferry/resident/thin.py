"""The ``ferry`` console script's entry: a resident process runs the command if there is one.

Before importing the command line (click, asyncio, ssl, the client: ~100 ms), :func:`main`
looks for a resident process of the command's destination (:mod:`ferry.resident.runtime`). If it
finds one, it sends it the command line, the environment and the umask, with its working folder
and its standard input, output and error as descriptors (SCM_RIGHTS): the resident process runs
the command with exactly those, its output goes straight where ours would have gone, and this
process only waits for the exit status. Ctrl-C sends a cancel (a second one leaves at once).

Anything unexpected (no resident, a stale socket, a busy or mismatched resident, an odd command
line) runs the command here instead, as if the resident did not exist: the resident replies
"run it yourself" only before it has done anything.

The destination is found with a small parser of the command line that knows only where
operands and ``-P`` are; a wrong guess costs nothing, because the resident parses the command
line with click and compares the whole destination before it runs anything.
"""

from __future__ import annotations

import _socket
import os
import sys

from ferry.resident import runtime

TYPE_CHECKING = False  # not typing's (~8 ms to import); mypy reads this name alike
if TYPE_CHECKING:
    from collections.abc import Mapping

#: Options of the resident commands that take a value (their value is not an operand).
_VALUE_OPTIONS = frozenset(
    {"-P", "--port", "--password-file", "-i", "--identity", "--token-file", "--hash", "--bwlimit",
     "--exclude", "--include", "--filter-from"}
)
#: Seconds to wait for the resident to accept a command (it answers in milliseconds; a stuck one
#: must not hang the command for ever: it then runs here).
_ACCEPT_TIMEOUT = 30.0
#: Exit status when the resident process vanished in the middle of a command (a broken connection).
_CONNECTION_STATUS = 6


def main() -> None:
    """Entry point of the ``ferry`` console script and of ``python -m ferry``."""
    status = try_resident(sys.argv[1:], os.environ)
    if status is not None:
        os._exit(status)
    from ferry.cli import main as cli_main

    cli_main()


def try_resident(argv: list[str], env: Mapping[str, str]) -> int | None:
    """Run ``argv`` through a resident process; its exit status, or None to run it here."""
    if not argv or argv[0] not in runtime.RESIDENT_COMMANDS:
        return None
    wanted = runtime.setting(env)
    if wanted is False or (wanted is None and config_off(env)):
        return None
    key = command_key(argv, env)
    if key is None:
        return None
    path = runtime.socket_path(key, env)
    if path is None:
        return None
    sock = connect(path)
    if sock is None:
        return None
    try:
        return _run(sock, argv)
    finally:
        sock.close()


def connect(path: str) -> _socket.socket | None:
    """A connection to the resident at ``path``; None when there is none (a stale socket left
    by a process that is gone is removed) or when it is not our user's."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except ConnectionRefusedError:  # the file is there, nobody listens: its process is gone
        sock.close()
        remove_stale(path)
        return None
    except OSError:
        sock.close()
        return None
    if not runtime.same_user(sock):
        sock.close()
        return None
    return sock


def remove_stale(path: str) -> None:
    """Remove a socket file nobody listens on (only a socket of ours: the folder is private)."""
    try:
        st = os.lstat(path)
        if (st.st_mode & 0o170000) == 0o140000 and st.st_uid == os.getuid():
            os.unlink(path)
    except OSError:
        pass


def _run(sock: _socket.socket, argv: list[str]) -> int | None:
    for fd in (0, 1, 2):  # a closed standard descriptor: the command line knows what to do
        try:
            os.fstat(fd)
        except OSError:
            return None
    try:  # O_PATH: a folder we may enter but not list is still our working folder
        cwd = os.open(".", getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    umask = os.umask(0o022)
    os.umask(umask)
    env = [k + b"=" + v for k, v in os.environb.items()]
    frame = runtime.encode_request(b"run", runtime.run_fields(umask, [os.fsencode(a) for a in argv], env))
    try:
        sock.settimeout(_ACCEPT_TIMEOUT)
        fds = runtime.fd_bytes([cwd, 0, 1, 2])
        sent = sock.sendmsg([frame], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        if sent < len(frame):
            sock.sendall(frame[sent:])
    except OSError:
        return None
    finally:
        os.close(cwd)
    return _wait(sock)


def _wait(sock: _socket.socket) -> int | None:
    """The resident's answer: an exit status, or None (run it here; nothing was done)."""
    accepted = False
    interrupted = False
    data = b""
    while True:
        try:
            chunk = sock.recv(64)
        except KeyboardInterrupt:
            if interrupted:  # a second Ctrl-C: leave now (the resident cancels on our EOF)
                os.write(2, b"ferry: interrupted\n")
                return 130
            interrupted = True
            try:
                sock.sendall(runtime.CANCEL)
            except OSError:
                pass
            continue
        except OSError:
            chunk = b""
        if not chunk:
            if not accepted:  # gone before it started: as if there were no resident
                return None
            os.write(2, b"ferry: the resident connection process ended during the command\n")
            return _CONNECTION_STATUS
        data += chunk
        while data:
            tag = data[:1]
            if tag == runtime.ACCEPTED:
                accepted = True
                sock.settimeout(None)
                data = data[1:]
            elif tag == runtime.FALLBACK:
                return None
            elif tag == runtime.EXITED:
                if len(data) < 2:
                    break
                return data[1]
            else:  # not our protocol: run the command here
                return None


def command_key(argv: list[str], env: Mapping[str, str]) -> str | None:
    """The resident key of the command line's destination (None: no single one found)."""
    command, args = argv[0], argv[1:]
    operands: list[str] = []
    port: int | None = None
    plain = False
    it = iter(args)
    for arg in it:
        if arg == "--":
            operands.extend(it)
            break
        if arg in ("--no-resident", "--help"):
            return None
        if arg == "--plain":
            plain = True
        elif arg in ("-P", "--port") or arg.startswith(("--port=", "-P")):
            if arg in ("-P", "--port"):
                value = next(it, "")
            else:
                value = arg.split("=", 1)[1] if arg.startswith("--") else arg[2:]
            if not (value.isascii() and value.isdigit()):
                return None
            port = int(value)
        elif arg in _VALUE_OPTIONS and not (arg == "-i" and command == "sync"):  # sync's -i: itemize
            next(it, None)
        elif not arg.startswith("-") or arg == "-":
            operands.append(arg)
    if command == "put" and "-" in operands:
        # Standard input: a cancelled upload would leave a reader of the caller's terminal or
        # pipe behind in the resident process, taking input meant for the shell.
        return None
    targets = {t for t in (remote_target(op) for op in operands) if t is not None}
    if not targets and command == "df" and operands:
        one = remote_target(operands[0] if ":" in operands[0] else operands[0] + ":")
        targets = {one} if one is not None else set()
    if len(targets) != 1:
        return None
    user, host, url_port = targets.pop()
    try:
        alias = _alias(host, env)
    except Exception:  # a broken config file: the command line reports it properly
        return None
    if alias is not None:
        host = alias.host
        user = user or alias.user
        url_port = url_port if url_port is not None else alias.port
        plain = plain or bool(alias.plain)
    final_port = port if port is not None else url_port if url_port is not None else 7373
    home = runtime.client_home(env)
    return runtime.key_string(home, user or runtime.default_user(env), host, final_port, plain)


def _config_path(env: Mapping[str, str]) -> str:
    return os.path.join(runtime.client_home(env), "config.toml")


def _alias(host: str, env: Mapping[str, str]) -> _Alias | None:
    """The config file's alias ``host`` (the config module only when there is a config file)."""
    if host.startswith("[") or ":" in host or not os.path.exists(_config_path(env)):
        return None
    from ferry.client.config import load_config

    found = load_config().alias(host)
    return None if found is None else _Alias(found.host, found.user, found.port, found.plain)


def config_off(env: Mapping[str, str]) -> bool:
    """Whether the config file's ``[defaults] resident`` turns the resident off."""
    if not os.path.exists(_config_path(env)):
        return False
    from ferry.client.config import load_config

    try:
        return load_config().defaults.resident is False
    except Exception:  # a broken config file: the command line reports it properly
        return True


class _Alias:
    """What of a config alias decides the destination."""

    def __init__(self, host: str, user: str | None, port: int | None, plain: bool | None) -> None:
        self.host, self.user, self.port, self.plain = host, user, port, plain


def remote_target(spec: str) -> tuple[str | None, str, int | None] | None:
    """``(user, host, port)`` of a remote operand as :func:`ferry.client.location.parse_location`
    reads it (without ``re`` and ``urllib``), or None for a local path or anything unusual."""
    if spec.startswith("ferry://"):
        netloc = spec[len("ferry://") :].split("/", 1)[0]
        userinfo, has_user, hostport = netloc.rpartition("@")
        user = userinfo if has_user else None
        if user is not None and (not user or any(c in user for c in "%:")):
            return None
        if hostport.startswith("["):
            host, _, tail = hostport[1:].partition("]")
            port_s = tail[1:] if tail.startswith(":") else None if not tail else "x"
        else:
            host, sep, port_s_ = hostport.partition(":")
            port_s = port_s_ if sep else None
        if not host or any(c in host for c in "%?#\t\n"):
            return None
        if port_s is None:
            return user, host.lower(), None
        if not (port_s.isascii() and port_s.isdigit()) or not 0 < int(port_s) < 65536:
            return None
        return user, host.lower(), int(port_s)
    if "://" in spec or spec.startswith(("/", "./", "../")):
        return None
    user = None
    rest = spec
    at = spec.find("@")
    if at > 0 and not any(c in spec[:at] for c in "/:[]"):
        user, rest = spec[:at], spec[at + 1 :]
    if rest.startswith("["):
        close = rest.find("]")
        host = rest[1:close] if close > 0 else ""
        if not host or rest[close + 1 : close + 2] != ":" or any(c not in "0123456789abcdefABCDEF:." for c in host):
            return None
        return user, host, None
    colon = rest.find(":")
    host = rest[:colon] if colon > 0 else ""
    if not host or any(c in host for c in "@/[]"):
        return None
    return user, host, None
