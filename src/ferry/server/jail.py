"""The jail: the one way the server touches a user's files (the folder backend,
:class:`ferry.server.folder.FolderStorage`, stands on it).

:class:`Jail` joins the jail's concerns, each in its own module (bottom up):

- :mod:`ferry.server.pathrules` -- the path rules (:func:`parse_path`: no absolute paths, no ``..``,
  no NUL, no empty or ``.`` components; reserved partial names; depth and length limits);
- :mod:`ferry.server.oserrors` -- error translation (:func:`translate_oserror`);
- :mod:`ferry.server.jailcore` -- the home descriptor, race-free resolution with ``O_NOFOLLOW``
  relative to directory descriptors, and the namespace operations (stat, list, mkdir, remove,
  rename, utime, chmod, open);
- :mod:`ferry.server.staging` -- upload staging (partial files, their genuineness mark, the commit
  of the inode the upload wrote, small files in one walk);
- :mod:`ferry.server.walkers` -- the tree walkers (tree downloads and uploads, listings, sync
  listings);
- :mod:`ferry.server.usage` -- the usage count and the folder walk of the sweeper.

Policy (see docs/security.md): a symbolic link anywhere in a client path is refused with code
``symlink``, even one that points inside the home. Links are still listed (kind ``"link"``), can be
inspected with :meth:`Jail.lstat`, renamed, and removed (the link itself, never its target).
Partial uploads (``.NAME.ferry-part-TOKEN``) are the server's own namespace (code
``reserved-name``).

Linux is the target platform (``O_DIRECTORY``, ``O_NOFOLLOW``, ``renameat2``); the modules need
nothing beyond the standard library. A :class:`Jail` holds only its home descriptor, so one instance
may be used from several threads at once; :meth:`Jail.close` must only be called when none is using it.
The names below are importable from here as before; new code imports them from their own module.
"""

from __future__ import annotations

from ferry.server.jailcore import Creations, Entry, EntryKind
from ferry.server.oserrors import translate_oserror
from ferry.server.pathrules import MAX_DEPTH, MAX_PATH_BYTES, join_path, parse_path, refuse_reserved
from ferry.server.staging import PARTIAL_XATTR, Staging
from ferry.server.usage import HomeUsage, UsageWalks
from ferry.server.walkers import (
    EntryScan,
    ListScan,
    ScanRecord,
    TreeDir,
    TreeDirs,
    TreeFailure,
    TreeFile,
    TreeScan,
    Walkers,
)

__all__ = [
    "MAX_DEPTH",
    "MAX_PATH_BYTES",
    "PARTIAL_XATTR",
    "Creations",
    "Entry",
    "EntryKind",
    "EntryScan",
    "HomeUsage",
    "Jail",
    "ListScan",
    "ScanRecord",
    "TreeDir",
    "TreeDirs",
    "TreeFailure",
    "TreeFile",
    "TreeScan",
    "join_path",
    "parse_path",
    "refuse_reserved",
    "translate_oserror",
]


class Jail(Staging, Walkers, UsageWalks):
    """All file operations of one user, confined to their home folder.

    ``Jail(home)`` opens ``home`` (which must exist; the caller creates it) as a directory descriptor;
    the home path itself is trusted configuration and may be a symlink. Every method takes client paths
    as described in :func:`parse_path` and raises :class:`~ferry.errors.FerryError` subclasses only
    (``PathRefused``, ``NotFound``, ``PermissionDenied``, ``DiskFull``, ...), never a raw ``OSError``.
    Descriptors returned to the caller are close-on-exec and must be closed by the caller.

    Limit: a local process (not a ferry client) that moves a directory *out* of the home while an
    operation holds its descriptor would take that operation with it; local users with write access
    to the home are trusted. No client operation can do that: every rename stays inside the home.
    """
