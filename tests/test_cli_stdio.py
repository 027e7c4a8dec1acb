"""``-`` for standard input and output (``ferry get HOST:F -``, ``... | ferry put - HOST:F``), and
what Ctrl-C says: real ``ferry`` processes on real pipes against a real server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from conftest import FERRY
from ferry_server import PASSWORD, ServerThread
from serve_process import ServeProcess

MiB = 1 << 20

pytestmark = pytest.mark.shared_server(ann={})


@pytest.fixture(scope="module")
def env(module_server: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = dict(os.environ, FERRY_HOME=str(tmp_path_factory.mktemp("client")), FERRY_PASSWORD=PASSWORD)
    pin = subprocess.run([*FERRY, "ls", *at(module_server)], env=env, capture_output=True, text=True, timeout=60)
    assert pin.returncode == 0 and "pinned" in pin.stderr  # once: later stderr is the command's own
    return env


def at(srv: ServerThread, path: str = "") -> list[str]:
    return ["-P", str(srv.port), f"ann@127.0.0.1:{path}"]


def pattern(size: int) -> Iterator[bytes]:
    """``size`` bytes of distinct MiB blocks, produced as they are needed."""
    block = os.urandom(MiB)
    for i in range(0, size, MiB):
        yield (i.to_bytes(8, "little") + block[8:])[: min(MiB, size - i)]


def peak_rss_kib(argv: list[str], env: dict[str, str], **kw: object) -> tuple[int, subprocess.CompletedProcess[bytes]]:
    """Run ``argv`` and return the peak resident memory of that process alone (GNU time)."""
    kw.setdefault("stdout", subprocess.PIPE)
    p = subprocess.run(["/usr/bin/time", "-f", "peak-rss-kib=%M", *argv], env=env, stderr=subprocess.PIPE,
                       timeout=120, **kw)  # type: ignore[call-overload]  # fmt: skip
    tail = p.stderr.rstrip().rsplit(b"\n", 1)[-1].decode()
    assert tail.startswith("peak-rss-kib="), p.stderr
    return int(tail.split("=")[1]), p


def test_get_to_stdout_and_put_from_stdin_are_verified_and_bounded(
    server: ServerThread, env: dict[str, str], tmp_path: Path
) -> None:
    size = 160 * MiB + 12345  # more than any buffer of ferry's, not a whole number of chunks
    home = server.root / "homes" / "ann"
    with open(home / "big.bin", "wb") as f:
        for block in pattern(size):
            f.write(block)
    expected = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(home / "big.bin", "rb") as f:
        while block := f.read(8 * MiB):
            expected.update(block)

    # get to a pipe: the bytes arrive in order on stdout, the JSON record on stderr
    with open(tmp_path / "out.bin", "wb") as sink:
        rss, p = peak_rss_kib([*FERRY, "get", "--json", *at(server, "big.bin"), "-"], env, stdout=sink)
    assert p.returncode == 0, p.stderr
    record = json.loads(p.stderr.decode().splitlines()[0])
    assert record["dest"] == "-" and record["size"] == size and record["checksum"] == expected.hexdigest()
    assert (tmp_path / "out.bin").stat().st_size == size
    assert filecmp_same(tmp_path / "out.bin", home / "big.bin")
    print(f"get -: peak RSS {rss} KiB")
    assert rss < 110 * 1024, f"get - peaked at {rss} KiB for a {size >> 20} MiB file"

    # put from a pipe (no size known in advance): streamed, stored whole, checksum reported
    feeder = subprocess.Popen(
        [sys.executable, "-c", "import sys,shutil; shutil.copyfileobj(open(sys.argv[1],'rb'), sys.stdout.buffer)",
         str(home / "big.bin")], stdout=subprocess.PIPE,
    )  # fmt: skip
    assert feeder.stdout is not None
    try:
        rss, p = peak_rss_kib([*FERRY, "put", "--json", "-", *at(server, "copy.bin")], env, stdin=feeder.stdout)
    finally:
        feeder.stdout.close()
        feeder.wait(30)
    assert p.returncode == 0, p.stderr
    (record,) = [json.loads(x) for x in p.stdout.decode().splitlines()]
    assert record["source"] == "-" and record["size"] == size and record["checksum"] == expected.hexdigest()
    assert filecmp_same(home / "copy.bin", home / "big.bin")
    print(f"put -: peak RSS {rss} KiB")
    assert rss < 110 * 1024, f"put - peaked at {rss} KiB for a {size >> 20} MiB stream"
    assert not [p for p in home.iterdir() if "ferry-part" in p.name]


def filecmp_same(a: Path, b: Path) -> bool:
    import filecmp

    return filecmp.cmp(a, b, shallow=False)


def test_stdin_and_stdout_small_cases_and_mistakes(server: ServerThread, env: dict[str, str]) -> None:
    home = server.root / "homes" / "ann"
    (home / "dir").mkdir(exist_ok=True)
    put = subprocess.run([*FERRY, "put", "-q", "-", *at(server, "dir/note.txt")], env=env, input=b"hello\n",
                         capture_output=True, timeout=60)  # fmt: skip
    assert put.returncode == 0 and put.stdout == b"", put.stderr
    assert (home / "dir" / "note.txt").read_bytes() == b"hello\n"
    empty = subprocess.run([*FERRY, "put", "-q", "-", *at(server, "dir/empty")], env=env, input=b"",
                           capture_output=True, timeout=60)  # fmt: skip
    assert empty.returncode == 0 and (home / "dir" / "empty").read_bytes() == b""
    get = subprocess.run([*FERRY, "get", "-q", *at(server, "dir/note.txt"), "-"], env=env, capture_output=True,
                         timeout=60)  # fmt: skip
    assert (get.returncode, get.stdout, get.stderr) == (0, b"hello\n", b"")
    # a folder as the target of stdin, a folder to stdout, '-' with other sources: clear refusals
    for args, says in (
        (["put", "-", *at(server, "dir")], b"is a folder: standard input needs a file name"),
        (["get", *at(server, "dir"), "-"], b"is a folder: standard output takes one file"),
        (["put", "-", "x", *at(server, "dir/")], b"'-' (standard input) must be the only LOCAL"),
    ):
        p = subprocess.run([*FERRY, *args], env=env, input=b"", capture_output=True, timeout=60)
        assert p.returncode == 2 and says in p.stderr, (args, p.stderr)


def test_ctrl_c_says_whether_running_it_again_resumes(tmp_path: Path) -> None:
    env = dict(os.environ, FERRY_HOME=str(tmp_path / "client"), PYTHONUNBUFFERED="1")
    srv = ServeProcess(tmp_path / "root", env).start()
    env["FERRY_PASSWORD"] = srv.password or ""
    assert srv.proc is not None
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for block in pattern(96 * MiB):
            f.write(block)
    home = srv.root / "homes" / "ferry"
    pin = subprocess.run([*FERRY, "ls", *srv.scp()], env=env, capture_output=True, text=True, timeout=60)
    assert pin.returncode == 0 and "pinned" in pin.stderr  # so stderr below is the command's own
    put = [*FERRY, "put", "-q", str(big), *srv.scp("big.bin")]
    client = subprocess.Popen(put, env=env, stderr=subprocess.PIPE, text=True)
    stopped = False
    try:
        deadline = time.monotonic() + 30
        while not any("ferry-part" in p.name for p in home.iterdir()):  # the upload has begun
            assert time.monotonic() < deadline and client.poll() is None, "the upload never started"
            time.sleep(0.005)
        os.kill(srv.proc.pid, signal.SIGSTOP)  # hold the server still: the client is mid-transfer
        stopped = True
        client.send_signal(signal.SIGINT)
        _, err = client.communicate(timeout=30)
    finally:
        if stopped:
            os.kill(srv.proc.pid, signal.SIGCONT)
        if client.poll() is None:
            client.kill()
            client.wait(10)
    try:
        assert client.returncode == 130
        assert err == "ferry: interrupted; run the same command again to resume where it stopped\n"
        again = subprocess.run(put, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        assert filecmp_same(big, home / "big.bin")

        # a stream cannot be resumed: no such promise
        reader = subprocess.Popen([*FERRY, "put", "-", *srv.scp("stream.bin")], env=env,
                                  stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert reader.stdin is not None
        reader.stdin.write("some data, then nothing more for now\n")
        reader.stdin.flush()
        deadline = time.monotonic() + 30
        while not any("ferry-part" in p.name for p in home.iterdir()):
            assert time.monotonic() < deadline and reader.poll() is None
            time.sleep(0.005)
        reader.send_signal(signal.SIGINT)
        try:
            _, err = reader.communicate(timeout=30)
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait(10)
        assert reader.returncode == 130 and err == "ferry: interrupted\n"
        assert not (home / "stream.bin").exists()
    finally:
        srv.stop()


def test_a_stream_over_the_quota_is_refused_as_it_arrives(server: ServerThread, env: dict[str, str]) -> None:
    home = server.add_user("quinn", quota=2 * MiB)
    p = subprocess.run(
        [*FERRY, "put", "-", "-P", str(server.port), "quinn@127.0.0.1:big"], env=env, capture_output=True,
        input=b"x" * (5 * MiB), timeout=60,
    )  # fmt: skip
    assert p.returncode == 5, p.stderr
    assert b"quota exceeded while receiving big" in p.stderr
    assert list(home.iterdir()) == []  # nothing kept, no partial left
    small = subprocess.run(
        [*FERRY, "put", "-", "-P", str(server.port), "quinn@127.0.0.1:small"], env=env, capture_output=True,
        input=b"y" * MiB, timeout=60,
    )  # fmt: skip
    assert small.returncode == 0, small.stderr
    assert (home / "small").stat().st_size == MiB


def test_a_streamed_upload_with_a_size_or_token_breaks_the_protocol(
    server: ServerThread, env: dict[str, str]
) -> None:
    import asyncio

    from ferry.client.aclient import AsyncClient
    from ferry.client.known_hosts import KnownHosts
    from ferry.errors import ConnectionBroken
    from ferry.wire import messages as m

    async def main(bad: m.PutFile) -> None:
        known = KnownHosts(Path(env["FERRY_HOME"]) / "known_hosts")
        client = await AsyncClient.connect("127.0.0.1", server.port, user="ann", password=PASSWORD,
                                           known_hosts=known)  # fmt: skip
        try:
            _, route = client.mux.open()
            await client.send(bad)
            with pytest.raises(ConnectionBroken):
                await client.mux.recv(route, timeout=10)
        finally:
            await client.close()

    for bad in (m.PutFile(id=1, path="s", size=5, mtime=0.0, streamed=True),
                m.PutFile(id=1, path="s", size=0, mtime=0.0, token="abc", streamed=True)):  # fmt: skip
        asyncio.run(main(bad))
    assert not (server.root / "homes" / "ann" / "s").exists()
