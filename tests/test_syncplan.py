"""The sync planner: quick check, checksum, attributes, skips, deletions and their safety (pure)."""

from __future__ import annotations

from ferry.syncplan import Node, plan


def F(path: str, size: int = 10, mtime: float = 100.0, mode: int = 0o644, digest: bytes = b"") -> Node:
    return Node(path, "file", size, mtime, mode, digest)


def D(path: str, mode: int = 0o755, mtime: float = 50.0) -> Node:
    return Node(path, "dir", 0, mtime, mode)


def actions(p) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {it.path: it.action + (f":{it.reason}" if it.reason else "") for it in p.all()}


def test_quick_check_and_attrs() -> None:
    src = [D(""), F("same"), F("size", size=11), F("time", mtime=101.0), F("mode", mode=0o600), F("new"), D("d")]
    dst = [D(""), F("same"), F("size"), F("time"), F("mode"), D("d", mode=0o700)]
    p = plan(src, dst)
    assert actions(p) == {
        "": "same",
        "size": "update:size",
        "time": "update:mtime",
        "mode": "attrs:mode",
        "new": "new",
        "d": "attrs:mode",
    }
    assert p.files == 5 and p.bytes == 51 and p.send_bytes == 31 and p.unchanged == 1
    assert [it.path for it in p.sends] == ["size", "time", "new"]  # in the listing's order
    # a float mtime that went through nanoseconds and back is still equal
    p = plan([F("a", mtime=1700000000.123456789)], [F("a", mtime=1700000000.1234567)])
    assert actions(p) == {} and p.unchanged == 1


def test_checksum_mode() -> None:
    src = [F("a", digest=b"1"), F("b", digest=b"1", mtime=5.0), F("c", digest=b"2")]
    dst = [F("a", digest=b"1", mtime=7.0), F("b", digest=b"1"), F("c", digest=b"3")]
    assert actions(plan(src, dst, checksum=True)) == {"a": "attrs:mtime", "b": "attrs:mtime", "c": "update:checksum"}
    # quick check would have called c unchanged (same size and mtime)
    assert "c" not in actions(plan(src, dst))


def test_links_and_special_files_are_reported_as_skipped() -> None:
    src = [Node("l", "link", 5), Node("fifo", "other"), Node("bad", "error", message="permission denied")]
    p = plan(src, [], delete=True)
    assert actions(p) == {
        "l": "skip:symbolic link (not copied)",
        "fifo": "skip:special file: FIFO, socket or device (not copied)",
        "bad": "skip:permission denied",
    }


def test_delete_order_and_suppression_after_read_errors() -> None:
    src = [D(""), F("keep")]
    dst = [D(""), F("keep"), D("old"), F("old/x"), D("old/sub"), F("old/sub/y"), F("zz")]
    p = plan(src, dst, delete=True)
    assert [it.path for it in p.deletes] == ["zz", "old/x", "old/sub/y", "old/sub", "old"]
    assert not plan(src, dst).deletes  # only with --delete
    # a source folder that could not be read must not look empty: no deletion at all
    p = plan([*src, Node("unreadable", "error", message="permission denied")], dst, delete=True)
    assert not p.deletes and p.deletions_suppressed
    # the root is never deleted, nor destination entries it could not read
    p = plan([F("keep")], [D(""), F("keep"), Node("locked", "error")], delete=True)
    assert not p.deletes


def test_type_changes_need_delete() -> None:
    src = [F("l"), F("x"), D("y")]
    dst = [D("x"), F("x/inner"), F("y"), Node("l", "link")]
    p = plan(src, dst)
    assert actions(p) == {
        "x": "skip:a folder of that name is in the way (--delete replaces it)",
        "y": "skip:a file of that name is in the way (--delete replaces it)",
        "l": "new:replaces a symbolic link",
    }
    p = plan(src, dst, delete=True)
    assert [(it.action, it.path) for it in p.replace] == [("delete", "y"), ("delete", "x")]
    assert not p.deletes  # x/inner goes with x
    assert {it.path: it.action for it in p.items} == {"x": "new", "y": "new", "l": "new"}
