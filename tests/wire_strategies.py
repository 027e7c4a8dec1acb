"""Hypothesis strategies for wire messages (shared by the property tests and the fuzz entry point)."""

from __future__ import annotations

from hypothesis import strategies as st

from ferry.wire import messages as m

u32 = st.integers(min_value=0, max_value=(1 << 32) - 1)
u64 = st.integers(min_value=0, max_value=(1 << 63) - 1)
paths = st.text(max_size=64)
digests = st.binary(min_size=0, max_size=64)
#: file times as the wire carries them (years 1-9999; outside is a MalformedMessage: test_wire_times)
floats = st.floats(min_value=m.MIN_TIME, max_value=m.MAX_TIME)

entries = st.builds(
    m.Entry,
    name=paths,
    kind=st.sampled_from(["file", "dir", "link", "other"]),
    size=u64,
    mtime=floats,
    mode=u32,
)

tree_items = st.builds(
    m.TreeItem,
    path=paths,
    kind=st.sampled_from(["file", "dir", "error"]),
    size=u64,
    mtime=floats,
    mode=u32,
    data=st.none() | st.binary(max_size=300),
    digest=digests,
    code=st.text(max_size=20),
    message=st.text(max_size=50),
)

#: The tree-transfer messages (GetTree, PutTree, TreeItems, TreeAck).
tree_messages = st.one_of(
    st.builds(
        m.GetTree,
        id=u32,
        path=paths,
        hash=st.sampled_from(["blake3", "md5"]),
        inline_max=st.integers(0, m.TREE_INLINE_MAX),
    ),
    st.builds(
        m.PutTree, id=u32, path=paths, hash=st.sampled_from(["blake3", "md5"]), overwrite=st.booleans()
    ),
    st.builds(m.TreeItems, id=u32, items=st.lists(tree_items, max_size=5), end=st.booleans()),
    st.builds(
        m.TreeAck, id=u32, files=u64, bytes=u64, errors=st.lists(tree_items, max_size=3), end=st.booleans()
    ),
)

#: Messages that are valid once the connection is open, in either direction.
open_messages = st.one_of(
    tree_messages,
    st.builds(m.Stat, id=u32, path=paths),
    st.builds(m.ListDir, id=u32, path=paths, recursive=st.booleans()),
    st.builds(m.ListReply, id=u32, entries=st.lists(entries, max_size=5), more=st.booleans()),
    st.builds(m.Mkdir, id=u32, path=paths, parents=st.booleans()),
    st.builds(m.Rename, id=u32, src=paths, dst=paths),
    st.builds(m.Error, id=u32, code=st.text(max_size=20), message=st.text(max_size=100)),
    st.builds(m.Ok, id=u32),
    st.builds(m.FileEnd, id=u32, size=u64, chunk_hashes=st.lists(digests, max_size=4), digest=digests),
    st.builds(
        m.PutFile,
        id=u32,
        path=paths,
        size=u64,
        mtime=floats,
        data=st.none() | st.binary(max_size=300),
        token=st.text(max_size=10),
    ),
    st.builds(
        m.Exec,
        id=u32,
        argv=st.none() | st.lists(st.text(max_size=10), max_size=4),
        env=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
    ),
    st.builds(
        m.ExitStatus, id=u32, code=st.none() | st.integers(-255, 255), signal=st.none() | st.integers(1, 64)
    ),
    st.builds(m.Ping, nonce=u64),
)


@st.composite
def chunkings(draw: st.DrawFn, blob: bytes) -> list[bytes]:
    """Split ``blob`` at arbitrary points (including 1-byte pieces and one piece)."""
    if not blob:
        return []
    cuts = sorted(draw(st.lists(st.integers(1, max(1, len(blob) - 1)), max_size=20, unique=True)))
    pieces, last = [], 0
    for c in [*cuts, len(blob)]:
        if c > last:
            pieces.append(blob[last:c])
            last = c
    return pieces
