"""Client side of tree transfers (``GetTree`` / ``PutTree``): a whole folder in one stream.

Download: one request; the server streams records (folder, or file with its bytes and digest) in
batches. Each batch is checked on the event loop (every name must be a plain relative path, before
anything of the batch is written) and then written by a worker thread while the next batch is being
received: per file a hidden temp file (``O_EXCL``), data, mode, mtime, then a rename, only after the
digest matched. Folders are opened once and kept as descriptors. At most ``RECV_DEPTH`` batches
wait in the client; beyond that the connection's reader stops and TCP pushes back on the server.

Upload: the local tree is read and hashed in a thread, batch by batch, and streamed without waiting
per file; the server acknowledges each batch. At most ``WINDOW`` batches are unacknowledged.

Files above the inline limit travel separately, after the stream, through the streaming
``get_file`` / ``put_file`` (resumable, chunk-verified). Files that fail one by one (vanished,
permission) do not stop the tree; they are reported together at the end as a TransferError.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import secrets
import stat as statmod
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgspec

from ferry.aio import close_after, gather_all
from ferry.cdc import FileChanged, stat_key
from ferry.client.mux import Mux
from ferry.client.transfer import Progress, TransferResult, get_file, put_file
from ferry.compress import tree_batch, tree_records
from ferry.errors import ConnectionBroken, IntegrityError, RemoteError, TransferError, UsageError
from ferry.errtext import os_reason
from ferry.fskit import DIR_FLAGS, READ_FLAGS, DirCache, partial_name, safe_relative, store_atomically
from ferry.hashing import HashName, small_digest
from ferry.textsafe import safe_name
from ferry.wire import ProtocolError
from ferry.wire import messages as m
from ferry.wire.codes import from_wire
from ferry.wire.credit import Credit
from ferry.wire.errors import RemoteProtocolError

__all__ = ["TreeResult", "get_tree", "put_tree", "safe_relative"]

#: Tree-upload batches sent and not yet acknowledged before the client waits for the server.
WINDOW = 8
#: Received tree-download batches queued for the writer before the reader stops reading.
RECV_DEPTH = 8
#: Payload bytes per uploaded batch (as the server's, see ferry.server.tree).
BATCH_BYTES = 1 << 18
BATCH_ITEMS = 1024
INLINE_MAX = m.TREE_INLINE_MAX
#: Folder descriptors kept open by the writer.
MAX_DIR_FDS = 32
#: Per-file failures named in the final error (the rest are counted).
SHOWN_ERRORS = 10


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return statmod.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _open_local_dir(parent: int, name: str, rel: str) -> int:
    """Open local folder ``name`` in ``parent``, created if missing; a symlink in its place is
    refused (the tree goes on without what belongs in it)."""
    try:
        try:
            return os.open(name, DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o777, dir_fd=parent)
            return os.open(name, DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        # O_NOFOLLOW|O_DIRECTORY on a symlink says ENOTDIR (ELOOP on some systems).
        if exc.errno in (errno.ENOTDIR, errno.ELOOP) and _is_link(parent, name):
            raise _link_refused(rel) from exc
        raise


def _tally(progress: Progress | None, total: list[int], n: int) -> None:
    total[0] += n
    if progress is not None:
        progress(total[0], total[0])


class _Failures:
    """Per-file failures of a tree: the first :data:`SHOWN_ERRORS` kept to be named, the rest only
    counted. A huge tree, or a hostile server streaming error records without end, must not grow
    the client's memory by a line per record."""

    def __init__(self) -> None:
        self.shown: list[str] = []
        self.count = 0

    def __bool__(self) -> bool:
        """True once anything failed."""
        return self.count > 0

    def add(self, text: str) -> None:
        """Count one failure (kept if it is among the first few)."""
        self.count += 1
        if len(self.shown) < SHOWN_ERRORS:
            self.shown.append(text)

    def extend(self, texts: list[str] | _Failures) -> None:
        """Count several failures (another ``_Failures`` adds its count, not just the names kept)."""
        if isinstance(texts, _Failures):
            for text in texts.shown:
                self.add(text)
            self.count += texts.count - len(texts.shown)
            return
        for text in texts:
            self.add(text)

    def error(self, what: str) -> TransferError:
        """The TransferError naming them."""
        total = self.count
        shown = "; ".join(self.shown)
        more = f" (and {total - len(self.shown)} more)" if total > len(self.shown) else ""
        return TransferError(
            f"{total} item(s) could not be {what}: {shown}{more}; everything else was transferred"
        )


