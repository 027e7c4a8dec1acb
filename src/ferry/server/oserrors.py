"""Error translation: an ``OSError`` met while working on a client path becomes the server's
:class:`~ferry.errors.FerryError` for it (:func:`translate_oserror`), naming the client's path,
never the server's. The one translation of the server: the jail, the services and the session (for
an ``OSError`` a handler let through) all use it.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from typing import Final

from ferry.errors import RemoteError
from ferry.server.pathrules import _show
from ferry.wire.codes import ErrorCode

# --------------------------------------------------------------------------------------------------
# OSError -> FerryError


def _symlink_refused(path: str) -> RemoteError:
    return ErrorCode.SYMLINK.error(
        f"{_show(path)} is a symbolic link; ferry does not follow symbolic links on the server "
        "(use the real path of the file or folder instead)",
    )


# errnos whose subject is the destination of a two-path operation (rename, commit).
_DST_ERRNOS: Final = frozenset({errno.EEXIST, errno.EISDIR, errno.ENOTDIR, errno.ENOTEMPTY})


def translate_oserror(exc: OSError, path: str, dst: str | None = None) -> RemoteError:
    """Map an ``OSError`` raised while working on client path ``path`` to the server's error for it.

    The one translation of the server: the jail, the transfer handlers and the session (for an
    ``OSError`` a handler let through) all use it. ``dst`` is the destination of a rename; errors
    about the destination (exists, is a folder, ...) then name it instead of ``path``. Codes:
    ``not-found``, ``permission``, ``read-only``, ``disk-full``, ``quota``, ``exists``,
    ``not-a-directory``, ``is-a-directory``, ``not-empty``, ``symlink``, ``bad-path``,
    ``cross-device``, ``invalid``, ``busy``, and ``io`` for anything else.
    """
    code = exc.errno
    where = _show(dst if dst is not None and code in _DST_ERRNOS else path)
    if code == errno.ENOENT:
        return ErrorCode.NOT_FOUND.error(f"{where}: no such file or folder")
    if code in (errno.EACCES, errno.EPERM):
        return ErrorCode.PERMISSION.error(f"{where}: permission denied on the server")
    if code == errno.EROFS:
        return ErrorCode.READ_ONLY.error(f"{where}: the server's storage is read-only")
    if code == errno.ENOSPC:
        return ErrorCode.DISK_FULL.error(f"{where}: the server's disk is full")
    if code == errno.EDQUOT:
        return ErrorCode.QUOTA.error(f"{where}: disk quota exceeded on the server")
    if code == errno.EEXIST:
        return ErrorCode.EXISTS.error(f"{where} already exists")
    if code == errno.ENOTDIR:
        return ErrorCode.NOT_A_DIRECTORY.error(f"{where}: not a folder (or a part of the path is not)")
    if code == errno.EISDIR:
        return ErrorCode.IS_A_DIRECTORY.error(f"{where} is a folder")
    if code == errno.ENOTEMPTY:
        return ErrorCode.NOT_EMPTY.error(f"{where} is a folder that is not empty")
    if code == errno.ELOOP:
        # Every final open/stat here uses O_NOFOLLOW / AT_SYMLINK_NOFOLLOW: ELOOP means a symlink.
        return _symlink_refused(path)
    if code == errno.ENAMETOOLONG:
        return ErrorCode.BAD_PATH.error(f"{where}: name too long")
    if code == errno.EXDEV:
        return ErrorCode.CROSS_DEVICE.error(f"{where}: cannot move across filesystems on the server")
    if code == errno.EINVAL:
        return ErrorCode.INVALID.error(f"{where}: invalid operation (e.g. moving a folder into itself)")
    if code in (errno.EMFILE, errno.ENFILE, errno.EBUSY, errno.EAGAIN, errno.ETXTBSY):
        return ErrorCode.BUSY.error(f"{where}: the server is busy ({exc.strerror}); try again later")
    return ErrorCode.IO.error(f"{where}: {exc.strerror or 'I/O error'} on the server")


@contextlib.contextmanager
def _translating(path: str, dst: str | None = None) -> Iterator[None]:
    """Translate any ``OSError`` escaping the block (FerryErrors pass through untouched)."""
    try:
        yield
    except OSError as exc:
        raise translate_oserror(exc, path, dst) from exc
