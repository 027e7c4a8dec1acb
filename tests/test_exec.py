"""Remote commands through the Python API, against a real server (thread) and real processes."""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ferry import paths
from ferry.client.aclient import AsyncClient
from ferry.client.exec import RemoteProcess
from ferry.client.known_hosts import KnownHosts
from ferry.errors import NotFound, PathRefused, PermissionDenied
from ferry.wire import Data
from ferry.wire import messages as m
from ferry_server import PASSWORD, ServerThread
from transfer_support import connect, marker, pids_with

pytestmark = pytest.mark.shared_server(
    bob={},  # commands not allowed
    carol={"exec_allow": ["echo", "/bin/cat"], "exec_allowed": True},
)

T = TypeVar("T")


def go(srv: ServerThread, tmp: Path, body: Callable[[AsyncClient], Awaitable[T]], user: str = "alice") -> T:
    """Connect as ``user``, run ``body(client)``, close."""

    async def main() -> T:
        client = await connect(srv, tmp, user=user)
        async with client:
            return await body(client)

    return asyncio.run(main())


def wait_gone(arg: str, within: float) -> list[int]:
    """Poll (bounded) until no process carries ``arg``; returns the survivors."""
    deadline = time.monotonic() + within
    while (left := pids_with(arg)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


# --- exit statuses --------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_exit_codes_and_signals(server: ServerThread, tmp_path: Path) -> None:
    async def body(c: AsyncClient) -> list[Any]:
        return [
            await c.run("exit 3"),
            await c.run(["sh", "-c", "exit 4"]),
            await c.run("kill -TERM $$"),
            await c.run("kill -KILL $$"),
            await c.run("true"),
            await c.run(["no-such-program-xyz"]),
        ]

    r3, r4, term, kill, ok, missing = go(server, tmp_path, body)
    assert (r3.exit_code, r4.exit_code, ok.exit_code) == (3, 4, 0)
    assert ok.ok and not r3.ok
    assert (term.exit_code, term.signal) == (128 + 15, 15)
    assert (kill.exit_code, kill.signal) == (128 + 9, 9)
    assert missing.exit_code == 127
    assert b"no-such-program-xyz" in missing.stderr and b"not found" in missing.stderr


@pytest.mark.timeout(30)
def test_not_executable_is_126(server: ServerThread, tmp_path: Path) -> None:
    home = server.root / "homes" / "alice"
    (home / "notexec.sh").write_text("#!/bin/sh\necho hi\n")
    (home / "notexec.sh").chmod(0o644)
    res = go(server, tmp_path, lambda c: c.run(["./notexec.sh"]))
    assert res.exit_code == 126


# --- output ---------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_stdout_stderr_separate_and_ordered(server: ServerThread, tmp_path: Path) -> None:
    script = "i=0; while [ $i -lt 3000 ]; do i=$((i+1)); echo out$i; echo err$i >&2; done"
    res = go(server, tmp_path, lambda c: c.run(script))
    assert res.exit_code == 0
    assert res.stdout.decode().split() == [f"out{i}" for i in range(1, 3001)]
    assert res.stderr.decode().split() == [f"err{i}" for i in range(1, 3001)]


@pytest.mark.timeout(30)
def test_streaming_yields_chunks_live_then_status(server: ServerThread, tmp_path: Path) -> None:
    async def body(c: AsyncClient) -> tuple[list[tuple[str, bytes, float]], int | None]:
        seen: list[tuple[str, bytes, float]] = []
        t0 = time.monotonic()
        stream = c.stream("echo one; sleep 0.4; echo two >&2; exit 5")
        async for kind, data in stream:
            seen.append((kind, data, time.monotonic() - t0))
        return seen, stream.exit_code

    seen, code = go(server, tmp_path, body)
    assert code == 5
    assert [(k, d) for k, d, _ in seen] == [("stdout", b"one\n"), ("stderr", b"two\n")]
    # "one" arrived before the command slept: output is live, not collected at the end.
    assert seen[1][2] - seen[0][2] > 0.3


@pytest.mark.timeout(30)
def test_binary_stdin_roundtrip_and_eof(server: ServerThread, tmp_path: Path) -> None:
    blob = os.urandom(5 << 20) + bytes(range(256))

    async def body(c: AsyncClient) -> tuple[Any, Any, Any]:
        cat = await c.run(["cat"], input=blob)
        wc = await c.run("wc -c", input=blob)
        empty = await c.run("wc -c")  # no input: EOF at once, not a hang
        return cat, wc, empty

    cat, wc, empty = go(server, tmp_path, body)
    assert cat.stdout == blob
    assert int(wc.stdout) == len(blob)
    assert int(empty.stdout) == 0


@pytest.mark.timeout(30)
def test_interactive_write_read_and_close_stdin(server: ServerThread, tmp_path: Path) -> None:
    async def body(c: AsyncClient) -> tuple[bytes, int]:
        proc = await c.start(["sh", "-c", "while read line; do echo got:$line; done; exit 9"])
        async with proc:
            await proc.write(b"a\n")
            first = await proc.read()
            await proc.write(b"b\n")
            await proc.close_stdin()
            rest = await proc.collect()
            assert first is not None
            return first[1] + rest[0], await proc.wait()

    out, code = go(server, tmp_path, body)
    assert out == b"got:a\ngot:b\n"
    assert code == 9


@pytest.mark.timeout(30)
def test_server_respects_each_streams_window(server: ServerThread, tmp_path: Path) -> None:
    """Raw protocol: stderr gets one window and no more; stdout is granted as read. stdout must
    complete while stderr is stalled (no deadlock), and no stream ever exceeds its grant."""
    window = 1 << 20
    total = 3 << 20
    script = f"head -c {total} /dev/zero >&2 & head -c {total} /dev/zero; wait"

    async def body(c: AsyncClient) -> tuple[int, int, int, int]:
        req_id, route = c.mux.open(0)
        await c.send(m.Exec(id=req_id, command=script, window=window))
        assert isinstance(await c.mux.recv(route), m.ExecStarted)
        got = {m.STDOUT: 0, m.STDERR: 0}
        granted = {m.STDOUT: window, m.STDERR: window}
        while got[m.STDOUT] < total:  # the shell keeps stdout open while it waits: count bytes
            ev = await c.mux.recv(route, timeout=10)
            if isinstance(ev, Data):
                got[ev.stream] += len(ev.data)
                assert got[ev.stream] <= granted[ev.stream], "server sent beyond the window"
                if ev.stream == m.STDOUT:
                    await c.send(m.Window(id=req_id, stream=m.STDOUT, increment=len(ev.data)))
                    granted[m.STDOUT] += len(ev.data)
        await asyncio.sleep(0.3)  # stderr is stalled on its window: nothing more may come
        while not route.queue.empty():
            ev = route.queue.get_nowait()
            if isinstance(ev, Data):
                got[ev.stream] += len(ev.data)
        stalled_stderr = got[m.STDERR]
        # Now release stderr and let the command finish.
        await c.send(m.Window(id=req_id, stream=m.STDERR, increment=total))
        while True:
            ev = await c.mux.recv(route, timeout=10)
            if isinstance(ev, Data):
                got[ev.stream] += len(ev.data)
            elif isinstance(ev, m.ExitStatus):
                c.mux.close_route(req_id)
                return got[m.STDOUT], stalled_stderr, got[m.STDERR], ev.code or 0

    out, stalled, err, code = go(server, tmp_path, body)
    assert out == total
    assert stalled == window  # exactly the grant: the pipe had more, the server held back
    assert err == total
    assert code == 0


@pytest.mark.timeout(30)
def test_client_buffers_at_most_the_window(server: ServerThread, tmp_path: Path) -> None:
    window = 256 << 10

    async def body(c: AsyncClient) -> tuple[int, int]:
        proc = await c.start("head -c 20000000 /dev/zero", window=window)
        async with proc:
            await asyncio.sleep(0.5)  # a consumer that does not read
            buffered = sum(len(d) for _, d in proc._chunks)
            total = 0
            while (item := await proc.read()) is not None:
                total += len(item[1])
            return buffered, total

    buffered, total = go(server, tmp_path, body)
    assert buffered == window
    assert total == 20_000_000


# --- processes: timeouts, cancel, orphans, concurrency -----------------------------------------------


@pytest.mark.timeout(30)
def test_timeout_kills_the_group_and_reports_it(server: ServerThread, tmp_path: Path) -> None:
    mk = marker()
    t0 = time.monotonic()
    res = go(server, tmp_path, lambda c: c.run(f"sleep {mk} & sleep {mk}; echo never", timeout=0.5))
    assert res.timed_out
    assert res.signal == 15 and res.exit_code == 143
    assert time.monotonic() - t0 < 5
    assert wait_gone(mk, 3) == []


@pytest.mark.timeout(30)
def test_timeout_escalates_to_kill_and_reaches_other_process_groups(
    server: ServerThread, tmp_path: Path
) -> None:
    mk = marker()
    # The background process moves to its own process group (as a job-control shell would put it)
    # and ignores SIGTERM, like the leader: only SIGKILL to the whole session gets them.
    escape = (
        "import os, signal; os.setpgid(0, 0); signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"os.execvp('sleep', ['sleep', '{mk}'])"
    )
    script = f"trap '' TERM; {shlex.quote(sys.executable)} -c {shlex.quote(escape)} & sleep {mk}"
    t0 = time.monotonic()
    res = go(server, tmp_path, lambda c: c.run(script, timeout=0.5))
    took = time.monotonic() - t0
    assert res.timed_out and res.signal == 9
    assert 2.0 <= took < 8  # SIGTERM ignored: SIGKILL after the 2 s grace
    assert wait_gone(mk, 3) == []


@pytest.mark.timeout(30)
def test_leftover_background_processes_are_killed_at_exit(server: ServerThread, tmp_path: Path) -> None:
    mk = marker()
    res = go(server, tmp_path, lambda c: c.run(f"sleep {mk} > /dev/null 2>&1 & echo started"))
    assert res.stdout == b"started\n" and res.exit_code == 0
    assert wait_gone(mk, 3) == []


@pytest.mark.timeout(30)
def test_disconnect_kills_running_commands(server: ServerThread, tmp_path: Path) -> None:
    mk = marker()

    async def body(c: AsyncClient) -> int:
        await c.start(f"sleep {mk}")
        deadline = time.monotonic() + 5
        while not pids_with(mk) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return len(pids_with(mk))  # the client closes here without waiting for the command

    assert go(server, tmp_path, body) == 1
    assert wait_gone(mk, 5) == []


@pytest.mark.timeout(30)
def test_signal_reaches_the_process_group(server: ServerThread, tmp_path: Path) -> None:
    async def body(c: AsyncClient) -> tuple[bytes, int]:
        proc = await c.start("trap 'echo got INT; exit 42' INT; echo ready; while :; do sleep 0.05; done")
        async with proc:
            first = await proc.read()
            assert first == ("stdout", b"ready\n")
            await proc.signal(2)
            out, _ = await proc.collect()
            return out, await proc.wait()

    out, code = go(server, tmp_path, body)
    assert out == b"got INT\n" and code == 42


@pytest.mark.timeout(30)
def test_cancel_stops_a_command(server: ServerThread, tmp_path: Path) -> None:
    mk = marker()

    async def body(c: AsyncClient) -> int:
        proc: RemoteProcess = await c.start(f"sleep {mk}")
        await proc.cancel()
        return await proc.wait()

    assert go(server, tmp_path, body) == 143
    assert wait_gone(mk, 3) == []


@pytest.mark.timeout(30)
def test_concurrent_commands_on_one_connection(server: ServerThread, tmp_path: Path) -> None:
    async def body(c: AsyncClient) -> tuple[list[Any], float]:
        t0 = time.monotonic()
        results = await asyncio.gather(
            *(c.run(f"sleep 0.5; echo {i}; echo e{i} >&2; exit {i}") for i in range(20))
        )
        return results, time.monotonic() - t0

    results, took = go(server, tmp_path, body)
    for i, r in enumerate(results):
        assert (r.stdout, r.stderr, r.exit_code) == (f"{i}\n".encode(), f"e{i}\n".encode(), i)
    assert took < 5  # in parallel, not 20 x 0.5 s in a row


@pytest.mark.timeout(30)
def test_concurrent_commands_across_20_connections(server: ServerThread, tmp_path: Path) -> None:
    async def one(i: int) -> Any:
        client = await AsyncClient.connect(
            "127.0.0.1", server.port, user="alice", password=PASSWORD, known_hosts=KnownHosts(tmp_path / "kh")
        )
        async with client:
            return await client.run(["sh", "-c", f"sleep 0.3; echo {i}"])

    async def main() -> list[Any]:
        return await asyncio.gather(*(one(i) for i in range(20)))

    results = asyncio.run(main())
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(20)]