# --- download ------------------------------------------------------------------------------


class _Refused(Exception):
    """One record that must not be written (the destination has a symlink in its way); the tree
    goes on and the record is reported at the end."""


def _link_refused(rel: str) -> _Refused:
    return _Refused(
        f"{safe_name(rel)}: a symbolic link in the destination is in the way; ferry does not write "
        "through it (remove or rename the link)"
    )


@dataclass
class _Written:
    """What the writer did with one batch."""

    files: int = 0
    bytes: int = 0
    large: list[m.TreeItem] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


class _LocalTree:
    """Writes received records under ``root`` (worker thread; one batch at a time)."""

    def __init__(self, root: Path, hash: HashName) -> None:
        os.makedirs(root, exist_ok=True)
        self.root = root
        self.hash = hash
        # The destination itself was named by the user: it may be a link (``~/dl -> /data``). Below
        # it, O_NOFOLLOW: a symlink already in the destination (``sub -> /elsewhere``) must not let
        # the server's ``sub/x`` land outside it.
        self._dirs = DirCache(os.open(root, DIR_FLAGS & ~os.O_NOFOLLOW), _open_local_dir, MAX_DIR_FDS)
        self._tag = secrets.token_hex(4)
        self._seq = itertools.count()

    def close(self) -> None:
        """Close every folder descriptor (idempotent)."""
        self._dirs.close()

    def _dir(self, rel: str) -> int:
        """Descriptor of local folder ``rel`` (created if missing, like ``mkdir -p``)."""
        return self._dirs.get(rel)

    def write(self, items: list[m.TreeItem]) -> _Written:
        """Create the folders and verified files of one batch; raises on the first hard failure."""
        out = _Written()
        for it in items:
            try:
                if it.kind == "dir":
                    self._dir(it.path)
                elif it.kind == "error":
                    out.failures.append(f"{safe_name(it.path)}: {safe_name(it.message)}")
                elif it.data is None:
                    self._check_large(it.path)
                    out.large.append(it)
                else:
                    self._file(it, it.data)
                    out.files += 1
                    out.bytes += it.size
            except _Refused as exc:
                out.failures.append(str(exc))
            except OSError as exc:
                where = self.root / it.path
                raise TransferError(f"cannot write {safe_name(str(where))}: {os_reason(exc)}") from exc
        return out

    def _check_large(self, rel: str) -> None:
        """Prepare the folder of large file ``rel`` (fetched later by ``get_file``, which works with
        a path and follows links): refuse it now if a symlink or a folder is in its place."""
        rel_dir, _, name = rel.rpartition("/")
        dfd = self._dir(rel_dir)
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if statmod.S_ISLNK(st.st_mode):
            raise _link_refused(rel)
        if statmod.S_ISDIR(st.st_mode):  # get_file would put it *inside* that folder
            raise _Refused(f"{safe_name(rel)}: a folder of that name is in the destination")

    def _file(self, it: m.TreeItem, data: bytes) -> None:
        """Write one verified small file (temp name, then rename: a symlink of that name is replaced,
        never followed)."""
        if len(data) != it.size or small_digest(self.hash, data) != it.digest:
            raise IntegrityError(
                f"{safe_name(it.path)}: received data does not match the server's hash; it was not "
                "written, run the command again"
            )
        rel_dir, _, name = it.path.rpartition("/")
        store_atomically(  # only once complete does the name appear
            name,
            data,
            dir_fd=self._dir(rel_dir),
            mode=it.mode & 0o777 or 0o644,
            mtime=it.mtime,
            temp=partial_name(name, f"{self._tag}{next(self._seq)}"),
        )


