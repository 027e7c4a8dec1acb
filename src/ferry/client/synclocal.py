"""The local side of a sync: listing a local tree, and the changes a pull makes to it.

Listing (a thread): folders before their contents, names sorted, symbolic links and special files
listed with their kind (never followed), excluded folders not entered, partial files of
interrupted transfers hidden. Changes: removals and attribute changes open each parent folder
component by component with ``O_NOFOLLOW`` below the destination root, so a symbolic link planted
in the destination cannot redirect them outside it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import stat as statmod
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from ferry.errors import FerryError
from ferry.fskit import is_partial_name
from ferry.syncfilter import Filter
from ferry.syncplan import Listed, Node

# --- listing the local side ---------------------------------------------------------------------


def local_node(rel: str, st: os.stat_result) -> Node:
    """The listing entry of ``rel`` from its ``lstat``."""
    mode = statmod.S_IMODE(st.st_mode)
    if statmod.S_ISREG(st.st_mode):
        return Node(rel, "file", st.st_size, st.st_mtime, mode)
    if statmod.S_ISDIR(st.st_mode):
        return Node(rel, "dir", 0, st.st_mtime, mode)
    if statmod.S_ISLNK(st.st_mode):
        return Node(rel, "link", st.st_size, st.st_mtime, mode)
    return Node(rel, "other", 0, st.st_mtime, mode)


def _with_digest(node: Node, name: str, dir_fd: int | None = None) -> Node:
    from ferry import cdc  # only with --checksum: a quick-check sync does not load the hashing

    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        digest = cdc.content_digest_fd(fd, st.st_size)
    finally:
        os.close(fd)
    return Node(node.path, "file", st.st_size, st.st_mtime, statmod.S_IMODE(st.st_mode), digest)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def scan_local(root: Path, filt: Filter, checksum: bool) -> list[Listed] | None:
    """List the local tree at ``root`` (thread): folders before their contents, excluded folders not
    entered, symbolic links never followed. None if ``root`` does not exist; an unreadable entry
    is an ``error`` node.

    Each folder is opened once (never through a link: a folder swapped for a link while listed
    is an error entry) and its entries are looked at relative to it, which spares the kernel
    resolving the whole path again for each of them: this loop is most of a no-op sync's work."""
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return None
    top = local_node("", st)
    if top.kind == "file":
        if checksum:
            top = _with_digest(top, os.fspath(root))
        return [top]
    if top.kind != "dir":
        return [top]
    out: list[Listed] = [top]
    excluded = filt.excluded if filt else None
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            dfd = os.open(os.path.join(root, rel) if rel else root, _DIR_FLAGS)
        except OSError as exc:
            out.append(Node(rel, "error", message=f"{exc.strerror or exc}"))
            continue
        try:
            subdirs = _scan_folder(dfd, rel, excluded, checksum, out)
        except OSError as exc:
            out.append(Node(rel, "error", message=f"{exc.strerror or exc}"))
            continue
        finally:
            os.close(dfd)
        stack.extend(reversed(subdirs))
    return out


def _scan_folder(
    dfd: int, rel: str, excluded: Callable[[str, bool], bool] | None, checksum: bool, out: list[Listed]
) -> list[str]:
    """Append the entries of the open folder ``dfd`` (``rel``) to ``out``, names sorted; return
    the subfolders to enter, in order."""
    with os.scandir(dfd) as it:
        found = sorted((de.name, de) for de in it)
    subdirs: list[str] = []
    prefix = f"{rel}/" if rel else ""
    for name, de in found:
        if name[0] == "." and is_partial_name(name):
            continue
        sub = prefix + name
        try:
            if not sub.isascii():
                sub.encode("utf-8")
            est = de.stat(follow_symlinks=False)  # fstatat(dfd, name): no path walk
        except UnicodeEncodeError:
            bad = sub.encode("utf-8", "backslashreplace").decode()
            out.append(Node(bad, "error", message="the name is not valid UTF-8"))
            continue
        except FileNotFoundError:
            continue  # vanished since listed
        except OSError as exc:
            out.append(Node(sub, "error", message=f"{exc.strerror or exc}"))
            continue
        mode = est.st_mode
        if _S_ISREG(mode):
            if excluded is not None and excluded(sub, False):
                continue
            node = Node(sub, "file", est.st_size, est.st_mtime, _S_IMODE(mode))
            if checksum:
                try:
                    node = _with_digest(node, name, dfd)
                except (OSError, FerryError) as exc:
                    node = Node(sub, "error", message=f"{getattr(exc, 'strerror', None) or exc}")
            out.append(node)
        elif _S_ISDIR(mode):
            if excluded is not None and excluded(sub, True):
                continue
            out.append(Node(sub, "dir", 0, est.st_mtime, _S_IMODE(mode)))
            subdirs.append(sub)
        else:
            if excluded is not None and excluded(sub, False):
                continue
            out.append(local_node(sub, est))
    return subdirs