# --- policy: permissions, environment, working folder ------------------------------------------------


@pytest.mark.timeout(30)
def test_exec_refused_without_permission(server: ServerThread, tmp_path: Path) -> None:
    with pytest.raises(PermissionDenied) as info:
        go(server, tmp_path, lambda c: c.run("true"), user="bob")
    assert info.value.code == "exec-denied"
    assert "ferry user mod" in str(info.value)


@pytest.mark.timeout(30)
def test_program_allow_list(server: ServerThread, tmp_path: Path) -> None:
    async def body(c: AsyncClient) -> list[Any]:
        out: list[Any] = [
            await c.run(["echo", "a b"]),
            await c.run("echo plain words"),
            await c.run(["/bin/cat"], input=b"x"),
        ]
        for cmd in (["ls"], "ls -l", "echo hi; rm -rf x", "echo $HOME", "echo 'quoted'", ["/bin/echo", "x"]):
            try:
                await c.run(cmd)
            except PermissionDenied as exc:
                out.append(exc)
            else:
                out.append(None)
        return out

    a, b, cat, *refusals = go(server, tmp_path, body, user="carol")
    assert a.stdout == b"a b\n" and b.stdout == b"plain words\n" and cat.stdout == b"x"
    assert all(isinstance(r, PermissionDenied) and r.code == "exec-denied" for r in refusals), refusals
    assert "'ls' is not allowed" in str(refusals[0])
    assert "shell syntax" in str(refusals[2]) and "';'" in str(refusals[2])