async def get_tree(
    mux: Mux,
    remote: str,
    local: str | os.PathLike[str],
    *,
    hash: HashName = "blake3",
    progress: Progress | None = None,
    request: m.GetFiles | None = None,
) -> TreeResult:
    """Download folder ``remote`` into ``local`` (created) with one GetTree stream; with ``request``
    (a sync's GetFiles: named files of ``remote`` only) that request instead (its id is replaced)."""
    t0 = time.monotonic()
    root = Path(local)
    loop = asyncio.get_running_loop()
    req_id, route = mux.open(RECV_DEPTH)
    writer: _LocalTree | None = None
    job: asyncio.Future[_Written] | None = None
    ended = False  # the server finished this request (last batch or Error)
    files = nbytes = 0
    done_bytes = [0]
    large: list[m.TreeItem] = []
    failures = _Failures()

    def account(w: _Written) -> None:
        nonlocal files, nbytes
        files += w.files
        nbytes += w.bytes
        large.extend(w.large)
        failures.extend(w.failures)
        _tally(progress, done_bytes, w.bytes)

    try:
        if request is None:
            await mux.send(m.GetTree(id=req_id, path=remote, hash=hash))
        else:
            await mux.send(msgspec.structs.replace(request, id=req_id))
        while not ended:
            ev = await mux.recv(route)
            if isinstance(ev, m.Error):
                ended = True
                raise from_wire(ev)
            if not isinstance(ev, m.TreeItems):
                raise ConnectionBroken(f"unexpected {type(ev).__name__} in a tree download")
            ended = ev.end
            try:
                items = tree_records(ev)  # unpacked if the server packed it (-z)
            except ProtocolError as exc:
                raise ConnectionBroken(f"the server broke the protocol: {exc}") from exc
            # Names come from the server and become local paths: a hostile or broken server must
            # not write outside ``local`` with "../x" or "/etc/x". Checked before the batch is written.
            for it in items:
                if not safe_relative(it.path):
                    raise TransferError(
                        f"the server sent an unsafe name {safe_name(it.path)!r} in {safe_name(remote)!r}; "
                        "the download was stopped and nothing was written under that name"
                    )
            if writer is None:
                writer = await loop.run_in_executor(None, _LocalTree, root, hash)
            if job is not None:
                account(await asyncio.shield(job))
            job = loop.run_in_executor(None, writer.write, items)
        assert job is not None
        account(await asyncio.shield(job))
        job = None
    except BaseException:
        if not ended:  # given up (unsafe name, integrity, local error, cancel): stop the server
            await mux.cancel(req_id)
        raise
    finally:
        mux.close_route(req_id)
        if writer is not None:
            close_after(job, writer.close)
    if large:
        prefix = remote.rstrip("/") + "/" if remote not in ("", ".") else ""
        tally = _Tally(sum(it.size for it in large), None)
        pairs = [(prefix + it.path, root / it.path) for it in large]
        await _each_large(pairs, lambda src, dest: get_file(mux, src, dest, hash=hash), tally)
        files += len(large)
        nbytes += tally.done
        _tally(progress, done_bytes, tally.done)
    if failures:
        raise failures.error("downloaded")
    return TreeResult(files, nbytes, time.monotonic() - t0)


# --- upload --------------------------------------------------------------------------------


def read_small(path: str, rel: str, hash: HashName) -> m.TreeItem | int | None:
    """The tree record of local file ``path`` with its bytes, or its size when it is larger than
    the inline limit (it is then streamed on its own), or None if it is not a regular file.

    Read with one ``read`` after an ``fstat``, and the status compared again after: a file being
    written meanwhile raises :class:`~ferry.cdc.FileChanged` instead of sending a mix of its old
    and new bytes. Raises ``OSError`` when it cannot be read."""
    fd = os.open(path, READ_FLAGS)
    try:
        st = os.fstat(fd)
        if not statmod.S_ISREG(st.st_mode):
            return None
        if st.st_size > INLINE_MAX:
            return st.st_size
        data = os.read(fd, INLINE_MAX + 1)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if len(data) > INLINE_MAX:  # grew since the fstat: stream it
        return len(data)
    if len(data) != st.st_size or stat_key(after) != stat_key(st):
        raise FileChanged(f"{safe_name(path)} changed while it was being read; try again")
    return m.TreeItem(
        path=rel,
        kind="file",
        size=len(data),
        mtime=m.wire_time(st.st_mtime),
        mode=statmod.S_IMODE(st.st_mode),
        data=data,
        digest=small_digest(hash, data),
    )


