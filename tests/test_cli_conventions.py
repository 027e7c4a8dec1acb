"""Habits users bring from coreutils, scp and sftp, checked in-process against a real server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli_inproc import CliResult, run_cli
from ferry.errors import ExitCode
from ferry.paths import DEFAULT_PORT
from ferry_server import PASSWORD, ServerThread

pytestmark = pytest.mark.shared_server(ann={})


@pytest.fixture
def home(server: ServerThread) -> Iterator[Path]:
    """ann's home, emptied after each test."""
    path = server.root / "homes" / "ann"
    yield path
    for p in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if p.is_symlink() or not p.is_dir():
            p.unlink()
        else:
            p.rmdir()


class Ferry:
    """``ferry ...`` in this process, as ann on the test server."""

    def __init__(self, server: ServerThread, tmp_path: Path) -> None:
        self.port = str(server.port)
        self.env = {"FERRY_HOME": str(tmp_path / "ferry-home"), "FERRY_PASSWORD": PASSWORD, "FERRY_USER": None}

    def at(self, path: str = "") -> str:
        return f"ann@127.0.0.1:{path}"

    def __call__(self, *args: str, input: str | bytes | None = None) -> CliResult:
        return run_cli([*args, "-P", self.port], env=self.env, input=input)

    def ok(self, *args: str, input: str | bytes | None = None) -> CliResult:
        r = self(*args, input=input)
        assert r.code == 0, r
        return r


