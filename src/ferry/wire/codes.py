"""The registry of wire error codes: one table, read by both sides.

Every ``Error`` message carries a ``code``. :class:`ErrorCode` lists them all, and for each one the
exception class it stands for (and so the exit status of the ``ferry`` command, the class's
``exit_code``) and its :class:`Scope`: whether it fails one request or the whole connection.

* The server raises ``ErrorCode.X.error(message)`` and sends :func:`reply_for` (or
  :meth:`ErrorCode.reply` for connection-level errors); it never spells a code as a string, and
  never derives one from a class name.
* The client turns a received ``Error`` into an exception with :func:`from_wire` and asks
  :func:`ends_connection` whether it fails one request or all of them.

So the server raises, and the client receives, the same exception class for a code. The exception
classes live in :mod:`ferry.errors`, below this module (it imports nothing of ferry), so there is no
import circle. Pure data and functions: no I/O. The table is documented in docs/wire.md (a test
keeps the two equal).
"""

from __future__ import annotations

import enum
from typing import Final

from ferry.errors import (
    AlreadyExists,
    BadRequest,
    ChunkDamaged,
    DirectoryNotEmpty,
    DiskFull,
    FerryError,
    IntegrityError,
    IsADirectory,
    NotADirectory,
    NotAFile,
    NotFound,
    PathRefused,
    PermissionDenied,
    RemoteAuthError,
    RemoteConnectionError,
    RemoteError,
    RemoteIntegrityError,
    RemoteTransferError,
    ServerBusy,
    StoreUnavailable,
    UploadGone,
    UsageError,
)
from ferry.wire import messages as m
from ferry.wire.errors import LocalProtocolError

__all__ = ["ErrorCode", "Scope", "code_of", "ends_connection", "from_wire", "lookup", "reply_for"]


class Scope(enum.Enum):
    """What an error code fails."""

    #: this request only (``Error.id`` is its id); the connection and other requests go on
    REQUEST = "request"
    #: the whole connection (``Error.id`` is 0): the handshake was refused or the server ends it
    CONNECTION = "connection"


_R, _C = Scope.REQUEST, Scope.CONNECTION
_MESSAGE_MAX: Final = 8192  # the bound of Error.message (ferry.wire.messages.Text)


class ErrorCode(enum.StrEnum):
    """A wire error code, with the exception class it maps to and its scope.

    Each member is ``(code, exception class, scope, lead)``; ``lead`` is put before the server's
    message on the client (for codes whose message alone would not say what happened).
    """

    exception: type[RemoteError]
    scope: Scope
    lead: str

    def __new__(cls, value: str, exception: type[RemoteError], scope: Scope = _R, lead: str = "") -> ErrorCode:
        obj = str.__new__(cls, value)
        obj._value_ = value
        obj.exception = exception
        obj.scope = scope
        obj.lead = lead
        return obj

    # --- paths and the jail ---------------------------------------------------------------
    NOT_FOUND = ("not-found", NotFound)
    NO_HOME = ("no-home", NotFound)
    PERMISSION = ("permission", PermissionDenied)
    READ_ONLY = ("read-only", PermissionDenied)
    OUTSIDE_HOME = ("outside-home", PathRefused)
    BAD_PATH = ("bad-path", PathRefused)
    SYMLINK = ("symlink", PathRefused)
    RESERVED_NAME = ("reserved-name", PathRefused)
    EXISTS = ("exists", AlreadyExists)
    NOT_A_DIRECTORY = ("not-a-directory", NotADirectory)
    IS_A_DIRECTORY = ("is-a-directory", IsADirectory)
    NOT_A_FILE = ("not-a-file", NotAFile)
    NOT_EMPTY = ("not-empty", DirectoryNotEmpty)
    CROSS_DEVICE = ("cross-device", RemoteError)
    INVALID = ("invalid", RemoteError)
    TOO_DEEP = ("too-deep", RemoteError)
    # --- storage and transfers ------------------------------------------------------------
    DISK_FULL = ("disk-full", DiskFull)
    QUOTA = ("quota", DiskFull)
    INTEGRITY = ("integrity", RemoteIntegrityError)
    CHANGED = ("changed", RemoteTransferError)
    CANCELLED = ("cancelled", RemoteTransferError)
    IO = ("io", RemoteTransferError)
    # --- the object backend (ferry.store) -------------------------------------------------
    UNAVAILABLE = ("unavailable", StoreUnavailable)
    CORRUPT = ("corrupt", ChunkDamaged)
    UPLOAD_GONE = ("upload-gone", UploadGone)
    INCOMPLETE = ("incomplete", RemoteTransferError)
    # --- requests -------------------------------------------------------------------------
    BUSY = ("busy", ServerBusy)
    BAD_REQUEST = ("bad-request", BadRequest)
    EXEC_DENIED = ("exec-denied", PermissionDenied)
    READ_ONLY_TOKEN = ("read-only-token", PermissionDenied)
    EXEC_FAILED = ("exec-failed", RemoteError)
    INTERNAL = ("internal", RemoteError)
    # --- the connection -------------------------------------------------------------------
    AUTH = ("auth", RemoteAuthError, _C)
    #: sent as ``Goodbye.code``: the login was revoked (user removed, password or key changed)
    REVOKED = ("revoked", RemoteAuthError, _C)
    VERSION = ("version", RemoteConnectionError, _C, "no common protocol version")
    PROTOCOL = ("protocol", RemoteConnectionError, _C, "the server reported a protocol error")
    REFUSED = ("refused", RemoteConnectionError, _C, "the server refused the connection")

    @property
    def exit_status(self) -> int:
        """The exit status of the ``ferry`` command failing with this code."""
        return self.exception.exit_code

    def error(self, message: str) -> RemoteError:
        """The exception for this code (the class the registry names), to raise on the server."""
        return self.exception(self.value, message)

    def reply(self, req_id: int, message: str) -> m.Error:
        """The ``Error`` message; ``req_id`` must be 0 exactly for a connection-level code."""
        if (req_id == 0) != (self.scope is Scope.CONNECTION):
            raise LocalProtocolError(f"error code {self.value!r} ({self.scope.value}) sent with id {req_id}")
        return m.Error(id=req_id, code=self.value, message=message[:_MESSAGE_MAX])


