"""Map wire error codes to ferry's exception hierarchy (so callers catch NotFound, not strings)."""

from __future__ import annotations

from ferry import errors as e
from ferry.wire import messages as m

_BY_CODE: dict[str, type[e.RemoteError]] = {
    "not-found": e.NotFound,
    "permission": e.PermissionDenied,
    "read-only": e.PermissionDenied,
    "outside-home": e.PathRefused,
    "bad-path": e.PathRefused,
    "symlink": e.PathRefused,
    "reserved-name": e.PathRefused,
    "exists": e.AlreadyExists,
    "not-a-directory": e.NotADirectory,
    "is-a-directory": e.IsADirectory,
    "not-a-file": e.NotAFile,
    "not-empty": e.DirectoryNotEmpty,
    "disk-full": e.DiskFull,
    "quota": e.DiskFull,
    "exec-denied": e.PermissionDenied,
    "read-only-token": e.PermissionDenied,
}


class RemoteIntegrityError(e.RemoteError, e.IntegrityError):
    """The server found that uploaded data did not match the client's hashes."""

    exit_code = e.ExitCode.TRANSFER


class RemoteTransferError(e.RemoteError, e.TransferError):
    """A transfer failed on the server (file changed, cancelled, I/O error)."""

    exit_code = e.ExitCode.TRANSFER


def from_wire(err: m.Error) -> e.FerryError:
    """The exception for a wire :class:`~ferry.wire.messages.Error`."""
    if err.code == "auth":
        return e.AuthError(err.message)
    if err.code in ("integrity", "integrityerror"):
        return RemoteIntegrityError(err.code, err.message)
    if err.code in ("changed", "cancelled", "io"):
        return RemoteTransferError(err.code, err.message)
    if err.code == "busy":
        return e.ConnectionBroken(f"the server refused the connection: {err.message}")
    if err.code in ("protocol", "version"):
        return e.ConnectionBroken(f"the server reported a protocol error: {err.message}")
    cls = _BY_CODE.get(err.code, e.RemoteError)
    return cls(err.code, err.message)
