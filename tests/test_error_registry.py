"""The registry of wire error codes (ferry.wire.codes): one table, what each side does with it, and
the bugs it fixed (a per-request ``busy`` taken for a broken connection, ``io`` and ``io-error``,
an ``overwrite=False`` upload refused only after all of its data was sent)."""

from __future__ import annotations

import asyncio
import io
import re
import resource
import signal
from pathlib import Path

import pytest

import ferry.errors
from ferry.cli.shell import FerryShell
from ferry.client.aclient import AsyncClient
from ferry.client.blocking import Client
from ferry.client.known_hosts import KnownHosts
from ferry.client.location import Location
from ferry.errors import (
    AlreadyExists,
    AuthError,
    ConnectionBroken,
    ExitCode,
    RemoteConnectionError,
    RemoteError,
    ServerBusy,
    TransferError,
)
from ferry.server.context import Limits
from ferry.wire import LocalProtocolError
from ferry.wire import messages as m
from ferry.wire.codes import ErrorCode, Scope, ends_connection, from_wire, lookup, reply_for
from ferry_server import PASSWORD, ServerThread
from serve_process import ServeProcess
from transfer_support import MiB, RawClient, connect, home, running_server, write_random

ROOT = Path(__file__).resolve().parents[1]


# --- the table -------------------------------------------------------------------------------


def test_every_code_round_trips_to_its_class_exit_status_and_scope() -> None:
    for code in ErrorCode:
        req_id = 0 if code.scope is Scope.CONNECTION else 7
        err = from_wire(code.reply(req_id, "why"))
        assert type(err) is code.exception and err.code == code.value, code
        assert err.exit_code == code.exit_status
        assert str(err).endswith("why")
        assert ends_connection(code.reply(req_id, "why")) is (code.scope is Scope.CONNECTION)
        # Connection-level errors are ConnectionBroken (the shell reconnects, retrying code retries)
        # or a refused login; nothing request-level is.
        if code.scope is Scope.CONNECTION:
            assert isinstance(err, ConnectionBroken | AuthError), code
        else:
            assert not isinstance(err, ConnectionBroken | AuthError), code
        assert lookup(code.value) is code
        # The server raises what the client receives.
        assert type(code.error("x")) is code.exception


def test_a_code_is_only_sent_in_its_scope() -> None:
    with pytest.raises(LocalProtocolError):
        ErrorCode.BUSY.reply(0, "a request error needs the request's id")
    with pytest.raises(LocalProtocolError):
        ErrorCode.REFUSED.reply(3, "a connection error has id 0")


def test_unknown_codes_and_unregistered_raises() -> None:
    unknown = from_wire(m.Error(id=4, code="from-a-newer-server", message="hm"))
    assert type(unknown) is RemoteError and unknown.code == "from-a-newer-server"
    assert not ends_connection(m.Error(id=4, code="from-a-newer-server", message="hm"))
    # Whatever the code, an Error with id 0 ends the connection.
    gone = from_wire(m.Error(id=0, code="not-found", message="hm"))
    assert isinstance(gone, RemoteConnectionError) and gone.exit_code == ExitCode.CONNECTION
    # The server never sends a code that is not registered (nor one derived from a class name).
    reply = reply_for(5, RemoteError("made-up", "text"))
    assert (reply.code, reply.id) == ("internal", 5) and "text" in reply.message
    assert reply_for(5, ValueError("secret path")).message == "internal server error (ValueError)"
    assert reply_for(5, TransferError("x")).code == "internal"


def test_docs_table_is_the_registry() -> None:
    """docs/wire.md lists every code with its exception, exit status and scope, and nothing else."""
    text = (ROOT / "docs" / "wire.md").read_text()
    rows = re.findall(r"^\| `([a-z-]+)` +\| `(\w+)` +\| (\d) +\| (request|connection) +\|", text, re.M)
    documented = {code: (exc, int(status), scope) for code, exc, status, scope in rows}
    assert documented == {
        c.value: (c.exception.__name__, c.exit_status, c.scope.value) for c in ErrorCode
    }


