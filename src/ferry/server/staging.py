"""Upload staging: how content reaches a final name in the jail without a half-written file ever
appearing under it.

Large uploads write a resumable partial file ``.NAME.ferry-part-TOKEN`` next to the target
(:meth:`Staging.open_partial`). A partial is resumed only if it is genuine: a regular file with one
link that carries the :data:`PARTIAL_XATTR` mark the server set when it created it; anything else
under that name is never read, written or truncated, only replaced by a fresh partial.
:meth:`Staging.commit` moves the inode whose descriptor the upload wrote, not whatever carries the
partial's name by then. Small files are written to a temp name and renamed in one path walk
(:meth:`Staging.store_small`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable
from typing import Final

from ferry.fskit import (
    NEW_PARTIAL_FLAGS,
    READ_FLAGS,
    TEMP_FLAGS,
    is_partial_name,
    partial_name,
    store_atomically,
)
from ferry.server.jailcore import (
    Creations,
    JailCore,
    _ident,
    _kind_at,
    _rename,
    _rename_noreplace,
    _require_regular,
)
from ferry.server.oserrors import _translating
from ferry.server.pathrules import _resume_name, _show, join_path, refuse_reserved
from ferry.wire.codes import ErrorCode

#: Extended attribute set on every partial file the server creates; its value is the partial's own
#: name. Survives a restart (it lives with the inode), so resume after a restart still works; a
#: file that lacks it (made by anyone else, or renamed from another partial's name) is not resumed.
PARTIAL_XATTR: Final = "user.ferry.partial"


def _mark_partial(fd: int, pname: str) -> None:
    """Mark a partial the server just created (best effort: without the mark, e.g. on a filesystem
    without user extended attributes, the upload still works but cannot be resumed)."""
    with contextlib.suppress(OSError):
        os.setxattr(fd, PARTIAL_XATTR, os.fsencode(pname))


def _is_genuine_partial(fd: int, st: os.stat_result, pname: str) -> bool:
    """True if open file ``fd`` (status ``st``) is a partial the server created under ``pname``: a
    regular file with exactly one link, carrying the mark :func:`_mark_partial` set."""
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        return False
    try:
        return os.getxattr(fd, PARTIAL_XATTR) == os.fsencode(pname)
    except OSError:  # no mark (ENODATA), or no extended attributes here at all
        return False


def _marked_partial_at(dir_fd: int, name: str, st: os.stat_result) -> bool:
    """True if entry ``name`` of folder ``dir_fd`` (status ``st``, not followed) is a regular file
    with one link that carries the partial mark for its own name (see :func:`_is_genuine_partial`)."""
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        return False
    try:
        # Through the folder's descriptor (os.getxattr has no dir_fd); the name itself not followed.
        mark = os.getxattr(f"/proc/self/fd/{dir_fd}/{name}", PARTIAL_XATTR, follow_symlinks=False)
    except OSError:
        return False
    return mark == os.fsencode(name)


def _reopen_rw(ro: int, st: os.stat_result) -> int:
    """Open the inode of read-only descriptor ``ro`` again, read-write, without a name lookup
    (``/proc/self/fd``): the inode that was checked is the one opened for writing."""
    fd = os.open(f"/proc/self/fd/{ro}", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    if _ident(os.fstat(fd)) != _ident(st):  # cannot happen through /proc; never write if it did
        os.close(fd)
        raise ErrorCode.CHANGED.error("a partial file changed while it was opened; try again")
    return fd


# --------------------------------------------------------------------------------------------------
# The jail

_UPLOAD_NEEDS_NAME: Final = "an upload needs a file name inside your home folder, not the home folder itself"


def _store_small_at(
    pfd: int,
    name: str,
    path: str,
    data: bytes,
    *,
    mode: int,
    mtime: float,
    overwrite: bool,
    admit: Callable[[int], None] | None = None,
    inspect: bool = True,
    temp: str | None = None,
    creations: Creations | None = None,
) -> int:
    """:meth:`Jail.store_small` once the parent folder is open as ``pfd`` (raises OSError as well
    as FerryErrors; the caller translates). Returns the size of the regular file it replaced.
    ``admit`` is called with that size before anything is written and may refuse by raising (a
    quota check needs to know what the file replaces). ``inspect`` False skips looking at the
    destination first (only with ``overwrite``; then 0 is returned). ``temp`` is the name of the
    hidden temp file (a partial name; default: a random one). ``creations`` sees the file first if
    it is a new name (the destination is then always looked at)."""
    replaced = 0
    st: os.stat_result | None = None
    if inspect or not overwrite or creations is not None:
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise ErrorCode.IS_A_DIRECTORY.error(
                f"{_show(path)} is a folder; upload to a file name inside it"
            )
        if not overwrite:
            raise ErrorCode.EXISTS.error(f"{_show(path)} already exists")
        if stat.S_ISREG(st.st_mode):
            replaced = st.st_size
    if admit is not None:
        admit(replaced)
    taker = creations if st is None else None  # a new name: one more entry
    if taker is not None:
        taker.take(path)
    try:
        store_atomically(
            name,
            data,
            dir_fd=pfd,
            mode=mode & 0o777,
            mtime=mtime,
            temp=temp,
            rename=lambda _s, src, _d, dst: _rename(pfd, src, pfd, dst, overwrite=overwrite),
        )
    except BaseException:
        if taker is not None:
            taker.give_back()
        raise
    return replaced


def _replace_name(pfd: int, name: str, pname: str) -> int:
    """Create a fresh, marked partial for final name ``name`` under a private random name and
    rename it over ``pname`` (which holds a file the server did not create: only that *name* is
    replaced, its inode is left alone). Returns the new partial's read-write fd."""
    for _ in range(16):
        private = partial_name(name, secrets.token_hex(8))
        try:
            fd = os.open(private, NEW_PARTIAL_FLAGS, 0o600, dir_fd=pfd)
        except FileExistsError:
            continue  # astronomically unlikely with 64 random bits; pick another
        try:
            _mark_partial(fd, pname)
            os.rename(private, pname, src_dir_fd=pfd, dst_dir_fd=pfd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(private, dir_fd=pfd)
            raise
        return fd
    raise ErrorCode.EXISTS.error("could not create a partial file; try again")


def _take_verified(sfd: int, sname: str, dname: str, fd: int, final_rel: str) -> str:
    """Move partial ``sname`` (in ``sfd``) to a private random name and check that it is the inode
    open as ``fd`` with a single link; returns the private name. Otherwise the entry is put back and
    ``changed`` raised: a commit must never publish bytes it did not verify."""
    why = "was removed"
    for _ in range(16):
        private = partial_name(dname, secrets.token_hex(8))
        try:
            _rename_noreplace(sfd, sname, sfd, private)
        except FileExistsError:
            continue
        except FileNotFoundError:
            break
        mine = os.fstat(fd)
        st = os.stat(private, dir_fd=sfd, follow_symlinks=False)
        if _ident(st) == _ident(mine) and mine.st_nlink == 1:
            return private
        with contextlib.suppress(OSError):
            _rename_noreplace(sfd, private, sfd, sname)
        why = "was replaced" if _ident(st) != _ident(mine) else "got another link"
        break
    raise ErrorCode.CHANGED.error(
        f"{_show(final_rel)}: the upload's partial file {why} while the data was on its way; "
        "nothing was kept (run the upload again)",
    )


def _refuse_existing_dir(pfd: int, name: str, path: str) -> None:
    """Fail early, before any data is sent, if an upload's destination is an existing folder."""
    try:
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise ErrorCode.IS_A_DIRECTORY.error(f"{_show(path)} is a folder; upload to a file name inside it")


class Staging(JailCore):
    """Upload staging of a jail (see the module docstring)."""

    def create_temp(self, path: str) -> tuple[int, str]:
        """Create a new, empty temporary file next to ``path`` for an upload to ``path``.

        Returns ``(fd, temp_rel)``: a write-only fd (mode 0o600, created with O_EXCL|O_NOFOLLOW, so it
        is always a fresh regular file) and its client path ``.<name>.ferry-part-<random>`` in the same
        folder as ``path`` (so :meth:`commit` is an atomic rename on one filesystem). Fails early with
        ``is-a-directory`` if ``path`` is an existing folder.
        """
        parts = self._needs_name(path, _UPLOAD_NEEDS_NAME)
        refuse_reserved(parts[-1], path)
        with _translating(path), self._parent(parts) as (pfd, name):
            _refuse_existing_dir(pfd, name, path)
            for _ in range(16):
                temp = partial_name(name, secrets.token_hex(8))
                try:
                    fd = os.open(temp, TEMP_FLAGS, 0o600, dir_fd=pfd)
                except FileExistsError:
                    continue  # astronomically unlikely with 64 random bits; just pick another
                return fd, join_path((*parts[:-1], temp))
            raise ErrorCode.EXISTS.error(f"{_show(path)}: could not create a temporary file")

    def store_small(
        self,
        path: str,
        data: bytes,
        *,
        mode: int,
        mtime: float,
        overwrite: bool = True,
        creations: Creations | None = None,
    ) -> int:
        """Write a small file to ``path`` atomically, in one walk: a temp file next to it, data,
        mode and mtime, then a rename. Returns the size of the regular file it replaced (0 if none).

        For small uploads (a 10,000-file tree) the separate lstat/create_temp/commit calls walked
        the path four times. No fsync, as for ``cp`` and ``rsync``: the rename still guarantees the
        final name only ever shows complete content.
        """
        parts = self._needs_name(path, _UPLOAD_NEEDS_NAME)
        refuse_reserved(parts[-1], path)
        with _translating(path), self._parent(parts) as (pfd, name):
            return _store_small_at(
                pfd, name, path, data, mode=mode, mtime=mtime, overwrite=overwrite, creations=creations
            )

    def open_partial(
        self, path: str, token: str, *, on_foreign: Callable[[str, os.stat_result], None] | None = None
    ) -> tuple[int, str, int]:
        """Open or create the resumable partial file for an upload to ``path``.

        The name is deterministic, ``.<name>.ferry-part-<token>`` next to ``path``, so a reconnecting
        client with the same ``token`` (1-64 of ``[A-Za-z0-9_-]``) finds what it sent before. Returns
        ``(fd, partial_rel, size)``: a blocking read-write fd (read access lets the server hash the
        prefix it already has before resuming) positioned at the end, the partial's client path, and
        the size it holds.

        Only a *genuine* partial is resumed: a regular file with one link that carries the mark the
        server set when it created it under this name (:data:`PARTIAL_XATTR`). Anything else found
        under the name (a hard link to another file, a file someone else made or renamed there) is
        never read, written or truncated: a fresh partial replaces the *name* (atomically, by a
        rename), ``size`` is 0, and ``on_foreign(partial_rel, its status)`` is called so the caller
        can log it. A symlink, folder or special file under that name is refused.
        """
        parts = self._needs_name(path, _UPLOAD_NEEDS_NAME)
        refuse_reserved(parts[-1], path)
        with _translating(path), self._parent(parts) as (pfd, name):
            _refuse_existing_dir(pfd, name, path)
            pname = _resume_name(name, token)
            prel = join_path((*parts[:-1], pname))
            for _ in range(8):  # bounded: each retry means the name changed under us
                try:
                    st = os.stat(pname, dir_fd=pfd, follow_symlinks=False)
                except FileNotFoundError:
                    try:
                        fd = os.open(pname, NEW_PARTIAL_FLAGS, 0o600, dir_fd=pfd)
                    except FileExistsError:
                        continue  # created meanwhile: look at it again
                    _mark_partial(fd, pname)
                    return fd, prel, 0
                # Checked before opening, so a device planted under the name is never opened.
                _require_regular(st, prel)
                try:
                    ro = os.open(pname, READ_FLAGS, dir_fd=pfd)
                except FileNotFoundError:
                    continue
                try:
                    st = os.fstat(ro)
                    _require_regular(st, prel)  # swapped for a FIFO since the check
                    if _is_genuine_partial(ro, st, pname):
                        fd = _reopen_rw(ro, st)
                        try:
                            os.lseek(fd, 0, os.SEEK_END)
                        except BaseException:
                            os.close(fd)
                            raise
                        return fd, prel, st.st_size
                finally:
                    os.close(ro)
                # Not ours: leave its content alone and give the name to a fresh partial.
                if on_foreign is not None:
                    on_foreign(prel, st)
                return _replace_name(pfd, name, pname), prel, 0
            raise ErrorCode.CHANGED.error(f"{_show(prel)} keeps changing; try again")

    def remove_partial(self, partial_rel: str, fd: int) -> None:
        """Unlink partial ``partial_rel`` if it still names the inode open as ``fd`` (an upload
        discarding its own partial must not delete whatever was put under that name since)."""
        parts = self._needs_name(partial_rel, _UPLOAD_NEEDS_NAME)
        if not is_partial_name(parts[-1]):
            raise ErrorCode.BAD_PATH.error(f"{_show(partial_rel)} is not a ferry partial file")
        with (
            _translating(partial_rel),
            self._parent(parts) as (pfd, pname),
            contextlib.suppress(FileNotFoundError),
        ):
            if _ident(os.stat(pname, dir_fd=pfd, follow_symlinks=False)) == _ident(os.fstat(fd)):
                os.unlink(pname, dir_fd=pfd)

    def commit(
        self,
        temp_rel: str,
        final_rel: str,
        *,
        overwrite: bool = True,
        durable: bool = True,
        fd: int | None = None,
        creations: Creations | None = None,
    ) -> None:
        """Atomically move a finished upload from ``temp_rel`` (a partial file) to ``final_rel``.

        The caller must ``fsync`` the file's fd *before* committing, so the final name never points at
        data that a crash could lose. With ``durable`` (default) the jail then fsyncs the folder(s), so
        the rename itself survives a crash. An existing file (or symlink: the link is replaced, not
        its target) at ``final_rel`` is replaced, unless ``overwrite`` is False: then it fails with
        ``exists``, atomically, so a check made when the upload started cannot be raced. An existing
        folder is never replaced (``is-a-directory``). ``temp_rel`` must name a partial file.

        With ``fd`` (the descriptor the upload wrote and verified), the inode moved is that one:
        the partial is first renamed to a private random name, which only this call knows, and
        checked there (same device and inode as ``fd``, one link) before it gets the final name. If
        anything else carries the partial's name by then, nothing is moved (code ``changed``) and
        that file is put back where it was. ``creations`` sees the final name first if it is new.
        """
        tparts = self._needs_name(temp_rel, _UPLOAD_NEEDS_NAME)
        if not is_partial_name(tparts[-1]):
            raise ErrorCode.BAD_PATH.error(f"{_show(temp_rel)} is not a ferry partial file")
        fparts = self._needs_name(final_rel, _UPLOAD_NEEDS_NAME)
        refuse_reserved(fparts[-1], final_rel)
        with (
            _translating(temp_rel, final_rel),
            self._parent(tparts) as (sfd, sname),
            self._parent(fparts) as (dfd, dname),
        ):
            taker = creations if creations is not None and _kind_at(dfd, dname) is None else None
            if taker is not None:
                taker.take(final_rel)
            try:
                if fd is not None:
                    sname = _take_verified(sfd, sname, dname, fd, final_rel)
                try:
                    _rename(sfd, sname, dfd, dname, overwrite=overwrite)
                except BaseException:
                    if fd is not None:  # keep the partial resumable under its own name
                        with contextlib.suppress(OSError):
                            _rename_noreplace(sfd, sname, sfd, tparts[-1])
                    raise
            except BaseException:
                if taker is not None:
                    taker.give_back()
                raise
            if fd is not None:
                # A complete file is no partial any more: drop the mark (best effort).
                with contextlib.suppress(OSError):
                    os.removexattr(fd, PARTIAL_XATTR)
            if durable:
                os.fsync(dfd)
                if tparts[:-1] != fparts[:-1]:
                    os.fsync(sfd)
