"""The client config file: host aliases in every command, defaults, clear errors; ferry known-hosts."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cli_inproc import run_inproc
from ferry.client.config import ConfigError, load_config
from ferry.client.location import parse_location, parse_target
from ferry_server import ServerThread
from login_support import KeySet, bare_env, key_server
from serve_process import run_ferry


def write_config(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ('[hosts.box]\nhost = "h"\nport = "7373"\n', 3, "port must be a number"),
        ('[hosts.box]\nhost = "h"\n\n[hosts.two]\nhots = "x"\n', 5, "unknown key 'hots' in [hosts.two]"),
        ('[defaults]\nhash = "sha1"\n', 2, 'hash must be "blake3" or "md5"'),
        ('[defaults]\nprogress = "yes"\n', 2, "progress must be true or false"),
        ('[defaults]\n\nbwlimit = "fast"\n', 3, 'bwlimit must be a rate like "10M"'),
        ("[defaults]\nbwlimit = true\n", 2, 'bwlimit must be a rate like "10M"'),
        ("[hosts.box]\nidentity = [1, 2]\n", 2, "identity must be a key file path or a list"),
        ('[hostz.box]\nhost = "h"\n', 1, "unknown table or key 'hostz'"),
        ('[hosts.box]\nhost = "h\n', 2, "not valid TOML"),
    ],
)
def test_bad_config_names_the_line(tmp_path: Path, text: str, line: int, words: str) -> None:
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and words in message
    assert f"line {line}" in message, message


def test_alias_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(
        tmp_path,
        '[hosts.box]\nhost = "files.example.org"\nport = 7400\nuser = "ann"\nidentity = ["~/k1", "~/k2"]\n'
        "[hosts.bare]\n",
    )
    monkeypatch.setenv("FERRY_HOME", str(tmp_path))
    loc = parse_location("box:inbox/a.txt")
    assert (loc.host, loc.port, loc.user, loc.path, loc.alias) == ("files.example.org", 7400, "ann", "inbox/a.txt", "box")
    loc = parse_location("bob@box:")  # what is written wins over the alias
    assert (loc.user, loc.port) == ("bob", 7400)
    loc = parse_location("ferry://box:7500/x")
    assert (loc.host, loc.port, loc.user, loc.path) == ("files.example.org", 7500, "ann", "x")
    loc = parse_target("box")
    assert (loc.host, loc.port, loc.alias) == ("files.example.org", 7400, "box")
    loc = parse_target("bare:7401")  # an alias without host= names the host itself
    assert (loc.host, loc.port, loc.alias) == ("bare", 7401, "bare")
    assert parse_target("other").alias is None


@dataclass
class Setup:
    srv: ServerThread
    env: dict[str, str]


@pytest.fixture
def setup(tmp_path: Path, keys: KeySet, ferry_env: dict[str, str]) -> Iterator[Setup]:
    srv = key_server(tmp_path / "root", keys.ed25519.pub)
    env = bare_env(ferry_env, tmp_path / "home")
    # The alias carries everything: host, port, user and the key; no password anywhere.
    write_config(
        Path(env["FERRY_HOME"]),
        f'[defaults]\nhash = "md5"\n\n[hosts.box]\nhost = "127.0.0.1"\nport = {srv.port}\nuser = "alice"\n'
        f'identity = "{keys.ed25519.path}"\n',
    )
    try:
        yield Setup(srv, env)
    finally:
        srv.stop()


def test_alias_in_every_command(setup: Setup, tmp_path: Path) -> None:
    s = setup
    src = tmp_path / "a.txt"
    src.write_text("hello")

    def ferry(*args: str, stdin: str | None = None) -> str:
        r = run_inproc(list(args), s.env, input=stdin)
        assert r.returncode == 0, (args, r.stderr)
        return r.stdout

    ferry("mkdir", "box:d")
    record = json.loads(ferry("put", "--json", str(src), "box:d/a.txt"))
    assert record["hash"] == "md5"  # [defaults] hash
    assert "a.txt" in ferry("ls", "box:d")
    assert "a.txt" in ferry("ls", "ferry://box/d")
    ferry("stat", "box:d/a.txt")
    ferry("get", "box:d/a.txt", str(tmp_path / "copy.txt"))
    assert (tmp_path / "copy.txt").read_text() == "hello"
    ferry("mv", "box:d/a.txt", "d/b.txt")
    ferry("df", "box")
    # exec hands the command's output to the process's descriptors: a real process
    r = run_ferry(["exec", "box", "--", "ls", "d"], s.env)
    assert r.returncode == 0 and r.stdout.split() == ["b.txt"], r.stderr
    assert "b.txt" in ferry("shell", "box", stdin="ls d\n")
    ferry("rm", "box:d/b.txt")
    assert ferry("ls", "box:d").strip() == ""
    # -v says the alias's key did it.
    r = run_inproc(["ls", "-v", "box:"], s.env)
    assert "with key SHA256:" in r.stderr
    # known-hosts: the pin is under the real address; forget works with the alias.
    listed = json.loads(ferry("known-hosts", "list", "--json"))
    assert listed == [{"host": "127.0.0.1", "port": s.srv.port, "fingerprint": listed[0]["fingerprint"]}]
    assert ferry("known-hosts", "list").split()[0] == f"127.0.0.1:{s.srv.port}"
    assert "forgot the pinned certificate" in ferry("known-hosts", "forget", "box")
    assert json.loads(ferry("known-hosts", "list", "--json")) == []
    r = run_inproc(["known-hosts", "forget", f"127.0.0.1:{s.srv.port}"], s.env)
    assert r.returncode == 0 and "no pinned certificate" in r.stderr


def test_api_takes_an_alias(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    import ferry

    for key, value in setup.env.items():
        if key in ("FERRY_HOME", "HOME"):
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("FERRY_PASSWORD", raising=False)
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    with ferry.connect("box") as c:
        assert c.info is not None and c.info.login_method == "key"
        c.mkdir("via-api")
    assert (setup.srv.root / "homes" / "alice" / "via-api").is_dir()


def test_a_bad_config_is_a_clear_error_for_client_commands(setup: Setup) -> None:
    write_config(Path(setup.env["FERRY_HOME"]), '[hosts.box]\nport = 0\n')
    r = run_inproc(["ls", "box:"], setup.env)
    assert r.returncode == 2 and "config.toml, line 2: port must be a number from 1 to 65535" in r.stderr
    r = run_inproc(["user", "list", "--root", str(setup.srv.root)], setup.env)  # not a client command
    assert r.returncode == 0, r.stderr


def test_default_bwlimit_paces_transfers_and_the_option_wins(setup: Setup, tmp_path: Path) -> None:
    config = Path(setup.env["FERRY_HOME"]) / "config.toml"
    write_config(config.parent, config.read_text().replace("[defaults]\n", '[defaults]\nbwlimit = "256K"\n', 1))
    src = tmp_path / "pace.bin"
    src.write_bytes(os.urandom(1024 * 1024))
    t0 = time.monotonic()
    r = run_inproc(["put", "-q", str(src), "box:pace.bin"], setup.env)
    assert r.returncode == 0, r.stderr
    # 1 MiB at 256 KiB/s with a 64 KiB burst: at least ~3.7 s, never faster (a floor, not a speed).
    assert time.monotonic() - t0 >= 3.5
    t0 = time.monotonic()
    r = run_inproc(["get", "-q", "--bwlimit", "0", "box:pace.bin", str(tmp_path / "back.bin")], setup.env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    assert time.monotonic() - t0 < 3.0  # --bwlimit 0 on the command line lifts the file's limit


def test_progress_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ferry.cli.files import Common

    monkeypatch.setenv("FERRY_HOME", str(tmp_path))
    common = Common(port=None, plain=False, password_file=None, quiet=False, json=False)
    write_config(tmp_path, "[defaults]\nprogress = true\n")
    assert common.output().bars is True  # even without a terminal: the file asked for bars
    write_config(tmp_path, "[defaults]\nprogress = false\n")
    assert common.output().bars is False
    quiet = Common(port=None, plain=False, password_file=None, quiet=True, json=False)
    write_config(tmp_path, "[defaults]\nprogress = true  # -q still wins\n")
    assert quiet.output().bars is False