_BY_VALUE: Final[dict[str, ErrorCode]] = {c.value: c for c in ErrorCode}

#: Exceptions that are not RemoteErrors but may be raised while serving a request, and their code.
_BY_CLASS: Final[tuple[tuple[type[FerryError], ErrorCode], ...]] = (
    (IntegrityError, ErrorCode.INTEGRITY),
    (UsageError, ErrorCode.BAD_REQUEST),
)


def lookup(code: str) -> ErrorCode | None:
    """The registered code spelt ``code``, or None (a code of a newer server, say)."""
    return _BY_VALUE.get(code)


def code_of(exc: BaseException) -> ErrorCode:
    """The request-level code the server sends for ``exc`` (raised while serving a request).

    A :class:`RemoteError` carries its code; a few other ferry errors have a code here; everything
    else (a bug, or a code missing from the registry) is ``internal``.
    """
    if isinstance(exc, RemoteError):
        code = lookup(exc.code)
        return code if code is not None and code.scope is Scope.REQUEST else ErrorCode.INTERNAL
    for cls, code in _BY_CLASS:
        if isinstance(exc, cls):
            return code
    return ErrorCode.INTERNAL


def reply_for(req_id: int, exc: BaseException) -> m.Error:
    """The ``Error`` reply for an exception raised while serving request ``req_id``.

    The message of a ferry error is meant for the user and goes as it is; anything else is a bug
    whose text is not shown (it could reveal server paths): only its type.
    """
    code = code_of(exc)
    if isinstance(exc, FerryError):
        message = str(exc)
        if code is ErrorCode.INTERNAL and isinstance(exc, RemoteError) and exc.code != code.value:
            message = f"{message} (unregistered error code {exc.code!r})"
    else:
        message = f"internal server error ({type(exc).__name__})"
    return code.reply(req_id, message)


def ends_connection(err: m.Error) -> bool:
    """Whether a received ``Error`` fails the whole connection (else only the request ``err.id``)."""
    code = lookup(err.code)
    return err.id == 0 or (code is not None and code.scope is Scope.CONNECTION)


def from_wire(err: m.Error) -> RemoteError:
    """The exception for a received ``Error`` (by the registry; an unknown code is a plain
    :class:`RemoteError` for a request, a :class:`RemoteConnectionError` for the connection)."""
    code = lookup(err.code)
    cls: type[RemoteError] = RemoteError if code is None else code.exception
    if ends_connection(err) and not issubclass(cls, RemoteConnectionError | RemoteAuthError):
        cls = RemoteConnectionError  # whatever it says, the server has ended the connection
    message = f"{code.lead}: {err.message}" if code is not None and code.lead else err.message
    return cls(err.code, message)
