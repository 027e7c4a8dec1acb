"""Remote glob patterns, expanded on the server inside the jail (``ListDir(glob=True)``).

``ferry get 'HOST:logs/*.log' dest/`` must not ask the client to list folders and match names
itself, one round trip per level, and the matching must not step outside the home: so the
server expands the pattern, with the same jail as every other request (directories opened by
descriptor, symbolic links never followed).

The rules, as a POSIX shell matches file names (``fnmatch`` per path component, case-sensitive):

- ``*`` matches any run of characters, ``?`` one character, ``[abc]`` / ``[a-z]`` / ``[!abc]`` one
  character of (or not of) a set; none of them matches ``/``.
- A name starting with ``.`` is matched only by a component that starts with ``.`` itself (as
  shells do: ``*`` does not list hidden files).
- A component without ``*``, ``?`` or ``[`` is a plain name; ``[*]`` matches a literal ``*``.
- There is no ``**``: it is ``*`` (one level). A pattern crosses folders only where it has a ``/``;
  a symbolic link is never entered (it can match as the last component only).
- Partial uploads never match. Matches come sorted by path. Folders that cannot be read are
  skipped, as a shell skips them.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Generator, Iterator
from typing import Final

from ferry.errors import NotADirectory, NotFound, PermissionDenied
from ferry.server.jail import Jail
from ferry.server.jailcore import Entry
from ferry.server.pathrules import parse_path
from ferry.wire.codes import ErrorCode

#: Most matches one pattern may give: beyond, the client is asked to narrow it (a listing of the
#: whole home is what ``ls -R`` is for).
MAX_MATCHES: Final = 100_000

_MAGIC = re.compile(r"[*?\[]")


def has_magic(component: str) -> bool:
    """Whether ``component`` holds a glob character (else it names one entry)."""
    return _MAGIC.search(component) is not None


def matches(pattern: str, name: str) -> bool:
    """Whether ``name`` matches the component ``pattern`` (hidden names need a leading '.')."""
    if name.startswith(".") and not pattern.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, pattern)


def expand(jail: Jail, pattern: str, check: Callable[[], None]) -> Generator[tuple[str, Entry], None, None]:
    """The (path, entry) pairs ``pattern`` matches in ``jail``, sorted by path. ``check`` is called
    before each entry looked at (it raises to stop the walk). Raises :class:`PathRefused` for a
    pattern that is not a clean relative path, and ``bad-request`` past :data:`MAX_MATCHES`."""
    parts = parse_path(pattern)
    if not parts:
        raise ErrorCode.NOT_FOUND.error("an empty pattern matches nothing")
    for count, found in enumerate(_expand(jail, (), parts, check), start=1):
        if count > MAX_MATCHES:
            raise ErrorCode.BAD_REQUEST.error(
                f"'{pattern}' matches more than {MAX_MATCHES} names; narrow the pattern"
            )
        yield found


def _expand(
    jail: Jail, base: tuple[str, ...], rest: tuple[str, ...], check: Callable[[], None]
) -> Iterator[tuple[str, Entry]]:
    # Depth-first over the pattern's components: at most one open listing per component.
    component, last = rest[0], len(rest) == 1
    folder = "/".join(base)
    if not has_magic(component):
        candidates = [component]
    else:
        try:
            candidates = sorted(e.name for e in jail.iter_dir(folder) if matches(component, e.name))
        except (NotFound, NotADirectory, PermissionDenied):
            return  # a folder that vanished or cannot be read holds no match
    for name in candidates:
        check()
        path = (*base, name)
        try:
            st = jail.lstat("/".join(path))
        except (NotFound, NotADirectory, PermissionDenied):
            continue  # a plain name that is not there; an entry removed meanwhile
        entry = Entry.from_stat(name, st)
        if last and entry.kind == "link":
            entry = entry.with_target(jail.readlink("/".join(path)))
        if last:
            yield "/".join(path), entry
        elif entry.kind == "dir":
            yield from _expand(jail, path, rest[1:], check)
