"""The local side of a sync: listing a local tree, and the changes a pull makes to it.

Listing (a thread): folders before their contents, names sorted, symbolic links and special files
listed with their kind (never followed), excluded folders not entered, partial files of
interrupted transfers hidden. Changes: removals and attribute changes open each parent folder
component by component with ``O_NOFOLLOW`` below the destination root, so a symbolic link planted
in the destination cannot redirect them outside it.
"""

from __future__ import annotations

import os
import shutil
import stat as statmod
from pathlib import Path

from ferry import cdc
from ferry.errors import FerryError
from ferry.fskit import is_partial_name
from ferry.syncfilter import Filter
from ferry.syncplan import Listed, Node

# --- listing the local side ---------------------------------------------------------------------


def local_node(rel: str, st: os.stat_result) -> Node:
    mode = statmod.S_IMODE(st.st_mode)
    if statmod.S_ISREG(st.st_mode):
        return Node(rel, "file", st.st_size, st.st_mtime, mode)
    if statmod.S_ISDIR(st.st_mode):
        return Node(rel, "dir", 0, st.st_mtime, mode)
    if statmod.S_ISLNK(st.st_mode):
        return Node(rel, "link", st.st_size, st.st_mtime, mode)
    return Node(rel, "other", 0, st.st_mtime, mode)


def _with_digest(node: Node, path: str) -> Node:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        digest = cdc.content_digest_fd(fd, st.st_size)
    finally:
        os.close(fd)
    return Node(node.path, "file", st.st_size, st.st_mtime, statmod.S_IMODE(st.st_mode), digest)


def scan_local(root: Path, filt: Filter, checksum: bool) -> list[Listed] | None:
    """List the local tree at ``root`` (thread): folders before their contents, excluded folders not
    entered, symbolic links never followed. None if ``root`` does not exist; an unreadable entry
    is an ``error`` node."""
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
    stack = [""]
    while stack:
        rel = stack.pop()
        full = os.path.join(root, rel) if rel else os.fspath(root)
        try:
            with os.scandir(full) as it:
                found = sorted(it, key=lambda de: de.name)
        except OSError as exc:
            out.append(Node(rel, "error", message=f"{exc.strerror or exc}"))
            continue
        subdirs: list[str] = []
        for de in found:
            name = de.name
            if is_partial_name(name):
                continue
            sub = f"{rel}/{name}" if rel else name
            try:
                sub.encode("utf-8")
                est = de.stat(follow_symlinks=False)
            except UnicodeEncodeError:
                out.append(
                    Node(
                        sub.encode("utf-8", "backslashreplace").decode(),
                        "error",
                        message="the name is not valid UTF-8",
                    )
                )
                continue
            except OSError as exc:
                if isinstance(exc, FileNotFoundError):
                    continue  # vanished since listed
                out.append(Node(sub, "error", message=f"{exc.strerror or exc}"))
                continue
            node = local_node(sub, est)
            if filt and filt.excluded(sub, node.kind == "dir"):
                continue
            if node.kind == "file" and checksum:
                try:
                    node = _with_digest(node, de.path)
                except (OSError, FerryError) as exc:
                    node = Node(sub, "error", message=f"{getattr(exc, 'strerror', None) or exc}")
            out.append(node)
            if node.kind == "dir":
                subdirs.append(sub)
        stack.extend(reversed(subdirs))
    return out




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
