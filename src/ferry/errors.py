"""The one exception hierarchy of ferry.

Every error a user can meet derives from :class:`FerryError`. Each carries an ``exit_code`` so the
command line can map failures to distinct exit statuses, and a message that says what to do.
Low-level ``OSError`` is translated into these at the I/O boundary (``raise X from exc``).

This module is the bottom layer: it imports nothing of ferry. Which wire error code becomes which
of these classes (and with what scope) is decided in one place above it, the registry
:class:`ferry.wire.codes.ErrorCode`; the server raises and the client receives the same classes.
"""

from __future__ import annotations


class ExitCode:
    """Process exit statuses of the ``ferry`` command (documented in docs/cli.md)."""

    OK = 0
    ERROR = 1  #: anything not covered below
    USAGE = 2  #: bad command line or bad input given by the user
    AUTH = 3  #: wrong password, unknown user, permission to log in refused
    NOT_FOUND = 4  #: remote path missing, or permission denied on it
    TRANSFER = 5  #: integrity mismatch, quota, disk full, server I/O error, interrupted transfer
    CONNECTION = 6  #: could not connect, connection broken, timeout, TLS / pin mismatch


class FerryError(Exception):
    """Base class of every error ferry raises on purpose."""

    exit_code: int = ExitCode.ERROR


class UsageError(FerryError):
    """The caller asked for something malformed (bad URL, port out of range, ...)."""

    exit_code = ExitCode.USAGE


class ConnectionClosed(FerryError):
    """The connection was closed by *us*; using it again is a programming error."""

    exit_code = ExitCode.CONNECTION


class ConnectionBroken(FerryError):
    """The peer or the network ended the connection (reset, EOF mid-message, timeout)."""

    exit_code = ExitCode.CONNECTION


class FerryTimeout(ConnectionBroken):
    """An operation did not complete within its time limit."""


class AuthError(FerryError):
    """Authentication failed: wrong password, unknown user, or the account may not do this."""

    exit_code = ExitCode.AUTH


class RemoteError(FerryError):
    """The server refused or failed an operation; ``code`` is the wire error code.

    Build one with :meth:`ferry.wire.codes.ErrorCode.error` (the registry picks the class).
    """

    exit_code = ExitCode.ERROR

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class NotFound(RemoteError):
    """The remote path does not exist."""

    exit_code = ExitCode.NOT_FOUND


class PermissionDenied(RemoteError):
    """The path is outside the user's home or not permitted."""

    exit_code = ExitCode.NOT_FOUND


class TransferError(FerryError):
    """A transfer failed: integrity mismatch, quota, disk full, source vanished."""

    exit_code = ExitCode.TRANSFER


class IntegrityError(TransferError):
    """The received data does not match the sender's hash; the copy was discarded."""


class AccountError(UsageError):
    """An account operation was given bad input: invalid user name, empty password, bad quota."""


class UserExists(AccountError):
    """``add`` was asked to create a user that already exists."""


class NoSuchUser(AccountError):
    """An account operation named a user that does not exist (never raised by login: see AuthError)."""


class HostKeyMismatch(FerryError):
    """The server's TLS certificate differs from the one pinned in known_hosts.

    Deliberately *not* a ConnectionBroken: code that retries broken connections must not retry
    this one, because retrying cannot help and the peer may be an attacker.
    """

    exit_code = ExitCode.CONNECTION


# --- Filesystem errors raised by the server's jail (ferry.server.jail); wire codes in comments. ---


class PathRefused(PermissionDenied):
    """The client path is refused before touching the disk.

    Codes: ``outside-home`` (absolute or ``..``), ``bad-path`` (NUL, empty or ``.`` component, too long),
    ``symlink`` (the path goes through a symbolic link, which the jail never follows),
    ``reserved-name`` (a name of the partial-upload namespace ``.NAME.ferry-part-TOKEN``).
    """


class AlreadyExists(RemoteError):
    """The destination already exists (code ``exists``)."""

    exit_code = ExitCode.USAGE


class NotADirectory(RemoteError):
    """A folder was expected but the path is something else (code ``not-a-directory``)."""

    exit_code = ExitCode.USAGE


class IsADirectory(RemoteError):
    """A file was expected but the path is a folder (code ``is-a-directory``)."""

    exit_code = ExitCode.USAGE


class NotAFile(RemoteError):
    """The path is a device, FIFO or socket, which ferry never reads or writes (code ``not-a-file``)."""

    exit_code = ExitCode.USAGE


class DirectoryNotEmpty(RemoteError):
    """A folder could not be removed because it is not empty (code ``not-empty``)."""

    exit_code = ExitCode.USAGE


class DiskFull(RemoteError, TransferError):
    """The server ran out of disk space or quota (codes ``disk-full``, ``quota``)."""

    exit_code = ExitCode.TRANSFER


class ServerBusy(RemoteError):
    """The server cannot take this request now (too many open transfers on the connection, out of
    file descriptors); the connection is fine: try the request again later (code ``busy``)."""

    exit_code = ExitCode.ERROR


class BadRequest(RemoteError):
    """The server could not accept the request as given (an empty command, a malformed tree record);
    the connection goes on (code ``bad-request``)."""

    exit_code = ExitCode.USAGE


class RemoteIntegrityError(RemoteError, IntegrityError):
    """The server found that uploaded data did not match the client's hashes (code ``integrity``)."""

    exit_code = ExitCode.TRANSFER


class RemoteTransferError(RemoteError, TransferError):
    """A transfer failed on the server: the file changed, the transfer was cancelled, or the
    server's storage failed (codes ``changed``, ``cancelled``, ``io``)."""

    exit_code = ExitCode.TRANSFER


class RemoteAuthError(RemoteError, AuthError):
    """The server refused the login (code ``auth``)."""

    exit_code = ExitCode.AUTH


class RemoteConnectionError(RemoteError, ConnectionBroken):
    """The server ended the whole connection with an error: it refused it (``refused``: a
    connection or login limit, out of capacity, shutting down), a protocol violation
    (``protocol``), no common version (``version``)."""

    exit_code = ExitCode.CONNECTION


# --- The object backend (ferry.store): storage that is not a local folder. ---


class StoreUnavailable(RemoteError):
    """The database or the object store cannot be reached, or refused the server's credentials
    (code ``unavailable``). Nothing that was acknowledged is lost; the same request can be retried
    once it is back."""

    exit_code = ExitCode.CONNECTION


class ChunkDamaged(RemoteError, IntegrityError):
    """A stored chunk is missing or its bytes do not match the hash recorded for it (code
    ``corrupt``); found on read, before any of its bytes are handed out."""

    exit_code = ExitCode.TRANSFER


class UploadGone(RemoteError):
    """The partial upload was removed while in use (its folder was removed, or it was swept as
    stale) (code ``upload-gone``); start the upload again."""

    exit_code = ExitCode.TRANSFER