class _LocalScan:
    """Reads the local tree in batches (worker thread; one call at a time): folders before their
    contents, regular files up to the inline limit with their bytes and digest. Symbolic links and
    special files are skipped; larger files are set aside for ``put_file``."""

    def __init__(self, root: Path, hash: HashName) -> None:
        self.root = os.fspath(root)
        self.hash = hash
        self.large: list[tuple[str, int]] = []
        self.failures = _Failures()
        self._gen = self._walk()

    def _walk(self) -> Iterator[m.TreeItem]:
        stack = [""]
        while stack:
            rel = stack.pop()
            full = os.path.join(self.root, rel) if rel else self.root
            if rel:
                yield m.TreeItem(path=rel, kind="dir")
            try:
                with os.scandir(full) as it:
                    found = sorted(
                        (de.name, de.is_dir(follow_symlinks=False), de.is_file(follow_symlinks=False))
                        for de in it
                    )
            except OSError as exc:
                self.failures.add(f"{safe_name(full)}: {exc.strerror or exc}")
                continue
            subdirs: list[str] = []
            for name, is_dir, is_file in found:
                if not (is_dir or is_file):
                    continue
                sub = f"{rel}/{name}" if rel else name
                if not sub.isascii():
                    try:
                        sub.encode("utf-8")
                    except UnicodeEncodeError:
                        self.failures.add(
                            f"{safe_name(os.path.join(full, name))}: the name is not valid UTF-8"
                        )
                        continue
                if is_dir:
                    subdirs.append(sub)
                    continue
                item = self._file(os.path.join(full, name), sub)
                if item is not None:
                    yield item
            subdirs.reverse()
            stack.extend(subdirs)

    def _file(self, path: str, rel: str) -> m.TreeItem | None:
        try:
            item = read_small(path, rel, self.hash)
        except (OSError, FileChanged) as exc:
            self.failures.add(f"{safe_name(path)}: {os_reason(exc) if isinstance(exc, OSError) else exc}")
            return None
        if isinstance(item, int):  # larger than the inline limit: streamed after the tree
            self.large.append((rel, item))
            return None
        return item

    def next(self) -> tuple[list[m.TreeItem], bool]:
        """The next batch, and whether the walk is complete."""
        items: list[m.TreeItem] = []
        size = 0
        for item in self._gen:
            items.append(item)
            size += 64 + len(item.path) * (1 if item.path.isascii() else 4)
            if item.data is not None:
                size += len(item.data)
            if size >= BATCH_BYTES or len(items) >= BATCH_ITEMS:
                return items, False
        return items, True


class BatchSource(Protocol):
    """What a tree upload streams: :class:`_LocalScan` (a whole folder) or a sync's named files."""

    large: list[tuple[str, int]]
    failures: _Failures

    def next(self) -> tuple[list[m.TreeItem], bool]:
        """The next batch, and whether it is the last (called in a worker thread)."""
        ...