_S_ISREG, _S_ISDIR, _S_IMODE = statmod.S_ISREG, statmod.S_ISDIR, statmod.S_IMODE


class LocalListing:
    """:func:`scan_local` of ``root`` in a thread of its own, from the moment it is made.

    A command starts it before it connects, so that listing the local side overlaps the
    connection, TLS and login (the main thread mostly waits for the server then) instead of
    following them; a sync given a listing that does not fit (another root, filter or
    ``checksum``) lists again. The result, or the scan's exception, is delivered once
    (:meth:`result`)."""

    def __init__(self, root: Path, rules: Sequence[str] = (), checksum: bool = False) -> None:
        self.root = Path(os.path.abspath(root))
        self.rules = tuple(rules)
        self.checksum = checksum
        filt = Filter(self.rules)  # a usage error surfaces here, before any thread starts
        self._future: concurrent.futures.Future[list[Listed] | None] = concurrent.futures.Future()
        threading.Thread(target=self._run, args=(filt,), name="ferry-scan", daemon=True).start()

    def _run(self, filt: Filter) -> None:
        if not self._future.set_running_or_notify_cancel():
            return
        try:
            self._future.set_result(scan_local(self.root, filt, self.checksum))
        except BaseException as exc:  # delivered to whoever awaits the result
            self._future.set_exception(exc)

    def fits(self, root: Path, rules: Sequence[str], checksum: bool) -> bool:
        """True if this is the listing a sync of ``root`` with these options needs."""
        return self.root == Path(os.path.abspath(root)) and self.rules == tuple(rules) and self.checksum == checksum

    async def result(self) -> list[Listed] | None:
        """The listing (None: ``root`` does not exist), once the thread has it."""
        return await asyncio.wrap_future(self._future)


# --- local changes (pull) ------------------------------------------------------------------------


def _open_parent(root: Path, rel: str) -> tuple[int, str]:
    """The descriptor of ``rel``'s folder under ``root``, opened component by component without
    following links (a link planted in the destination cannot redirect a change outside it)."""
    *parents, name = rel.split("/")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parents:
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd, name


def local_remove(root: Path, rel: str, recursive: bool) -> None:
    """Remove ``rel`` under ``root`` (a folder only if empty, unless ``recursive``); links themselves."""
    pfd, name = _open_parent(root, rel)
    try:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not statmod.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=pfd)
        elif recursive:
            import shutil  # only for a type change in a pull: start-up does not pay for it

            shutil.rmtree(name, dir_fd=pfd)
        else:
            os.rmdir(name, dir_fd=pfd)
    finally:
        os.close(pfd)


def makedirs(path: Path) -> None:
    """``mkdir -p`` (a folder a pull creates)."""
    os.makedirs(path, exist_ok=True)


def local_set_attrs(root: Path, rel: str, mode: int, mtime: float) -> None:
    """Set mode and mtime of ``rel`` under ``root`` (never through a link)."""
    if rel:
        pfd, name = _open_parent(root, rel)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=pfd)
        finally:
            os.close(pfd)
    else:
        fd = os.open(root, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fchmod(fd, mode & 0o777)
        os.utime(fd, (mtime, mtime))
    finally:
        os.close(fd)