@pytest.mark.timeout(30)
def test_environment_minimal_and_allow_list(server: ServerThread, tmp_path: Path) -> None:
    async def body(c: AsyncClient) -> tuple[Any, Exception | None]:
        res = await c.run("env", env={"LC_ALL": "C", "FERRY_JOB": "7", "TZ": "UTC"})
        try:
            await c.run("env", env={"LD_PRELOAD": "/tmp/evil.so"})
        except PermissionDenied as exc:
            return res, exc
        return res, None

    res, refused = go(server, tmp_path, body)
    env = dict(line.split("=", 1) for line in res.stdout.decode().splitlines())
    home = str(server.root / "homes" / "alice")
    assert env.pop("PWD") == home
    assert env == {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "USER": "alice",
        "LOGNAME": "alice",
        "SHELL": "/bin/sh",
        "LANG": "C.UTF-8",
        "LC_ALL": "C",
        "FERRY_JOB": "7",
        "TZ": "UTC",
    }
    assert isinstance(refused, PermissionDenied) and "LD_PRELOAD" in str(refused)


@pytest.mark.timeout(30)
def test_working_folder_inside_the_home_only(server: ServerThread, tmp_path: Path) -> None:
    home = server.root / "homes" / "alice"
    (home / "proj" / "sub").mkdir(parents=True, exist_ok=True)
    if not (home / "link").is_symlink():
        (home / "link").symlink_to(home / "proj")

    async def body(c: AsyncClient) -> list[Any]:
        out: list[Any] = [await c.run("pwd", cwd="proj/sub")]
        for cwd in ("../", "/etc", "link", "link/sub", "nope"):
            try:
                await c.run("pwd", cwd=cwd)
            except (PathRefused, NotFound) as exc:
                out.append(exc)
        return out

    ok, *refused = go(server, tmp_path, body)
    assert ok.stdout.decode().strip() == str(home / "proj" / "sub")
    assert [type(e) for e in refused] == [PathRefused, PathRefused, PathRefused, PathRefused, NotFound]
    assert [e.code for e in refused[:4]] == ["outside-home", "outside-home", "symlink", "symlink"]


