"""The server's path rules: what a client path may be, checked lexically before anything touches
a file (both storage backends rely on them).

Every client path is a POSIX string relative to the user's home: :func:`parse_path` refuses
absolute paths, ``..``, NUL, empty or ``.`` components and over-long paths or names, and splits the
rest into components. Partial uploads (``.NAME.ferry-part-TOKEN``) are the server's own namespace:
no client operation may create such a name or rename anything onto or off it
(:func:`refuse_reserved`, code ``reserved-name``). :data:`MAX_DEPTH` bounds how deep folders are
made and walked.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Final

from ferry.errors import RemoteError
from ferry.fskit import (
    MAX_NAME_BYTES,
    PARTIAL_MARK,
    is_partial_name,
    partial_name,
)
from ferry.textsafe import safe_name
from ferry.wire.codes import ErrorCode

#: Longest client path accepted, in bytes of UTF-8 (Linux's PATH_MAX). Bounds the work per request.
MAX_PATH_BYTES: Final = 4096

#: Deepest folder the jail creates (``mkdir``, tree uploads), counted in folders below the home, and
#: deepest a listing or tree download descends below the folder it starts from (code ``too-deep``).
#: 2,048 is the deepest folder one client path can name (4,096 bytes of ``d/d/...``), so the limit
#: refuses nothing a single request could make; it stops walks where a tree moved into another
#: goes further (walks cost linear time whatever the depth, but names grow with it). ``rm -r`` and
#: the usage count have no depth limit: they must reach whatever exists.
MAX_DEPTH: Final = 2048


# --------------------------------------------------------------------------------------------------
# Lexical checks


def _show(path: str) -> str:
    """How a client path appears in an error message: quoted and terminal-safe; a path longer than
    a request can hold (found deep in a walk) is shortened in the middle, so that the message stays
    within what the wire carries."""
    if path in ("", "."):
        return "your home folder"
    if len(path) > 1024:
        path = f"{path[:500]}...{path[-500:]}"
    return f"'{safe_name(path)}'"


def _too_deep(path: str, levels: int, where: str) -> RemoteError:
    return ErrorCode.TOO_DEEP.error(f"{_show(path)}: goes deeper than {levels} folder levels {where}")


def parse_path(path: str) -> tuple[str, ...]:
    """Check a client path and split it into its components; ``""`` and ``"."`` give ``()`` (home).

    Raises :class:`~ferry.errors.PathRefused` with code ``outside-home`` for absolute paths and any
    ``..`` component, and ``bad-path`` for NUL characters, empty components (``a//b``, a trailing
    ``/``), ``.`` components (``./a``) and over-long paths or names. The path must be in canonical form
    (clients normalise before sending): one spelling per path lets the server compare paths as strings.
    """
    if not isinstance(path, str):
        raise ErrorCode.BAD_PATH.error(f"a path must be text, not {type(path).__name__}")
    if "\x00" in path:
        raise ErrorCode.BAD_PATH.error(f"{_show(path)}: paths may not contain NUL characters")
    try:
        size = len(os.fsencode(path))
    except UnicodeEncodeError as exc:
        raise ErrorCode.BAD_PATH.error(f"{_show(path)}: the path is not valid text") from exc
    if size > MAX_PATH_BYTES:
        raise ErrorCode.BAD_PATH.error(f"path too long ({size} bytes; at most {MAX_PATH_BYTES})")
    if path in ("", "."):
        return ()
    if path.startswith("/"):
        raise ErrorCode.OUTSIDE_HOME.error(
            f"{_show(path)}: absolute paths are not allowed; paths are relative to your home folder "
            "(drop the leading '/')",
        )
    parts = tuple(path.split("/"))
    # '..' is checked over all parts first so 'a//../x' reports the more important problem.
    if ".." in parts:
        raise ErrorCode.OUTSIDE_HOME.error(
            f"{_show(path)}: paths may not contain '..'; paths are relative to your home folder",
        )
    for part in parts:
        if part == "":
            raise ErrorCode.BAD_PATH.error(
                f"{_show(path)}: empty path component (a doubled, leading or trailing '/')"
            )
        if part == ".":
            raise ErrorCode.BAD_PATH.error(f"{_show(path)}: '.' components are not allowed; drop the './'")
        if len(os.fsencode(part)) > MAX_NAME_BYTES:
            raise ErrorCode.BAD_PATH.error(f"{_show(part)}: name too long (at most {MAX_NAME_BYTES} bytes)")
    return parts


def join_path(parts: Sequence[str]) -> str:
    """Inverse of :func:`parse_path`: ``("a", "b")`` -> ``"a/b"``; ``()`` -> ``""`` (home)."""
    return "/".join(parts)


def _resume_name(name: str, token: str) -> str:
    """The partial name of an upload to ``name`` with the client's resume ``token`` (see
    :func:`ferry.fskit.partial_name`; listings hide such names); a token outside the safe alphabet
    is refused (``bad-path``) here too, whoever called."""
    try:
        return partial_name(name, token)
    except ValueError:
        raise ErrorCode.BAD_PATH.error("invalid resume token (use 1-64 letters, digits, '-' or '_')") from None


def refuse_reserved(name: str, path: str) -> None:
    """Raise :class:`~ferry.errors.PathRefused` (code ``reserved-name``) if ``name``, a component
    that a client operation would create or move, lies in the partial-upload namespace.

    Partial names belong to the server: a client that could rename a file onto one (or create one)
    could make an upload resume onto, and commit, a file the server never created.
    """
    if is_partial_name(name):
        raise ErrorCode.RESERVED_NAME.error(
            f"{_show(path)}: names of the form '.NAME{PARTIAL_MARK}TOKEN' are reserved for ferry's "
            "unfinished uploads; choose another name",
        )


def _refuse_reserved_parts(parts: Sequence[str], path: str) -> None:
    for part in parts:
        refuse_reserved(part, path)
