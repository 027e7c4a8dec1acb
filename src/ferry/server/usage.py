"""Usage: the apparent size of everything under a home, counted by a descriptor walk that can be
spread over several thread jobs (:meth:`UsageWalks.usage_walk`), and the walk over every folder
of a home that the sweeper of stale partial uploads uses (:meth:`UsageWalks.folder_walk`).
"""

from __future__ import annotations

import collections
import errno
import os
import stat
from collections.abc import Generator
from dataclasses import dataclass, field

from ferry.fskit import (
    is_partial_name,
)
from ferry.server.jailcore import _SKIPPED, JailCore, _DirChain, _ident, _split_at
from ferry.server.oserrors import _translating
from ferry.server.staging import _marked_partial_at


@dataclass
class HomeUsage:
    """What a home holds, as :meth:`Jail.usage` counts it."""

    bytes: int = 0  #: apparent size of the complete regular files (a hard-linked file once)
    #: entries of every kind but partial uploads (files, folders, links...), the home not included
    entries: int = 0
    #: partial uploads (regular files the server marked as the partial of an upload):
    #: home-relative path -> size
    partials: dict[str, int] = field(default_factory=dict)


class UsageWalks(JailCore):
    """The usage count and the folder walk of a jail (see the module docstring)."""

    def usage(self) -> HomeUsage:
        """What the home holds: bytes and entries of complete files, and its partial uploads.

        Bytes are the apparent size (``st_size``) of regular files, not allocated blocks: it is what
        a user can predict from what they uploaded (sparse files, compression and block rounding do
        not change it). A file with several hard links inside the home counts its bytes once.
        The partials of uploads are counted apart (:attr:`HomeUsage.partials`): they occupy the
        disk and the quota like files, but are not entries the user sees; other files with a
        partial name (a small file's temporary) are not counted. Symbolic links are never followed.
        Cost is one ``lstat`` per entry; callers should cache the result.
        """
        last = collections.deque(self.usage_walk(), maxlen=1)  # the final tally
        return last[0] if last else HomeUsage()

    def usage_walk(self) -> Generator[HomeUsage, None, None]:
        """:meth:`usage` one entry at a time: yields the running tally after each entry (one
        object, updated in place; the last value is the usage; nothing for an empty home). Lets a
        caller spread the count over several thread jobs and stop between entries; close it when
        abandoned (it holds descriptors)."""
        tally = HomeUsage()
        seen: set[tuple[int, int]] = set()

        def scan(fd: int, rel: str) -> Generator[HomeUsage, None, list[str]]:
            subdirs: list[str] = []
            with os.scandir(fd) as it:
                for de in it:
                    try:
                        st = de.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if is_partial_name(de.name):
                        # Only the partials of uploads (marked when the server created them): a
                        # small file's temporary, there for microseconds (or left by a crash until
                        # the sweep), would stay counted as an idle partial that nobody ever frees.
                        if _marked_partial_at(fd, de.name, st):
                            tally.partials[f"{rel}/{de.name}" if rel else de.name] = st.st_size
                    else:
                        tally.entries += 1
                        if stat.S_ISDIR(st.st_mode):
                            subdirs.append(de.name)
                        elif stat.S_ISREG(st.st_mode) and (st.st_nlink == 1 or _ident(st) not in seen):
                            if st.st_nlink > 1:
                                seen.add(_ident(st))
                            tally.bytes += st.st_size
                    yield tally
            return subdirs

        with _translating(""):
            chain = _DirChain(self._home_fd(), self._max_open_dirs)
            try:
                pending = [("", (yield from scan(chain.top(), "")))]
                while pending:
                    rel, todo = pending[-1]
                    if not todo:
                        pending.pop()
                        if len(chain) > 1:
                            chain.pop()
                        continue
                    name = todo.pop()
                    try:
                        chain.push(name)
                    except OSError as exc:
                        # Vanished, or swapped for a non-directory/symlink since listed: skip it.
                        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                            continue
                        raise
                    sub = f"{rel}/{name}" if rel else name
                    pending.append((sub, (yield from scan(chain.top(), sub))))
            finally:
                chain.close()

    def folder_walk(self) -> Generator[tuple[str, int, list[str]], None, None]:
        """Every folder of the home, depth-first: ``(home-relative path, its descriptor, the names of
        its entries that are not folders)``. The descriptor is valid until the next step only.

        Iterative over the same descriptor chain as :meth:`usage` (at most ``MAX_OPEN_DIRS`` open,
        linear in the entries, no depth limit: ``os.fwalk`` recurses, and a tree ~1,000 levels deep
        made it fail with RecursionError). Symbolic links are never followed. A folder that cannot
        be read (permission) or that vanished or was swapped for a link since its parent was read is
        skipped. Close the generator when abandoned (it holds descriptors)."""
        with _translating(""):
            chain = _DirChain(self._home_fd(), self._max_open_dirs)
            try:
                subdirs, others = _split_at(chain.top())
                yield "", chain.top(), others
                stack = [("", subdirs)]
                while stack:
                    rel, todo = stack[-1]
                    if not todo:
                        stack.pop()
                        if len(chain) > 1:
                            chain.pop()
                        continue
                    name = todo.pop()
                    try:
                        chain.push(name)
                    except OSError as exc:
                        if exc.errno in _SKIPPED:
                            continue
                        raise
                    try:
                        subdirs, others = _split_at(chain.top())
                    except OSError as exc:
                        if exc.errno not in _SKIPPED:
                            raise
                        subdirs, others = [], []  # unreadable: left on the way back like an empty one
                    sub = f"{rel}/{name}" if rel else name
                    yield sub, chain.top(), others
                    stack.append((sub, subdirs))
            finally:
                chain.close()
