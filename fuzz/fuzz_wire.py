"""Coverage-guided fuzz entry point for the wire decoder.

    pip install atheris && python fuzz/fuzz_wire.py          # libFuzzer via atheris, runs until stopped
    python fuzz/fuzz_wire.py --hypothesis 20000               # no atheris: a long hypothesis run

Any exception other than ProtocolError escaping the decoder is a bug.
"""

from __future__ import annotations

import sys

from ferry.wire import NEED_DATA, Connection, ProtocolError, Role, State


def fuzz_one_input(blob: bytes) -> None:
    """Feed ``blob`` (first byte picks role/state) to a Connection; only ProtocolError may escape."""
    if not blob:
        return
    conn = Connection(Role.SERVER if blob[0] & 1 else Role.CLIENT, max_message=4096, max_data=1 << 16)
    if blob[0] & 2:
        conn.state = State.OPEN
    conn.receive_data(blob[1:])
    conn.receive_data(b"")
    try:
        for _ in range(10_000):
            if conn.next_event() is NEED_DATA or conn.state is State.CLOSED:
                break
    except ProtocolError:
        pass


def main() -> None:
    """Run under atheris if installed, else a long hypothesis campaign."""
    if "--hypothesis" in sys.argv:
        from hypothesis import given, settings
        from hypothesis import strategies as st

        n = int(sys.argv[sys.argv.index("--hypothesis") + 1])
        given(st.binary(max_size=4096))(settings(max_examples=n, deadline=None)(fuzz_one_input))()
        print(f"{n} inputs, no unexpected exception")
        return
    import atheris  # type: ignore[import-not-found]

    atheris.Setup(sys.argv, fuzz_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
