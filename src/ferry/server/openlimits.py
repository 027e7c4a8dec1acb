"""Per-user caps on open transfers: how many uploads and downloads one user may hold open at once.

Every open transfer holds a descriptor (an upload its partial file, a download the file it sends)
for as long as the client keeps it open, and a client decides how long that is. Caps per
connection alone did not bound one user: 8 connections held 989 streamed uploads open without
sending a byte and used up the server's 1,024 descriptors (issue 10, break 3). So every transfer
that holds a file open also takes a place here, counted per user across all their sessions on
this server, and a transfer beyond the cap is refused at once with ``busy`` for that request only
(the connection and the user's other transfers go on).

What counts: uploads (``PutFile`` that is not inline, a delta upload, a tree upload) and downloads
(``GetFile``, a tree download, ``GetFiles``, a delta download), from the moment the file is about
to be opened until it is closed. The event loop's thread only, like the rest of the counts.
"""

from __future__ import annotations

import enum
from collections import Counter
from types import TracebackType

from ferry.wire.codes import ErrorCode

__all__ = ["Hold", "Kind", "OpenTransfers"]


class Kind(enum.Enum):
    """What a transfer is, for its per-user cap."""

    UPLOAD = "upload"
    DOWNLOAD = "download"


class Hold:
    """One open transfer's place in the per-user count; :meth:`release` it (or leave its ``with``
    block) when the transfer's file is closed. Releasing twice is harmless."""

    def __init__(self, owner: OpenTransfers, user: str, kind: Kind) -> None:
        self._owner = owner
        self.user = user
        self.kind = kind
        self._released = False

    def release(self) -> None:
        """Give the place back (idempotent)."""
        if not self._released:
            self._released = True
            self._owner._release(self)

    def __enter__(self) -> Hold:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class OpenTransfers:
    """The per-user counts of open uploads and downloads and their caps (one per server)."""

    def __init__(self, *, uploads: int, downloads: int) -> None:
        self.caps = {Kind.UPLOAD: uploads, Kind.DOWNLOAD: downloads}
        self._open: dict[Kind, Counter[str]] = {Kind.UPLOAD: Counter(), Kind.DOWNLOAD: Counter()}
        self.refused = 0  #: transfers refused since the server started (for the log and tests)

    def count(self, user: str, kind: Kind) -> int:
        """Transfers of ``kind`` that ``user`` holds open now."""
        return self._open[kind][user]

    def take(self, user: str, kind: Kind) -> Hold:
        """A place for one more open transfer of ``user``, or ``busy`` (a request-scoped error)."""
        counts, cap = self._open[kind], self.caps[kind]
        if counts[user] >= cap:
            self.refused += 1
            raise ErrorCode.BUSY.error(
                f"too many open {kind.value}s: user {user!r} has {counts[user]} open across all "
                f"connections to this server (the server allows {cap} at once); finish or cancel "
                f"some, then try again",
            )
        counts[user] += 1
        return Hold(self, user, kind)

    def _release(self, h: Hold) -> None:
        counts = self._open[h.kind]
        counts[h.user] -= 1
        if counts[h.user] <= 0:
            del counts[h.user]  # bounded memory: only users with open transfers have an entry