@pytest.mark.timeout(30)
def test_every_exec_is_logged(server: ServerThread, tmp_path: Path) -> None:
    go(server, tmp_path, lambda c: c.run("echo logged-\x1b[31m-marker; exit 6"))
    log = paths.log_file(server.root).read_text(encoding="utf-8")
    line = next(ln for ln in log.splitlines() if "logged-" in ln)
    assert "exec user=alice" in line and "peer=127.0.0.1:" in line
    assert "exit=6" in line and "stdout=" in line and "seconds=" in line
    assert "\x1b" not in line and "\\x1b" in line  # terminal escapes are neutralised


# --- bounded server memory --------------------------------------------------------------------------

_SERVER_PROC = """
import sys, threading
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from ferry_server import ServerThread
srv = ServerThread(Path(sys.argv[1]), plain=True)
srv.add_user("alice", exec_allowed=True)
srv.start()
print(srv.port, flush=True)
sys.stdin.read()
srv.stop()
"""


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


@pytest.mark.timeout(60)
def test_100_mib_through_a_slow_reader_keeps_server_memory_bounded(tmp_path: Path) -> None:
    tests_dir = str(Path(__file__).parent)
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER_PROC, str(tmp_path / "root"), tests_dir],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        total = 100 << 20

        async def main() -> tuple[int, int, int, int]:
            client = await AsyncClient.connect("127.0.0.1", port, user="alice", password=PASSWORD, plain=True)
            async with client:
                await client.run("head -c 4000000 /dev/zero")  # warm up allocator and buffers
                base = _rss_kib(proc.pid, "VmRSS")
                p = await client.start(f"head -c {total} /dev/zero; echo end >&2", window=1 << 20)
                async with p:
                    await asyncio.sleep(
                        1.0
                    )  # the reader stalls: the command must wait, not the server buffer
                    stalled = _rss_kib(proc.pid, "VmRSS")
                    n = 0
                    while (item := await p.read()) is not None:
                        n += len(item[1]) if item[0] == "stdout" else 0
                        if n % (8 << 20) < len(item[1]):
                            await asyncio.sleep(0.01)  # and stays slowish
                    peak = _rss_kib(proc.pid, "VmHWM")
                    assert await p.wait() == 0
                    return base, stalled, peak, n

        base, stalled, peak, n = asyncio.run(main())
        print(f"server RSS: base {base} KiB, stalled {stalled} KiB, peak {peak} KiB")
        assert n == total
        assert stalled - base < 16 << 10, (base, stalled)
        assert peak - base < 48 << 10, (base, peak)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(30)