def _remote_error_classes() -> list[str]:
    return [
        name
        for name, obj in vars(ferry.errors).items()
        if isinstance(obj, type) and issubclass(obj, RemoteError)
    ]


# Constructing an error with a literal code, or sending one: `RemoteError("busy", ...)`,
# `m.Error(..., code="x")`, `exc.code == "x"`.
_LITERAL_CODE = re.compile(
    rf"""(\b({"|".join(_remote_error_classes())})\(\s*["'][a-z-]+["']|\bcode\s*==?\s*["'][a-z-]+["'])"""
)


def test_no_code_is_spelt_outside_the_registry() -> None:
    offenders = []
    for path in sorted((ROOT / "src" / "ferry").rglob("*.py")):
        if path.name == "codes.py" or "net" in path.relative_to(ROOT / "src" / "ferry").parts:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if _LITERAL_CODE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "use ferry.wire.codes.ErrorCode (add the code there):\n" + "\n".join(offenders)


# --- busy: a request refused, not the connection ------------------------------------------------


def _open_upload(req_id: int, path: str) -> m.PutFile:
    """A streamed upload left open (no data follows): it holds one of the connection's upload slots."""
    return m.PutFile(id=req_id, path=path, size=4 * MiB, mtime=0.0, mode=0o644, token=f"held{req_id}")


@pytest.mark.timeout(60)
def test_busy_fails_the_request_and_the_connection_goes_on(tmp_path: Path) -> None:
    src = tmp_path / "big"
    write_random(src, MiB, seed=1)
    with running_server(tmp_path / "root", limits=Limits(max_uploads=1)) as srv:

        async def main() -> None:
            c = await connect(srv, tmp_path)
            try:
                await c.send(_open_upload(1_000_000, "held"))
                with pytest.raises(ServerBusy) as info:
                    await c.put(src, "big")
                assert info.value.code == "busy" and info.value.exit_code == ExitCode.ERROR
                # a per-request error: nothing that retries or reconnects may take it for a lost connection
                assert not isinstance(info.value, ConnectionBroken)
                assert "too many unfinished uploads" in str(info.value)
                assert (await c.stat("")).kind == "dir"  # the same connection still serves
            finally:
                await c.close()

        asyncio.run(main())


