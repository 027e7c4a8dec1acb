"""``ferry user ...`` in-process (cli_inproc), as real subprocesses where the terminal or the
process matters (prompts, warnings on a closed stdin), plus the size parser."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cli_inproc import run_inproc
from conftest import FERRY
from ferry.cli.user import format_size, parse_size
from ferry.errors import ExitCode, UsageError
from ferry.server.accounts import Accounts


def run(
    env: dict[str, str], *args: str, stdin: str = "", root: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``ferry user ARGS [--root ROOT]`` in this process (cli_inproc): same messages and statuses."""
    argv = ["user", *args]
    if root is not None:
        argv += ["--root", str(root)]
    return run_inproc(argv, env, input=stdin)


def listed(env: dict[str, str], root: Path) -> dict[str, dict[str, Any]]:
    proc = run(env, "list", "--json", root=root)
    assert proc.returncode == 0, proc.stderr
    return {u["name"]: u for u in json.loads(proc.stdout)}


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("ferry: "), proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert text in proc.stderr


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


def test_add_list_and_login(ferry_env: dict[str, str], root: Path) -> None:
    proc = run(
        ferry_env, "add", "bob", "--password-stdin", "--quota", "10G", "--max-files", "20_000",
        stdin="s3 cret\n", root=root,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "created user bob" in proc.stdout and "files 20,000" in proc.stdout
    users = listed(ferry_env, root)
    assert users == {
        "bob": {
            "name": "bob",
            "home": str(root.absolute() / "homes" / "bob"),
            "quota": 10 * 1024**3,
            "max_files": 20_000,
            "exec_allowed": False,
            "exec_allow": None,
            "disabled": False,
        }
    }
    assert (root / "homes" / "bob").is_dir()
    # The hash written by the CLI (production argon2 parameters) verifies; only "\n" was stripped.
    with Accounts(root) as acc:
        assert acc.verify("bob", "s3 cret").name == "bob"
    text = run(ferry_env, "list", root=root)
    assert text.returncode == 0
    assert text.stdout.splitlines()[0].split() == ["NAME", "QUOTA", "FILES", "EXEC", "HOME"]
    assert text.stdout.splitlines()[1].split()[:5] == ["bob", "10", "GiB", "20,000", "no"]
    shown = run(ferry_env, "show", "bob", root=root)
    assert shown.returncode == 0 and "quota 10 GiB, files 20,000, exec no" in shown.stdout, shown
    assert json.loads(run(ferry_env, "show", "bob", "--json", root=root).stdout) == users["bob"]


def test_mod_sets_and_clears_the_file_limit(ferry_env: dict[str, str], root: Path) -> None:
    assert run(ferry_env, "add", "bob", "--password-stdin", stdin="pw\n", root=root).returncode == 0
    assert listed(ferry_env, root)["bob"]["max_files"] is None  # unlimited unless given
    proc = run(ferry_env, "mod", "bob", "--max-files", "100", root=root)
    assert proc.returncode == 0 and "files 100," in proc.stdout, proc
    assert listed(ferry_env, root)["bob"]["max_files"] == 100
    assert run(ferry_env, "mod", "bob", "--max-files", "none", root=root).returncode == 0
    assert listed(ferry_env, root)["bob"]["max_files"] is None
    assert_one_line_error(run(ferry_env, "mod", "bob", "--max-files", "1.5k", root=root), 2, "invalid number of files")


def test_add_with_allow_implies_exec(ferry_env: dict[str, str], root: Path) -> None:
    assert (
        run(
            ferry_env,
            "add",
            "a",
            "--password-stdin",
            "--allow",
            "ls",
            "--allow",
            "cat",
            stdin="pw\n",
            root=root,
        ).returncode
        == 0
    )
    assert run(ferry_env, "add", "b", "--password-stdin", "--exec", stdin="pw\n", root=root).returncode == 0
    users = listed(ferry_env, root)
    assert (users["a"]["exec_allowed"], users["a"]["exec_allow"]) == (True, ["ls", "cat"])
    assert (users["b"]["exec_allowed"], users["b"]["exec_allow"]) == (True, None)


def test_duplicate_and_invalid_names(ferry_env: dict[str, str], root: Path) -> None:
    assert run(ferry_env, "add", "bob", "--password-stdin", stdin="pw\n", root=root).returncode == 0
    proc = run(ferry_env, "add", "bob", "--password-stdin", stdin="other\n", root=root)
    assert_one_line_error(proc, ExitCode.USAGE, "user 'bob' already exists")
    proc = run(ferry_env, "add", "Bad/Name", "--password-stdin", stdin="pw\n", root=root)
    assert_one_line_error(proc, ExitCode.USAGE, "invalid user name")


def test_bad_quota(ferry_env: dict[str, str], root: Path) -> None:
    proc = run(ferry_env, "add", "bob", "--password-stdin", "--quota", "10X", stdin="pw\n", root=root)
    assert_one_line_error(proc, ExitCode.USAGE, "invalid size '10X'")
    assert not root.exists()  # refused before anything was created


def test_empty_password_from_stdin(ferry_env: dict[str, str], root: Path) -> None:
    proc = run(ferry_env, "add", "bob", "--password-stdin", stdin="\n", root=root)
    assert_one_line_error(proc, ExitCode.USAGE, "no password")
    assert not root.exists()  # the password is read before the root is created
    assert run(ferry_env, "add", "ann", "--password-stdin", stdin="pw\n", root=root).returncode == 0
    proc = run(ferry_env, "add", "bob", "--password-stdin", stdin="\n", root=root)
    assert_one_line_error(proc, ExitCode.USAGE, "no password")
    assert set(listed(ferry_env, root)) == {"ann"}


def test_missing_user_errors(ferry_env: dict[str, str], root: Path) -> None:
    assert run(ferry_env, "add", "ann", "--password-stdin", stdin="pw\n", root=root).returncode == 0
    for args in (["del", "nobody"], ["passwd", "nobody", "--password-stdin"], ["mod", "nobody", "--exec"]):
        proc = run(ferry_env, *args, root=root)
        assert_one_line_error(proc, ExitCode.USAGE, f"no such user: 'nobody' (data root {root})")


def test_passwd(ferry_env: dict[str, str], root: Path) -> None:
    assert run(ferry_env, "add", "bob", "--password-stdin", stdin="old\n", root=root).returncode == 0
    proc = run(ferry_env, "passwd", "bob", "--password-stdin", stdin="new\n", root=root)
    assert proc.returncode == 0, proc.stderr
    with Accounts(root) as acc:
        assert acc.verify("bob", "new").name == "bob"


def test_mod(ferry_env: dict[str, str], root: Path) -> None:
    assert run(ferry_env, "add", "bob", "--password-stdin", stdin="pw\n", root=root).returncode == 0
    steps: list[tuple[list[str], dict[str, Any]]] = [
        (["--quota", "500MB"], {"quota": 500_000_000, "exec_allowed": False, "exec_allow": None}),
        (
            ["--allow", "ls", "--allow", "du"],
            {"quota": 500_000_000, "exec_allowed": True, "exec_allow": ["ls", "du"]},
        ),
        (["--no-exec"], {"quota": 500_000_000, "exec_allowed": False, "exec_allow": ["ls", "du"]}),
        (
            ["--exec", "--allow-any", "--quota", "none"],
            {"quota": None, "exec_allowed": True, "exec_allow": None},
        ),
    ]
    for args, expected in steps:
        proc = run(ferry_env, "mod", "bob", *args, root=root)
        assert proc.returncode == 0, proc.stderr
        user = listed(ferry_env, root)["bob"]
        assert {k: user[k] for k in expected} == expected, args


def test_mod_usage_errors(ferry_env: dict[str, str], root: Path) -> None:
    assert run(ferry_env, "add", "bob", "--password-stdin", stdin="pw\n", root=root).returncode == 0
    assert_one_line_error(run(ferry_env, "mod", "bob", root=root), ExitCode.USAGE, "nothing to change")
    proc = run(ferry_env, "mod", "bob", "--allow", "ls", "--allow-any", root=root)
    assert_one_line_error(proc, ExitCode.USAGE, "cannot be combined")
    assert_one_line_error(
        run(ferry_env, "mod", "bob", "--quota", "-1G", root=root), ExitCode.USAGE, "invalid size"
    )


def test_del_keeps_or_removes_home(ferry_env: dict[str, str], root: Path) -> None:
    for name in ("keep", "gone"):
        assert run(ferry_env, "add", name, "--password-stdin", stdin="pw\n", root=root).returncode == 0
    assert run(ferry_env, "del", "keep", root=root).returncode == 0
    assert run(ferry_env, "del", "gone", "--remove-home", root=root).returncode == 0
    assert (root / "homes" / "keep").is_dir()
    assert not (root / "homes" / "gone").exists()
    assert listed(ferry_env, root) == {}


def test_ferry_root_environment(ferry_env: dict[str, str], tmp_path: Path) -> None:
    env = {**ferry_env, "FERRY_ROOT": str(tmp_path / "from-env")}
    assert run(env, "add", "bob", "--password-stdin", stdin="pw\n").returncode == 0
    assert (tmp_path / "from-env" / "users.db").is_file()


def test_interactive_prompt(ferry_env: dict[str, str], root: Path) -> None:
    """Without --password-stdin the password is asked twice on the terminal, without echo."""
    pexpect = pytest.importorskip("pexpect")
    argv = [*FERRY, "user", "add", "bob", "--root", str(root)]
    transcript = io.StringIO()
    child = pexpect.spawn(argv[0], argv[1:], env=ferry_env, encoding="utf-8", timeout=30)
    child.logfile_read = transcript  # everything the terminal would have shown
    try:
        child.expect("New password for bob: ")
        child.sendline("typed-pw")
        child.expect("Repeat the password: ")
        child.sendline("typed-pw")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, transcript.getvalue()
    assert "created user bob" in transcript.getvalue()
    assert "typed-pw" not in transcript.getvalue()  # never echoed
    with Accounts(root) as acc:
        assert acc.verify("bob", "typed-pw").name == "bob"

    argv = [*FERRY, "user", "passwd", "bob", "--root", str(root)]
    child = pexpect.spawn(argv[0], argv[1:], env=ferry_env, encoding="utf-8", timeout=30)
    try:
        child.expect("New password for bob: ")
        child.sendline("one")
        child.expect("Repeat the password: ")
        child.sendline("two")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == ExitCode.USAGE
    assert "do not match" in (child.before or "")


# --- size parsing (in-process) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("1048576", 1048576),
        ("1_000", 1000),
        ("10G", 10 * 1024**3),
        ("10g", 10 * 1024**3),
        ("10 GiB", 10 * 1024**3),
        ("10Gi", 10 * 1024**3),
        ("10GB", 10 * 1000**3),
        ("500M", 500 * 1024**2),
        ("500 mb", 500 * 1000**2),
        ("1.5GiB", 3 * 1024**3 // 2),
        (".5K", 512),
        ("2T", 2 * 1024**4),
        ("1 PB", 1000**5),
        ("7B", 7),
        ("7 bytes", 7),
        ("1.7", 1),  # fractions of a byte round down
        ("none", None),
        ("Unlimited", None),
    ],
)
def test_parse_size(text: str, expected: int | None) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "10X", "-1G", "1.2.3G", "10 G B", "ten", "1e9", "10 GiBs"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="invalid size"):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(None) == "unlimited"
    assert format_size(512) == "512 B"
    assert format_size(10 * 1024**3) == "10 GiB"
    assert format_size(3 * 1024**3 // 2) == "1.5 GiB"


# --- which data root, and never a new one by accident ---------------------------------------------


def test_user_commands_never_create_a_root(ferry_env: dict[str, str], tmp_path: Path) -> None:
    """The reported trap: the server runs with --root elsewhere, `ferry user` without --root used the
    default root, said "no such user" and left a new empty database there."""
    from cli_inproc import run_cli

    home = tmp_path / "home"  # the default root is under it: ~/.local/share/ferry
    env = {"HOME": str(home), "FERRY_ROOT": None, "XDG_DATA_HOME": None}
    default = home / ".local" / "share" / "ferry"
    elsewhere = tmp_path / "elsewhere"
    commands = (
        ["passwd", "ferry", "--password-stdin"],
        ["mod", "ferry", "--exec"],
        ["del", "ferry"],
        ["list"],
        ["list", "--json"],
    )
    for where, extra in ((default, []), (elsewhere, ["--root", str(elsewhere)])):
        for args in commands:
            r = run_cli(["user", *args, *extra], env=env, input="pw\n")
            assert r.code == ExitCode.USAGE, (args, r)
            assert r.stderr.startswith(f"ferry: no ferry data root at {where} "), r.stderr
            assert r.stderr.count("\n") == 1 and r.stdout == ""
        assert not where.exists(), where
    assert not home.exists()
    # `add` is the one that may create a root, and it says where.
    r = run_cli(["user", "add", "bob", "--password-stdin", "--root", str(elsewhere)], env=env, input="pw\n")
    assert r.code == 0, r
    assert f"created the data root {elsewhere} (serve it with 'ferry serve --root {elsewhere}')" in r.stdout
    assert f"created user bob in {elsewhere}: " in r.stdout
    r = run_cli(["user", "add", "cy", "--password-stdin", "--root", str(elsewhere)], env=env, input="pw\n")
    assert r.code == 0 and "created the data root" not in r.stdout


def test_every_message_names_the_root(ferry_env: dict[str, str], root: Path) -> None:
    from cli_inproc import run_cli

    env = {"FERRY_HOME": ferry_env["FERRY_HOME"]}

    def ok(*args: str, stdin: str | None = None) -> str:
        r = run_cli(["user", *args, "--root", str(root)], env=env, input=stdin)
        assert r.code == 0, r
        assert str(root) in r.stdout + r.stderr, (args, r)
        return r.stdout

    ok("add", "bob", "--password-stdin", stdin="pw\n")
    ok("passwd", "bob", "--password-stdin", stdin="pw2\n")
    ok("mod", "bob", "--quota", "1G")
    ok("list")
    ok("del", "bob")
    ok("add", "bob", "--password-stdin", stdin="pw\n")
    r = run_cli(["user", "add", "bob", "--password-stdin", "--root", str(root)], env=env, input="pw\n")
    assert r.code == ExitCode.USAGE
    assert r.stderr == f"ferry: user 'bob' already exists (data root {root})\n"


def test_no_terminal_for_the_password_is_one_line(ferry_env: dict[str, str], root: Path) -> None:
    """`ferry user add NAME </dev/null` without a terminal: no GetPassWarning text, one line."""
    for args in (["add", "bob"], ["passwd", "ferry"]):
        if args[0] == "passwd":
            assert run(ferry_env, "add", "ferry", "--password-stdin", stdin="pw\n", root=root).returncode == 0
        proc = subprocess.run(
            [*FERRY, "user", *args, "--root", str(root)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=ferry_env,
            timeout=60,
            start_new_session=True,  # no controlling terminal: /dev/tty cannot be opened
        )
        assert_one_line_error(proc, ExitCode.USAGE, "no terminal to ask for the password of")
        assert "--password-stdin" in proc.stderr and "Warning" not in proc.stderr
    assert set(listed(ferry_env, root)) == {"ferry"}
