"""Creating (and cleaning up) the listening socket: the one place that turns OSError into advice."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from dataclasses import dataclass

from ferry.errors import FerryError, UsageError
from ferry.errtext import os_reason
from ferry.net.serve.config import ServeConfig


@dataclass(slots=True)
class Listener:
    """A bound socket plus what is needed to describe it and to clean up after it."""

    sock: socket.socket
    address: str
    #: (st_dev, st_ino) of the socket file we created, so we only ever unlink our own file.
    unix_identity: tuple[int, int] | None = None
    path: str | None = None

    def close(self) -> None:
        """Close the socket and remove the unix socket file if it is still the one we made."""
        self.sock.close()
        if self.path is not None and self.unix_identity is not None:
            with contextlib.suppress(OSError):
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self.unix_identity:
                    os.unlink(self.path)
            self.unix_identity = None


def format_address(family: int, sockaddr: object) -> str:
    """``host:port`` for IPv4, ``[host]:port`` for IPv6, the path for unix sockets."""
    if family == socket.AF_UNIX:
        return str(sockaddr)
    assert isinstance(sockaddr, tuple)
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"


def _resolve(config: ServeConfig, socktype: int) -> tuple[int, object]:
    try:
        infos = socket.getaddrinfo(config.host, config.port, type=socktype, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"cannot resolve host {config.host!r}: {exc.strerror}") from exc
    family, _type, _proto, _canon, sockaddr = infos[0]
    return family, sockaddr


def _bind_error(where: str, exc: OSError) -> FerryError:
    if exc.errno == errno.EADDRINUSE:
        return FerryError(f"cannot listen on {where}: address already in use")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return FerryError(f"cannot listen on {where}: permission denied (ports below 1024 need privileges)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return UsageError(f"cannot listen on {where}: no such local address")
    return FerryError(f"cannot listen on {where}: {os_reason(exc)}")


def _open_inet(config: ServeConfig) -> Listener:
    socktype = socket.SOCK_DGRAM if config.proto == "udp" else socket.SOCK_STREAM
    family, sockaddr = _resolve(config, socktype)
    sock = socket.socket(family, socktype)
    try:
        # Without SO_REUSEADDR a restart fails for ~60 s while old connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)  # type: ignore[arg-type]  # getaddrinfo's sockaddr is the right shape
        except OSError as exc:
            raise _bind_error(f"{config.host}:{config.port}", exc) from exc
        if socktype == socket.SOCK_STREAM:
            sock.listen(config.backlog)
    except BaseException:
        sock.close()
        raise
    return Listener(sock, format_address(family, sock.getsockname()))


def _remove_stale(path: str) -> None:
    """Unlink ``path`` if it is a socket nobody listens on; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        # Refused = a leftover file from a server that died without cleaning up: safe to replace.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError as exc:
        raise FerryError(f"cannot check existing socket {path}: {os_reason(exc)}") from exc
    finally:
        probe.close()
    raise FerryError(f"{path} is in use by a running server; stop it or choose another --path")


def _open_unix(config: ServeConfig) -> Listener:
    assert config.path is not None
    path = config.path
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):  # checked again here: the directory may vanish after validation
        raise UsageError(f"socket directory does not exist: {parent}")
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(path)
        except OSError as exc:
            raise _bind_error(path, exc) from exc
        st = os.stat(path)
        sock.listen(config.backlog)
    except BaseException:
        sock.close()
        raise
    return Listener(sock, path, unix_identity=(st.st_dev, st.st_ino), path=path)


def open_listener(config: ServeConfig) -> Listener:
    """Bind the socket ``config`` describes; raises UsageError/FerryError with a one-line reason."""
    if config.proto == "unix":
        return _open_unix(config)
    return _open_inet(config)