async def put_tree(
    mux: Mux,
    local: str | os.PathLike[str],
    remote: str,
    *,
    hash: HashName = "blake3",
    progress: Progress | None = None,
    scan: BatchSource | None = None,
    pack: bool = False,
) -> TreeResult:
    """Upload folder ``local`` as ``remote`` with one PutTree stream (large files streamed after);
    ``scan`` replaces the walk of ``local`` by another batch source (a sync's changed files).
    ``pack``: zstd-pack the batches where that helps (only to a server announcing "packed")."""
    t0 = time.monotonic()
    root = Path(local)
    if not root.is_dir():
        raise UsageError(f"{local} is not a folder")
    # 'a/' names the folder 'a'; but '/' (or '//') must not shrink to '' (the home): absolute paths
    # are sent as they are so the server refuses them, as it does for every other command.
    base = remote.rstrip("/") or remote
    base = "" if base == "." else base
    loop = asyncio.get_running_loop()
    source: BatchSource = scan if scan is not None else _LocalScan(root, hash)
    # Acknowledgements only: one per batch in flight (at most WINDOW), or an Error, then the Ok of
    # a Cancel. Bounded: a server sending more is held back by the reader instead of piling up here
    # while this task reads the local disk (and is refused below once read).
    req_id, route = mux.open(WINDOW + 2)

    def next_batch() -> tuple[m.TreeItems, bool]:
        items, done = source.next()
        return tree_batch(req_id, items, done, pack), done

    job: asyncio.Future[tuple[m.TreeItems, bool]] | None = None
    window = Credit(WINDOW)  # batches we may still send: each TreeAck grants one back
    finished = False  # the server acknowledged the last batch
    server_ended = False  # ... or ended the tree with an Error
    stored = [0, 0]  # files, bytes
    done_bytes = [0]
    failures = _Failures()

    def on_reply(ev: Any) -> None:
        nonlocal finished, server_ended
        if isinstance(ev, m.Error):
            server_ended = True
            raise from_wire(ev)
        if not isinstance(ev, m.TreeAck):
            raise ConnectionBroken(f"unexpected {type(ev).__name__} in a tree upload")
        try:
            window.grant(1)
        except RemoteProtocolError as exc:
            # Believed, it would end the tree early or have us wait for an end forever.
            raise ConnectionBroken("the server acknowledged a tree batch that was never sent") from exc
        finished = ev.end
        for e in ev.errors:
            failures.add(f"{safe_name(e.path)}: {safe_name(e.message)}")
        _tally(progress, done_bytes, ev.bytes - stored[1])
        stored[0], stored[1] = ev.files, ev.bytes

    try:
        await mux.send(m.PutTree(id=req_id, path=base, hash=hash))
        job = loop.run_in_executor(None, next_batch)
        while True:
            assert job is not None
            batch, done = await asyncio.shield(job)
            job = None
            if not done:  # read and hash (and pack) the next batch while this one is on its way
                job = loop.run_in_executor(None, next_batch)
            while window.available <= 0:
                on_reply(await mux.recv(route))
            while not route.queue.empty():
                on_reply(await mux.recv(route))
            window.spend(1)
            await mux.send(batch)
            if done:
                break
        while not finished:
            on_reply(await mux.recv(route))
    except BaseException as exc:
        if not (finished or server_ended) and not isinstance(exc, RemoteError):
            await mux.cancel(req_id)
        raise
    finally:
        mux.close_route(req_id)
        close_after(job, lambda: None)
    failures.extend(source.failures)
    files, nbytes = stored
    if source.large:
        join = (lambda r: f"{base}/{r}") if base else (lambda r: r)
        tally = _Tally(sum(size for _, size in source.large), None)
        pairs = [(root / rel, join(rel)) for rel, _ in source.large]
        await _each_large(pairs, lambda src, dst: put_file(mux, src, dst, hash=hash), tally)
        files += len(source.large)
        nbytes += tally.done
        _tally(progress, done_bytes, tally.done)
    if failures:
        raise failures.error("uploaded")
    return TreeResult(files, nbytes, time.monotonic() - t0)


# --- shared by both directions -------------------------------------------------------------


@dataclass(frozen=True)
class TreeResult:
    """What a folder transfer did."""

    files: int
    bytes: int
    seconds: float


class _Tally:
    """Bytes done across a tree's large files, reported to the progress callback as they finish."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self.progress = total, 0, progress

    def __call__(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)


async def _each_large(
    items: list[Any], transfer: Callable[[Any, Any], Awaitable[TransferResult]], tally: _Tally
) -> None:
    """Stream the large files of a tree, four at a time (each already pipelines its own data)."""
    sem = asyncio.Semaphore(4)

    async def one(src: Any, dst: Any) -> None:
        async with sem:
            r = await transfer(src, dst)
        tally(r.size)

    await gather_all([one(src, dst) for src, dst in items])


