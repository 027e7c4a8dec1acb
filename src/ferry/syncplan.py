"""What a sync has to do: compare the source and destination listings (pure; no I/O).

Both sides of a sync are listed as :class:`Node` records (paths relative to the sync's root, ``""``
being the root itself), already filtered by the same rules (:mod:`ferry.syncfilter`). :func:`plan`
compares them and returns the :class:`Item` list the engine executes and ``-i`` / ``--json`` report:

- **quick check** (default): a file is unchanged when its size and mtime match (within 1 us: a float
  round trip of nanoseconds); ``checksum=True`` compares content digests instead, and a file whose
  content matches but whose mtime differs only gets its mtime set;
- a file or folder whose permission bits differ gets them set (``attrs``), its content is not sent;
- symbolic links, FIFOs, sockets and devices in the source are reported as ``skip`` (never silently
  dropped), as are entries the source could not read (``error``);
- with ``delete``, destination entries the source does not have are deleted, children before their
  folder; excluded entries are never listed, so never deleted. If the source had any read error,
  no deletion is planned at all (as rsync does): an unreadable folder must not look empty;
- a type change (a folder where the source has a file, or the reverse) is replaced only with
  ``delete``; otherwise it is skipped with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import msgspec

NodeKind = Literal["file", "dir", "link", "other", "error"]
Action = Literal["new", "update", "attrs", "same", "delete", "skip"]

#: Largest mtime difference still taken as equal (seconds).
MTIME_WINDOW = 1e-6
_SKIP_REASON = {
    "link": "symbolic link (not copied)",
    "other": "special file: FIFO, socket or device (not copied)",
}


class Listed(Protocol):
    """What the planner needs of a listed entry: a :class:`Node`, or the wire's ``SyncEntry`` as
    received (no conversion of 10,000 records)."""

    @property
    def path(self) -> str: ...
    @property
    def kind(self) -> NodeKind: ...
    @property
    def size(self) -> int: ...
    @property
    def mtime(self) -> float: ...
    @property
    def mode(self) -> int: ...
    @property
    def digest(self) -> bytes: ...
    @property
    def message(self) -> str: ...


class Node(msgspec.Struct, frozen=True, gc=False):
    """One entry of a listed tree.

    A msgspec struct rather than a dataclass: a listing makes one per entry (10,000 for a tree of
    10,000 files) and a struct is built ~10x faster and is not tracked by the garbage collector
    (it holds no containers)."""

    path: str
    kind: NodeKind
    size: int = 0
    mtime: float = 0.0
    mode: int = 0
    digest: bytes = b""
    message: str = ""  #: why an ``error`` entry could not be read


@dataclass(frozen=True, slots=True)
class Item:
    """One thing the sync does (or reports): ``action`` on ``path``; ``src`` / ``dst`` as listed."""

    action: Action
    path: str
    kind: NodeKind
    src: Listed | None = None
    dst: Listed | None = None
    reason: str = ""

    @property
    def size(self) -> int:
        """Bytes of the source file (0 for folders and deletions)."""
        return self.src.size if self.src is not None and self.src.kind == "file" else 0

    @property
    def sends_content(self) -> bool:
        """True if file content has to travel."""
        return self.kind == "file" and self.action in ("new", "update")


@dataclass
class Plan:
    """What a sync does, in execution order: :attr:`replace` (destination entries of another type
    in the way, removed recursively first), :attr:`items` (creations, transfers, attribute changes,
    and what is unchanged or skipped), :attr:`deletes` (children before their folders)."""

    replace: list[Item] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    deletes: list[Item] = field(default_factory=list)
    files: int = 0  #: source files considered
    bytes: int = 0  #: their bytes
    unchanged: int = 0  #: source files the destination already has (no item is made for them)
    deletions_suppressed: bool = False  #: --delete was asked but the source had read errors

    def all(self) -> list[Item]:
        """Every item in execution order."""
        return [*self.replace, *self.items, *self.deletes]

    @property
    def sends(self) -> list[Item]:
        """The items whose file content has to travel."""
        return [it for it in self.items if it.sends_content]

    @property
    def send_bytes(self) -> int:
        """Bytes of the files to send (the job's total for progress)."""
        return sum(it.size for it in self.items if it.sends_content)


def _sort_key(path: str) -> tuple[str, ...]:
    return tuple(path.split("/")) if path else ()


def same_mtime(a: float, b: float) -> bool:
    """Modification times equal within :data:`MTIME_WINDOW`."""
    return abs(a - b) <= MTIME_WINDOW


def _file_item(s: Listed, d: Listed | None, checksum: bool) -> Item:
    if d is None:
        return Item("new", s.path, "file", s, None)
    if d.kind in ("link", "other"):
        return Item("new", s.path, "file", s, d, f"replaces a {'symbolic link' if d.kind == 'link' else 'special file'}")
    if checksum:
        if s.size != d.size:
            return Item("update", s.path, "file", s, d, "size")
        if s.digest != d.digest or not s.digest:
            return Item("update", s.path, "file", s, d, "checksum")
    elif s.size != d.size:
        return Item("update", s.path, "file", s, d, "size")
    elif not same_mtime(s.mtime, d.mtime):
        return Item("update", s.path, "file", s, d, "mtime")
    why = _attr_reason(s, d)
    if why:
        return Item("attrs", s.path, "file", s, d, why)
    return Item("same", s.path, "file", s, d)


def _attr_reason(s: Listed, d: Listed) -> str:
    parts = []
    if (s.mode & 0o777) != (d.mode & 0o777):
        parts.append("mode")
    if not same_mtime(s.mtime, d.mtime):
        parts.append("mtime")
    return ",".join(parts)


def plan(
    src: Iterable[Listed],
    dst: Iterable[Listed],
    *,
    checksum: bool = False,
    delete: bool = False,
    force: bool = False,
) -> Plan:
    """Compare the listings; see the module documentation for the rules. ``force`` sends every
    file again, changed or not (``--force``). Both listings must name folders before their
    contents (the scans do): the items come out in ``src``'s order."""
    dst_by = {n.path: n for n in dst}
    out = Plan()
    items: list[Item] = []
    replaced: list[Item] = []  # destination entries deleted to make room (type changes)
    seen: set[str] = set()
    errors = False
    quick = not checksum and not force
    for s in src:
        seen.add(s.path)
        d = dst_by.get(s.path)
        if (
            quick
            and s.kind == "file"
            and d is not None
            and d.kind == "file"
            and d.size == s.size
            and abs(d.mtime - s.mtime) <= MTIME_WINDOW
            and (d.mode & 0o777) == (s.mode & 0o777)
        ):  # the common case of a re-sync, without an Item per file
            out.files += 1
            out.bytes += s.size
            out.unchanged += 1
            continue
        if s.kind == "error":
            errors = True
            items.append(Item("skip", s.path, "error", s, d, s.message or "could not be read"))
            continue
        if s.kind in ("link", "other"):
            items.append(Item("skip", s.path, s.kind, s, d, _SKIP_REASON[s.kind]))
            continue
        if s.kind == "file":
            out.files += 1
            out.bytes += s.size
            if d is not None and d.kind in ("dir", "error"):
                if delete and d.kind == "dir":
                    replaced.append(Item("delete", s.path, "dir", None, d, "a file replaces it"))
                    items.append(Item("new", s.path, "file", s, None, "replaces a folder"))
                else:
                    items.append(Item("skip", s.path, "file", s, d, "a folder of that name is in the way (--delete replaces it)"))
                continue
            item = _file_item(s, d, checksum)
            if force and item.action in ("same", "attrs"):
                item = Item("update", s.path, "file", s, d, "forced")
            if item.action == "same":
                out.unchanged += 1
            else:
                items.append(item)
            continue
        # a folder
        if d is not None and d.kind == "error":
            items.append(Item("skip", s.path, "dir", s, d, d.message or "the destination could not be read"))
        elif d is None:
            items.append(Item("new", s.path, "dir", s, None))
        elif d.kind == "dir":
            why = _attr_reason(s, d) if s.path else ""
            items.append(Item("attrs" if why else "same", s.path, "dir", s, d, why))
        elif delete or d.kind in ("link", "other"):
            replaced.append(Item("delete", s.path, d.kind, None, d, "a folder replaces it"))
            items.append(Item("new", s.path, "dir", s, None, f"replaces a {d.kind}"))
        else:
            items.append(Item("skip", s.path, "dir", s, d, f"a {d.kind} of that name is in the way (--delete replaces it)"))
    deletes: list[Item] = []
    if delete:
        if errors:
            out.deletions_suppressed = True
        else:
            under = tuple(r.path + "/" for r in replaced)
            for path, d in dst_by.items():
                # Entries inside a folder replaced by a file go with it (a recursive removal).
                if path and path not in seen and d.kind != "error" and not path.startswith(under or ("\0",)):
                    deletes.append(Item("delete", path, d.kind, None, d))
    # Deletions run after the transfers (a failed transfer deletes nothing), deepest first.
    deletes.sort(key=lambda it: _sort_key(it.path), reverse=True)
    out.replace = sorted(replaced, key=lambda it: _sort_key(it.path), reverse=True)
    out.items = items
    out.deletes = deletes
    return out
