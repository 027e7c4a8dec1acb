"""Messages a user can act on: words, not ``[Errno N]``; addresses as users write them."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from cli_inproc import run_cli
from conftest import free_port
from ferry.errors import ExitCode
from ferry.errtext import os_reason


def test_connection_refused_in_words_with_a_bracketed_ipv6_address(tmp_path: Path) -> None:
    env = {"FERRY_HOME": str(tmp_path / "h"), "FERRY_PASSWORD": "x"}
    for host, shown in (("127.0.0.1", "127.0.0.1"), ("[::1]", "[::1]")):
        port = free_port(host.strip("[]"))  # nothing listens there any more
        r = run_cli(["ls", "-P", str(port), f"{host}:"], env=env)
        assert r.code == ExitCode.CONNECTION
        assert r.stderr == f"ferry: cannot connect to {shown}:{port}: connection refused\n"


def test_missing_password_file_is_named_without_errno(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-password.txt"
    r = run_cli(["ls", "--password-file", str(missing), "127.0.0.1:"], env={"FERRY_HOME": str(tmp_path)})
    assert r.code == ExitCode.USAGE
    assert r.stderr == f"ferry: cannot read a password from --password-file {missing}: no such file or folder\n"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    r = run_cli(["ls", "--password-file", str(empty), "127.0.0.1:"], env={"FERRY_HOME": str(tmp_path)})
    assert r.code == ExitCode.USAGE and "Errno" not in r.stderr and str(empty) in r.stderr


def test_os_reason_words() -> None:
    assert os_reason(FileNotFoundError(2, "No such file or directory", "pw.txt")) == "no such file or folder"
    # asyncio's texts: one address, and a host name with several addresses
    assert os_reason(OSError(111, "Connect call failed ('::1', 7373, 0, 0)")) == "connection refused"
    several = OSError(
        "Multiple exceptions: [Errno 111] Connect call failed ('::1', 7373, 0, 0), "
        "[Errno 111] Connect call failed ('127.0.0.1', 7373)"
    )
    assert os_reason(several) == "connection refused"
    assert os_reason(socket.gaierror(-2, "Name or service not known")) == "name or service not known"
    assert os_reason(ConnectionResetError()) == "connection reset by peer"  # never an empty reason
    assert os_reason(OSError()) == "OSError"
    for exc in (FileNotFoundError(2, "x", "f"), OSError(13, "Permission denied")):
        assert "Errno" not in os_reason(exc)
    import ssl

    bad_cert = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    bad_cert.verify_message = "unable to get local issuer certificate"
    assert os_reason(bad_cert) == "certificate verify failed: unable to get local issuer certificate"
    plain = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    plain.reason = "WRONG_VERSION_NUMBER"
    assert os_reason(plain) == "TLS error (WRONG_VERSION_NUMBER)"


def test_net_tools_say_it_in_words_too(tmp_path: Path) -> None:
    r = run_cli(["net", "fetch", "-o", str(tmp_path / "no-such-dir" / "x"), "http://127.0.0.1:1/"])
    assert r.code == ExitCode.USAGE
    assert r.stderr == f"ferry: cannot write {tmp_path / 'no-such-dir' / 'x'}: no such file or folder\n"


@pytest.mark.parametrize("ipv6", [True, False])
def test_location_address_brackets_ipv6(ipv6: bool) -> None:
    from ferry.client.location import format_address

    assert format_address("::1" if ipv6 else "h", 1) == ("[::1]:1" if ipv6 else "h:1")