@pytest.fixture(scope="module")
def ferry(module_server: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> Ferry:
    f = Ferry(module_server, tmp_path_factory.mktemp("client"))
    assert "pinned its certificate" in f.ok("ls", f.at()).stderr  # once: later stderr is the command's own
    return f


def test_ls_human_sizes_hidden_names_and_several_paths(ferry: Ferry, home: Path) -> None:
    (home / "d").mkdir()
    (home / "d" / "big.bin").write_bytes(b"x" * 1536)
    (home / "d" / ".hidden").write_text("h")
    (home / "d" / ".cache").mkdir()
    (home / "d" / ".cache" / "c").write_text("c")
    (home / "e").mkdir()
    (home / "e" / "one").write_text("1")
    (home / "f.txt").write_text("f")

    assert ferry.ok("ls", ferry.at("d")).stdout.splitlines() == ["big.bin"]
    assert ferry.ok("ls", "-a", ferry.at("d")).stdout.splitlines() == [".cache/", ".hidden", "big.bin"]
    assert ferry.ok("ls", "-R", ferry.at("d")).stdout.splitlines() == ["big.bin"]  # nor under .cache
    assert ".cache/c" in ferry.ok("ls", "-aR", ferry.at("d")).stdout.splitlines()
    (line,) = ferry.ok("ls", "-lh", ferry.at("d")).stdout.splitlines()
    assert " 1.5K " in line and line.endswith(" big.bin")
    assert " 1536 " in ferry.ok("ls", "-l", ferry.at("d")).stdout
    assert "Show this message" in ferry.ok("ls", "--help").stdout  # help stays on --help
    # a hidden file named on the command line is listed, as ls does
    assert ferry.ok("ls", ferry.at("d/.hidden")).stdout == ".hidden\n"

    # several paths: files first, then each folder under a heading
    r = ferry.ok("ls", ferry.at("e"), ferry.at("f.txt"), ferry.at("d"))
    assert r.stdout == "f.txt\n\n127.0.0.1:e:\none\n\n127.0.0.1:d:\nbig.bin\n"
    records = [json.loads(x) for x in ferry.ok("ls", "--json", ferry.at("e"), ferry.at("d")).stdout.splitlines()]
    assert [(r["dir"], r["name"]) for r in records] == [("e", "one"), ("d", "big.bin")]
    r = ferry("ls", ferry.at("e"), ferry.at("missing"))
    assert r.code == ExitCode.NOT_FOUND and "missing" in r.stderr


def test_rm_refuses_a_folder_without_r(ferry: Ferry, home: Path) -> None:
    (home / "empty").mkdir()
    (home / "file").write_text("x")
    r = ferry("rm", ferry.at("empty"))
    assert r.code == ExitCode.USAGE
    assert r.stderr == "ferry: 127.0.0.1:empty is a folder: use -r to remove it\n"
    assert (home / "empty").is_dir()  # even an empty one, as rm(1)
    ferry.ok("rm", ferry.at("file"))
    ferry.ok("rm", "-r", ferry.at("empty"))
    assert list(home.iterdir()) == []


def test_short_size_like_ls_h() -> None:
    from ferry.cli.output import short_size

    cases = {0: "0", 1023: "1023", 1024: "1.0K", 1536: "1.5K", 10239: "10K", 10241: "11K",
             1048575: "1.0M", 5 << 30: "5.0G", (1 << 63) - 1: "8.0E"}  # fmt: skip
    assert {n: short_size(n) for n in cases} == cases


def test_interrupted_transfer_says_how_to_resume() -> None:
    from ferry.cli.output import interrupted_message

    assert "run the same command again to resume" in interrupted_message("get")
    assert "run the same command again to resume" in interrupted_message("put")
    assert interrupted_message("ls") == "ferry: interrupted"


def test_host_colon_is_always_a_path_and_a_number_there_is_explained(ferry: Ferry, home: Path) -> None:
    port = ferry.port
    env = ferry.env
    # df, shell and exec once read HOST:PORT: now refused, with both readings spelled out
    for args in (["df", f"ann@127.0.0.1:{port}"], ["shell", f"ann@127.0.0.1:{port}"],
                 ["exec", f"ann@127.0.0.1:{port}", "--", "true"]):  # fmt: skip
        r = run_cli(args, env=env, input="")
        assert r.code in (ExitCode.USAGE, 255), (args, r)
        assert (
            f"'ann@127.0.0.1:{port}': after the colon comes a path, not a port; for port {port} write "
            f"-P {port} ann@127.0.0.1: or ferry://ann@127.0.0.1:{port}/ "
            f"(a folder named {port}: ann@127.0.0.1:./{port})"
        ) in r.stderr, args
    # the same servers with -P or a URL
    assert "available" in ferry.ok("df", "--json", ferry.at()).stdout
    assert "available" in run_cli(["df", "--json", f"ferry://ann@127.0.0.1:{port}"], env=env).stdout
    # a path after the colon: df accepts one (the home's usage), shell starts there
    (home / "start").mkdir()
    assert ferry.ok("df", ferry.at("start")).stdout.startswith("used")
    assert ferry.ok("shell", ferry.at("start"), input="pwd\n").stdout == "/start\n"
    (home / "2024").mkdir()
    assert ferry.ok("shell", ferry.at("./2024"), input="pwd\n").stdout == "/2024\n"
    # commands that take paths: a number is a path (a file of that name just works) ...
    (home / "7").write_text("a file named 7")
    assert ferry.ok("ls", ferry.at("7")).stdout == "7\n"
    # ... and when that fails to connect (no -P: the default port), the error says how to write a port
    with socket.socket() as probe:  # (127.0.0.2: a server started by hand on 127.0.0.1:7373 is no matter)
        if probe.connect_ex(("127.0.0.2", DEFAULT_PORT)) == 0:
            pytest.skip(f"something listens on 127.0.0.2:{DEFAULT_PORT}")
    r = run_cli(["ls", f"ann@127.0.0.2:{port}"], env=env)
    assert r.code == ExitCode.CONNECTION
    assert r.stderr == (
        f"ferry: cannot connect to 127.0.0.2:{DEFAULT_PORT}: connection refused ({port} is a path here; "
        f"for port {port} write -P {port} ann@127.0.0.2: or ferry://ann@127.0.0.2:{port}/)\n"
    )
    # './N' is how the hint names a folder N without -P: accepted (it then tries the default port)
    r = run_cli(["df", "ann@127.0.0.2:./7"], env=env)
    assert r.code == ExitCode.CONNECTION and "after the colon" not in r.stderr


def standard_hash(name: str, path: Path) -> str:
    """What the usual tool prints for ``path``: md5sum itself; for BLAKE3 the blake3 package's hash
    of the whole file, which is b3sum's value (b3sum is not installed here)."""
    if name == "md5":
        out = subprocess.run(["md5sum", str(path)], capture_output=True, text=True, check=True, timeout=60)
        return out.stdout.split()[0]
    import blake3

    return str(blake3.blake3(path.read_bytes()).hexdigest())


@pytest.mark.parametrize("hash_name", ["blake3", "md5"])
def test_json_reports_the_standard_whole_file_hash(
    ferry: Ferry, home: Path, tmp_path: Path, hash_name: str
) -> None:
    sizes = {"empty": 0, "small": 1000, "large": 9 * (1 << 20) + 123}  # inline, and three 4 MiB chunks
    for label, size in sizes.items():
        src = tmp_path / f"{label}.bin"
        src.write_bytes(os.urandom(size))
        expected = standard_hash(hash_name, src)
        r = ferry.ok("put", "--json", "--hash", hash_name, str(src), ferry.at(f"{label}.bin"))
        (put,) = [json.loads(x) for x in r.stdout.splitlines()]
        assert (put["hash"], put["checksum"]) == (hash_name, expected), label
        assert put["digest"] != expected  # the chunk-tree digest is another value
        back = tmp_path / f"{label}.back"
        r = ferry.ok("get", "--json", "--hash", hash_name, ferry.at(f"{label}.bin"), str(back))
        (got,) = [json.loads(x) for x in r.stdout.splitlines()]
        assert (got["hash"], got["checksum"]) == (hash_name, expected), label
        assert standard_hash(hash_name, back) == expected
    assert "checksum" not in ferry.ok("get", ferry.at("small.bin"), str(tmp_path / "x")).stdout


def test_whole_file_hash_after_a_resume(
    server: ServerThread, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resumed transfers stream only the rest: the whole-file hash still covers every byte."""
    import ferry as api

    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(10 * (1 << 20)))
    expected = standard_hash("blake3", src)

    class Stop(Exception):
        pass

    def stop_after_two_chunks(done: int, total: int) -> None:
        if done > 8 << 20:
            raise Stop

    monkeypatch.setenv("FERRY_HOME", str(tmp_path / "api-home"))
    with api.connect(f"ann@127.0.0.1:{server.port}", password=PASSWORD) as c:
        with pytest.raises(Stop):
            c.put(src, "big.bin", progress=stop_after_two_chunks)
        r = c.put(src, "big.bin", checksum=True)
        assert r.resumed_from > 0 and r.checksum == expected
        dest = tmp_path / "down.bin"
        with pytest.raises(Stop):
            c.get("big.bin", dest, progress=stop_after_two_chunks)
        r = c.get("big.bin", dest, checksum=True)
        assert r.resumed_from > 0 and r.checksum == expected


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_documented_shell_completion_scripts(shell: str) -> None:
    """docs/cli.md tells how to enable completion in each shell, and the command it gives works."""
    from conftest import FERRY

    docs = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text(encoding="utf-8")
    assert f"_FERRY_COMPLETE={shell}_source ferry" in docs
    env = dict(os.environ, _FERRY_COMPLETE=f"{shell}_source")
    script = subprocess.run([*FERRY], env=env, capture_output=True, text=True, timeout=60)
    assert script.returncode == 0 and "_ferry_completion" in script.stdout, script.stderr
    # and the completion it drives answers (bash's protocol: one "type,value" per line)
    if shell == "bash":
        env = dict(os.environ, _FERRY_COMPLETE="bash_complete", COMP_WORDS="ferry ls --hu", COMP_CWORD="2")
        answer = subprocess.run([*FERRY], env=env, capture_output=True, text=True, timeout=60)
        assert answer.stdout.splitlines() == ["plain,--human-readable"]


def make_logs(home: Path) -> None:
    (home / "logs" / "old").mkdir(parents=True)
    for name in ("a.log", "b.log", "notes.txt", ".hidden.log", "star*.log"):
        (home / "logs" / name).write_text(name)
    (home / "logs" / "old" / "c.log").write_text("c.log")
    (home / "x").mkdir()
    (home / "x" / "data.csv").write_text("x")
    (home / "y").mkdir()
    (home / "y" / "data.csv").write_text("y")


def test_get_several_sources_and_server_side_globs(ferry: Ferry, home: Path, tmp_path: Path) -> None:
    make_logs(home)
    dest = tmp_path / "dest"
    dest.mkdir()
    r = ferry.ok("get", "-q", ferry.at("logs/*.log"), str(dest))
    assert sorted(p.name for p in dest.iterdir()) == ["a.log", "b.log", "star*.log"]  # not .hidden, not old/
    (tmp_path / "d2").mkdir()
    r = ferry.ok("get", "--json", ferry.at("logs/.*.log"), ferry.at("logs/star[*].log"), str(tmp_path / "d2"))
    assert [json.loads(x)["source"] for x in r.stdout.splitlines()] == [
        "127.0.0.1:logs/.hidden.log", "127.0.0.1:logs/star*.log"]  # fmt: skip
    # a pattern in a middle component, and several plain sources
    r = ferry.ok("get", "--json", ferry.at("*/data.csv"), ferry.at("logs/notes.txt"), str(tmp_path / "d2"))
    assert [json.loads(x)["source"] for x in r.stdout.splitlines()] == [
        "127.0.0.1:x/data.csv", "127.0.0.1:y/data.csv", "127.0.0.1:logs/notes.txt"]  # fmt: skip
    # mistakes: no match, several into a file, a folder without -r, a pattern leaving the home
    r = ferry("get", ferry.at("logs/*.nothing"), str(dest))
    assert r.code == ExitCode.NOT_FOUND and r.stderr.endswith("127.0.0.1:logs/*.nothing: no match\n")
    r = ferry("get", ferry.at("logs/*.log"), str(dest / "a.log"))
    assert r.code == ExitCode.USAGE and "several files go into an existing folder" in r.stderr
    r = ferry("get", ferry.at("log?"), str(dest))
    assert r.code == ExitCode.USAGE and "is a folder: use -r" in r.stderr
    ferry.ok("get", "-r", "-q", ferry.at("log?"), str(dest))
    assert (dest / "logs" / "old" / "c.log").read_text() == "c.log"
    r = ferry("get", ferry.at("../*"), str(dest))
    assert r.code == ExitCode.NOT_FOUND and "'..'" in r.stderr
    # put: several local files into a folder
    srcs = [tmp_path / f"up{i}.txt" for i in range(3)]
    for p in srcs:
        p.write_text(p.name)
    ferry.ok("mkdir", ferry.at("up"))
    ferry.ok("put", "-q", *map(str, srcs), ferry.at("up/"))
    assert sorted(p.name for p in (home / "up").iterdir()) == ["up0.txt", "up1.txt", "up2.txt"]


def test_glob_never_follows_a_link_out_of_the_home(server: ServerThread, home: Path, tmp_path: Path) -> None:
    import asyncio

    from ferry.client.aclient import AsyncClient
    from ferry.client.known_hosts import KnownHosts

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (home / "link").symlink_to(outside)
    (home / "plain.txt").write_text("p")

    async def main() -> tuple[list[tuple[str, str]], list[str], list[str]]:
        known = KnownHosts(tmp_path / "known_hosts")
        async with await AsyncClient.connect(
            "127.0.0.1", server.port, user="ann", password=PASSWORD, known_hosts=known
        ) as c:
            top = [(e.name, e.kind) for e in await c.glob("*")]
            inside = [e.name for e in await c.glob("link/*")]
            named = [e.name for e in await c.glob("link/secret.txt")]
            return top, inside, named

    top, inside, named = asyncio.run(main())
    assert top == [("link", "link"), ("plain.txt", "file")]  # the link itself matches, as a link
    assert inside == [] and named == []  # never entered


def test_shell_get_put_mget_mput_take_patterns(
    ferry: Ferry, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the shell's lcd changes this process's folder: put it back after
    make_logs(home)
    work = tmp_path / "work"
    (work / "in").mkdir(parents=True)
    for name in ("one.txt", "two.txt", "three.md"):
        (work / name).write_text(name)
    script = "\n".join([
        "lcd " + str(work / "in"),
        "get logs/*.log",
        "mget x/data.csv logs/notes.txt",
        "lcd " + str(work),
        "mkdir up",
        "put *.txt up",
        "cd up",
        "mput *.md",
        "get nothing*",
        "ls",
    ]) + "\n"  # fmt: skip
    r = run_cli(["shell", "-P", ferry.port, "ann@127.0.0.1:"], env=ferry.env, input=script)
    assert sorted(p.name for p in (work / "in").iterdir()) == ["a.log", "b.log", "data.csv", "notes.txt", "star*.log"]
    assert sorted(p.name for p in (home / "up").iterdir()) == ["one.txt", "three.md", "two.txt"]
    assert r.stdout.splitlines()[-3:] == ["one.txt", "three.md", "two.txt"]
    assert "/nothing*: no match" in r.stderr and r.code == ExitCode.NOT_FOUND


def test_links_show_their_target_never_followed(ferry: Ferry, home: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    (home / "d").mkdir()
    (home / "d" / "to-etc").symlink_to(outside)
    (home / "d" / "rel").symlink_to("../elsewhere/file\x1b[31m")  # dangling, with a control character
    (home / "d" / "plain").write_text("p")
    lines = ferry.ok("ls", "-l", ferry.at("d")).stdout.splitlines()
    assert lines[0].startswith("-") and lines[0].endswith(" plain")
    assert lines[1].startswith("l") and lines[1].endswith(" rel -> ../elsewhere/file\\x1b[31m")
    assert lines[2].startswith("l") and lines[2].endswith(f" to-etc -> {outside}")
    assert ferry.ok("ls", ferry.at("d")).stdout.splitlines() == ["plain", "rel", "to-etc"]  # names only
    listing = ferry.ok("ls", "--json", ferry.at("d")).stdout.splitlines()
    records = {json.loads(x)["name"]: json.loads(x) for x in listing}
    assert records["to-etc"]["target"] == str(outside) and "target" not in records["plain"]
    assert f"kind: link -> {outside}" in ferry.ok("stat", ferry.at("d/to-etc")).stdout
    assert json.loads(ferry.ok("stat", "--json", ferry.at("d/to-etc")).stdout)["target"] == str(outside)
    assert ferry.ok("ls", ferry.at("d/to-etc/")).stdout == "to-etc\n"  # the link itself, not entered
    r = ferry("ls", ferry.at("d/to-etc/secret"))
    assert r.code == ExitCode.NOT_FOUND and "symbolic link" in r.stderr
    # recursive listings and patterns carry the target too
    assert f"d/to-etc -> {outside}" in ferry.ok("ls", "-lR", ferry.at()).stdout


def test_a_listing_of_links_with_long_targets_stays_in_small_pages(ferry: Ferry, home: Path) -> None:
    """Each page of a listing must stay under the message limit (1 MiB), targets included."""
    (home / "many").mkdir()
    long = "t" * 3000
    for i in range(1200):  # ~3.6 MB of targets: several pages
        (home / "many" / f"l{i:04d}").symlink_to(f"{long}{i}")
    r = ferry.ok("ls", "--json", ferry.at("many"))
    records = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(records) == 1200 and records[-1]["target"] == f"{long}1199"
