"""Errors of the object backend, as :class:`ferry.errors.FerryError` subclasses with wire codes.

The namespace errors (missing path, exists, not a folder, not empty, quota) reuse the classes the
folder backend's jail raises, with the same codes, so a client cannot tell the backends apart by their
errors. New codes here (plain strings, as TEAM.md asks until the error registry lands):
``unavailable`` (the database or the object store cannot be reached), ``corrupt`` (a stored chunk is
missing or does not match its hash), ``upload-gone`` (a partial upload was removed while in use).
"""

from __future__ import annotations

from ferry.errors import ExitCode, IntegrityError, RemoteError


class StoreUnavailable(RemoteError):
    """The database or the object store cannot be reached, or refused our credentials (code
    ``unavailable``). Nothing that was acknowledged is lost; the same request can be retried once it
    is back."""

    exit_code = ExitCode.CONNECTION

    def __init__(self, message: str) -> None:
        super().__init__("unavailable", message)


class ChunkDamaged(RemoteError, IntegrityError):
    """A chunk object is missing from the store or its bytes do not match the hash recorded for it
    (code ``corrupt``). Raised on read, before any of its bytes are handed out."""

    exit_code = ExitCode.TRANSFER

    def __init__(self, message: str) -> None:
        super().__init__("corrupt", message)


class UploadGone(RemoteError):
    """The partial upload was removed while in use (its folder was removed, or it was swept as stale)
    (code ``upload-gone``); start the upload again."""

    exit_code = ExitCode.TRANSFER

    def __init__(self, message: str) -> None:
        super().__init__("upload-gone", message)
