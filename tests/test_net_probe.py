"""Tests of ``ferry net probe``: open, closed and unanswered ports on loopback, and exit statuses."""

from __future__ import annotations

import errno
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from conftest import FERRY
from ferry.cli import main
from ferry.errors import ExitCode
from ferry.net.probe import ProbeResult, Status, _classify, probe, probe_one
from ferry.net.target import HostPort

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def open_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield int(listener.getsockname()[1])


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on: bind it, then close it (the kernel answers with RST)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A port whose SYNs go unanswered: a listener with a full accept queue that never accepts.

    Linux drops SYNs while the accept queue is full, so a connect there times out. Skips where the
    kernel behaves differently (e.g. answers with RST or SYN cookies).
    """
    fillers: list[socket.socket] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        try:
            for _ in range(16):  # bounded: the queue holds one or two on Linux
                c = socket.socket()
                fillers.append(c)
                c.settimeout(0.2)
                result = c.connect_ex(("127.0.0.1", port))
                if result != 0:
                    break
            else:
                pytest.skip("could not fill the accept queue on this kernel")
            if result == errno.ECONNREFUSED:
                pytest.skip("this kernel refuses instead of dropping when the queue is full")
            yield port
        finally:
            for c in fillers:
                c.close()


def run_cli(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``ferry net probe ARGS`` in-process; returns exit status, stdout, stderr."""
    with pytest.raises(SystemExit) as info:
        main(["net", "probe", *args])
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def test_open_port_exit_0(open_port: int) -> None:
    proc = subprocess.run([*FERRY, "net", "probe", f"127.0.0.1:{open_port}"], capture_output=True, text=True, timeout=20)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"127.0.0.1:{open_port} open\n", "")


def test_closed_port_exit_1(closed_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(f"127.0.0.1:{closed_port}", capsys=capsys)
    assert (code, out) == (ExitCode.ERROR, f"127.0.0.1:{closed_port} closed\n")


def test_mixed_targets_keep_order(open_port: int, closed_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(
        f"127.0.0.1:{closed_port}", f"localhost:{open_port}", f"127.0.0.1:{open_port}", capsys=capsys
    )
    assert code == 1
    assert out.splitlines() == [
        f"127.0.0.1:{closed_port} closed",
        f"localhost:{open_port} open",
        f"127.0.0.1:{open_port} open",
    ]


@pytest.mark.parametrize("bad", ["127.0.0.1:65536", "127.0.0.1:0", "127.0.0.1", "127.0.0.1:x", "::1:22"])
def test_usage_errors_exit_2_before_probing(bad: str, open_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(f"127.0.0.1:{open_port}", bad, capsys=capsys)
    assert code == ExitCode.USAGE
    assert out == ""  # nothing was probed: the bad target was rejected first
    assert err.startswith("ferry: ")


def test_no_targets_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = run_cli(capsys=capsys)
    assert code == ExitCode.USAGE


def test_timeout_and_concurrency(unanswered_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    target = HostPort("127.0.0.1", unanswered_port)
    assert probe_one(target, 0.2).status is Status.TIMEOUT
    # Four unanswered targets cost about one timeout, not four: they are probed concurrently.
    start = time.monotonic()
    results = probe([target] * 4, 0.5)
    elapsed = time.monotonic() - start
    assert [r.status for r in results] == [Status.TIMEOUT] * 4
    assert elapsed < 1.5, f"probes ran one after another ({elapsed:.2f} s)"
    code, out, _ = run_cli("--timeout", "0.2", f"127.0.0.1:{unanswered_port}", capsys=capsys)
    assert (code, out) == (1, f"127.0.0.1:{unanswered_port} timeout\n")


def test_unknown_host_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated resolver failure: tests never query real DNS.
    def no_such_host(*args: object, **kwargs: object) -> list[object]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    result = probe_one(HostPort("no.such.host.invalid", 80), 1.0)
    assert result == ProbeResult(HostPort("no.such.host.invalid", 80), Status.ERROR, "unknown-host")
    assert result.line() == "no.such.host.invalid:80 error unknown-host"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (0, (Status.OPEN, "")),
        (errno.ECONNREFUSED, (Status.CLOSED, "")),
        (errno.EWOULDBLOCK, (Status.TIMEOUT, "")),
        (errno.ETIMEDOUT, (Status.TIMEOUT, "")),
        (errno.EHOSTUNREACH, (Status.ERROR, "EHOSTUNREACH")),
        (errno.ENETUNREACH, (Status.ERROR, "ENETUNREACH")),
    ],
)
def test_classify_connect_ex_results(code: int, expected: tuple[Status, str]) -> None:
    assert _classify(code) == expected


def test_ipv6_line_format() -> None:
    assert ProbeResult(HostPort("::1", 22), Status.OPEN).line() == "[::1]:22 open"
