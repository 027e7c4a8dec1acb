"""The file commands end to end: ``ferry serve`` and ``ferry get/put/...`` as real subprocesses."""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cli_inproc import run_inproc
from conftest import FERRY, free_port
from ferry.client.transfer import partial_path
from ferry.fskit import is_partial_name
from serve_process import ServeProcess

MiB = 1 << 20


def client_env(base: dict[str, str], home: Path, password: str | None) -> dict[str, str]:
    env = dict(base)
    env["FERRY_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("FERRY_USER", None)
    if password is not None:
        env["FERRY_PASSWORD"] = password
    return env


class Served:
    """A running server plus a client environment (FERRY_HOME, FERRY_PASSWORD) for it."""

    def __init__(self, srv: ServeProcess, env: dict[str, str]) -> None:
        self.srv = srv
        self.env = env
        self.home = srv.root / "homes" / "ferry"

    def ferry(
        self, *args: str, timeout: float = 60.0, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a client command against this server (adds --plain when needed), in this process."""
        return run_inproc([*args, *self.srv.tls_args()], self.env, cwd=cwd)


def _serve(tmp: Path, plain: bool) -> Iterator[Served]:
    env = client_env(dict(os.environ), tmp / "client-home", None)
    srv = ServeProcess(tmp / "root", env, plain=plain).start()
    assert srv.password
    try:
        yield Served(srv, client_env(env, tmp / "client-home", srv.password))
    finally:
        assert srv.stop() == 0


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from _serve(tmp_path_factory.mktemp("tls"), plain=False)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from _serve(tmp_path_factory.mktemp("plain"), plain=True)


def ok(p: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    return p


def json_lines(p: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in p.stdout.splitlines()]


def make_tree(root: Path) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "a.txt").write_text("alpha\n")
    (root / "sub" / "b.bin").write_bytes(os.urandom(300_000))  # above the inline limit: streamed
    (root / "sub" / "deeper" / "c.txt").write_text("gamma\n")
    return root


def same_tree(a: Path, b: Path) -> None:
    def listing(p: Path) -> list[str]:
        return sorted(str(x.relative_to(p)) + ("/" if x.is_dir() else "") for x in p.rglob("*"))

    assert listing(a) == listing(b)
    for x in a.rglob("*"):
        if x.is_file():
            assert (b / x.relative_to(a)).read_bytes() == x.read_bytes(), x


def make_big(path: Path, mib: int) -> None:
    """A file of distinct MiB blocks, written fast (urandom of the whole size would dominate)."""
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for i in range(mib):
            f.write(i.to_bytes(8, "little") + block[8:])


# --- transfers ---------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_put_get_files_and_trees(tls: Served, tmp_path: Path) -> None:
    s = tls
    base = "t"
    ok(s.ferry("mkdir", *s.srv.scp(base)))
    small = tmp_path / "small.txt"
    small.write_text("hello ferry\n")
    medium = tmp_path / "medium.bin"
    medium.write_bytes(os.urandom(MiB + 7))
    tree = make_tree(tmp_path / "tree")

    # several files into a folder (URL form), quietly
    p = ok(s.ferry("put", "-q", str(small), str(medium), s.srv.remote(base + "/")))
    assert p.stdout == "" and p.stderr == ""
    assert (s.home / base / "small.txt").read_text() == "hello ferry\n"
    assert (s.home / base / "medium.bin").read_bytes() == medium.read_bytes()

    # a tree to a new name (scp form; the trailing slash is stripped before sending), with --json
    p = ok(s.ferry("put", "-r", "--json", str(tree), *s.srv.scp(base + "/copy/")))
    (rec,) = json_lines(p)
    assert rec["op"] == "put" and rec["kind"] == "tree" and rec["files"] == 3
    same_tree(tree, s.home / base / "copy")
    # into an existing folder: lands under its own name
    ok(s.ferry("put", "-r", "-q", str(tree), *s.srv.scp(base)))
    same_tree(tree, s.home / base / "tree")

    # downloads: a file into a folder, a file to a new name, trees to a new and an existing folder
    out = tmp_path / "out"
    out.mkdir()
    p = ok(s.ferry("get", "--json", s.srv.remote(f"{base}/medium.bin"), str(out)))
    (rec,) = json_lines(p)
    assert rec["size"] == MiB + 7 and rec["sent"] == MiB + 7 and rec["resumed_from"] == 0
    assert (out / "medium.bin").read_bytes() == medium.read_bytes()
    p = ok(s.ferry("get", *s.srv.scp(f"{base}/small.txt"), str(out / "renamed.txt")))
    assert "small.txt" in p.stdout and "renamed.txt" in p.stdout  # a human summary line
    assert (out / "renamed.txt").read_text() == "hello ferry\n"
    ok(s.ferry("get", "-r", "-q", *s.srv.scp(f"{base}/copy"), str(out / "down")))
    same_tree(tree, out / "down")
    ok(s.ferry("get", "-r", "-q", s.srv.remote(f"{base}/copy"), str(out)))
    same_tree(tree, out / "copy")
    # a trailing slash means "the contents of" (as rsync): into an existing folder, not nested
    (out / "flat").mkdir()
    ok(s.ferry("get", "-r", "-q", s.srv.remote(f"{base}/copy/"), str(out / "flat")))
    same_tree(tree, out / "flat")
    # get with LOCAL omitted downloads into the current folder
    ok(s.ferry("get", "-q", *s.srv.scp(f"{base}/small.txt"), cwd=out / "down"))
    assert (out / "down" / "small.txt").read_text() == "hello ferry\n"
    assert not [p for p in out.rglob("*") if is_partial_name(p.name)]

    # folders need -r both ways
    p = s.ferry("get", *s.srv.scp(f"{base}/copy"), str(out))
    assert p.returncode == 2 and "use -r" in p.stderr
    p = s.ferry("put", str(tree), *s.srv.scp(base))
    assert p.returncode == 2 and "use -r" in p.stderr
    # several sources need an existing folder
    p = s.ferry("put", str(small), str(medium), *s.srv.scp(base + "/missing"))
    assert p.returncode == 4 and "no such remote folder" in p.stderr


@pytest.mark.timeout(60)
def test_ls_stat_mkdir_mv_rm_df(tls: Served, tmp_path: Path) -> None:
    s = tls
    ok(s.ferry("mkdir", "-p", *s.srv.scp("m/a//b/c/")))  # doubled and trailing slashes are normalised
    assert (s.home / "m" / "a" / "b" / "c").is_dir()
    p = s.ferry("mkdir", *s.srv.scp("m/a"))
    assert p.returncode == 2 and "exists" in p.stderr
    ok(s.ferry("mkdir", "-p", *s.srv.scp("m/a")))  # -p: no error if it exists
    f = tmp_path / "f.txt"
    f.write_text("x" * 1000)
    ok(s.ferry("put", "-q", str(f), *s.srv.scp("m/a/f.txt")))
    os.utime(s.home / "m" / "a" / "f.txt", (1_700_000_000, 1_700_000_000))

    p = ok(s.ferry("ls", *s.srv.scp("m/a/")))
    assert p.stdout.splitlines() == ["b/", "f.txt"]
    p = ok(s.ferry("ls", "-l", *s.srv.scp("m/a")))
    lines = p.stdout.splitlines()
    assert lines[0].startswith("d") and lines[0].endswith(" b/")
    assert lines[1].startswith("-rw") and " 1000 " in lines[1] and lines[1].endswith(" f.txt")
    p = ok(s.ferry("ls", "--json", s.srv.remote("m/a")))
    recs = {r["name"]: r for r in json_lines(p)}
    assert recs["f.txt"]["kind"] == "file" and recs["f.txt"]["size"] == 1000
    assert recs["f.txt"]["mtime"] == 1_700_000_000 and recs["b"]["kind"] == "dir"
    p = ok(s.ferry("ls", "-R", *s.srv.scp("m")))
    assert p.stdout.splitlines() == ["a/", "a/b/", "a/f.txt", "a/b/c/"]
    p = ok(s.ferry("ls", *s.srv.scp("m/a/f.txt")))  # a file lists as itself
    assert p.stdout.strip() == "f.txt"

    p = ok(s.ferry("stat", *s.srv.scp("m/a/f.txt")))
    assert "kind: file" in p.stdout and "size: 1000 bytes" in p.stdout
    (rec,) = json_lines(ok(s.ferry("stat", "--json", s.srv.remote("m/a/f.txt"))))
    assert rec == {"path": "m/a/f.txt", "name": "f.txt", "kind": "file", "size": 1000,
                   "mtime": 1_700_000_000.0, "mode": rec["mode"]}  # fmt: skip

    ok(s.ferry("mv", *s.srv.scp("m/a/f.txt"), "m/a/b"))  # into an existing folder
    assert (s.home / "m" / "a" / "b" / "f.txt").is_file()
    (rec,) = json_lines(ok(s.ferry("mv", "--json", *s.srv.scp("m/a/b/f.txt"), "m/g.txt")))
    assert rec == {"op": "mv", "source": "m/a/b/f.txt", "dest": "m/g.txt", "ok": True}
    assert (s.home / "m" / "g.txt").read_text() == "x" * 1000

    (rec,) = json_lines(ok(s.ferry("df", "--json", s.srv.remote())))
    assert rec["used"] >= 1000 and rec["quota"] is None and rec["free"] > 0
    p = ok(s.ferry("df", "-P", str(s.srv.port), "ferry@127.0.0.1:"))
    assert "unlimited" in p.stdout

    p = s.ferry("rm", *s.srv.scp("m"))
    assert p.returncode == 2
    ok(s.ferry("rm", *s.srv.scp("m/g.txt")))
    ok(s.ferry("rm", "-r", *s.srv.scp("m")))
    assert not (s.home / "m").exists()
    p = s.ferry("stat", *s.srv.scp("m"))
    assert p.returncode == 4


@pytest.mark.timeout(60)
def test_plain_transfers(plain: Served, tmp_path: Path) -> None:
    s = plain
    tree = make_tree(tmp_path / "tree")
    (rec,) = json_lines(ok(s.ferry("put", "-r", "--json", str(tree), s.srv.remote("up"))))
    assert rec["files"] == 3
    same_tree(tree, s.home / "up")
    (rec,) = json_lines(ok(s.ferry("get", "--json", *s.srv.scp("up/sub/b.bin"), str(tmp_path))))
    assert (
        rec["size"] == 300_000 and (tmp_path / "b.bin").read_bytes() == (tree / "sub" / "b.bin").read_bytes()
    )
    ok(s.ferry("get", "-r", "-q", *s.srv.scp("up"), str(tmp_path / "down")))
    same_tree(tree, tmp_path / "down")
    # a TLS client cannot talk to a plain server: a connection error with a hint
    p = run_inproc(["ls", *s.srv.scp()], s.env)
    assert p.returncode == 6 and "--plain" in p.stderr


@pytest.mark.timeout(60)
def test_exit_codes_and_messages(tls: Served, tmp_path: Path) -> None:
    s = tls
    no_pw = {k: v for k, v in s.env.items() if k != "FERRY_PASSWORD"}
    pwfile = tmp_path / "pw"
    pwfile.write_text(f"{s.srv.password}\n")
    pwfile.chmod(0o600)  # a password file other users can read is refused
    loose = tmp_path / "loose-pw"
    loose.write_text(f"{s.srv.password}\n")
    loose.chmod(0o644)
    scp = s.srv.scp
    # (argv, environment, expected exit status, expected words on stderr); independent: run in parallel
    cases: list[tuple[list[str], dict[str, str], int, str]] = [
        (["ls", *scp()], dict(s.env, FERRY_PASSWORD="wrong"), 3, "wrong user name or password"),
        (["ls", *scp()], no_pw, 3, "FERRY_PASSWORD"),
        (["ls", "--password-file", str(pwfile), *scp()], no_pw, 0, ""),
        (["ls", "--password-file", str(loose), *scp()], no_pw, 2, "lets other users read or change it"),
        (["get", *scp("no-such-file"), str(tmp_path)], s.env, 4, "no-such-file"),
        (["get", *scp("/etc/passwd"), str(tmp_path)], s.env, 4, "absolute paths"),
        (["get", *scp("../x"), str(tmp_path)], s.env, 4, "'..'"),
        (["ls", *scp("a/../../x")], s.env, 4, "'..'"),
        (["ls", "no-colon-here"], s.env, 2, "not a remote location"),
        (["ls", "ftp://host/x"], s.env, 2, "unknown scheme"),
        (["get", "./local:file"], s.env, 2, "not a remote location"),
        (["ls", "-P", "0", "ferry@127.0.0.1:"], s.env, 2, "-P"),
        (["ls", "-P", str(s.srv.port + 1), s.srv.remote()], s.env, 2, "give only one"),
        (["ls", "-P", str(free_port()), "ferry@127.0.0.1:"], s.env, 6, "cannot connect"),
        (["put", "only-one-arg"], s.env, 2, "at least one LOCAL"),
        (["put", str(tmp_path / "missing"), *scp()], s.env, 2, "no such local file"),
    ]

    def check(case: tuple[list[str], dict[str, str], int, str]) -> None:
        argv, env, status, words = case
        p = subprocess.run(
            [*FERRY, *argv], env=env, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
        )
        assert p.returncode == status, (argv, p.returncode, p.stderr)
        assert words in p.stderr, (argv, p.stderr)
        if status:
            assert "Traceback" not in p.stderr and p.stderr.count("\n") <= 4, p.stderr

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(check, cases))


# --- resume after the client was killed -----------------------------------------------------------------


def kill_when(proc: subprocess.Popen[bytes], partial: Callable[[], Path | None], threshold: int) -> int:
    """SIGKILL ``proc`` once the partial file exceeds ``threshold`` bytes; return the bytes it held."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        path = partial()
        size = path.stat().st_size if path is not None and path.exists() else 0
        if size > threshold:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            assert path is not None
            return path.stat().st_size  # measured after death: writes in flight may have landed
        if proc.poll() is not None:
            raise AssertionError(f"the transfer ended ({proc.returncode}) before it could be interrupted")
        time.sleep(0.002)
    proc.kill()
    raise AssertionError("the partial file never grew")


@pytest.mark.timeout(90)
def test_get_resumes_after_the_client_is_killed(tls: Served, tmp_path: Path) -> None:
    s = tls
    make_big(s.home / "big-get.bin", 200)
    out = tmp_path / "out"
    out.mkdir()
    part = partial_path(out / "big-get.bin")
    proc = subprocess.Popen(
        [*FERRY, "get", "-q", *s.srv.scp("big-get.bin"), str(out)], env=s.env, stdout=subprocess.DEVNULL
    )
    held = kill_when(proc, lambda: part, 24 * MiB)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "big-get.bin").exists() and part.exists()

    (rec,) = json_lines(ok(s.ferry("get", "--json", *s.srv.scp("big-get.bin"), str(out))))
    assert 0 < rec["resumed_from"] <= held and rec["sent"] == rec["size"] - rec["resumed_from"]
    assert rec["size"] == 200 * MiB
    assert filecmp.cmp(s.home / "big-get.bin", out / "big-get.bin", shallow=False)
    assert not part.exists()


@pytest.mark.timeout(90)
def test_put_resumes_after_the_client_is_killed(tls: Served, tmp_path: Path) -> None:
    s = tls
    big = tmp_path / "big-put.bin"
    make_big(big, 200)

    def partial() -> Path | None:
        found = list(s.home.glob(".big-put.bin.ferry-part-*"))
        return found[0] if found else None

    proc = subprocess.Popen(
        [*FERRY, "put", "-q", str(big), *s.srv.scp()], env=s.env, stdout=subprocess.DEVNULL
    )
    kill_when(proc, partial, 24 * MiB)
    assert not (s.home / "big-put.bin").exists()

    (rec,) = json_lines(ok(s.ferry("put", "--json", str(big), *s.srv.scp())))
    assert rec["resumed_from"] > 0 and rec["sent"] == rec["size"] - rec["resumed_from"]
    assert filecmp.cmp(big, s.home / "big-put.bin", shallow=False)
    assert partial() is None


@pytest.mark.timeout(60)
def test_resume_and_no_resume_from_a_partial_download(tls: Served, tmp_path: Path) -> None:
    s = tls
    make_big(s.home / "mid.bin", 12)
    data = (s.home / "mid.bin").read_bytes()
    part = partial_path(tmp_path / "mid.bin")
    part.write_bytes(data[: 9 * MiB])  # two whole 4 MiB chunks and a bit
    (rec,) = json_lines(ok(s.ferry("get", "--json", *s.srv.scp("mid.bin"), str(tmp_path))))
    assert rec["resumed_from"] == 8 * MiB and rec["sent"] == 4 * MiB
    assert (tmp_path / "mid.bin").read_bytes() == data
    part.write_bytes(data[: 9 * MiB])
    (rec,) = json_lines(ok(s.ferry("get", "--json", "--no-resume", *s.srv.scp("mid.bin"), str(tmp_path))))
    assert rec["resumed_from"] == 0 and rec["sent"] == 12 * MiB
    assert (tmp_path / "mid.bin").read_bytes() == data
    # a partial with wrong content is detected chunk by chunk and replaced
    part.write_bytes(bytes(9 * MiB))
    (rec,) = json_lines(ok(s.ferry("get", "--json", "--hash", "md5", *s.srv.scp("mid.bin"), str(tmp_path))))
    assert rec["resumed_from"] == 0
    assert (tmp_path / "mid.bin").read_bytes() == data
