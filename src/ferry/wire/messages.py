"""Typed protocol messages (msgspec Structs), validated on decode.

Each message is a tagged Struct: on the wire a msgpack map with a ``t`` field naming its type. Decoding
validates every field's type and bounds, so a handler never sees a wrong type — a bad message
becomes a :class:`~ferry.wire.errors.MalformedMessage` naming the field. Unknown *fields* are ignored
(a newer peer may add optional fields); unknown *types* are errors.

Conventions: ``id`` is a request id chosen by the client, echoed by every reply to that request and
used as the data channel of a transfer or command. Paths are POSIX strings relative to the user's
home folder.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from ferry.wire.errors import LocalProtocolError, MalformedMessage

#: Highest protocol version this code speaks; the handshake picks the highest one both sides share.
#: 1: password login only. 2: adds key and token login (:class:`AuthKey`, :class:`AuthToken`) and
#: the server nonce in :class:`Welcome`; a version-1 peer still logs in with a password.
PROTOCOL_VERSION = 2
MIN_PROTOCOL_VERSION = 1
#: The first version with key and token login.
KEY_LOGIN_VERSION = 2

U32 = Annotated[int, Meta(ge=0, le=(1 << 32) - 1)]
U64 = Annotated[int, Meta(ge=0, le=(1 << 63) - 1)]
#: Longest path on the wire, in characters (a sender must check: the receiver rejects the message).
MAX_PATH_CHARS = 4096
Path = Annotated[str, Meta(max_length=MAX_PATH_CHARS)]
Short = Annotated[str, Meta(max_length=256)]
Text = Annotated[str, Meta(max_length=8192)]
Digest = Annotated[bytes, Meta(max_length=64)]
#: Earliest and latest file time the wire carries, in seconds since the epoch: the first and the
#: last second of the years 1 and 9999 (what every filesystem call and ``datetime`` accept).
#: Decoding refuses anything else, infinities and NaN included, naming the field: an mtime of inf
#: or NaN used to reach ``os.utime`` and answer "internal server error".
MIN_TIME = -62_135_596_800.0
MAX_TIME = 253_402_300_799.0
Time = Annotated[float, Meta(ge=MIN_TIME, le=MAX_TIME)]
#: Longest command timeout, in seconds (about 31 years): finite, so the server can schedule it.
MAX_TIMEOUT = 1e9


def wire_time(t: float) -> float:
    """A file time read from a disk, as the wire carries it: clamped to [MIN_TIME, MAX_TIME], NaN
    as 0. A filesystem may hold any 64-bit time (tmpfs, btrfs), and the receiver refuses a message
    with a time outside that range: without the clamp one odd file would cost a whole listing or
    tree transfer."""
    if t != t:  # NaN
        return 0.0
    return min(max(t, MIN_TIME), MAX_TIME)
HashName = Literal["blake3", "md5"]

# Streams of a data channel.
STDIN = 0  #: client -> server bytes (file upload data, command stdin)
STDOUT = 1  #: server -> client bytes (file download data, command stdout)
STDERR = 2  #: server -> client command stderr


class Message(msgspec.Struct, tag_field="t", omit_defaults=True):
    """Base of every protocol message."""


# --- handshake and session -------------------------------------------------------------------


class Hello(Message, tag="hello"):
    """First message of the client: the protocol versions it speaks and its software."""

    min_version: Annotated[int, Meta(ge=1, le=65535)]
    max_version: Annotated[int, Meta(ge=1, le=65535)]
    software: Short = ""
    features: Annotated[list[Short], Meta(max_length=64)] = []


class Welcome(Message, tag="welcome"):
    """The server's answer to :class:`Hello`: the chosen version; from version 2 on, a fresh random
    ``nonce`` that a key login signs (see :func:`ferry.wire.auth.key_transcript`)."""

    version: Annotated[int, Meta(ge=1, le=65535)]
    software: Short = ""
    features: Annotated[list[Short], Meta(max_length=64)] = []
    nonce: Annotated[bytes, Meta(max_length=64)] = b""


class Auth(Message, tag="auth"):
    """Password authentication (the connection is already encrypted unless --plain)."""

    user: Short
    password: Annotated[str, Meta(max_length=1024)]


class KeyOffer(msgspec.Struct, frozen=True, omit_defaults=True):
    """One public key of an :class:`AuthKey`: the SSH wire blob and, unless this is only a query,
    an SSH-format signature (string algorithm, string signature) of the key transcript."""

    public_key: Annotated[bytes, Meta(max_length=16384)]
    signature: Annotated[bytes, Meta(max_length=16384)] = b""


#: Keys one :class:`AuthKey` may offer.
MAX_KEY_OFFERS = 16


class AuthKey(Message, tag="auth_key"):
    """Key login (version 2): signed offers log in if one of them is a key of ``user`` and its
    signature verifies; unsigned offers only ask which keys the server would accept (answered by
    :class:`AuthKeyOk`), so a client asks for a passphrase only for a key worth unlocking."""

    user: Short
    client_nonce: Annotated[bytes, Meta(min_length=16, max_length=64)]
    offers: Annotated[list[KeyOffer], Meta(min_length=1, max_length=MAX_KEY_OFFERS)]


class AuthKeyOk(Message, tag="auth_key_ok"):
    """Answer to an :class:`AuthKey` with unsigned offers: the indexes of the acceptable ones."""

    accepted: Annotated[list[Annotated[int, Meta(ge=0, lt=MAX_KEY_OFFERS)]], Meta(max_length=MAX_KEY_OFFERS)]


class AuthToken(Message, tag="auth_token"):
    """Token login (version 2). ``user`` may be empty: the token names its user."""

    token: Annotated[str, Meta(max_length=256)]
    user: Short = ""


class AuthOk(Message, tag="auth_ok"):
    """Authentication succeeded; what the account may do, and how it logged in (``method``:
    ``password``, ``key`` or ``token``; ``key_id`` the key fingerprint or token id)."""

    user: Short
    exec_allowed: bool = False
    quota: U64 | None = None
    method: Short = ""
    key_id: Short = ""
    read_only: bool = False


class Ping(Message, tag="ping"):
    """Keepalive probe; the peer answers :class:`Pong` with the same nonce."""

    nonce: U64


class Pong(Message, tag="pong"):
    """Answer to :class:`Ping`."""

    nonce: U64


class Goodbye(Message, tag="bye"):
    """Either side is closing the connection on purpose. ``code`` says why in a machine-readable
    way when there is more to say than "done" (``revoked``: the credential or account the session
    logged in with was removed, disabled or changed)."""

    reason: Text = ""
    code: Short = ""


# --- generic replies -----------------------------------------------------------------------


class Ok(Message, tag="ok"):
    """A request succeeded and has nothing else to say."""

    id: U32


class Error(Message, tag="error"):
    """A request failed (``id`` 0 for connection-level errors). ``code`` is machine-readable."""

    id: U32
    code: Short
    message: Text


# --- file system ---------------------------------------------------------------------------


class Entry(msgspec.Struct, frozen=True, omit_defaults=True):
    """One directory entry / stat result. ``target``: what a symbolic link says (never followed)."""

    name: Path
    kind: Literal["file", "dir", "link", "other"]
    size: U64 = 0
    mtime: Time = 0.0
    mode: U32 = 0
    target: Path | None = None


class Stat(Message, tag="stat"):
    """Ask for the metadata of ``path`` (symlinks are not followed)."""

    id: U32
    path: Path


class StatReply(Message, tag="stat_reply"):
    """Answer to :class:`Stat`."""

    id: U32
    entry: Entry


class ListDir(Message, tag="list"):
    """List a directory; ``recursive`` walks the whole tree (entry names are relative paths).

    ``glob``: ``path`` is a pattern (``logs/*.log``; rules in ``ferry.server.glob``), expanded on
    the server; the entries are the matches, named by their path from the home (none: an empty
    page). ``recursive`` does not apply then."""

    id: U32
    path: Path
    recursive: bool = False
    glob: bool = False


class ListReply(Message, tag="list_reply"):
    """A page of entries; ``more`` is True while further pages follow for the same id."""

    id: U32
    entries: Annotated[list[Entry], Meta(max_length=4096)]
    more: bool = False


class Mkdir(Message, tag="mkdir"):
    """Create a directory (``parents`` like ``mkdir -p``)."""

    id: U32
    path: Path
    parents: bool = False


class Remove(Message, tag="rm"):
    """Remove a file, a symlink, or (``recursive``) a directory tree."""

    id: U32
    path: Path
    recursive: bool = False


class Rename(Message, tag="mv"):
    """Rename ``src`` to ``dst`` inside the home."""

    id: U32
    src: Path
    dst: Path


class Df(Message, tag="df"):
    """Ask for disk usage and quota."""

    id: U32


#: ``DfReply.free`` of a server whose storage has no free space to measure (an object store): at least
#: this much means "no limit but the quota" (half the largest U64, so a client adding to it cannot overflow).
FREE_UNMETERED = 1 << 62


class DfReply(Message, tag="df_reply"):
    """Usage of the home in bytes, the quota (None: unlimited) and free space on the server's disk
    (:data:`FREE_UNMETERED` or more: unmetered).
    ``used`` counts everything the quota counts; ``partial`` is the part of it held by unfinished
    uploads (``partials`` of them: interrupted ones kept for a resume, and those running now)."""

    id: U32
    used: U64
    quota: U64 | None
    free: U64
    partial: U64 = 0
    partials: U32 = 0
    #: files and folders in the home (partial uploads not counted) and the most it may hold (None:
    #: no limit)
    files: U64 = 0
    max_files: U64 | None = None


# --- transfers -----------------------------------------------------------------------------


class GetFile(Message, tag="get"):
    """Download ``path``. To resume, send ``chunk_hashes`` of the chunks already held locally:
    the server answers with the offset up to which they match (re-checking chunks, not the file)."""

    id: U32
    path: Path
    hash: HashName = "blake3"
    chunk_size: Annotated[int, Meta(ge=1 << 16, le=1 << 30)] = 1 << 22
    chunk_hashes: Annotated[list[Digest], Meta(max_length=1 << 16)] = []


class FileInfo(Message, tag="file"):
    """Start of a download: metadata, and the offset from which data follows on channel ``id``."""

    id: U32
    size: U64
    mtime: Time
    mode: U32
    offset: U64 = 0


class FileEnd(Message, tag="file_end"):
    """End of a file's data (either direction): per-chunk hashes and the file digest.

    The digest is the hash of the concatenated chunk hashes, so it can be built from chunk hashes
    computed in any order and re-verified per chunk on resume.
    """

    id: U32
    size: U64
    chunk_hashes: Annotated[list[Digest], Meta(max_length=1 << 16)]
    digest: Digest


class PutFile(Message, tag="put"):
    """Upload ``path`` of ``size`` bytes. ``token`` names a resumable partial upload (same source =
    same token). Small files may carry their bytes inline in ``data`` (then no data frames follow).

    ``streamed``: the size is not known in advance (a pipe): ``size`` is 0, the data ends with the
    :class:`FileEnd`, whose ``size`` says how much was sent; such an upload has no ``token`` and
    no inline ``data`` (it cannot be resumed) and the quota is checked as the data arrives."""

    id: U32
    path: Path
    size: U64
    mtime: Time
    mode: U32 = 0o644
    hash: HashName = "blake3"
    chunk_size: Annotated[int, Meta(ge=1 << 16, le=1 << 30)] = 1 << 22
    token: Short = ""
    overwrite: bool = True
    data: Annotated[bytes, Meta(max_length=1 << 18)] | None = None
    chunk_hashes: Annotated[list[Digest], Meta(max_length=1 << 16)] = []
    digest: Digest = b""
    streamed: bool = False


class PutReady(Message, tag="put_ready"):
    """The server accepts an upload; ``chunk_hashes`` describe the partial data it already holds."""

    id: U32
    chunk_hashes: Annotated[list[Digest], Meta(max_length=1 << 16)] = []


class PutFrom(Message, tag="put_from"):
    """The client will send data from ``offset`` (a chunk boundary where the partial stops matching)."""

    id: U32
    offset: U64


class Cancel(Message, tag="cancel"):
    """Abort the transfer or command ``id``; partial data stays hidden (and resumable for uploads)."""

    id: U32


# --- folder trees --------------------------------------------------------------------------

#: Largest file that travels inside a :class:`TreeItem` (larger ones use GetFile / PutFile).
TREE_INLINE_MAX = 1 << 18


class TreeItem(msgspec.Struct, frozen=True, omit_defaults=True):
    """One record of a tree transfer: a folder, a file (with its bytes when small) or a per-file error.

    ``path`` is relative to the tree's root (plain names joined by ``/``). A ``file`` with ``data``
    carries its whole content and ``digest``, the same file digest as :class:`FileEnd` (hash of the
    single chunk hash, see ``ferry.hashing``); a ``file`` without ``data`` is larger than the inline
    limit and is transferred separately with GetFile / PutFile. An ``error`` names the file or folder
    that could not be read or written (``code`` as in :class:`Error`); the tree goes on.
    """

    path: Path
    kind: Literal["file", "dir", "error"]
    size: U64 = 0
    mtime: Time = 0.0
    mode: U32 = 0
    data: Annotated[bytes, Meta(max_length=TREE_INLINE_MAX)] | None = None
    digest: Digest = b""
    code: Short = ""
    message: Text = ""


class GetTree(Message, tag="get_tree"):
    """Download the folder ``path``: the server walks it and streams :class:`TreeItems` (folders
    before their contents; files up to ``inline_max`` bytes inline) until one with ``end``."""

    id: U32
    path: Path
    hash: HashName = "blake3"
    inline_max: Annotated[int, Meta(ge=0, le=TREE_INLINE_MAX)] = TREE_INLINE_MAX


class PutTree(Message, tag="put_tree"):
    """Start uploading a folder tree as ``path`` (created like ``mkdir -p``). No reply: the client
    streams :class:`TreeItems` at once, the server answers each batch with a :class:`TreeAck`."""

    id: U32
    path: Path
    hash: HashName = "blake3"
    overwrite: bool = True


#: Most bytes a packed :class:`TreeItems` batch may unpack to (a batch is ~256 KiB of payload plus
#: at most one more inline file and its path).
TREE_UNPACKED_MAX = 1 << 20


class TreeItems(Message, tag="tree_items"):
    """A batch of records of tree transfer ``id`` (either direction); ``end`` marks the last one.

    With ``packed`` the records are instead one zstd frame of their msgpack array (at most
    :data:`TREE_UNPACKED_MAX` bytes unpacked; ``items`` is then empty): sent only with ``-z``, to a
    peer that announced the feature ``"packed"`` (a server) or asked for it (``GetFiles.compress``).
    """

    id: U32
    items: Annotated[list[TreeItem], Meta(max_length=4096)] = []
    end: bool = False
    packed: Annotated[bytes, Meta(max_length=(1 << 20) - 4096)] = b""


class TreeAck(Message, tag="tree_ack"):
    """The server stored one more batch of tree upload ``id``: running totals of files and bytes
    stored, and the records of that batch that failed (kind ``error``). ``end`` answers the last."""

    id: U32
    files: U64
    bytes: U64
    errors: Annotated[list[TreeItem], Meta(max_length=4096)] = []
    end: bool = False


# --- sync ----------------------------------------------------------------------------------

#: Chunk hashes per :class:`Chunks` page (32 bytes each: 512 KiB, half the message cap).
CHUNKS_PAGE = 1 << 14
#: Literal bytes a :class:`DeltaData` batch may carry (one batch's threshold plus one maximal chunk).
DELTA_DATA_MAX = 1 << 19
SyncKind = Literal["file", "dir", "link", "other", "error"]


class SyncEntry(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """One entry of a sync listing (:class:`ScanItems`), an attribute change (:class:`SetAttrs`) or
    a failed entry of a batch (:class:`BatchReply`, kind ``error`` with its ``message``).

    Encoded as an array, not a map: a 10,000-file listing is ~40% smaller without field names.
    ``path`` is relative to the request's folder (``""`` is that folder, or the file itself when a
    file was listed); ``digest`` is the content digest (``ferry.cdc``) when asked for.
    """

    path: Path
    kind: SyncKind
    size: U64 = 0
    mtime: Time = 0.0
    mode: U32 = 0
    digest: Digest = b""
    message: Text = ""


class ScanTree(Message, tag="scan"):
    """List the tree at ``path`` for a sync: :class:`ScanItems` pages follow (the root first,
    folders before their contents), filtered by the gitignore-style ``rules``; with ``checksum``
    each file carries its content digest."""

    id: U32
    path: Path
    rules: Annotated[list[Text], Meta(max_length=4096)] = []
    checksum: bool = False
    #: the client takes pages packed with zlib (a 10,000-file listing: ~4x fewer bytes)
    packed: bool = False


#: Most bytes a packed :class:`ScanItems` page may unpack to (a receiver stops there).
SCAN_UNPACKED_MAX = 1 << 21


class ScanItems(Message, tag="scan_items"):
    """A page of a sync listing; ``end`` marks the last one. With ``packed`` (only if the request
    asked for it) the entries are instead a zlib stream of the msgpack array of ``SyncEntry``
    records (at most :data:`SCAN_UNPACKED_MAX` bytes unpacked; ``entries`` is then empty)."""

    id: U32
    entries: Annotated[list[SyncEntry], Meta(max_length=4096)] = []
    end: bool = False
    packed: Annotated[bytes, Meta(max_length=1 << 19)] = b""


class GetFiles(Message, tag="get_files"):
    """Send the files ``names`` (relative to folder ``path``) as :class:`TreeItems`, like a tree
    download of just those (files up to ``inline_max`` inline, larger ones announced)."""

    id: U32
    path: Path
    names: Annotated[list[Path], Meta(max_length=4096)]
    hash: HashName = "blake3"
    inline_max: Annotated[int, Meta(ge=0, le=TREE_INLINE_MAX)] = TREE_INLINE_MAX
    #: pack the TreeItems batches with zstd where that shrinks them (``-z``)
    compress: bool = False


#: Bytes per chunk hash in a :class:`Chunks` list: 8 to 32 (full BLAKE3).
HashWidth = Annotated[int, Meta(ge=8, le=32)]


class GetChunks(Message, tag="get_chunks"):
    """Ask for the chunk index of file ``path``: :class:`Chunks` pages follow, each hash cut to its
    first ``width`` bytes. With ``prefetch`` the server only indexes the file into its cache (in
    the background) and answers ``Ok`` at once: a sync that just uploaded a large file asks for
    this, so that the next delta of that file need not read its old version first."""

    id: U32
    path: Path
    width: HashWidth = 32
    prefetch: bool = False


class Chunks(Message, tag="chunks"):
    """A page of a chunk index: concatenated 32-byte BLAKE3 chunk hashes in file order; ``end`` on
    the last page. Server to client for :class:`GetChunks`; client to server after :class:`DeltaGet`
    (the client's basis). ``size`` is the indexed file's size (informative)."""

    id: U32
    hashes: Annotated[bytes, Meta(max_length=CHUNKS_PAGE * 32)] = b""
    size: U64 = 0
    end: bool = False
    width: HashWidth = 32


class DeltaPut(Message, tag="delta_put"):
    """Upload ``path`` as :class:`DeltaData` batches that may copy chunks of the server's current
    file, whose hashes the client got with :class:`GetChunks`; ``basis`` is the BLAKE3 of those
    hashes as received (cut to ``width`` bytes each; empty: no basis, all literal). ``token``
    names the partial file (same source, same token). No reply until the last batch: ``Ok``, or
    an ``Error`` at the first problem."""

    id: U32
    path: Path
    size: U64
    mtime: Time
    mode: U32 = 0o644
    basis: Digest = b""
    token: Short = ""
    overwrite: bool = True
    width: HashWidth = 32


class DeltaGet(Message, tag="delta_get"):
    """Download ``path`` as a delta against the client's basis, whose hashes follow in
    :class:`Chunks` pages; the server answers ``FileInfo`` and :class:`DeltaData` batches (zstd-packed
    literal chunks where they shrink, with ``compress``)."""

    id: U32
    path: Path
    compress: bool = False
    width: HashWidth = 32


class DeltaData(Message, tag="delta"):
    """A batch of a delta transfer (either direction): ``ops`` are flat triples (see
    ``ferry.delta``), ``data`` the literal chunks they announce; the last batch has ``end`` and the
    new version's content digest."""

    id: U32
    ops: Annotated[list[U64], Meta(max_length=3 * 4096)] = []
    data: Annotated[bytes, Meta(max_length=DELTA_DATA_MAX)] = b""
    end: bool = False
    digest: Digest = b""


class RemoveMany(Message, tag="rm_many"):
    """Remove the entries ``names`` (relative to folder ``path``), in order; a folder only when empty
    unless ``recursive``. Answered by one :class:`BatchReply`."""

    id: U32
    path: Path
    names: Annotated[list[Path], Meta(max_length=4096)]
    recursive: bool = False


class SetAttrs(Message, tag="set_attrs"):
    """Set the mode (if non-zero) and mtime (if non-zero) of ``entries`` (paths relative to folder
    ``path``; ``""`` is that folder). Answered by one :class:`BatchReply`."""

    id: U32
    path: Path
    entries: Annotated[list[SyncEntry], Meta(max_length=4096)]


class BatchReply(Message, tag="batch_reply"):
    """How a batch went: entries done, and the ones that failed (kind ``error`` with a message)."""

    id: U32
    done: U64
    errors: Annotated[list[SyncEntry], Meta(max_length=4096)] = []


# --- remote commands -----------------------------------------------------------------------


class PtySpec(msgspec.Struct, frozen=True):
    """Terminal parameters for a command run under a PTY."""

    term: Short = "xterm-256color"
    rows: Annotated[int, Meta(ge=1, le=10000)] = 24
    cols: Annotated[int, Meta(ge=1, le=10000)] = 80


class Exec(Message, tag="exec"):
    """Run a command: ``command`` through ``/bin/sh -c`` or ``argv`` directly; ``cwd`` is home-relative."""

    id: U32
    command: Text | None = None
    argv: Annotated[list[Text], Meta(max_length=4096)] | None = None
    env: Annotated[dict[Short, Text], Meta(max_length=256)] = {}
    cwd: Path = ""
    pty: PtySpec | None = None
    window: U32 = 1 << 20
    #: seconds after which the server kills the command's group (TERM, then KILL) and reports it
    timeout: Annotated[float, Meta(gt=0, le=MAX_TIMEOUT)] | None = None


class ExecStarted(Message, tag="exec_started"):
    """The command is running; output follows on channel ``id``."""

    id: U32
    pid: U32 = 0


class Window(Message, tag="window"):
    """Flow control: the receiver of ``stream`` on channel ``id`` grants ``increment`` more bytes."""

    id: U32
    stream: Annotated[int, Meta(ge=0, le=255)]
    increment: U32


class Eof(Message, tag="eof"):
    """No more data will follow on ``stream`` of channel ``id`` (e.g. stdin closed)."""

    id: U32
    stream: Annotated[int, Meta(ge=0, le=255)]


class Signal(Message, tag="signal"):
    """Deliver a signal (by number) to the command's process group."""

    id: U32
    signum: Annotated[int, Meta(ge=1, le=64)]


class Resize(Message, tag="resize"):
    """The client's terminal changed size."""

    id: U32
    rows: Annotated[int, Meta(ge=1, le=10000)]
    cols: Annotated[int, Meta(ge=1, le=10000)]


class ExitStatus(Message, tag="exit"):
    """The command ended: ``code`` when it exited, ``signal`` when a signal killed it."""

    id: U32
    code: int | None = None
    signal: int | None = None
    timed_out: bool = False


AnyMessage = (
    Hello
    | Welcome
    | Auth
    | AuthKey
    | AuthKeyOk
    | AuthToken
    | AuthOk
    | Ping
    | Pong
    | Goodbye
    | Ok
    | Error
    | Stat
    | StatReply
    | ListDir
    | ListReply
    | Mkdir
    | Remove
    | Rename
    | Df
    | DfReply
    | GetFile
    | FileInfo
    | FileEnd
    | PutFile
    | PutReady
    | PutFrom
    | Cancel
    | GetTree
    | PutTree
    | TreeItems
    | TreeAck
    | ScanTree
    | ScanItems
    | GetFiles
    | GetChunks
    | Chunks
    | DeltaPut
    | DeltaGet
    | DeltaData
    | RemoveMany
    | SetAttrs
    | BatchReply
    | Exec
    | ExecStarted
    | Window
    | Eof
    | Signal
    | Resize
    | ExitStatus
)

ALL_MESSAGES: tuple[type[Message], ...] = AnyMessage.__args__


_tree_items_encoder = msgspec.msgpack.Encoder()
_tree_items_decoder = msgspec.msgpack.Decoder(list[TreeItem])


def encode_tree_items(items: list[TreeItem]) -> bytes:
    """The msgpack array of ``items`` (what a packed :class:`TreeItems` batch carries, zstd-packed)."""
    return _tree_items_encoder.encode(items)


def decode_tree_items(raw: bytes) -> list[TreeItem]:
    """The records of an unpacked batch, validated like any message (MalformedMessage otherwise)."""
    try:
        items: list[TreeItem] = _tree_items_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise MalformedMessage(f"invalid packed tree batch: {exc}") from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise MalformedMessage(f"undecodable packed tree batch: {exc}") from exc
    if len(items) > 4096:
        raise MalformedMessage("a packed tree batch holds more than 4096 records")
    return items


class _Tag(msgspec.Struct):
    """Only the tag of a message (its other fields are skipped): which type to decode it as."""

    t: str = ""


_tag_decoder = msgspec.msgpack.Decoder(_Tag)
_BY_TAG: dict[str, type[Message]] = {str(cls.__struct_config__.tag): cls for cls in ALL_MESSAGES}


class MessageCodec:
    """Encodes and decodes messages; one per connection (msgspec encoders reuse their buffers).

    A message is decoded in two steps: its tag, then the message with a decoder for that one type,
    made on first use. A decoder for the union of all ~50 types costs ~5 ms to build (msgspec
    prepares every type and its constraints), which every short command paid before its first
    reply although it uses a handful of types; reading the tag first costs well under a
    microsecond a message."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoders: dict[str, msgspec.msgpack.Decoder[Message]] = {}

    def encode(self, msg: Message) -> bytes:
        """Serialise ``msg``; raises LocalProtocolError for an object that is not a message."""
        if not isinstance(msg, Message):
            raise LocalProtocolError(f"not a ferry message: {msg!r}")
        return self._encoder.encode(msg)

    def _decoder(self, tag: str) -> msgspec.msgpack.Decoder[Message]:
        decoder = self._decoders.get(tag)
        if decoder is None:
            kind = _BY_TAG.get(tag)
            if kind is None:
                raise MalformedMessage(f"invalid message: unknown message type {tag!r} - at `$.t`")
            decoder = self._decoders[tag] = msgspec.msgpack.Decoder(kind)
        return decoder

    def decode(self, payload: bytes) -> Message:
        """Parse and validate one message payload; raises MalformedMessage naming the problem."""
        try:
            msg: Message = self._decoder(_tag_decoder.decode(payload).t).decode(payload)
        except msgspec.ValidationError as exc:
            raise MalformedMessage(f"invalid message: {exc}") from exc
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec lets bad UTF-8 through as-is
            raise MalformedMessage(f"undecodable message: {exc}") from exc
        return msg