@pytest.mark.timeout(60)
def test_busy_in_the_shell_is_reported_without_reconnecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The shell used to take a per-request ``busy`` for a dropped connection: it reconnected (and
    exited if the retry was refused as well)."""
    src = tmp_path / "big"
    write_random(src, MiB, seed=2)
    with running_server(tmp_path / "root", limits=Limits(max_uploads=1)) as srv:
        connects = []

        def make() -> Client:
            connects.append(1)
            return Client.open(
                lambda: AsyncClient.connect(
                    "127.0.0.1",
                    srv.port,
                    user="alice",
                    password=PASSWORD,
                    known_hosts=KnownHosts(tmp_path / "known_hosts"),
                )
            )

        sh = FerryShell(
            make,
            Location("127.0.0.1", srv.port, "alice", ""),
            interactive=False,
            stdin=io.StringIO(),
            stdout=io.StringIO(),
        )
        try:
            sh.client.call(sh.client.aclient.send(_open_upload(1_000_000, "held")))
            assert sh.onecmd(f"put {src} big") is False  # the shell goes on
            assert sh.exit_code == ExitCode.ERROR
            err = capsys.readouterr().err
            assert "too many unfinished uploads" in err and "reconnecting" not in err
            assert connects == [1]
        finally:
            sh.client.close()


@pytest.mark.timeout(60)
def test_the_session_limit_ends_the_connection(tmp_path: Path) -> None:
    with running_server(tmp_path / "root", limits=Limits(max_sessions=1)) as srv:

        async def main() -> None:
            first = await connect(srv, tmp_path)
            try:
                with pytest.raises(RemoteConnectionError) as info:
                    await connect(srv, tmp_path)
                assert info.value.code == "refused"
                assert info.value.exit_code == ExitCode.CONNECTION
                assert "session limit" in str(info.value)
            finally:
                await first.close()

        asyncio.run(main())


# --- io: one code, one exit status ----------------------------------------------------------------


@pytest.mark.timeout(90)
def test_a_server_io_error_is_one_code_for_every_upload_path(tmp_path: Path, ferry_env: dict[str, str]) -> None:
    """A file size limit on the server (RLIMIT_FSIZE: writes fail with EFBIG) fails small (inline)
    and large (streamed) uploads alike: code ``io``, exit status 5. The inline path used to say
    ``io-error`` (exit status 1), the streamed one ``io``."""
    srv = ServeProcess(tmp_path / "root", ferry_env).start()
    try:
        assert srv.proc is not None
        limit = 64 << 10
        resource.prlimit(srv.proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
        small, large = tmp_path / "small", tmp_path / "large"
        write_random(small, 100 << 10, seed=3)  # inline (at most 256 KiB), over the limit
        write_random(large, 2 * MiB, seed=4)

        async def main() -> list[RemoteError]:
            c = await AsyncClient.connect(
                "127.0.0.1",
                srv.port,
                user=srv.user or "ferry",
                password=srv.password or "",
                known_hosts=KnownHosts(tmp_path / "known_hosts"),
            )
            errors = []
            try:
                for local in (small, large):
                    with pytest.raises(RemoteError) as info:
                        await c.put(local, local.name)
                    errors.append(info.value)
                assert (await c.stat("")).kind == "dir"
            finally:
                await c.close()
            return errors

        errors = asyncio.run(main())
        assert [(e.code, e.exit_code) for e in errors] == [("io", ExitCode.TRANSFER)] * 2, errors
        assert all("File too large" in str(e) for e in errors)
    finally:
        assert srv.stop(signal.SIGTERM) == 0


# --- overwrite=False: refused before any data is sent ----------------------------------------------


@pytest.mark.timeout(60)
def test_upload_without_overwrite_is_refused_before_its_data(server: ServerThread, tmp_path: Path) -> None:
    src = tmp_path / "big"
    write_random(src, 2 * MiB, seed=5)
    srv = server
    (home(srv) / "taken").write_bytes(b"keep me")
    progress: list[int] = []

    async def main() -> None:
        c = await connect(srv, tmp_path)
        try:
            with pytest.raises(AlreadyExists):
                await c.put(src, "taken", overwrite=False, progress=lambda done, total: progress.append(done))
        finally:
            await c.close()

    asyncio.run(main())
    assert progress == []  # not a byte of the file was sent
    assert (home(srv) / "taken").read_bytes() == b"keep me"
    assert sorted(p.name for p in home(srv).iterdir()) == ["taken"]  # and no partial was left


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "put",
    [
        m.PutFile(id=1, path="taken", size=2 * MiB, mtime=0.0, token="t1", overwrite=False),  # resumable
        m.PutFile(id=1, path="taken", size=0, mtime=0.0, streamed=True, overwrite=False),  # from a pipe
        m.PutFile(id=1, path="taken", size=3, mtime=0.0, data=b"new", overwrite=False),  # inline
    ],
    ids=["resumable", "streamed", "inline"],
)
def test_put_without_overwrite_is_answered_by_the_refusal_not_put_ready(server: ServerThread, put: m.PutFile) -> None:
    """On the wire, whatever the client does with it: the reply to an upload that may not replace
    an existing file is the refusal, first and at once; the server never asks for the data
    (PutReady) of an upload it will refuse."""
    (home(server) / "taken").write_bytes(b"keep me")
    raw = RawClient(server.port, tls=True)
    try:
        raw.login()
        raw.send(put)
        first = raw.reply(1)
        assert isinstance(first, m.Error) and first.code == "exists", first
        raw.send(m.Stat(id=3, path="taken"))
        assert raw.reply(3).entry.size == len(b"keep me")  # the connection goes on, the file is kept
    finally:
        raw.close()
    assert sorted(p.name for p in home(server).iterdir()) == ["taken"]