def test_server_shutdown_kills_running_commands(tmp_path: Path) -> None:
    srv = ServerThread(tmp_path / "root")
    srv.add_user("alice", exec_allowed=True)
    srv.start()
    mk = marker()
    stopped = False
    try:

        async def main() -> None:
            nonlocal stopped
            client = await AsyncClient.connect(
                "127.0.0.1",
                srv.port,
                user="alice",
                password=PASSWORD,
                known_hosts=KnownHosts(tmp_path / "kh"),
            )
            await client.start(f"trap '' TERM; sleep {mk}")  # ignores SIGTERM: needs the SIGKILL
            deadline = time.monotonic() + 5
            while not pids_with(mk) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert pids_with(mk)
            stopped = True
            await asyncio.to_thread(srv.stop)
            await client.close()

        asyncio.run(main())
    finally:
        if not stopped:
            srv.stop()
    assert wait_gone(mk, 5) == []


@pytest.mark.timeout(30)
def test_server_enforces_an_exec_timeout_field(
    server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Protocol v1's Exec has no timeout field; the server is ready for one (it reads it with
    getattr). A class attribute stands in for the field, and no client-side timer runs here."""
    mk = marker()
    monkeypatch.setattr(m.Exec, "timeout", 0.3, raising=False)

    async def body(c: AsyncClient) -> m.ExitStatus:
        req_id, route = c.mux.open(0)
        try:
            await c.send(m.Exec(id=req_id, command=f"sleep {mk}"))
            while True:
                ev = await c.mux.recv(route, timeout=10)
                if isinstance(ev, m.ExitStatus):
                    return ev
        finally:
            c.mux.close_route(req_id)

    status = go(server, tmp_path, body)
    assert status.timed_out and status.signal == 15
    assert wait_gone(mk, 3) == []
