"""The resident connection (ferry.resident): real ``ferry serve`` and ``ferry`` processes, real
Unix sockets. The server's log counts the logins: a command through a resident process adds none.

Every test has its own runtime folder (FERRY_RUNTIME_DIR, short: socket paths are limited) and
stops the resident processes its commands left there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import ferry
from conftest import FERRY
from ferry import paths
from ferry.client.location import parse_location
from ferry.resident import runtime, spawn, thin
from serve_process import ServeProcess

DEADLINE = 20.0  # seconds any wait for a process here may take
#: A Python that another user may run (ours lives under root's private home here).
OTHER_PYTHON = shutil.which("python3", path="/usr/bin:/usr/local/bin:/bin")
AS_OTHER = pytest.mark.skipif(
    os.getuid() != 0 or OTHER_PYTHON is None, reason="another user's connection needs root and a system python3"
)


def run(env: dict[str, str], *args: str, cwd: Path | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FERRY, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def ok(p: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    return p


def logins(srv: ServeProcess) -> int:
    """Successful logins the server has logged so far."""
    return (srv.root / "logs" / "ferry.log").read_text().count(" login user=")


def gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}") or Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"


def wait_gone(pid: int, limit: float = DEADLINE) -> float:
    """Wait (bounded) until process ``pid`` has ended; the seconds it took."""
    t0 = time.monotonic()
    while not gone(pid):
        assert time.monotonic() - t0 < limit, f"process {pid} still runs after {limit} s"
        time.sleep(0.05)
    return time.monotonic() - t0


class Setup:
    """A server and a client environment with the resident connection on, in a runtime folder
    of its own."""

    def __init__(self, srv: ServeProcess, env: dict[str, str], home: Path) -> None:
        self.srv, self.env, self.home = srv, env, home
        self.dest = srv.remote("")  # ferry://ferry@127.0.0.1:PORT/

    def url(self, path: str) -> str:
        return self.srv.remote(path)

    def direct(self) -> dict[str, str]:
        return dict(self.env, FERRY_RESIDENT="0")

    def start(self, *extra: str) -> int:
        """``ferry resident start``: the pid of the resident process (it is ready on return)."""
        ok(run(self.env, "resident", "start", *extra, self.dest))
        found = self.residents()
        assert len(found) == 1, found
        return int(found[0]["pid"])  # type: ignore[call-overload]

    def residents(self) -> list[dict[str, object]]:
        return [info for _path, info in spawn.residents(self.env)]

    def socket(self) -> Path:
        found = list(Path(self.env["FERRY_RUNTIME_DIR"]).glob("*.sock"))
        assert len(found) == 1, found
        return found[0]

    def stop_all(self) -> None:
        pids = [int(info["pid"]) for info in self.residents()]  # type: ignore[call-overload]
        run(self.env, "resident", "stop")
        for pid in pids:
            try:
                wait_gone(pid, 10)
            except AssertionError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)  # ours: started by our own commands


def make_env(base: Path, srv_password: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["FERRY_HOME"] = str(base / "home")
    env["FERRY_RESIDENT"] = "60"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("FERRY_USER", None)
    env.pop("FERRY_TOKEN", None)
    if srv_password is not None:
        env["FERRY_PASSWORD"] = srv_password
    return env


@contextlib.contextmanager
def runtime_folder() -> Iterator[str]:
    folder = tempfile.mkdtemp(prefix="fr-", dir="/tmp")  # short: a socket path has 107 bytes
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    base = tmp_path_factory.mktemp("resident")
    srv = ServeProcess(base / "root", make_env(base)).start()
    try:
        yield srv
    finally:
        assert srv.stop() == 0


@pytest.fixture
def setup(served: ServeProcess, tmp_path: Path) -> Iterator[Setup]:
    with runtime_folder() as folder:
        env = make_env(tmp_path, served.password)
        env["FERRY_RUNTIME_DIR"] = folder
        s = Setup(served, env, tmp_path)
        try:
            yield s
        finally:
            s.stop_all()


def test_commands_go_through_one_login_and_print_what_direct_ones_print(setup: Setup, tmp_path: Path) -> None:
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    for i in range(20):
        (src / "sub" / f"f{i}").write_text(f"file {i}\n")
    setup.start()
    before = logins(setup.srv)
    sync = ok(run(setup.env, "sync", "-i", f"{src}/", setup.url("t1")))
    assert sync.stdout.count("\nnew     sub/f") == 20
    again = ok(run(setup.env, "sync", "-i", f"{src}/", setup.url("t1")))
    assert "new " not in again.stdout
    # relative paths are the caller's: the resident process runs in the caller's folder
    (tmp_path / "down").mkdir()
    ok(run(setup.env, "get", setup.url("t1/sub/f3"), "down/", cwd=tmp_path))
    assert (tmp_path / "down" / "f3").read_text() == "file 3\n"
    # standard output is the caller's own descriptor
    streamed = subprocess.run([*FERRY, "get", setup.url("t1/sub/f4"), "-"], env=setup.env, capture_output=True, timeout=60)
    assert streamed.returncode == 0 and streamed.stdout == b"file 4\n"
    cases = [["ls", "-l", setup.url("t1/sub")], ["stat", setup.url("t1/missing")], ["ls", setup.url("t1"), "--json"]]
    through = [run(setup.env, *c) for c in cases]
    assert logins(setup.srv) == before, "a command through the resident process logged in"
    assert setup.residents()[0]["commands"] == 4 + len(cases)
    direct = [run(setup.direct(), *c) for c in cases]
    assert logins(setup.srv) == before + len(cases)
    for c, a, b in zip(cases, through, direct, strict=True):
        assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr), c
    assert through[1].returncode == 4 and "no such file" in through[1].stderr


def test_a_direct_command_leaves_a_resident_process(setup: Setup) -> None:
    assert setup.residents() == []
    ok(run(setup.env, "mkdir", "-p", setup.url("left")))
    t0 = time.monotonic()
    while not setup.residents():  # it logs in on its own, in the background
        assert time.monotonic() - t0 < DEADLINE, "no resident process appeared"
        time.sleep(0.05)
    assert setup.socket().stat().st_mode & 0o777 == 0o600
    assert os.stat(setup.env["FERRY_RUNTIME_DIR"]).st_mode & 0o777 == 0o700
    before = logins(setup.srv)
    ok(run(setup.env, "ls", setup.url("")))
    assert logins(setup.srv) == before


def test_opting_out_and_other_credentials_connect_directly(setup: Setup) -> None:
    setup.start()
    before = logins(setup.srv)
    ok(run(setup.env, "ls", "--no-resident", setup.url("")))
    ok(run(setup.direct(), "ls", setup.url("")))
    assert logins(setup.srv) == before + 2
    # another password must not borrow the resident's login
    wrong = run(dict(setup.env, FERRY_PASSWORD="not-the-password"), "ls", setup.url(""))
    assert wrong.returncode == 3 and "refused" in wrong.stderr
    assert setup.residents()[0]["commands"] == 0


def test_a_stale_socket_is_removed_and_the_command_connects_itself(setup: Setup) -> None:
    pid = setup.start()
    sock = setup.socket()
    os.kill(pid, signal.SIGKILL)  # (started by our `ferry resident start`)
    wait_gone(pid)
    assert sock.exists()
    before = logins(setup.srv)
    listing = ok(run(setup.env, "ls", setup.url("")))
    assert logins(setup.srv) > before
    assert listing.stderr == ""
    # the stale name is gone, or now belongs to a new, live resident process
    assert not sock.exists() or all(info["pid"] != pid for info in setup.residents())


def test_the_resident_process_leaves_after_its_idle_time(setup: Setup) -> None:
    t0 = time.monotonic()
    pid = setup.start("--persist", "1")
    sock = setup.socket()
    wait_gone(pid)
    assert time.monotonic() - t0 >= 1.0
    assert not sock.exists()


def test_the_resident_process_leaves_when_its_connection_ends(tmp_path: Path) -> None:
    with runtime_folder() as folder:
        srv = ServeProcess(tmp_path / "root", make_env(tmp_path)).start()
        env = make_env(tmp_path, srv.password)
        env["FERRY_RUNTIME_DIR"] = folder
        s = Setup(srv, env, tmp_path)
        try:
            pid = s.start()
            sock = s.socket()
        finally:
            assert srv.stop() == 0
        wait_gone(pid)
        assert not sock.exists()


def test_a_changed_pin_ends_the_resident_process(setup: Setup) -> None:
    pid = setup.start()
    ok(run(setup.env, "known-hosts", "forget", f"127.0.0.1:{setup.srv.port}"))
    listing = ok(run(setup.env, "ls", setup.url("")))
    assert "first connection" in listing.stderr  # checked and pinned again, directly
    wait_gone(pid)


def test_ctrl_c_cancels_the_command_and_a_busy_resident_lets_others_connect(setup: Setup, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(1 << 20) * 12)
    setup.start()
    before = logins(setup.srv)
    slow = subprocess.Popen(
        [*FERRY, "put", "--bwlimit", "1M", str(big), setup.url("big.bin")],
        env=setup.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        t0 = time.monotonic()
        while not setup.residents()[0]["busy"]:
            assert time.monotonic() - t0 < DEADLINE and slow.poll() is None, "the put did not start"
            time.sleep(0.05)
        # one command at a time: another one meanwhile connects itself
        ok(run(setup.env, "ls", setup.url("")))
        assert logins(setup.srv) == before + 1
        slow.send_signal(signal.SIGINT)
        _out, err = slow.communicate(timeout=DEADLINE)
    finally:
        if slow.poll() is None:
            slow.kill()
            slow.wait()
    assert slow.returncode == 130, err
    assert "interrupted; run the same command again" in err
    info = setup.residents()[0]
    assert not info["busy"]
    # it still works, without a new login
    ok(run(setup.env, "put", str(big), setup.url("big.bin")))
    assert (setup.srv.root / "homes" / "ferry" / "big.bin").read_bytes() == big.read_bytes()
    assert logins(setup.srv) == before + 1


def test_peer_credentials_are_the_kernels() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert runtime.peer_credentials(a) == (os.getpid(), os.getuid(), os.getgid())
        assert runtime.same_user(a)



@AS_OTHER
def test_peer_credentials_of_another_user() -> None:
    assert OTHER_PYTHON is not None
    with runtime_folder() as folder:
        path = os.path.join(folder, "x.sock")
        os.chmod(folder, 0o755)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with listener:
            listener.bind(path)
            os.chmod(path, 0o777)
            listener.listen(1)
            child = subprocess.Popen(
                [OTHER_PYTHON, "-c", f"import socket,time; s=socket.socket(socket.AF_UNIX); s.connect({path!r}); time.sleep(5)"],
                user=65534,
                group=65534,
            )
            try:
                listener.settimeout(DEADLINE)
                conn, _ = listener.accept()
                with conn:
                    pid, uid, gid = runtime.peer_credentials(conn)
                    assert (pid, uid, gid) == (child.pid, 65534, 65534)
                    assert not runtime.same_user(conn)
            finally:
                child.kill()
                child.wait()


@AS_OTHER
def test_the_resident_process_answers_no_other_user(setup: Setup) -> None:
    assert OTHER_PYTHON is not None
    setup.start()
    folder, sock = setup.env["FERRY_RUNTIME_DIR"], setup.socket()
    # Open the way for a moment (the private folder is what normally keeps others out) to see
    # that the resident process itself checks who connects.
    os.chmod(folder, 0o711)
    os.chmod(sock, 0o666)
    try:
        probe = (
            "import socket,sys; s=socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])\n"
            "try:\n"
            "    s.sendall(b'FRY1\\0\\0\\0\\4info'); print(repr(s.recv(100)))\n"
            "except (BrokenPipeError, ConnectionResetError): print('closed')"
        )
        other = subprocess.run([OTHER_PYTHON, "-c", probe, str(sock)], user=65534, group=65534,
                               capture_output=True, text=True, timeout=DEADLINE)  # fmt: skip
    finally:
        os.chmod(sock, 0o600)
        os.chmod(folder, 0o700)
    assert other.stdout.strip() in ("b''", "closed"), other  # closed without a word
    # the same request from us is answered
    assert spawn.ask(str(sock), b"info") is not None


def test_a_runtime_folder_others_may_enter_is_not_used(tmp_path: Path) -> None:
    with runtime_folder() as folder:
        env = {"FERRY_RUNTIME_DIR": folder}
        assert runtime.runtime_dir(env) == folder
        os.chmod(folder, 0o755)
        assert runtime.runtime_dir(env) is None
        os.chmod(folder, 0o700)
        link = os.path.join(folder, "link")
        os.symlink(folder, link)
        assert runtime.runtime_dir({"FERRY_RUNTIME_DIR": link}) is None


@pytest.mark.parametrize(
    "argv",
    [
        ["sync", "-i", "--exclude", "x:y", "src/", "ann@box.example:dst"],
        ["sync", "src/", "ferry://ann@Box.Example:7400/dst", "--delete"],
        ["ls", "-P", "7401", "box:"],
        ["ls", "-P7401", "box:"],
        ["get", "--port=7401", "ann@[::1]:f", "."],
        ["put", "a", "b", "[::1]:dir/"],
        ["df", "ann@box"],
        ["stat", "--plain", "box:x"],
        ["mv", "box:a", "b"],
    ],
)
def test_the_thin_client_finds_the_destination_the_command_line_finds(argv: list[str], tmp_path: Path) -> None:
    env = {"FERRY_HOME": str(tmp_path), "USER": "me", "HOME": str(tmp_path)}
    command, args = argv[0], argv[1:]
    port = None
    for i, a in enumerate(args):
        if a in ("-P", "--port"):
            port = int(args[i + 1])
        elif a.startswith("-P") and a[2:].isdigit():
            port = int(a[2:])
        elif a.startswith("--port="):
            port = int(a.split("=")[1])
    remote = next(a for a in args if (":" in a or command == "df") and not a.startswith("-") and a != "x:y")
    loc = parse_location(remote if ":" in remote else remote + ":")
    expected = runtime.key_string(str(tmp_path), loc.user or "me", loc.host, port or loc.port, "--plain" in args)
    assert thin.command_key(argv, env) == expected


def test_the_thin_client_gives_up_on_what_it_cannot_tell() -> None:
    env = {"FERRY_HOME": "/nowhere", "USER": "me"}
    assert thin.command_key(["sync", "a/", "b/"], env) is None  # no remote side
    assert thin.command_key(["ls", "one:", "two:"], env) is None  # two servers
    assert thin.command_key(["ls", "--no-resident", "one:"], env) is None
    assert thin.command_key(["put", "-", "one:x"], env) is None  # standard input stays here
    assert thin.command_key(["get", "one:x", "-"], env) is not None
    assert thin.try_resident(["exec", "box", "true"], env) is None
    assert thin.try_resident(["ls", "box:"], dict(env, FERRY_RESIDENT="0")) is None


@pytest.mark.parametrize(
    "env",
    [{"FERRY_HOME": "/a/b"}, {"FERRY_HOME": "~/x", "HOME": "/h"}, {"XDG_CONFIG_HOME": "/x", "HOME": "/h"},
     {"XDG_CONFIG_HOME": "rel", "HOME": "/h"}, {"HOME": "/h"}],
)
def test_the_client_folder_is_found_as_ferry_paths_finds_it(env: dict[str, str]) -> None:
    assert runtime.client_home(env) == str(paths.client_home(env))


def test_the_socket_name_fits_and_differs_per_destination() -> None:
    assert runtime.key_string("/h", "ann", "box", 7373, False).startswith(ferry.__version__ + "\0")
    a = runtime.socket_name(runtime.key_string("/h", "ann", "box", 7373, False))
    b = runtime.socket_name(runtime.key_string("/h", "ann", "box", 7373, True))
    assert a != b and len(a) == len("0123456789abcdef.sock")




def test_a_plain_connection_warns_through_the_resident_as_directly(tmp_path: Path) -> None:
    with runtime_folder() as folder:
        srv = ServeProcess(tmp_path / "root", make_env(tmp_path), plain=True).start()
        env = make_env(tmp_path, srv.password)
        env["FERRY_RUNTIME_DIR"] = folder
        s = Setup(srv, env, tmp_path)
        try:
            ok(run(env, "resident", "start", "--plain", s.dest))
            before = logins(srv)
            through = ok(run(env, "ls", "--plain", s.url("")))
            assert logins(srv) == before
            direct = ok(run(s.direct(), "ls", "--plain", s.url("")))
            assert (through.stdout, through.stderr) == (direct.stdout, direct.stderr)
            assert "warning: --plain" in through.stderr
            # TLS and plain are two destinations: a TLS command does not use it
            tls = run(env, "ls", s.url(""))
            assert tls.returncode == 6
        finally:
            s.stop_all()
            assert srv.stop() == 0
